"""Pacing of attempts: a client-wide and a per-batch rate, and a client-wide pause after a 429.

Rates are kept on a fixed grid of send times (GCRA's virtual scheduling, :class:`Pace`).

Klarna counts requests per merchant, so when one request is told to slow down, every request
of the client waits out the same window instead of each one discovering the limit on its own.
The pause is capped (``RetryPolicy.retry_after_cap``), and a call never waits past its own
deadline for it: it fails with ``RateLimitError`` instead, having sent nothing.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar

from .config import MAX_RATE_LIMIT, check_rate_limit
from .errors import RateLimitError, reset_after
from .middleware import Handler, Request, Response

__all__ = ("Pace", "ThrottleMiddleware", "rate_limited")


class Pace:
    """Send times on a fixed grid ``1 / per_second`` apart (GCRA's virtual scheduling).

    Each request takes the next free slot when it asks, so a task that wakes late never
    pushes later slots back, and an idle spell banks no burst: no interval of the grid's
    length ever holds two sends. (``aiolimiter``'s bucket of one, used before, scheduled from
    each wake-up and drifted to 86-89% of the rate under load.)

    ``per_second``: finite, ``MIN_RATE_LIMIT`` to ``MAX_RATE_LIMIT`` (``ValidationError``).
    """

    def __init__(self, per_second: float) -> None:
        check_rate_limit(per_second)
        #: Seconds between two sends.
        self.interval = 1.0 / per_second
        self._next = -math.inf

    def delay(self, now: float) -> float:
        """Take the next free slot; the seconds from ``now`` until it (0 if it is now)."""
        slot = self._next if self._next > now else now
        self._next = slot + self.interval
        return slot - now


# Set by a batch for the tasks it starts, so concurrent batches and single calls sharing one
# client each keep their own limit (on top of the client's own pace, if it has one).
_batch_pace: ContextVar[Pace | None] = ContextVar("klarna_om_batch_pace", default=None)

_LIMIT = "X-Ratelimit-Limit"
_REMAINING = "X-Ratelimit-Remaining"
#: Share of a limit Klarna states that the client paces at.
LEARNED_SHARE = 0.95


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


#: Pause after a 429 that did not say how long to wait.
DEFAULT_RATE_LIMIT_PAUSE = 1.0
#: The longest pause a 429 imposes unless told otherwise: ``RetryPolicy``'s default cap.
DEFAULT_MAX_PAUSE = 30.0


@contextlib.contextmanager
def rate_limited(requests_per_second: float | None) -> Iterator[None]:
    """Within this block (and tasks started in it), send at most this many attempts a second.

    ``requests_per_second``: None (no limit) or a finite number greater than 0 and at most
    ``MAX_RATE_LIMIT`` (10,000); anything else raises ``ValidationError`` (a ``ValueError``).
    """
    pace = None if requests_per_second is None else Pace(requests_per_second)
    token = _batch_pace.set(pace)
    try:
        yield
    finally:
        _batch_pace.reset(token)


class ThrottleMiddleware:
    """Waits for the batch's rate limiter and for any pause a 429 imposed on the client.

    A 429 pauses every call of the client for its ``Retry-After`` seconds (1 s if it gave
    none), capped at ``max_pause`` seconds (the client passes ``retry_after_cap``), so one
    ``Retry-After: 3600`` cannot stall the client for an hour. ``clock`` must be the retry
    middleware's: a request's ``deadline`` is a time on it. When waiting out the pause would
    pass the request's deadline, nothing is sent and ``RateLimitError`` is raised at once
    (``retry_after`` = the pause left; not an unknown outcome by itself), which the retry
    loop gives up with. ``base_url`` only completes the URL such an error reports.
    """

    def __init__(
        self,
        *,
        sleep: Callable[[float], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
        max_pause: float = DEFAULT_MAX_PAUSE,
        base_url: str = "",
        pace: Pace | None = None,
    ) -> None:
        if not max_pause >= 0:
            raise ValueError(f"max_pause must be >= 0, got {max_pause!r}")
        self._pace = pace
        self._learned: Pace | None = None
        self._sleep = sleep
        self._clock = clock
        self._max_pause = max_pause
        self._base_url = base_url
        self._resume_at = 0.0

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Send ``request`` once any 429 pause is over and the paces give it a slot.

        A limit Klarna states (``X-Ratelimit-Limit``) paces later requests when the client
        has no ``rate_limit`` of its own; ``X-Ratelimit-Remaining: 0`` pauses the client until
        ``X-Ratelimit-Reset``.

        Raises ``RateLimitError`` without sending when the pause or a pace slot lies past the
        call's deadline.
        """
        if self._resume_at:  # 0.0 unless a 429 paused the client and nobody has waited since
            now = self._clock()
            wait = self._resume_at - now
            if wait > 0:
                await self._wait(request, now, wait, "paused after a 429 from Klarna")
            else:
                self._resume_at = 0.0  # the pause is over: later calls skip the clock
        # The paces come after the pause, so requests released together leave one by one.
        batch_pace = _batch_pace.get()
        if batch_pace is not None:
            now = self._clock()
            wait = batch_pace.delay(now)
            if wait > 0:
                await self._wait(request, now, wait, "waiting for the batch's rate_limit")
        pace = self._pace or self._learned  # the client's: every batch and single call
        if pace is not None:
            now = self._clock()
            wait = pace.delay(now)
            if wait > 0:
                await self._wait(request, now, wait, "waiting for the client's rate limit")
        try:
            response = await call_next(request)
        except RateLimitError as error:
            pause = error.retry_after
            if pause is None or not pause >= 0:  # `not >=` also catches nan
                pause = DEFAULT_RATE_LIMIT_PAUSE
            pause = min(pause, self._max_pause)
            self._resume_at = max(self._resume_at, self._clock() + pause)
            raise
        headers = response.headers
        if _LIMIT in headers or _REMAINING in headers:
            self._learn(headers)
        return response

    def _learn(self, headers: Mapping[str, str]) -> None:
        """Pace at Klarna's stated limit, and pause when its window is used up."""
        limit = _number(headers.get(_LIMIT))
        if limit is not None and limit >= 1 and self._pace is None:
            # Per second, as Klarna counts; a little under it, for the skew between our clock
            # and Klarna's windows.
            rate = min(limit * LEARNED_SHARE, MAX_RATE_LIMIT)
            if self._learned is None or self._learned.interval != 1.0 / rate:
                self._learned = Pace(rate)
        remaining = _number(headers.get(_REMAINING))
        reset = reset_after(headers)
        if remaining is not None and remaining <= 0 and reset is not None:
            pause = min(reset, self._max_pause)
            self._resume_at = max(self._resume_at, self._clock() + pause)

    async def _wait(self, request: Request, now: float, wait: float, why: str) -> None:
        """Sleep ``wait`` seconds, unless that passes the call's deadline: then refuse it."""
        # getattr: middlewares are also driven by hand with stand-in requests.
        deadline: float | None = getattr(request, "deadline", None)
        if deadline is not None and now + wait > deadline:
            raise self._refusal(request, wait, deadline - now, why)
        await self._sleep(wait)

    def _refusal(self, request: Request, wait: float, left: float, why: str) -> RateLimitError:
        """The error for a call a wait would keep past its deadline; nothing was sent."""
        error = RateLimitError(
            status=429,
            error_messages=(
                f"not sent: this client is {why} for {wait:.1f}s more, and the call's"
                f" deadline is {max(left, 0.0):.1f}s away",
            ),
            retry_after=wait,
        )
        error.bind(
            method=request.method,
            url=self._base_url + request.path,
            idempotency_key=request.idempotency_key,
            attempts=1,
        )
        return error
