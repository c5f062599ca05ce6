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


async def test_rate_limit_error_survives_retries_exhausted() -> None:
    sleeps = InstantSleep()
    script = Script(*[api_error(429, "1")] * 2)
    with pytest.raises(RateLimitError) as caught:
        await RetryMiddleware(policy(sleeps, max_attempts=2))(Request("GET", "/o"), script)
    assert caught.value.attempts == 2


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
