"""The request pipeline: plain request/response values and the middlewares every call goes through.

A middleware is any ``async (request, call_next) -> Response`` callable (or a plain one that
returns ``call_next(...)``'s awaitable, as the two that only dress the request do: one
coroutine fewer per call). The client lines them up, outermost first::

    IdempotencyMiddleware   stamps Klarna-Idempotency-Key once per logical call
    RetryMiddleware         backoff with full jitter; the same key on every attempt
    ThrottleMiddleware      waits for a batch's rate limit and any pause a 429 imposed
    *your middlewares*      see every attempt (with its key, without credentials)
    ErrorMiddleware         non-2xx -> typed KlarnaAPIError
    AuthMiddleware          Authorization: Basic ...
    AiohttpTransport        the only code that touches aiohttp

Each one is small, holds its configuration from ``__init__``, and can be tested without a
network by calling it with a fake ``call_next``.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Protocol

import attrs
import backoff

from ._keys import random_key
from .config import Credentials, RetryPolicy
from .errors import (
    KlarnaAPIError,
    KlarnaConnectionError,
    KlarnaError,
    ValidationError,
    decode_error,
)

__all__ = (
    "AuthMiddleware",
    "ErrorMiddleware",
    "Handler",
    "IdempotencyMiddleware",
    "Middleware",
    "Request",
    "Response",
    "RetryMiddleware",
    "compose",
)

logger = logging.getLogger("klarna_om_async")

IDEMPOTENCY_HEADER = "Klarna-Idempotency-Key"
# Klarna honours idempotency keys on these; GETs are safe to repeat without one.
_KEYED_METHODS = frozenset({"POST", "PATCH"})


@attrs.frozen
class Request:
    """One logical API call, before or after the middlewares have dressed it."""

    #: HTTP method, upper case.
    method: str
    #: Path below the base URL, already URL-quoted, e.g. ``/ordermanagement/v1/orders/x``.
    path: str
    #: The encoded JSON body, if any.
    body: bytes | None = None
    #: Headers to send; middlewares add to a copy, never to this mapping.
    headers: Mapping[str, str] = attrs.field(factory=dict)
    #: The caller's key for this call, or the one the idempotency middleware chose.
    idempotency_key: str | None = None

    def with_header(self, name: str, value: str) -> Request:
        """A copy of this request with one more header."""
        # Positional construction: attrs.evolve would re-read the fields on every call.
        return Request(
            self.method, self.path, self.body, {**self.headers, name: value}, self.idempotency_key
        )


@attrs.frozen
class Response:
    """A complete HTTP answer: the body is read and the connection already released."""

    #: HTTP status code.
    status: int
    #: Response headers (case-insensitive mapping).
    headers: Mapping[str, str]
    #: The raw body.
    body: bytes
    #: The request that got this answer (carries the idempotency key used).
    request: Request
    #: The absolute URL that was called.
    url: str
    #: How many HTTP attempts this call took (set by the retry middleware).
    attempts: int = 1


#: The rest of the chain, as seen from inside a middleware.
Handler = Callable[[Request], Awaitable[Response]]


class Middleware(Protocol):
    """Anything that can sit in the chain: ``await middleware(request, call_next)``."""

    def __call__(self, request: Request, call_next: Handler) -> Awaitable[Response]:
        """Handle ``request``, usually by awaiting ``call_next`` with it (or a changed copy)."""
        ...


def compose(middlewares: Iterable[Middleware], transport: Handler) -> Handler:
    """Wrap ``transport`` in ``middlewares`` (first listed is outermost), once, up front."""
    handler = transport
    for middleware in reversed(tuple(middlewares)):
        handler = _link(middleware, handler)
    return handler


def _link(middleware: Middleware, call_next: Handler) -> Handler:
    """``request -> middleware(request, call_next)``, as cheap to call as Python allows."""
    call: Callable[[Request, Handler], Awaitable[Response]] = middleware
    if not isinstance(middleware, types.FunctionType):
        bound = middleware.__call__
        if isinstance(bound, types.MethodType):
            # A bound method skips the per-call __call__ lookup on the instance; a plain
            # function (not a coroutine) adds no coroutine of its own to every attempt.
            call = bound

    def link(request: Request) -> Awaitable[Response]:
        return call(request, call_next)

    return link


class IdempotencyMiddleware:
    """Gives every POST/PATCH one ``Klarna-Idempotency-Key`` for the whole logical call.

    The caller's key wins; otherwise a fresh UUID4 is made here, outside the retry loop, so
    every retry of the call carries the same key and Klarna executes it at most once.
    """

    def __init__(self, new_key: Callable[[], str] = random_key) -> None:
        self._new_key = new_key

    def __call__(self, request: Request, call_next: Handler) -> Awaitable[Response]:
        """Stamp the key on keyed methods, then pass the request on."""
        method = request.method
        if method not in _KEYED_METHODS:
            return call_next(request)
        key = request.idempotency_key
        if key is None:
            key = self._new_key()
        elif not isinstance(key, str) or not key.strip() or len(key) > 255:
            raise ValidationError("idempotency_key", "must be a non-empty string of <= 255 chars")
        headers = {**request.headers, IDEMPOTENCY_HEADER: key}
        return call_next(Request(method, request.path, request.body, headers, key))


def _is_retryable(error: KlarnaError) -> bool:
    if isinstance(error, KlarnaConnectionError):
        return True
    return isinstance(error, KlarnaAPIError) and error.retryable


class RetryMiddleware:
    """Retries connection errors, timeouts, 409, 429 and 5xx as the policy says.

    The schedule is backoff's exponential generator with full jitter; a ``Retry-After``
    header takes precedence (capped) and is not jittered. Discarded answers need no
    release: the transport has read and released every response before it reaches here.
    """

    def __init__(self, policy: RetryPolicy, *, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self._clock = clock

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Send ``request`` until it succeeds, fails for good, or the policy runs out."""
        started = self._clock()
        try:
            # Most calls succeed at once: no schedule is made until an attempt fails.
            return await call_next(request)
        except KlarnaError as error:
            first = error
        return await self._retry(request, call_next, started, first)

    async def _retry(
        self, request: Request, call_next: Handler, started: float, error: KlarnaError
    ) -> Response:
        """Attempts 2 and later, after ``error`` ended the first one."""
        policy = self.policy
        delays = backoff.expo(factor=policy.initial_delay, max_value=policy.max_delay)
        next(delays)  # backoff's generators yield a priming 0 first
        attempt = 1
        unknown = False
        while True:
            error.attempts = attempt
            wait = self._wait_before_retry(error, attempt, started, delays)
            if wait is None:
                # Attempt 1 may have been booked and its answer lost; a later 429 (or even a
                # 401) says nothing about that, so the call's outcome stays unknown.
                error.earlier_attempt_unknown = unknown
                raise error
            unknown = unknown or error.outcome_unknown
            logger.warning(
                "Klarna %s %s failed (attempt %d: %s); retrying in %.2fs with key %s",
                request.method,
                request.path,
                attempt,
                type(error).__name__,
                wait,
                request.idempotency_key,
            )
            await policy.sleep(wait)
            attempt += 1
            try:
                response = await call_next(request)
            except KlarnaError as next_error:
                error = next_error
                continue
            return attrs.evolve(response, attempts=attempt)

    def _wait_before_retry(
        self, error: KlarnaError, attempt: int, started: float, delays: Iterator[float]
    ) -> float | None:
        """Seconds to wait before the next attempt, or None to give up with ``error``."""
        policy = self.policy
        if not _is_retryable(error) or attempt >= policy.max_attempts:
            return None
        retry_after = error.retry_after if isinstance(error, KlarnaAPIError) else None
        if retry_after is not None:
            wait = min(retry_after, policy.retry_after_cap)
        else:
            wait = policy.jitter(next(delays))
        if self._clock() - started + wait > policy.deadline:
            return None
        return wait


class ErrorMiddleware:
    """Turns every non-2xx answer into the matching typed exception."""

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Pass 2xx answers through; raise ``decode_error(...)`` for the rest."""
        response = await call_next(request)
        if 200 <= response.status < 300:
            return response
        error = decode_error(response.status, response.headers, response.body)
        error.bind(
            method=request.method,
            url=response.url,
            idempotency_key=request.idempotency_key,
            attempts=1,
        )
        raise error


class AuthMiddleware:
    """Adds HTTP Basic credentials; innermost, so no other middleware ever sees them."""

    def __init__(self, credentials: Credentials) -> None:
        self._header = credentials.authorization_header()

    def __repr__(self) -> str:
        return "AuthMiddleware(<credentials hidden>)"

    def __call__(self, request: Request, call_next: Handler) -> Awaitable[Response]:
        """Send the request with the ``Authorization`` header."""
        return call_next(request.with_header("Authorization", self._header))
