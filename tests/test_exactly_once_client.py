"""Exactly-once through the whole client: bounded 429 pauses, the 201's capture id, key reuse
and the key of a cancelled call. Against FakeKlarna (or a tiny aiohttp server) over loopback."""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest

import klarna_om_async
from klarna_om_async import (
    AuthenticationError,
    BatchItem,
    CaptureRequest,
    CaptureStatus,
    KlarnaConnectionError,
    KlarnaOM,
    KlarnaResponseError,
    RateLimitError,
    Request,
    Response,
    RetryPolicy,
    ServerError,
    ValidationError,
    new_idempotency_key,
)
from klarna_om_async.errors import parse_retry_after
from klarna_om_async.middleware import Handler
from klarna_om_async.testing import (
    Delay,
    DropAfterProcessing,
    FakeKlarna,
    InstantSleep,
    RateLimited,
    ServerFailure,
)

NOTE = re.compile(r"Klarna-Idempotency-Key: (\S+) - .*idempotency_key='(\S+)' within 24 hours .*")


class VirtualTime(InstantSleep):
    """InstantSleep on a virtual clock: every wait moves ``now`` on, as a real sleep would."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def __call__(self, seconds: float) -> None:
        await super().__call__(seconds)
        self.now += seconds


def virtual_client(fake: FakeKlarna, time: VirtualTime, **policy: float) -> KlarnaOM:
    """A client of ``fake`` whose retries, deadlines and 429 pauses all run on ``time``."""
    retry = RetryPolicy(jitter=lambda d: d, sleep=time, **policy)  # type: ignore[arg-type]
    return KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, retry=retry, clock=time.clock
    )


def capture_posts(fake: FakeKlarna, order_id: str | None = None) -> list[str | None]:
    """The keys of the capture POSTs the fake received (for one order, if given)."""
    return [
        r.idempotency_key
        for r in fake.requests
        if r.method == "POST"
        and r.path.endswith("/captures")
        and (order_id is None or f"/{order_id}/" in r.path)
    ]


# -- 1. pauses are bounded ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "Infinity", "-inf", "nan", "1e999", "-1", "-0.5"])
def test_a_retry_after_that_is_no_usable_wait_counts_as_absent(value: str) -> None:
    assert parse_retry_after(value) is None


def test_a_retry_after_of_zero_or_a_past_date_is_no_wait() -> None:
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=1_000_000_000) == 0.0


@pytest.mark.parametrize(
    ("retry_after", "waits"),
    [
        ("3600", [30.0]),  # capped at retry_after_cap; the pause ends with the retry's wait
        ("inf", [0.5, 0.5]),  # as if absent: backoff's 0.5 s, then the rest of the 1 s pause
    ],
)
async def test_a_huge_retry_after_never_stalls_a_call_past_its_deadline(
    fake: FakeKlarna, retry_after: str, waits: list[float]
) -> None:
    time = VirtualTime()
    first, later = fake.add_order(amount=100), fake.add_order(amount=100)
    fake.inject(RateLimited(retry_after=retry_after), method="POST")
    async with virtual_client(fake, time, max_attempts=4, retry_after_cap=30, deadline=60) as om:
        await om.captures.create(first, CaptureRequest(captured_amount=100))
        await om.captures.create(later, CaptureRequest(captured_amount=100))
    assert time.waits == waits
    assert sum(time.waits) <= om.retry_policy.deadline
    assert len(fake.booked_captures) == 2


async def test_a_later_call_waits_out_at_most_the_capped_pause(fake: FakeKlarna) -> None:
    time = VirtualTime()
    limited, later = fake.add_order(amount=100), fake.add_order(amount=100)
    fake.inject(RateLimited(retry_after="3600"), method="POST")
    async with virtual_client(fake, time, max_attempts=1, retry_after_cap=30, deadline=60) as om:
        with pytest.raises(RateLimitError):
            await om.captures.create(limited, CaptureRequest(captured_amount=100))
        time.now += 1.0
        await om.captures.create(later, CaptureRequest(captured_amount=100))
    assert time.waits == [29.0]
    assert [c.order_id for c in fake.booked_captures] == [later]


async def test_a_pause_past_the_deadline_fails_at_once_and_sends_nothing(
    fake: FakeKlarna,
) -> None:
    time = VirtualTime()
    limited, later = fake.add_order(amount=100), fake.add_order(amount=100)
    fake.inject(RateLimited(retry_after="3600"), method="POST")
    async with virtual_client(fake, time, max_attempts=4, retry_after_cap=30, deadline=10) as om:
        with pytest.raises(RateLimitError) as first:
            await om.captures.create(limited, CaptureRequest(captured_amount=100))
        time.now += 1.0
        key = new_idempotency_key()
        with pytest.raises(RateLimitError) as caught:
            await om.captures.create(
                later, CaptureRequest(captured_amount=100), idempotency_key=key
            )
    # Neither call waited: 30 s of pause (capped from an hour) outlasts a 10 s deadline.
    assert time.waits == []
    assert first.value.attempts == 1
    assert capture_posts(fake, later) == []
    error = caught.value
    # Nothing sent now; but the caller gave the key, which an earlier call may have sent:
    # a 429 says nothing of that, so the outcome stays unknown until a retry under the key.
    assert not first.value.outcome_unknown
    assert error.outcome_unknown
    assert f"Retry with idempotency_key={key!r}" in str(error)
    assert (error.method, error.idempotency_key, error.attempts) == ("POST", key, 0)  # none sent
    assert error.url == f"{fake.base_url}/ordermanagement/v1/orders/{later}/captures"
    assert error.retry_after == 29.0
    assert "not sent" in str(error)
    assert fake.booked_captures == []


@pytest.mark.parametrize("busy", ["429s past the deadline", "a 401"])
async def test_a_retry_under_a_key_that_may_have_booked_stays_unknown_on_an_answer_before_it(
    fake: FakeKlarna, busy: str
) -> None:
    """The first call under the caller's key was booked and its answer lost; the retry, as
    the docs say, met only 429s (or a 401 after a credential rotation) and was told its
    outcome was known: "refused, nothing captured". The caller's new key then booked a
    second time (helper-88). Such an answer comes before Klarna's idempotency: unknown."""
    time = VirtualTime()
    order_id = fake.add_order(amount=10_000)
    request = CaptureRequest(captured_amount=3000, reference="box-1")
    key = new_idempotency_key()
    async with virtual_client(fake, time, max_attempts=1, retry_after_cap=30, deadline=10) as om:
        fake.inject(DropAfterProcessing(), method="POST")
        with pytest.raises(KlarnaConnectionError) as lost:
            await om.captures.create(order_id, request, idempotency_key=key)
        assert lost.value.outcome_unknown
        if busy == "a 401":
            retrying = KlarnaOM(fake.username, "rotated", base_url=fake.base_url)
        else:
            fake.inject(RateLimited(retry_after="3600"), method="POST", times=None)
            retrying = om
        with pytest.raises((RateLimitError, AuthenticationError)) as again:
            await retrying.captures.create(order_id, request, idempotency_key=key)
        if retrying is not om:
            await retrying.close()
        fake.clear_faults()
        assert again.value.outcome_unknown
        assert f"Retry with idempotency_key={key!r}" in str(again.value)
        time.now += 60  # past the pause the 429s set
        done = await om.captures.create(order_id, request, idempotency_key=key)
    assert [c.capture_id for c in fake.captures(order_id)] == [done.capture_id]


@pytest.mark.parametrize("how", ["a single call", "a batch item"])
async def test_a_key_reused_for_another_request_says_the_earlier_one_may_have_booked(
    fake: FakeKlarna, how: str
) -> None:
    """The first call under the key was booked, its answer lost; the same key with a
    changed request was refused as a ValidationError saying nothing of that (helper-90), and
    a batch took it for a refusal (``refused``: helper-91): a new key for the changed request
    booked again. It names the key, unknown (a batch item is failed)."""
    time = VirtualTime()
    order_id = fake.add_order(amount=10_000)
    key = new_idempotency_key()
    async with virtual_client(fake, time, max_attempts=1) as om:
        fake.inject(DropAfterProcessing(), method="POST")
        with pytest.raises(KlarnaConnectionError):
            await om.captures.create(
                order_id, CaptureRequest(captured_amount=1000), idempotency_key=key
            )
        changed = CaptureRequest(captured_amount=1000, reference="r1")
        if how == "a single call":
            with pytest.raises(ValidationError) as reused:
                await om.captures.create(order_id, changed, idempotency_key=key)
            error: Exception | None = reused.value
        else:
            item = BatchItem(order_id=order_id, request=changed, idempotency_key=key)
            [outcome] = [o async for o in om.capture_many([item])]
            assert (outcome.status, outcome.idempotency_key) == (CaptureStatus.FAILED, key)
            error = outcome.error
    assert isinstance(error, ValidationError)
    assert "already used for a different request" in str(error)
    assert error.outcome_unknown
    assert error.idempotency_key == key
    assert len(fake.captures(order_id)) == 1


# -- 2. the 201's capture id ----------------------------------------------------------------


CAPTURES = "{origin}/ordermanagement/v1/orders/o1/captures"


@pytest.mark.parametrize(
    "headers",
    [
        {"Location": CAPTURES + "/"},
        {"Location": CAPTURES + "/?status=pending"},
        {"Location": CAPTURES + "/#latest"},
        {"Location": CAPTURES},
        {"Location": "/foo/bar"},
        # Another order's capture: a reused key, not an unknown outcome (test_key_reuse.py).
        {"Location": "https://elsewhere.example/captures/abc"},
        {"Location": "http://[::1"},
        {"Capture-Id": " ", "Location": CAPTURES + "/"},
        {"Capture-Id": "", "Location": "/foo/bar"},
        {},
    ],
)
async def test_a_201_without_a_capture_id_is_an_unknown_outcome_with_the_key(
    answer_201: tuple[dict[str, str], KlarnaOM], headers: dict[str, str]
) -> None:
    sent, om = answer_201
    sent.update(headers)
    key = new_idempotency_key()
    with pytest.raises(KlarnaResponseError) as caught:
        await om.captures.create("o1", CaptureRequest(captured_amount=5), idempotency_key=key)
    error = caught.value
    assert error.status == 201
    assert error.outcome_unknown
    assert error.idempotency_key == key
    assert error.attempts == 1
    assert repr(key) in str(error)


@pytest.mark.parametrize(
    ("headers", "capture_id"),
    [
        ({"Location": CAPTURES + "/cap-1?status=pending#top"}, "cap-1"),
        ({"Location": "/ordermanagement/v1/orders/o1/captures/cap%2F2"}, "cap/2"),
        ({"Capture-Id": "cap-3", "Location": "/foo/bar"}, "cap-3"),
        ({"Capture-Id": " cap-4 "}, "cap-4"),
        ({"Capture-Id": " ", "Location": CAPTURES + "/cap-5"}, "cap-5"),
    ],
)
async def test_the_capture_id_comes_from_capture_id_or_a_capture_location(
    answer_201: tuple[dict[str, str], KlarnaOM], headers: dict[str, str], capture_id: str
) -> None:
    sent, om = answer_201
    sent.update(headers)
    created = await om.captures.create("o1", CaptureRequest(captured_amount=5))
    assert created.capture_id == capture_id


# -- 3. one key, one request ----------------------------------------------------------------


async def test_one_key_for_two_different_captures_books_one_and_refuses_the_other_unsent(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=10_000)
    key = new_idempotency_key()
    results = await asyncio.gather(
        om.captures.create(order_id, CaptureRequest(captured_amount=1000), idempotency_key=key),
        om.captures.create(order_id, CaptureRequest(captured_amount=2000), idempotency_key=key),
        return_exceptions=True,
    )
    [created] = [r for r in results if isinstance(r, klarna_om_async.CaptureCreated)]
    [refused] = [r for r in results if isinstance(r, ValidationError)]
    assert refused.field == "idempotency_key"
    assert "already used for a different request" in str(refused)
    assert "new key" in str(refused)
    assert "\n" not in str(refused)
    [booked] = fake.booked_captures
    assert booked.capture_id == created.capture_id
    assert capture_posts(fake) == [key]


async def test_one_key_for_the_same_capture_twice_books_it_once(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=10_000)
    key = new_idempotency_key()
    first, second = await asyncio.gather(  # equal requests, not the same object
        om.captures.create(order_id, CaptureRequest(captured_amount=1000), idempotency_key=key),
        om.captures.create(order_id, CaptureRequest(captured_amount=1000), idempotency_key=key),
    )
    [booked] = fake.booked_captures
    assert first.capture_id == second.capture_id == booked.capture_id


async def test_after_an_unknown_outcome_only_the_same_request_may_reuse_the_key(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=6000)
    fake.inject(ServerFailure(503), method="POST", times=4)
    with pytest.raises(ServerError) as caught:
        await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
    key = caught.value.idempotency_key
    assert key is not None
    sent = len(fake.requests)
    with pytest.raises(ValidationError, match="idempotency_key"):
        await om.captures.create(
            order_id, CaptureRequest(captured_amount=5000), idempotency_key=key
        )
    with pytest.raises(ValidationError, match="idempotency_key"):
        await om.captures.trigger_send_out(order_id, "c1", idempotency_key=key)
    assert len(fake.requests) == sent
    created = await om.captures.create(
        order_id, CaptureRequest(captured_amount=6000), idempotency_key=key
    )
    [booked] = fake.booked_captures
    assert created.capture_id == booked.capture_id


# -- 4. a cancelled call still tells its key ------------------------------------------------


def test_new_idempotency_key_is_public_and_makes_fresh_uuid4s() -> None:
    assert "new_idempotency_key" in klarna_om_async.__all__
    keys = {new_idempotency_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(uuid.UUID(k).version == 4 for k in keys)


def noted_key(exc: BaseException) -> str:
    """The key in the one note the client added to ``exc``."""
    [note] = [n for n in getattr(exc, "__notes__", ()) if n.startswith("Klarna-Idempotency")]
    match = NOTE.fullmatch(note)
    assert match is not None, note
    assert match[1] == match[2]
    return match[1]


@pytest.mark.parametrize("own_key", [True, False])
async def test_a_timed_out_capture_tells_its_key_and_a_retry_with_it_books_nothing_new(
    om: KlarnaOM, fake: FakeKlarna, own_key: bool
) -> None:
    order_id = fake.add_order(amount=6000)
    fake.inject(Delay(1.0, after_processing=True), method="POST")
    request = CaptureRequest(captured_amount=6000)
    key = new_idempotency_key() if own_key else None
    with pytest.raises(TimeoutError) as caught:
        async with asyncio.timeout(0.3):
            await om.captures.create(order_id, request, idempotency_key=key)
    cause = caught.value.__cause__
    assert isinstance(cause, asyncio.CancelledError)
    told = noted_key(cause)
    assert told == capture_posts(fake)[0]
    if own_key:
        assert told == key
    [booked] = fake.booked_captures

    again = await om.captures.create(order_id, request, idempotency_key=told)
    assert again.capture_id == booked.capture_id
    assert len(fake.booked_captures) == 1
    assert fake.requests[-1].replayed


async def test_a_cancelled_capture_tells_its_key_on_the_cancellation(fake: FakeKlarna) -> None:
    answered = asyncio.Event()

    async def hang_after_the_answer(request: Request, call_next: Handler) -> Response:
        response = await call_next(request)
        if not answered.is_set():
            answered.set()
            await asyncio.Event().wait()  # cancelled here: booked, answer never returned
        return response

    order_id = fake.add_order(amount=6000)
    request = CaptureRequest(captured_amount=6000)
    async with KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, middlewares=[hang_after_the_answer]
    ) as om:
        task = asyncio.create_task(om.captures.create(order_id, request))
        await answered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as caught:
            await task
        key = noted_key(caught.value)
        again = await om.captures.create(order_id, request, idempotency_key=key)
    [booked] = fake.booked_captures
    assert again.capture_id == booked.capture_id


async def test_any_other_exception_tells_the_key_once(fake: FakeKlarna) -> None:
    async def broken(request: Request, call_next: Handler) -> Response:
        raise RuntimeError("a bug in a middleware")

    async with KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, middlewares=[broken]
    ) as om:
        key = new_idempotency_key()
        with pytest.raises(RuntimeError) as caught:
            await om.captures.create(
                fake.add_order(amount=5), CaptureRequest(captured_amount=5), idempotency_key=key
            )
        assert noted_key(caught.value) == key
        with pytest.raises(RuntimeError) as unkeyed:
            await om.orders.get("o1")
    assert getattr(unkeyed.value, "__notes__", []) == []


async def test_klarna_errors_carry_the_key_and_get_no_note(om: KlarnaOM, fake: FakeKlarna) -> None:
    order_id = fake.add_order(amount=6000)
    fake.inject(ServerFailure(503), method="POST", times=4)
    with pytest.raises(ServerError) as caught:
        await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
    assert caught.value.idempotency_key == capture_posts(fake)[0]
    assert getattr(caught.value, "__notes__", []) == []
