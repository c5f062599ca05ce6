"""The one place that talks to aiohttp: send a request, read the whole answer, release it."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Awaitable, Callable

import aiohttp

from ._klarna_clock import KlarnaClock
from .errors import KlarnaConnectionError, KlarnaTimeoutError
from .middleware import Request, Response

__all__ = ("AiohttpTransport", "BeforeSend")

#: Called with each attempt once it has its connection slot, right before it is sent: None to
#: send at once, or an awaitable to wait for first (it may raise to refuse the attempt).
BeforeSend = Callable[[Request], Awaitable[None] | None]

# Passed on every request so a session's own timeouts (a borrowed session's default `total`
# among them) never span our retries; the attempt's deadline is kept by `_Deadlines`.
_NO_AIOHTTP_TIMEOUT = aiohttp.ClientTimeout()
# Event-loop timers may fire up to a clock tick early.
_EARLY = 1e-3


class _Deadline:
    """One attempt's deadline and the task it cancels when it passes."""

    __slots__ = ("cancelling", "expired", "task", "when")

    def __init__(self, task: asyncio.Task[object], when: float) -> None:
        self.task = task
        self.when = when
        self.cancelling = task.cancelling()
        self.expired = False


class _Deadlines:
    """Per-attempt timeouts for every attempt in flight, kept with ONE event-loop timer.

    aiohttp's own per-request timeout schedules and cancels a loop timer per request, about a
    tenth of the client's CPU per capture. All attempts here share one timeout, so deadlines
    fall due in the order the attempts started: a timer at the oldest pending deadline serves
    them all. A passed deadline cancels its task, as ``asyncio.timeout`` does, and ``finish``
    tells whether a cancellation was ours to turn into a timeout.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        # Insertion order is deadline order; values unused (an ordered set).
        self._pending: dict[_Deadline, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> _Deadline:
        """Start the current task's attempt clock."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Klarna calls must run inside an asyncio task")
        loop = task.get_loop()
        deadline = _Deadline(task, loop.time() + self.seconds)
        self._pending[deadline] = None
        if self._timer is None:
            self._timer = loop.call_at(deadline.when, self._expire, loop)
        return deadline

    def finish(self, deadline: _Deadline) -> bool:
        """Stop the clock; True if the deadline passed and only it cancelled the task."""
        self._pending.pop(deadline, None)
        return deadline.expired and deadline.task.uncancel() <= deadline.cancelling

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time() + _EARLY
        due = []
        for deadline in self._pending:
            if deadline.when > now:
                self._timer = loop.call_at(deadline.when, self._expire, loop)
                break
            due.append(deadline)
        for deadline in due:
            del self._pending[deadline]
            deadline.expired = True
            deadline.task.cancel()


class _Slots:
    """Bounds the attempts holding a connection; waiting here is not part of any attempt.

    aiohttp's connector makes a request wait for a free pooled connection inside the
    request, where any timeout around it counts the wait. Attempts queue here instead, before
    their clock starts, so a long queue never times out an attempt that never reached Klarna.
    First come, first served: a released slot goes straight to the longest waiting attempt.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    def grow(self, size: int) -> None:
        """Allow ``size`` attempts at once if that is more than now."""
        for _ in range(size - self.size):
            self.release()  # each release adds a slot (or hands one to a waiter)
        self.size = max(self.size, size)

    def acquire(self) -> Awaitable[None] | None:
        """Take a slot: None when one is free (no coroutine for the common case, as
        ``asyncio.Semaphore.acquire`` would cost two), else an awaitable that waits for one."""
        if self._free and not self._waiters:
            self._free -= 1
            return None
        return self._wait()

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot as it was cancelled: the next one takes it
            elif waiter in self._waiters:  # (a release may have dropped it, cancelled, already)
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give the slot back (to the first attempt waiting for one, if any)."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


def _reason(error: OSError) -> str:
    """A human reason for a failed connect: "Connection refused", not the call's repr."""
    if isinstance(error.errno, int) and error.errno > 0:
        return os.strerror(error.errno)
    return error.strerror or str(error) or type(error).__name__


class AiohttpTransport:
    """Sends one HTTP attempt with its own timeout and returns the fully read response.

    The per-attempt timeout covers connecting, sending and reading the whole answer; it is
    kept here rather than by the session, so a session's own ``total`` timeout never spans
    the retry loop and its sleeps. It starts once the attempt has a connection slot
    (``slots``, at most the connector's limit): queueing for the pool is not the attempt.
    ``before_send`` runs between the two (the client passes ``ThrottleMiddleware.recheck``):
    an attempt that queued for a connection while a 429 paused the client waits the pause
    out there, or is refused unsent, and that wait is not part of the attempt either.

    A borrowed session's settings never change what the client sees: every request passes
    ``raise_for_status=False``, no session middlewares, ``auto_decompress=True``, an absolute
    URL (a session ``base_url`` is ignored), its own timeout, and our ``Authorization``
    header (over a default one). The session's proxy settings and connector are used.
    Every answer's ``Date`` header (but a 5xx's) is shown to ``klarna_clock``: Klarna's time.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        timeout: float,
        slots: _Slots | None = None,
        before_send: BeforeSend | None = None,
        klarna_clock: KlarnaClock | None = None,
    ) -> None:
        self._session = session
        self._klarna_clock = klarna_clock
        self._base_url = base_url
        self._deadlines = _Deadlines(timeout)
        self.slots = slots
        self._before_send = before_send

    async def __call__(self, request: Request) -> Response:
        """Send ``request``; raise KlarnaTimeoutError / KlarnaConnectionError on failure.

        Whatever ``before_send`` raises is raised as is, with nothing sent.
        """
        slots = self.slots
        if slots is not None:
            waiting = slots.acquire()
            if waiting is not None:
                await waiting
        try:
            if self._before_send is not None:
                waiting = self._before_send(request)
                if waiting is not None:
                    await waiting
            # The attempt itself runs in this coroutine: a second one per attempt was one
            # more object in flight, for the garbage collector to count, on every capture.
            url = self._base_url + request.path
            deadline = self._deadlines.start()
            timed_out = False
            try:
                try:
                    async with self._session.request(
                        request.method,
                        url,
                        data=request.body,
                        headers=request.headers,
                        timeout=_NO_AIOHTTP_TIMEOUT,
                        # A redirected POST could be replayed elsewhere; surface 3xx as an error.
                        allow_redirects=False,
                        raise_for_status=False,
                        auto_decompress=True,
                        middlewares=(),
                    ) as answer:
                        # A 5xx may come from a proxy or balancer in front of Klarna, by
                        # its own clock.
                        if self._klarna_clock is not None and answer.status < 500:
                            self._klarna_clock.saw(answer.headers.get("Date"))
                        return Response(
                            answer.status, answer.headers, await answer.read(), request, url
                        )
                finally:
                    timed_out = self._deadlines.finish(deadline)
            except asyncio.CancelledError as exc:
                if not timed_out:
                    raise  # the caller cancelled us: not ours to swallow
                error = self._timeout()
                cause: BaseException = exc
            except TimeoutError as exc:  # before ClientError: ServerTimeoutError is both
                error = self._timeout()
                cause = exc
            except aiohttp.ClientConnectorError as exc:
                # No connection was made (DNS, refused, TLS handshake, proxy): nothing was sent.
                reason = _reason(exc.os_error)
                error = KlarnaConnectionError(
                    f"Could not connect to {exc.host}:{exc.port} ({reason})",
                    request_sent=False,
                )
                cause = exc
            except aiohttp.ClientError as exc:
                error = KlarnaConnectionError(
                    f"Connection to Klarna failed: {type(exc).__name__}: {exc}"
                )
                cause = exc
            error.bind(
                method=request.method, url=url, idempotency_key=request.idempotency_key, attempts=1
            )
            raise error from cause
        finally:
            if slots is not None:
                slots.release()

    def _timeout(self) -> KlarnaConnectionError:
        return KlarnaTimeoutError(f"No answer from Klarna within {self._deadlines.seconds}s")
