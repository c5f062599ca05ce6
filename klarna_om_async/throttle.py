"""Pacing of attempts: a per-batch rate limit, and a client-wide pause after a 429.

Klarna counts requests per merchant, so when one request is told to slow down, every request
of the client waits out the same window instead of each one discovering the limit on its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar

from aiolimiter import AsyncLimiter

from .errors import RateLimitError
from .middleware import Handler, Request, Response

__all__ = ("ThrottleMiddleware", "rate_limited")

# Set by a batch for the tasks it starts, so concurrent batches and single calls sharing one
# client each keep their own limit.
_limiter: ContextVar[AsyncLimiter | None] = ContextVar("klarna_om_rate_limiter", default=None)

#: Pause after a 429 that did not say how long to wait.
DEFAULT_RATE_LIMIT_PAUSE = 1.0


@contextlib.contextmanager
def rate_limited(requests_per_second: float | None) -> Iterator[None]:
    """Within this block (and tasks started in it), send at most this many attempts a second."""
    if requests_per_second is not None and requests_per_second <= 0:
        raise ValueError(f"rate_limit must be positive, got {requests_per_second!r}")
    limiter = None
    if requests_per_second is not None:
        # A bucket of one, refilled every 1/rate seconds: no window of one second ever holds
        # more than the rate (a bucket of `rate` per second would allow twice that at start).
        limiter = AsyncLimiter(1, time_period=1 / requests_per_second)
    token = _limiter.set(limiter)
    try:
        yield
    finally:
        _limiter.reset(token)


class ThrottleMiddleware:
    """Waits for the batch's rate limiter and for any pause a 429 imposed on the client."""

    def __init__(
        self,
        *,
        sleep: Callable[[float], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sleep = sleep
        self._clock = clock
        self._resume_at = 0.0

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Send ``request`` once the limiter and any 429 pause allow it."""
        limiter = _limiter.get()
        if limiter is not None:
            await limiter.acquire()
        if self._resume_at:  # 0.0 unless a 429 paused the client and nobody has waited since
            wait = self._resume_at - self._clock()
            if wait > 0:
                await self._sleep(wait)
            else:
                self._resume_at = 0.0  # the pause is over: later calls skip the clock
        try:
            return await call_next(request)
        except RateLimitError as error:
            pause = error.retry_after if error.retry_after is not None else DEFAULT_RATE_LIMIT_PAUSE
            self._resume_at = max(self._resume_at, self._clock() + pause)
            raise
