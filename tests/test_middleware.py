"""The chain's middlewares, each driven with a scripted ``call_next``: no network involved."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from klarna_om_async._keys import random_key
from klarna_om_async.config import Credentials, RetryPolicy
from klarna_om_async.errors import (
    BadRequestError,
    KlarnaAPIError,
    KlarnaConnectionError,
    KlarnaTimeoutError,
    RateLimitError,
    ServerError,
    ValidationError,
    decode_error,
)
from klarna_om_async.middleware import (
    AuthMiddleware,
    ErrorMiddleware,
    Handler,
    IdempotencyMiddleware,
    Request,
    Response,
    RetryMiddleware,
    compose,
)
from klarna_om_async.testing import InstantSleep
from klarna_om_async.throttle import ThrottleMiddleware


def ok(request: Request, status: int = 200) -> Response:
    return Response(
        status=status, headers={}, body=b"", request=request, url="http://k" + request.path
    )


class Script:
    """A call_next that raises or answers from a list and records what it was sent."""

    def __init__(self, *outcomes: Exception | int) -> None:
        self.outcomes = list(outcomes)
        self.seen: list[Request] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return ok(request, outcome)


def policy(sleeps: InstantSleep, **kwargs: float) -> RetryPolicy:
    return RetryPolicy(jitter=lambda d: d, sleep=sleeps, **kwargs)  # type: ignore[arg-type]


def api_error(status: int, retry_after: str | None = None) -> Exception:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return decode_error(status, headers, b"")


async def test_compose_runs_middlewares_outermost_first() -> None:
    order: list[str] = []

    def tag(name: str) -> Callable[[Request, Handler], object]:
        async def middleware(request: Request, call_next: Handler) -> Response:
            order.append(name)
            return await call_next(request)

        return middleware

    handler = compose([tag("a"), tag("b")], Script(200))  # type: ignore[list-item]
    await handler(Request("GET", "/x"))
    assert order == ["a", "b"]


async def test_posts_get_a_fresh_uuid_key_and_gets_get_none() -> None:
    script = Script(200, 200, 200)
    middleware = IdempotencyMiddleware()
    await middleware(Request("POST", "/a"), script)
    await middleware(Request("POST", "/a"), script)
    await middleware(Request("GET", "/a"), script)
    first, second, get = script.seen
    assert first.headers["Klarna-Idempotency-Key"] == first.idempotency_key
    assert len(first.idempotency_key or "") == 36
    assert first.idempotency_key != second.idempotency_key
    assert "Klarna-Idempotency-Key" not in get.headers
    assert get.idempotency_key is None


async def test_the_callers_key_wins() -> None:
    script = Script(200)
    await IdempotencyMiddleware()(Request("PATCH", "/a", idempotency_key="mine"), script)
    assert script.seen[0].headers["Klarna-Idempotency-Key"] == "mine"


@pytest.mark.parametrize("key", ["", "   ", "x" * 256])
async def test_a_bad_key_is_refused_before_sending(key: str) -> None:
    script = Script(200)
    with pytest.raises(ValidationError, match="idempotency_key"):
        await IdempotencyMiddleware()(Request("POST", "/a", idempotency_key=key), script)
    assert script.seen == []


async def test_retries_reuse_the_same_request_and_key_until_success() -> None:
    sleeps = InstantSleep()
    script = Script(KlarnaConnectionError("reset"), api_error(503), api_error(409), 201)
    handler = compose([IdempotencyMiddleware(), RetryMiddleware(policy(sleeps))], script)
    response = await handler(Request("POST", "/captures"))
    assert response.status == 201
    assert response.attempts == 4
    keys = {r.headers["Klarna-Idempotency-Key"] for r in script.seen}
    assert len(keys) == 1
    # Exponential schedule from backoff: 0.5, 1, 2 (jitter disabled).
    assert sleeps.waits == [0.5, 1.0, 2.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_client_errors_are_never_retried(status: int) -> None:
    sleeps = InstantSleep()
    script = Script(api_error(status), 201)
    with pytest.raises(KlarnaAPIError) as caught:
        await RetryMiddleware(policy(sleeps))(Request("POST", "/c"), script)
    assert caught.value.status == status
    assert len(script.seen) == 1
    assert sleeps.waits == []


async def test_giving_up_reports_the_attempts_made() -> None:
    sleeps = InstantSleep()
    script = Script(*[KlarnaTimeoutError("slow")] * 3)
    retry = RetryMiddleware(policy(sleeps, max_attempts=3))
    with pytest.raises(KlarnaTimeoutError) as caught:
        await retry(Request("POST", "/c", idempotency_key="k"), script)
    assert caught.value.attempts == 3
    assert len(sleeps.waits) == 2


async def test_retry_after_replaces_the_schedule_and_is_capped() -> None:
    sleeps = InstantSleep()
    script = Script(api_error(429, "3"), api_error(503, "120"), 200)
    await RetryMiddleware(policy(sleeps, retry_after_cap=10))(Request("GET", "/o"), script)
    assert sleeps.waits == [3.0, 10.0]


async def test_no_attempt_starts_after_the_deadline() -> None:
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    script = Script(*[api_error(503)] * 10)
    retry_policy = RetryPolicy(
        max_attempts=10, initial_delay=4, max_delay=4, deadline=10, jitter=lambda d: d, sleep=sleep
    )
    with pytest.raises(ServerError) as caught:
        await RetryMiddleware(retry_policy, clock=lambda: now[0])(Request("GET", "/o"), script)
    # Waits of 4 s: attempts start at 0, 4 and 8; a fourth would start at 12 > 10.
    assert caught.value.attempts == 3
    assert now[0] == 8


async def test_full_jitter_draws_waits_within_the_exponential_cap() -> None:
    sleeps = InstantSleep()
    script = Script(*[api_error(500)] * 6, 200)
    retry_policy = RetryPolicy(max_attempts=7, initial_delay=0.5, max_delay=4, sleep=sleeps)
    await RetryMiddleware(retry_policy)(Request("GET", "/o"), script)
    caps = [0.5, 1, 2, 4, 4, 4]
    assert all(0 <= wait <= cap for wait, cap in zip(sleeps.waits, caps, strict=True))


async def test_error_middleware_passes_2xx_and_raises_typed_errors_with_context() -> None:
    middleware = ErrorMiddleware()
    assert (await middleware(Request("GET", "/o"), Script(204))).status == 204
    request = Request("POST", "/o/captures", idempotency_key="k7")
    with pytest.raises(BadRequestError) as caught:
        await middleware(request, Script(400))
    assert caught.value.method == "POST"
    assert caught.value.url == "http://k/o/captures"
    assert caught.value.idempotency_key == "k7"


async def test_a_429_storm_waits_until_the_deadline_not_max_attempts() -> None:
    sleeps = InstantSleep()
    script = Script(*[api_error(429, "1")] * 12)
    retry = RetryMiddleware(policy(sleeps, max_attempts=2, deadline=10), clock=sleeps.clock)
    with pytest.raises(RateLimitError) as caught:
        await retry(Request("GET", "/o"), script)
    assert 5 < caught.value.attempts < 12  # more than max_attempts; the deadline stopped it
    assert sum(sleeps.waits) <= 10


async def test_429s_between_failures_do_not_use_up_attempts() -> None:
    sleeps = InstantSleep()
    script = Script(api_error(503), *[api_error(429, "1")] * 5, api_error(503), 200)
    retry = RetryMiddleware(policy(sleeps, max_attempts=3), clock=sleeps.clock)
    response = await retry(Request("GET", "/o"), script)
    assert (response.status, response.attempts) == (200, 8)


async def test_a_429_saying_retry_after_0_is_not_retried_in_a_tight_loop() -> None:
    sleeps = InstantSleep()
    script = Script(*[api_error(429, "0")] * 5, 200)
    retry = RetryMiddleware(policy(sleeps, initial_delay=0.5), clock=sleeps.clock)
    response = await retry(Request("GET", "/o"), script)
    assert response.status == 200
    assert sleeps.waits == [0.5] * 5


async def test_no_retries_surfaces_the_first_429() -> None:
    script = Script(api_error(429, "1"))
    with pytest.raises(RateLimitError) as caught:
        await RetryMiddleware(RetryPolicy.no_retries())(Request("GET", "/o"), script)
    assert caught.value.attempts == 1


async def test_auth_adds_basic_credentials_and_hides_them() -> None:
    credentials = Credentials("user", "s3cret")
    script = Script(200)
    middleware = AuthMiddleware(credentials)
    await middleware(Request("GET", "/o"), script)
    assert script.seen[0].headers["Authorization"] == "Basic dXNlcjpzM2NyZXQ="
    assert "s3cret" not in repr(middleware)
    assert "s3cret" not in repr(credentials)


def test_credentials_must_not_be_empty() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        Credentials("user", "")


def test_fresh_keys_are_distinct_version_4_uuids() -> None:
    keys = [random_key() for _ in range(1000)]
    assert len(set(keys)) == len(keys)
    for key in keys:
        parsed = uuid.UUID(key)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, key)


async def test_retry_stamps_the_calls_deadline_on_every_attempt() -> None:
    script = Script(api_error(503), 200)
    retry = RetryMiddleware(policy(InstantSleep(), deadline=45), clock=lambda: 100.0)
    await retry(Request("POST", "/c", b"{}", {"A": "b"}, "k"), script)
    assert [r.deadline for r in script.seen] == [145.0, 145.0]
    first = script.seen[0]
    assert (first.method, first.path, first.body, first.headers, first.idempotency_key) == (
        "POST",
        "/c",
        b"{}",
        {"A": "b"},
        "k",
    )
    assert first.with_header("X", "y").deadline == 145.0


async def test_the_idempotency_middleware_keeps_the_deadline() -> None:
    script = Script(200)
    await IdempotencyMiddleware()(Request("POST", "/a", deadline=7.0), script)
    assert script.seen[0].deadline == 7.0


async def test_a_429_pause_is_capped_and_waited_out_within_the_deadline() -> None:
    now = [100.0]
    sleeps = InstantSleep()
    throttle = ThrottleMiddleware(sleep=sleeps, clock=lambda: now[0], max_pause=5)
    with pytest.raises(RateLimitError):
        await throttle(Request("GET", "/o"), Script(api_error(429, "3600")))
    now[0] += 1.0
    await throttle(Request("GET", "/o", deadline=105.0), Script(200))  # just in time
    assert sleeps.waits == [4.0]


@pytest.mark.parametrize("retry_after", [None, float("nan"), float("inf"), -1.0])
async def test_a_429_without_a_usable_wait_pauses_the_default_second(
    retry_after: float | None,
) -> None:
    sleeps = InstantSleep()
    throttle = ThrottleMiddleware(sleep=sleeps, clock=lambda: 10.0, max_pause=30)
    with pytest.raises(RateLimitError):
        await throttle(
            Request("GET", "/o"), Script(RateLimitError(status=429, retry_after=retry_after))
        )
    await throttle(Request("GET", "/o"), Script(200))
    assert sleeps.waits == [30.0 if retry_after == float("inf") else 1.0]


async def test_a_pause_past_the_deadline_is_a_rate_limit_error_with_nothing_sent() -> None:
    sleeps = InstantSleep()
    throttle = ThrottleMiddleware(
        sleep=sleeps, clock=lambda: 0.0, max_pause=30, base_url="https://k"
    )
    with pytest.raises(RateLimitError):
        await throttle(Request("GET", "/o"), Script(api_error(429, "20")))
    script = Script(200)
    with pytest.raises(RateLimitError) as caught:
        await throttle(Request("POST", "/c", idempotency_key="k", deadline=19.0), script)
    assert script.seen == []
    assert sleeps.waits == []
    error = caught.value
    assert (error.method, error.url, error.idempotency_key, error.retry_after) == (
        "POST",
        "https://k/c",
        "k",
        20.0,
    )
    assert not error.outcome_unknown
    with pytest.raises(ValueError, match="max_pause"):
        ThrottleMiddleware(sleep=sleeps, max_pause=-1)


async def test_a_key_reused_for_another_request_is_refused_before_sending() -> None:
    script = Script(200, 200, 200)
    middleware = IdempotencyMiddleware()
    await middleware(Request("POST", "/a", b"1", idempotency_key="k"), script)
    for other in (
        Request("POST", "/a", b"2", idempotency_key="k"),
        Request("POST", "/b", b"1", idempotency_key="k"),
        Request("PATCH", "/a", b"1", idempotency_key="k"),
    ):
        with pytest.raises(ValidationError, match="already used for a different request"):
            await middleware(other, script)
    await middleware(Request("POST", "/a", b"1", idempotency_key="k"), script)
    await middleware(Request("GET", "/a", idempotency_key="k"), script)  # GETs carry no key
    assert [r.body for r in script.seen] == [b"1", b"1", None]


async def test_keys_the_middleware_made_are_remembered_too() -> None:
    script = Script(200)
    middleware = IdempotencyMiddleware(new_key=lambda: "made")
    await middleware(Request("POST", "/a", b"1"), script)
    with pytest.raises(ValidationError):
        await middleware(Request("POST", "/a", b"2", idempotency_key="made"), script)


async def test_the_key_memory_forgets_the_least_recently_used_key() -> None:
    script = Script(*[200] * 5)
    middleware = IdempotencyMiddleware(remember=2)
    await middleware(Request("POST", "/a", b"1", idempotency_key="k1"), script)
    await middleware(Request("POST", "/a", b"1", idempotency_key="k2"), script)
    await middleware(Request("POST", "/a", b"1", idempotency_key="k1"), script)  # k1 is fresh
    await middleware(Request("POST", "/a", b"1", idempotency_key="k3"), script)  # k2 forgotten
    with pytest.raises(ValidationError):
        await middleware(Request("POST", "/a", b"2", idempotency_key="k1"), script)
    await middleware(Request("POST", "/a", b"2", idempotency_key="k2"), script)
    assert len(script.seen) == 5
    with pytest.raises(ValueError, match="remember"):
        IdempotencyMiddleware(remember=0)


async def test_an_exception_on_a_retry_tells_the_key_once() -> None:
    boom = RuntimeError("boom")
    script = Script(api_error(503), boom)
    retry = RetryMiddleware(policy(InstantSleep()))
    # Two retry layers (e.g. a client inside a user's own chain) still note the key once.
    handler = compose([retry, retry], script)
    with pytest.raises(RuntimeError) as caught:
        await handler(Request("POST", "/c", idempotency_key="k-1"))
    [note] = caught.value.__notes__
    assert "idempotency_key='k-1'" in note


async def test_the_throttle_counts_the_429s_klarna_sent_not_its_own_refusals() -> None:
    sleeps = InstantSleep()
    throttle = ThrottleMiddleware(sleep=sleeps, clock=lambda: 0.0, max_pause=30)
    with pytest.raises(RateLimitError):
        await throttle(Request("GET", "/o"), Script(api_error(429, "20")))
    with pytest.raises(RateLimitError, match="not sent"):
        await throttle(Request("GET", "/o", deadline=5.0), Script(200))
    assert throttle.rate_limited_count == 1
    assert throttle.rate is None  # a lone call taught no pace


async def test_a_later_429_with_nothing_to_measure_keeps_the_learned_pace_and_pauses() -> None:
    now = [0.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    throttle = ThrottleMiddleware(sleep=sleep, clock=lambda: now[0])
    for i in range(10):
        now[0] = 0.05 + i / 10
        await throttle(Request("GET", "/o"), Script(200))
    now[0] = 1.0
    with pytest.raises(RateLimitError):  # no Retry-After: a short probing pause
        await throttle(Request("GET", "/o"), Script(RateLimitError(status=429)))
    assert throttle.rate == pytest.approx(9.0)  # 90% of the 10 let through in that second
    now[0] = 4.0
    await throttle(Request("GET", "/o"), Script(200))  # paced, past the pause: no wait
    now[0] = 5.0
    climbed = throttle.rate
    assert climbed is not None
    assert 9.0 < climbed < 10.0  # climbing back towards the 10/s let through
    with pytest.raises(RateLimitError):
        await throttle(Request("GET", "/o"), Script(RateLimitError(status=429)))
    # No answer in the last second: another client of the merchant may have used the quota,
    # which says nothing about our rate. The estimate stays (no collapse to 1/s) ...
    assert throttle.rate == pytest.approx(climbed)
    # ... and the client pauses instead, then sends on the learned grid.
    waits.clear()
    await throttle(Request("GET", "/o"), Script(200))
    pause, *slot = waits
    assert pause == pytest.approx(1.0)
    assert sum(slot) == pytest.approx(1 / climbed) or sum(slot) < 1 / climbed


async def test_a_429_saying_retry_after_0_still_teaches_a_pace() -> None:
    now = [0.0]
    throttle = ThrottleMiddleware(sleep=InstantSleep(), clock=lambda: now[0])
    for i in range(10):
        now[0] = 0.05 + i / 10
        await throttle(Request("GET", "/o"), Script(200))
    now[0] = 1.0
    with pytest.raises(RateLimitError):
        await throttle(Request("GET", "/o"), Script(api_error(429, "0")))
    assert throttle.rate_limited_count == 1
    # "No wait" still says "too fast": 90% of the 10 let through in the last second.
    assert throttle.rate == pytest.approx(9.0)
