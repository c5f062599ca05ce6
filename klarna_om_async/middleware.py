"""The request pipeline: plain request/response values and the middlewares every call goes through.

A middleware is any ``async (request, call_next) -> Response`` callable (or a plain one that
returns ``call_next(...)``'s awaitable, as the two that only dress the request do: one
coroutine fewer per call). The client lines them up, outermost first::

    IdempotencyMiddleware   stamps Klarna-Idempotency-Key once per logical call; refuses a
                            key this client already sent with a different request
    RetryMiddleware         backoff with full jitter; the same key on every attempt; stamps
                            the call's deadline; notes the key on a cancelled call
    ThrottleMiddleware      waits for a batch's rate limit, the client's pace (its
                            rate_limit, else Klarna's stated limit, else one learned from
                            429s) and any (capped) pause a 429 imposed, unless that would
                            pass the call's deadline; counts the 429s
    *your middlewares*      see every attempt (with its key, without credentials)
    ErrorMiddleware         non-2xx -> typed KlarnaAPIError
    AuthMiddleware          Authorization: Basic ...
    AiohttpTransport        the only code that touches aiohttp; once an attempt has its
                            connection, it asks the throttle again whether a 429 paused
                            the client meanwhile

Each one is small, holds its configuration from ``__init__``, and can be tested without a
network by calling it with a fake ``call_next``.

Logs, on the logger ``klarna_om_async.retry``, one record per retry with structured fields
in ``extra=`` (``method``, ``path``, ``order_id``, ``idempotency_key``, ``attempt``: the
attempt that failed, ``status``: its HTTP status or None, ``correlation_id``, ``error``: the
error's class name, ``delay``: seconds until the next attempt): WARNING after a failed
attempt, DEBUG after a 429 (the throttle summarizes 429s on ``klarna_om_async.throttle``).
No record carries credentials or a body.
"""

from __future__ import annotations

import logging
import time
import types
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Protocol

import attrs
import backoff

from ._keys import (
    KEY_RESEND_WINDOW_S,
    check_idempotency_key,
    fresh_key,
    key_time_left,
    random_key,
)
from .config import MIN_BUSY_WAIT, Credentials, RetryPolicy
from .errors import (
    AuthenticationError,
    ConflictError,
    KlarnaAPIError,
    KlarnaConnectionError,
    KlarnaError,
    RateLimitError,
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

logger = logging.getLogger("klarna_om_async.retry")

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
    #: When the whole call must be over, on the retry middleware's clock (``time.monotonic``
    #: seconds by default); stamped by ``RetryMiddleware`` as call start + policy deadline
    #: (or earlier, when the call's key would outlive Klarna's memory of it).
    #: ``None`` before that, or when the chain has no retry middleware: no limit.
    deadline: float | None = None

    def with_header(self, name: str, value: str) -> Request:
        """A copy of this request with one more header."""
        # Positional construction: attrs.evolve would re-read the fields on every call.
        return Request(
            self.method,
            self.path,
            self.body,
            {**self.headers, name: value},
            self.idempotency_key,
            self.deadline,
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


#: How many keys an ``IdempotencyMiddleware`` remembers (least recently used go first).
#: Reusing a key for another request is a mistake made close to the first use: two
#: concurrent calls handed one key, or a retry after an unknown outcome with an edited body.
#: 4096 keys hold every call in flight at any sane concurrency (the connection pool defaults
#: to 100, a batch to 32) plus the last ~20 s at Klarna's production limit of 200 requests/s,
#: in well under 1 MiB (a key string, an int and a link each). Older reuse is not caught here:
#: over Klarna's 24 hours the caller's records (e.g. a batch journal) are the authority.
REMEMBERED_KEYS = 4096


class IdempotencyMiddleware:
    """Gives every POST/PATCH one ``Klarna-Idempotency-Key`` for the whole logical call.

    The caller's key wins; otherwise a fresh UUID4 is made here, outside the retry loop, so
    every retry of the call carries the same key and Klarna executes it at most once.

    Klarna answers a reused key with the first request's stored answer and ignores the new
    body, so this middleware remembers the last ``remember`` keys it stamped, each with a
    digest of its request (method, path, body), and refuses a key already sent with a
    different request: ``ValidationError("idempotency_key", ...)``, before anything is sent.
    The same key with the same request passes (that is how a call whose outcome is unknown is
    retried). Keys it made itself are remembered too: they are handed back to the caller (on
    results and errors), who may reuse them.
    """

    def __init__(
        self, new_key: Callable[[], str] = random_key, *, remember: int = REMEMBERED_KEYS
    ) -> None:
        if remember < 1:
            raise ValueError(f"remember must be at least 1, got {remember!r}")
        self._new_key = new_key
        self._remember = remember
        # key -> hash((method, path, body)). A 64-bit hash, salted per process (fine: the
        # memory never leaves it); equal requests always match, and a different request
        # slips through only on a 1-in-2**64 collision.
        self._sent: OrderedDict[str, int] = OrderedDict()

    def __call__(self, request: Request, call_next: Handler) -> Awaitable[Response]:
        """Stamp the key on keyed methods, then pass the request on.

        Raises ``ValidationError`` (nothing sent) for a malformed key, or for a key this
        client already sent with a different method, path or body.
        """
        method = request.method
        if method not in _KEYED_METHODS:
            return call_next(request)
        key = request.idempotency_key
        if key is None:
            key = self._new_key()
            given = False
        else:
            check_idempotency_key(key)
            given = fresh_key.get() != key
        path, body = request.path, request.body
        digest = hash((method, path, body))
        sent = self._sent
        earlier = sent.get(key)
        if earlier is None:
            sent[key] = digest
            if len(sent) > self._remember:
                sent.popitem(last=False)
        elif earlier == digest:
            sent.move_to_end(key)
        else:
            reused = ValidationError(
                "idempotency_key",
                f"{key!r} was already used for a different request; Klarna would replay that"
                f" request's answer and ignore this {method} {path}. Use a new key"
                f" (klarna_om_async.new_idempotency_key()) for a different request",
            )
            # That earlier call may have been booked: whoever changes the request and takes
            # a new key must first know it was not (helper-90: the new key booked again).
            reused.idempotency_key, reused.earlier_attempt_unknown = key, True
            raise reused
        headers = {**request.headers, IDEMPOTENCY_HEADER: key}
        answer = call_next(Request(method, path, body, headers, key, request.deadline))
        return _doubting_earlier_sends(answer) if given else answer


async def _doubting_earlier_sends(answer: Awaitable[Response]) -> Response:
    """``answer`` of a call under a key the caller gave, which an earlier call may have sent.

    Klarna answers a key's first request and replays that answer to every later one (24
    hours): a 4xx from it proves nothing was booked under the key. A 429, 401 or 409 comes
    before that (the merchant is busy, the credentials are refused, another request holds
    the key), as do a 5xx, no answer, and nothing sent: they say nothing of an earlier send,
    so the call's outcome stays unknown (a retry under a key a cancelled call had booked met
    only 429s, was told "nothing happened", and the caller's new key booked again:
    helper-88).
    """
    try:
        return await answer
    except KlarnaError as error:
        if not _settles_key(error):
            error.earlier_attempt_unknown = True
        raise


def _settles_key(error: KlarnaError) -> bool:
    """Whether ``error`` proves that nothing was ever booked under its call's key (or, for a
    ``ValidationError``, that this call sent nothing and its request must change)."""
    if isinstance(error, ValidationError):
        return True
    return (
        isinstance(error, KlarnaAPIError)
        and error.status < 500
        and not isinstance(error, RateLimitError | AuthenticationError | ConflictError)
    )


_ORDERS = "/ordermanagement/v1/orders/"


def log_fields(
    request: Request,
    *,
    status: int | None = None,
    correlation_id: str | None = None,
) -> dict[str, object]:
    """The structured fields (``extra=``) of a log record about ``request``: ``method``,
    ``path`` (query and fragment cut off), ``order_id`` (None off the order paths),
    ``idempotency_key``, ``status`` and ``correlation_id``. Never a header or the body."""
    path = request.path.partition("?")[0].partition("#")[0]
    order_id = None
    if path.startswith(_ORDERS):
        order_id = urllib.parse.unquote(path[len(_ORDERS) :].partition("/")[0]) or None
    return {
        "method": request.method,
        "path": path,
        "order_id": order_id,
        "idempotency_key": getattr(request, "idempotency_key", None),
        "status": status,
        "correlation_id": correlation_id,
    }


def _is_retryable(error: KlarnaError) -> bool:
    if isinstance(error, KlarnaConnectionError):
        return True
    return isinstance(error, KlarnaAPIError) and error.retryable


def _note_key(exc: BaseException, key: str | None) -> None:
    """Tell the key of a keyed call that ended without a KlarnaError (cancelled, a bug, ...)."""
    if key is None:
        return
    note = (
        f"{IDEMPOTENCY_HEADER}: {key} - the call may have taken effect; retry it with"
        f" idempotency_key={key!r} within 24 hours to finish it exactly once"
    )
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


class RetryMiddleware:
    """Retries connection errors, timeouts, 409, 429 and 5xx as the policy says.

    The schedule is backoff's exponential generator with full jitter; a ``Retry-After``
    header takes precedence (capped at ``retry_after_cap``) and is not jittered. No attempt
    starts later than ``policy.deadline`` seconds after the call began, nor, for a call under
    an idempotency key, once Klarna may have forgotten the key (23 hours after the call
    began, or what ``key_time_left`` says of a key an earlier run sent): a resend then books
    the operation again. The attempts carry that moment as ``Request.deadline`` (on
    ``clock``) so the throttle can keep it too.
    Discarded answers need no release: the transport has read and released every response
    before it reaches here.

    A keyed call ended by anything but a ``KlarnaError`` (cancellation, e.g. by
    ``asyncio.timeout``; a bug in a middleware) gets the key added as a note
    (``exc.add_note``), since its outcome is unknown. ``asyncio.timeout`` raises
    ``TimeoutError`` from the cancellation, so there the note is on ``err.__cause__``.
    KlarnaErrors carry the key as ``err.idempotency_key`` instead.
    """

    def __init__(self, policy: RetryPolicy, *, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self._clock = clock

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Send ``request`` until it succeeds, fails for good, or the policy runs out.

        Raises the last attempt's ``KlarnaError`` when giving up (``attempts`` set, and
        ``earlier_attempt_unknown`` when an earlier attempt may have taken effect).
        """
        started = self._clock()
        deadline = started + self.policy.deadline
        if request.idempotency_key is not None:
            left = key_time_left.get()
            deadline = min(deadline, started + (KEY_RESEND_WINDOW_S if left is None else left))
        request = Request(
            request.method,
            request.path,
            request.body,
            request.headers,
            request.idempotency_key,
            deadline,
        )
        try:
            # Most calls succeed at once: no schedule is made until an attempt fails.
            return await call_next(request)
        except KlarnaError as error:
            first = error
        except BaseException as exc:
            _note_key(exc, request.idempotency_key)
            raise
        try:
            return await self._retry(request, call_next, first)
        except KlarnaError:
            raise
        except BaseException as exc:
            _note_key(exc, request.idempotency_key)
            raise

    async def _retry(self, request: Request, call_next: Handler, error: KlarnaError) -> Response:
        """Attempts 2 and later, after ``error`` ended the first one."""
        policy = self.policy
        deadline = request.deadline
        assert deadline is not None  # stamped by __call__
        delays = backoff.expo(factor=policy.initial_delay, max_value=policy.max_delay)
        next(delays)  # backoff's generators yield a priming 0 first
        attempt = 1
        # Held back by the throttle before sending: no attempt reached Klarna.
        unsent = 0
        # A 429 says the merchant is busy, not that the call failed: it does not use up
        # max_attempts (only the deadline bounds waiting for the merchant's turn).
        failures = 0
        unknown = False
        while True:
            unsent += getattr(error, "refused_by_throttle", False)
            error.attempts = attempt - unsent
            busy = isinstance(error, RateLimitError)
            failures += not busy
            wait = self._wait_before_retry(error, failures, deadline, delays)
            if wait is None:
                # Attempt 1 may have been booked and its answer lost; a later 429 (or even a
                # 401) says nothing about that, so the call's outcome stays unknown.
                error.earlier_attempt_unknown = unknown
                raise error
            unknown = unknown or error.outcome_unknown
            # A 429 storm is routine in a batch: the throttle logs one summary per interval.
            level = logging.DEBUG if busy else logging.WARNING
            if logger.isEnabledFor(level):
                self._log_retry(level, request, error, attempt, wait)
            await policy.sleep(wait)
            attempt += 1
            try:
                response = await call_next(request)
            except KlarnaError as next_error:
                error = next_error
                continue
            return attrs.evolve(response, attempts=attempt - unsent)

    @staticmethod
    def _log_retry(
        level: int, request: Request, error: KlarnaError, attempt: int, wait: float
    ) -> None:
        api_error = error if isinstance(error, KlarnaAPIError) else None
        fields = log_fields(
            request,
            status=None if api_error is None else api_error.status,
            correlation_id=None if api_error is None else api_error.correlation_id,
        )
        fields.update(attempt=attempt, error=type(error).__name__, delay=wait)
        logger.log(
            level,
            "Klarna %s %s failed (attempt %d: %s%s); retrying in %.2fs with key %s",
            request.method,
            fields["path"],
            attempt,
            type(error).__name__,
            "" if api_error is None else f" {api_error.status}",
            wait,
            request.idempotency_key,
            extra=fields,
        )

    def _wait_before_retry(
        self, error: KlarnaError, failures: int, deadline: float, delays: Iterator[float]
    ) -> float | None:
        """Seconds to wait before the next attempt, or None to give up with ``error``.

        ``failures`` counts the attempts that failed other than with a 429.
        """
        policy = self.policy
        if not _is_retryable(error) or failures >= policy.max_attempts:
            return None
        if policy.max_attempts == 1:  # RetryPolicy.no_retries(): a 429 surfaces at once too
            return None
        retry_after = error.retry_after if isinstance(error, KlarnaAPIError) else None
        if retry_after is not None:
            wait = min(retry_after, policy.retry_after_cap)
        else:
            wait = policy.jitter(next(delays))
        if isinstance(error, RateLimitError):
            # 429s are bounded by the deadline only: never hammer a busy merchant faster than
            # one retry per initial_delay (and never in a tight loop), whatever Retry-After
            # said ("0").
            wait = max(wait, policy.initial_delay, MIN_BUSY_WAIT)
        if self._clock() + wait > deadline:
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
