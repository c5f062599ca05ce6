"""Log records: structured ``extra=`` fields on the retry and throttle records, one summary
per interval for a 429 storm, and never a credential; against FakeKlarna over loopback."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klarna_om_async import (
    CaptureNotAllowedError,
    CaptureRequest,
    KlarnaOM,
    RetryPolicy,
)
from klarna_om_async.middleware import Request, log_fields
from klarna_om_async.testing import (
    DropConnection,
    FakeKlarna,
    InstantSleep,
    RateLimited,
    ServerFailure,
)
from klarna_om_async.testing._auth import basic_auth_header
from klarna_om_async.throttle import LOG_INTERVAL

RETRY = "klarna_om_async.retry"
THROTTLE = "klarna_om_async.throttle"
CAPTURES = "/ordermanagement/v1/orders/{}/captures"


@pytest.fixture(autouse=True)
def propagating(monkeypatch: pytest.MonkeyPatch) -> None:
    """The records reach caplog's handler even if a CLI test turned propagation off."""
    monkeypatch.setattr(logging.getLogger("klarna_om_async"), "propagate", True)


def client(fake: FakeKlarna, sleeps: InstantSleep, **kwargs: object) -> KlarnaOM:
    """A client of ``fake`` with 4 attempts and instant, un-jittered retries (not started)."""
    policy = RetryPolicy(max_attempts=4, jitter=lambda d: d, sleep=sleeps)
    return KlarnaOM(
        fake.username,
        fake.password,
        base_url=fake.base_url,
        retry=policy,
        clock=kwargs.pop("clock", sleeps.clock),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def records(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == name]


async def test_a_retried_capture_logs_one_warning_with_its_fields(
    fake: FakeKlarna, sleeps: InstantSleep, caplog: pytest.LogCaptureFixture
) -> None:
    order_id = fake.add_order(amount=6000)
    fake.inject(ServerFailure(503), method="POST", path="/captures")
    fake.inject(DropConnection(), method="POST", path="/captures")
    with caplog.at_level(logging.DEBUG, logger="klarna_om_async"):
        async with client(fake, sleeps) as om:
            created = await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
    assert created.attempts == 3

    first, second = records(caplog, RETRY)
    assert (first.levelno, second.levelno) == (logging.WARNING, logging.WARNING)
    path = CAPTURES.format(order_id)
    assert first.method == "POST"  # type: ignore[attr-defined]
    assert first.path == path  # type: ignore[attr-defined]
    assert first.order_id == order_id  # type: ignore[attr-defined]
    assert first.idempotency_key == created.idempotency_key  # type: ignore[attr-defined]
    assert first.attempt == 1  # type: ignore[attr-defined]
    assert first.status == 503  # type: ignore[attr-defined]
    assert isinstance(first.correlation_id, str)  # type: ignore[attr-defined]
    assert first.correlation_id  # type: ignore[attr-defined]
    assert first.error == "ServerError"  # type: ignore[attr-defined]
    assert first.delay == sleeps.waits[0]  # type: ignore[attr-defined]
    message = first.getMessage()
    assert f"POST {path} failed (attempt 1: ServerError 503)" in message
    assert created.idempotency_key in message

    # A dropped connection has no status or correlation id, but the same key.
    assert second.attempt == 2  # type: ignore[attr-defined]
    assert second.status is None  # type: ignore[attr-defined]
    assert second.correlation_id is None  # type: ignore[attr-defined]
    assert second.error == "KlarnaConnectionError"  # type: ignore[attr-defined]
    assert second.idempotency_key == created.idempotency_key  # type: ignore[attr-defined]
    assert records(caplog, THROTTLE) == []


def test_log_fields_read_the_order_id_and_drop_the_query() -> None:
    fields = log_fields(Request("GET", "/ordermanagement/v1/orders/a%2Fb/captures?x=secret#f"))
    assert fields["order_id"] == "a/b"
    assert fields["path"] == "/ordermanagement/v1/orders/a%2Fb/captures"
    assert log_fields(Request("GET", "/elsewhere"))["order_id"] is None


class ManualClock:
    """A clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_429_storm_logs_one_summary_per_interval(
    fake: FakeKlarna, sleeps: InstantSleep, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    orders = [fake.add_order(amount=1000) for _ in range(20)]
    fake.inject(RateLimited("1"), times=60, method="POST", path="/captures")
    with caplog.at_level(logging.DEBUG, logger="klarna_om_async"):
        async with client(fake, sleeps, clock=clock) as om:
            request = CaptureRequest(captured_amount=1000)
            await asyncio.gather(*(om.captures.create(order, request) for order in orders))
            assert om.rate_limited_count == 60
            # Every 429 came within one interval: one record, at the first, at INFO.
            first = [r for r in records(caplog, THROTTLE) if r.levelno >= logging.INFO]
            assert len(first) == 1
            assert first[0].levelno == logging.INFO
            assert first[0].rate_limited == 1  # type: ignore[attr-defined]
            assert first[0].status == 429  # type: ignore[attr-defined]
            assert first[0].getMessage().startswith("Klarna rate limited a request (429")

            clock.now += LOG_INTERVAL  # the next answer after the interval tells the rest
            await om.orders.get(orders[0])
            await om.orders.get(orders[0])

    summaries = [r for r in records(caplog, THROTTLE) if r.levelno >= logging.INFO]
    assert len(summaries) == 2
    summary = summaries[1]
    assert summary.rate_limited == 59  # type: ignore[attr-defined]
    assert summary.interval == LOG_INTERVAL  # type: ignore[attr-defined]
    assert summary.status == 429  # type: ignore[attr-defined]
    assert summary.order_id in orders  # type: ignore[attr-defined]
    assert summary.getMessage().startswith(
        "Klarna rate limited 59 requests in the last 10 s (429; the last: RateLimitError: POST"
    )
    pace = summary.pace  # type: ignore[attr-defined]
    assert pace is None or f"pace now {pace:.1f} requests/s" in summary.getMessage()
    # Each retry after a 429 is a DEBUG record only: nothing per 429 at INFO or above.
    retries = records(caplog, RETRY)
    assert len(retries) == 60
    assert {record.levelno for record in retries} == {logging.DEBUG}
    assert {record.status for record in retries} == {429}  # type: ignore[attr-defined]


async def test_the_429s_of_the_last_interval_are_logged_as_the_client_closes(
    fake: FakeKlarna, sleeps: InstantSleep, caplog: pytest.LogCaptureFixture
) -> None:
    # No answer came after them to write their summary: 50 429s, 38 of them logged.
    clock = ManualClock()
    orders = [fake.add_order(amount=1000) for _ in range(20)]
    fake.inject(RateLimited("1"), times=30, method="POST", path="/captures")
    with caplog.at_level(logging.INFO, logger="klarna_om_async"):
        async with client(fake, sleeps, clock=clock) as om:
            request = CaptureRequest(captured_amount=1000)
            await asyncio.gather(*(om.captures.create(order, request) for order in orders))
    summaries = records(caplog, THROTTLE)
    assert sum(r.rate_limited for r in summaries) == 30  # type: ignore[attr-defined]


async def credentials_scenario(username: str, password: str) -> None:
    sleeps = InstantSleep()
    async with FakeKlarna(username=username, password=password) as fake:
        order_id = fake.add_order(amount=1000)
        fake.inject(ServerFailure(503), method="POST", path="/captures")
        fake.inject(RateLimited("1"), method="POST", path="/captures")
        fake.inject(DropConnection(), method="POST", path="/captures")
        async with client(fake, sleeps) as om:
            await om.captures.create(order_id, CaptureRequest(captured_amount=600))
            with pytest.raises(CaptureNotAllowedError):
                await om.captures.create(order_id, CaptureRequest(captured_amount=600))
        assert fake.requests[0].headers["Authorization"] == basic_auth_header(username, password)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    username=st.text(
        st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40
    ).filter(lambda name: ":" not in name),
    # Long enough not to turn up by chance inside an id, a URL or a traceback, and ending in
    # a character no message holds: Hypothesis also draws words of the code under test
    # ("RateLimitErr" is in every 429's log line).
    password=st.text(
        st.characters(blacklist_categories=("Cc", "Cs")), min_size=12, max_size=40
    ).map(lambda text: text + "\u2603"),
)
def test_no_credentials_in_any_log_record(
    username: str, password: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="klarna_om_async"):
        asyncio.run(credentials_scenario(username, password))
    ours = [record for record in caplog.records if record.name.startswith("klarna_om_async")]
    assert {record.name for record in ours} >= {RETRY, THROTTLE}
    header = basic_auth_header(username, password)
    for record in ours:
        texts = [record.getMessage(), *(str(value) for value in vars(record).values())]
        for text in texts:
            assert password not in text
            assert header.removeprefix("Basic ") not in text
