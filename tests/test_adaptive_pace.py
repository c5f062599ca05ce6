"""A pace learned from 429s when Klarna states no limit: down on a 429, back up, settled.

The batches here run over real HTTP on loopback against a small rate-limited server, in
virtual time: every sleep parks its task until the clock reaches its wake-up, and the clock
moves (to the earliest wake-up) only when no request is on the wire, one sleeper at a time.
So a request reaches the server at exactly the virtual time it was sent, and a run is the
same on every machine.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from aiohttp import web

from klarna_om_async import (
    CaptureRequest,
    CaptureStatus,
    Handler,
    KlarnaOM,
    Request,
    Response,
)
from klarna_om_async.config import RetryPolicy
from klarna_om_async.throttle import (
    ADAPTIVE_DECREASE,
    ADAPTIVE_FORGET,
    ADAPTIVE_PROBE,
    ADAPTIVE_RECOVERY,
    LEARNED_SHARE,
    LIMIT_SHARE,
    AdaptiveRate,
    StatedRate,
    ThrottleMiddleware,
)

T = TypeVar("T")


class SimulatedTime:
    """Virtual time for many tasks whose requests go over real sockets.

    ``sleep`` parks the task; ``run`` wakes the earliest sleeper (moving the clock to its
    wake-up) whenever no request is between ``middleware`` and its answer and the tasks that
    can run have run. A task asleep inside ``middleware`` (the transport's pause re-check) is
    not on the wire.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._on_wire: set[asyncio.Task[Any]] = set()
        self._answering = 0  # requests the server is taking its time over (``latency``)
        self._idle = asyncio.Event()
        self._idle.set()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        task = asyncio.current_task()
        assert task is not None
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(seconds, 0.0), next(self._order), wake))
        sending = task in self._on_wire
        if sending:
            self._leave(task)
        try:
            await wake
        finally:
            if sending:
                self._enter(task)

    async def latency(self, seconds: float) -> None:
        """For the server: answer ``seconds`` later. The request stays on the wire, but the
        clock may move meanwhile."""
        self._answering += 1
        self._update()
        try:
            await self.sleep(seconds)
        finally:
            self._answering -= 1
            self._update()

    async def middleware(self, request: Request, call_next: Handler) -> Response:
        """Marks the attempt as on the wire until it is answered."""
        task = asyncio.current_task()
        assert task is not None
        self._enter(task)
        try:
            return await call_next(request)
        finally:
            self._leave(task)

    def _enter(self, task: asyncio.Task[Any]) -> None:
        self._on_wire.add(task)
        self._update()

    def _leave(self, task: asyncio.Task[Any]) -> None:
        self._on_wire.discard(task)
        self._update()

    def _update(self) -> None:
        if len(self._on_wire) > self._answering:
            self._idle.clear()
        else:
            self._idle.set()

    async def run(self, main: Coroutine[Any, Any, T]) -> T:
        work = asyncio.ensure_future(main)
        while not work.done():
            # The safety net only turns a hang (a bug) into a failure; it times nothing.
            await asyncio.wait_for(self._idle.wait(), 30)
            for _ in range(50):  # let every task that can run reach a sleep or the wire
                await asyncio.sleep(0)
            if work.done() or not self._idle.is_set():
                continue
            assert self._sleepers, "every task waits, and none on the clock"
            when, _, wake = heapq.heappop(self._sleepers)
            self.now = max(self.now, when)
            wake.set_result(None)
        return work.result()


class LimitedServer:
    """Books captures, at most ``limit`` a virtual second (fixed windows on the clock's
    seconds, every request counted), 429 beyond; no ``X-Ratelimit-*`` unless ``stated`` (then
    ``X-Ratelimit-Limit: stated_as``, by default the limit, on every answer, or on the 429s
    alone), and ``Retry-After: retry_after`` on 429s if given.
    A booking is answered ``latency`` virtual seconds after it arrived, a 429
    ``reject_latency`` after."""

    def __init__(
        self,
        time: SimulatedTime,
        limit: int,
        *,
        stated: bool = False,
        stated_as: int | None = None,
        stated_on_429s_only: bool = False,
        retry_after: str = "",
        latency: float = 0.0,
        reject_latency: float = 0.0,
    ) -> None:
        self.time = time
        self.latency = latency
        self.reject_latency = reject_latency
        self.limit = limit
        self.stated = stated
        self.stated_as = limit if stated_as is None else stated_as
        self.stated_on_429s_only = stated_on_429s_only
        self.retry_after = retry_after
        #: (virtual arrival time, status, the client's pace then in requests per second)
        self.arrivals: list[tuple[float, int, float | None]] = []
        self.client_rate: Callable[[], float | None] = lambda: None
        #: The order id of each arrival.
        self.orders: list[str] = []
        self._window = -1
        self._used = 0

    async def capture(self, request: web.Request) -> web.Response:
        now = self.time.now
        window = math.floor(now + 1e-9)  # a grid slot may land a hair under a whole second
        if window != self._window:
            self._window, self._used = window, 0
        self._used += 1
        status = 201 if self._used <= self.limit else 429
        self.arrivals.append((now, status, self.client_rate()))
        self.orders.append(request.match_info["order"])
        stating = self.stated and (status == 429 or not self.stated_on_429s_only)
        headers = {"X-Ratelimit-Limit": str(self.stated_as)} if stating else {}
        if status == 201:
            headers["Capture-Id"] = f"cap-{len(self.arrivals)}"
            if self.latency:
                await self.time.latency(self.latency)
            return web.Response(status=201, headers=headers)
        if self.reject_latency:
            await self.time.latency(self.reject_latency)
        if self.retry_after:
            headers["Retry-After"] = self.retry_after
        return web.json_response(
            {"error_code": "TOO_MANY_REQUESTS", "error_messages": ["slow down"]},
            status=429,
            headers=headers,
        )

    def after(self, start: float) -> list[tuple[float, int, float | None]]:
        return [a for a in self.arrivals if a[0] >= start]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[LimitedServer], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(server: LimitedServer) -> str:
        app = web.Application()
        app.router.add_post("/ordermanagement/v1/orders/{order}/captures", server.capture)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def client(url: str, time: SimulatedTime, rate_limit: float | None = None) -> KlarnaOM:
    policy = RetryPolicy(sleep=time.sleep, jitter=lambda d: d, deadline=600)
    return KlarnaOM(
        "u",
        "p",
        base_url=url,
        retry=policy,
        clock=time.clock,
        rate_limit=rate_limit,
        middlewares=[time.middleware],
    )


def throttle_of(om: KlarnaOM) -> ThrottleMiddleware:
    return next(m for m in om.chain if isinstance(m, ThrottleMiddleware))


async def capture_all(om: KlarnaOM, n: int, concurrency: int) -> list[CaptureStatus]:
    items = [(f"o{i}", CaptureRequest(captured_amount=100)) for i in range(n)]
    return [o.status async for o in om.capture_many(items, concurrency=concurrency)]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def two_workers(
    time: SimulatedTime, url: str, n: int, concurrency: int
) -> list[list[CaptureStatus]]:
    """Two clients (workers of one merchant), each capturing ``n`` orders, at once."""

    async def worker(om: KlarnaOM) -> list[CaptureStatus]:
        async with om:
            return await capture_all(om, n, concurrency=concurrency)

    async def both() -> list[list[CaptureStatus]]:
        return await asyncio.gather(worker(client(url, time)), worker(client(url, time)))

    return await time.run(both())


def booked_rate(arrivals: list[tuple[float, int, float | None]]) -> float:
    """Bookings per second from the first booking among ``arrivals`` to the last."""
    booked = [a[0] for a in arrivals if a[1] == 201]
    return (len(booked) - 1) / (booked[-1] - booked[0])


def busiest_second(times: list[float]) -> int:
    return max(sum(1 for t in times[i:] if t < start + 1 - 1e-9) for i, start in enumerate(times))


# --- the algorithm on its own ---------------------------------------------------------------


def test_a_429_drops_the_pace_under_what_got_through_and_it_climbs_back_on_a_curve() -> None:
    rate = AdaptiveRate()
    for i in range(20):
        rate.answered(0.01 + i / 20)  # 20 answers in the second before the 429
    assert rate.limited(asked_at=0.99, now=1.0, resume_at=2.0)
    assert rate.ceiling == 20
    assert rate.rate_at(1.5) == pytest.approx(ADAPTIVE_DECREASE * 20)  # paused: flat
    assert rate.rate_at(2.0) == pytest.approx(18.0)  # the climb starts after the pause
    assert rate.rate_at(2.0 + ADAPTIVE_RECOVERY / 2) == pytest.approx(20 * (1 - 0.1 / 8))
    assert rate.rate_at(2.0 + ADAPTIVE_RECOVERY) == pytest.approx(20.0)
    assert rate.rate_at(2.0 + 1.5 * ADAPTIVE_RECOVERY) == pytest.approx(20 * (1 + 0.1 / 8))
    # Well past the estimate without a 429: forgotten, the client is unpaced again.
    forget_at = 2.0 + ADAPTIVE_RECOVERY * (1 + ((ADAPTIVE_FORGET - 1) / 0.1) ** (1 / 3))
    assert rate.rate_at(forget_at - 0.01) is not None
    assert rate.rate_at(forget_at + 0.01) is None
    assert rate.pace_at(forget_at + 0.01) is None
    assert rate.pace is None


def test_a_429_without_answers_after_the_pace_was_forgotten_learns_it_anew() -> None:
    # The forgotten pace was kept under a ceiling of 0: the next pace_at divided by it.
    rate = AdaptiveRate()
    for i in range(20):
        rate.answered(0.01 + i / 20)
    assert rate.limited(asked_at=0.99, now=1.0, resume_at=2.0)
    later = 2.0 + 10 * ADAPTIVE_RECOVERY  # forgotten: far past the estimate
    assert rate.rate_at(later) is None
    assert not rate.limited(asked_at=later, now=later, resume_at=later + 1.0)  # no answers
    assert rate.pace_at(later + 0.5) is None
    for i in range(10):  # the answers to the requests in flight set the new estimate
        rate.answered(later + 0.1 + i / 20)
    assert rate.ceiling == 10
    pace = rate.pace_at(later + 0.7)
    assert pace is not None
    assert pace.interval == pytest.approx(1 / (ADAPTIVE_DECREASE * 10))


def test_one_overshoot_lowers_the_pace_once() -> None:
    rate = AdaptiveRate()
    for i in range(10):
        rate.answered(0.05 + i / 10)
    assert rate.limited(asked_at=0.95, now=1.0, resume_at=1.0)
    # The burst of 429s to requests sent before the decrease is the same event; so are
    # 429s to requests sent within a window after it (Klarna's window may still be full).
    assert not rate.limited(asked_at=0.97, now=1.02, resume_at=1.0)
    assert not rate.limited(asked_at=1.5, now=1.6, resume_at=1.6)
    assert rate.ceiling == 10
    # Answers to requests that were in flight raise the estimate, for one window more.
    for i in range(5):
        rate.answered(1.05 + i / 100)
    assert rate.ceiling == 14  # 9 of the first second still within the last second, + 5
    # A 429 to a request sent a window after the decrease is a new event.
    rate.answered(2.0)
    assert rate.limited(asked_at=2.05, now=2.1, resume_at=2.1)
    assert rate.decreases == 2


def test_a_429_with_nothing_let_through_in_the_last_second_teaches_no_pace() -> None:
    rate = AdaptiveRate()
    # A lone call, or a second in which every request got a 429 (another client of the
    # merchant used the quota up): zero answers is no rate. Only the pause slows down.
    assert not rate.limited(asked_at=0.0, now=0.2, resume_at=1.2)
    assert rate.rate_at(0.5) is None
    assert rate.pace is None
    # Answers that come in later measure the rate when the next 429 comes.
    for i in range(7):
        rate.answered(1.3 + i / 100)
    assert rate.limited(asked_at=1.35, now=1.4, resume_at=2.4)
    assert rate.ceiling == 7
    # With a pace, a second of nothing but 429s keeps the estimate (no collapse to 1/s).
    assert not rate.limited(asked_at=5.0, now=5.1, resume_at=6.1)
    assert rate.ceiling == 7
    assert rate.decreases == 1


def test_a_second_429_soon_after_a_decrease_does_not_compound_it() -> None:
    rate = AdaptiveRate()
    for i in range(20):
        rate.answered(0.01 + i / 20)
    assert rate.limited(asked_at=0.99, now=1.0, resume_at=1.0)  # no pause: paced at 18/s
    for i in range(18):
        rate.answered(1.0 + i / 18)  # sent at the new pace: 18 in the next second
    # A window after the decrease a new 429: the last second's answers were held at the
    # lowered pace, so they are not the limit: the pace drops from the rate it was at.
    first = rate.ceiling  # 20, raised a little by answers to requests then in flight
    assert rate.limited(asked_at=2.05, now=2.1, resume_at=2.1)
    assert rate.ceiling == pytest.approx(rate_after(first, 1.1))
    assert rate.ceiling > 19


def rate_after(ceiling: float, seconds: float) -> float:
    return ceiling * (1 + (1 - ADAPTIVE_DECREASE) * (seconds / ADAPTIVE_RECOVERY - 1) ** 3)


# --- a batch against a limit nobody states --------------------------------------------------


async def test_without_rate_headers_the_pace_drops_after_a_429_then_climbs_and_settles(
    serve: Callable[[LimitedServer], Awaitable[str]],
) -> None:
    time = SimulatedTime()
    server = LimitedServer(time, limit=20)
    url = await serve(server)
    async with client(url, time) as om:
        throttle = throttle_of(om)
        server.client_rate = lambda: throttle.rate
        statuses = await time.run(capture_all(om, 300, concurrency=32))
    assert statuses == [CaptureStatus.CAPTURED] * 300

    # Second 0, before anything is known: slow start, but the server answers in no virtual
    # time, so its window opens at once (workers that got a 201 send their next item at
    # once too). 20 booked, the rest refused, and the 429s taught 90% of those 20.
    first = [a for a in server.arrivals if a[0] < 1 - 1e-9]  # the server's second 0
    opening = [a for a in first if a[0] == 0.0]
    assert sum(a[1] == 201 for a in opening) == 20
    assert {a[2] for a in opening if a[1] == 201} == {None}
    assert {a[2] for a in opening[-5:]} == {ADAPTIVE_DECREASE * 20}
    # Klarna's window stays full until the second ends: the client probes it, one request
    # per ADAPTIVE_PROBE (the retries, after their 0.5 s), instead of sending into it at
    # the full pace or pausing blindly.
    probes = [a for a in first if a[0] > 0]
    assert [a[1] for a in probes] == [429] * len(probes)
    assert gaps([a[0] for a in probes]) == pytest.approx([ADAPTIVE_PROBE] * (len(probes) - 1))
    # The window ends: the held-back requests leave on the learned grid, one by one.
    resumed = server.after(1.0 - 1e-9)
    assert resumed[0][0] == pytest.approx(1.0)
    assert resumed[0][1] == 201
    assert 18.0 < (resumed[0][2] or 0) < 20.0  # climbing since the probe's pause ended
    assert all(1 / 20.5 < gap < 1 / 18 for gap in gaps([a[0] for a in resumed[:5]]))
    assert min(gaps([a[0] for a in resumed])) >= 1 / (ADAPTIVE_FORGET * 20)
    # From there the pace climbs back to 20/s, and past it, until a 429 lowers it again.
    rates = [a[2] for a in resumed]
    assert all(r is not None for r in rates)
    peak = next(i for i, r in enumerate(rates) if r is not None and r > 20.5)
    assert any(r is not None and r < 19.5 for r in rates[peak:])  # under the limit again
    # It settles just under the limit: each later overshoot costs a 429 or two (the next
    # slot on the slower grid may still fall in Klarna's full window), not a burst (the
    # requests asleep on slots given at the old rate take new ones on the slower grid), and
    # the batch books 90%+ of what the limit allows.
    later_429s = [a[0] for a in resumed if a[1] == 429]
    overshoots = [b for a, b in itertools.pairwise([-math.inf, *later_429s]) if b - a > 1]
    assert 1 <= len(overshoots) <= 3
    assert len(later_429s) <= 2 * len(overshoots)
    assert booked_rate(resumed) >= 0.9 * 20
    assert om.rate_limited_count == len(first) - 20 + len(later_429s)


async def test_a_stated_limit_wins_over_the_learned_pace(
    serve: Callable[[LimitedServer], Awaitable[str]],
) -> None:
    time = SimulatedTime()
    server = LimitedServer(time, limit=20, stated=True)
    url = await serve(server)
    async with client(url, time) as om:
        throttle = throttle_of(om)
        server.client_rate = lambda: throttle.rate
        statuses = await time.run(capture_all(om, 100, concurrency=32))
    assert statuses == [CaptureStatus.CAPTURED] * 100
    resumed = server.after(1.0)
    # Paced at 95% of the stated 20/s from the first answer on, whatever the 429s said.
    assert {round(a[2] or 0, 9) for a in resumed} == {19.0}
    assert gaps([a[0] for a in resumed]) == pytest.approx([1 / 19] * (len(resumed) - 1))
    assert [a for a in resumed if a[1] == 429] == []


async def test_a_limit_stated_only_on_429s_paces_the_client_at_it(
    serve: Callable[[LimitedServer], Awaitable[str]],
) -> None:
    # The 429s of the opening say the limit: from then on the client paces under it, as it
    # would had every answer said it (it used to learn a pace from 429s instead: 45 of them).
    time = SimulatedTime()
    server = LimitedServer(time, limit=20, stated=True, stated_on_429s_only=True)
    url = await serve(server)
    async with client(url, time) as om:
        throttle = throttle_of(om)
        server.client_rate = lambda: throttle.rate
        statuses = await time.run(capture_all(om, 100, concurrency=32))
    assert statuses == [CaptureStatus.CAPTURED] * 100
    resumed = server.after(1.0)
    assert {round(a[2] or 0, 9) for a in resumed} == {19.0}
    assert [a for a in resumed if a[1] == 429] == []


async def test_a_stated_limit_above_the_real_one_is_cut_by_429s_and_settles_under_it(
    serve: Callable[[LimitedServer], Awaitable[str]],
) -> None:
    # Klarna says 40/s but lets 20 through: paced at the stated 38/s, every second met a 429.
    time = SimulatedTime()
    server = LimitedServer(time, limit=20, stated=True, stated_as=40)
    url = await serve(server)
    async with client(url, time) as om:
        throttle = throttle_of(om)
        server.client_rate = lambda: throttle.rate
        statuses = await time.run(capture_all(om, 300, concurrency=32))
        stated = throttle.stated
    assert statuses == [CaptureStatus.CAPTURED] * 300
    assert stated is not None
    assert stated.cuts >= 1
    later = server.after(3.0)
    assert sum(a[1] == 429 for a in later) <= 3
    assert max(a[2] or 0 for a in later) < 40 * LEARNED_SHARE  # it climbs no higher
    assert booked_rate(later) >= 0.85 * 20


async def test_clients_sharing_a_stated_quota_settle_under_it_together(
    serve: Callable[[LimitedServer], Awaitable[str]],
) -> None:
    # Two workers of one merchant, each told the merchant's limit: each paced at it, they
    # sent twice what Klarna lets through, and met a 429 every second.
    time = SimulatedTime()
    server = LimitedServer(time, limit=20, stated=True)
    outcomes = await two_workers(time, await serve(server), 150, concurrency=16)
    assert outcomes == [[CaptureStatus.CAPTURED] * 150] * 2
    later = server.after(3.0)
    assert sum(a[1] == 429 for a in later) <= 5
    assert booked_rate(later) >= 0.85 * 20


async def test_a_429_that_says_to_wait_a_second_shares_a_stated_quota_by_its_pauses(
    serve: Callable[[LimitedServer], Awaitable[str]],
) -> None:
    # "Retry-After: 1": Klarna's window is full until then. The pauses share the quota out
    # (whoever is not paused has the window); cutting the pace as well idled it (two
    # workers: 1.29x the floor, against 1.11x).
    time = SimulatedTime()
    server = LimitedServer(time, limit=20, stated=True, retry_after="1")
    url = await serve(server)
    oms = [client(url, time), client(url, time)]

    async def worker(om: KlarnaOM) -> list[CaptureStatus]:
        async with om:
            return await capture_all(om, 150, concurrency=16)

    async def both() -> list[list[CaptureStatus]]:
        return await asyncio.gather(*(worker(om) for om in oms))

    assert await time.run(both()) == [[CaptureStatus.CAPTURED] * 150] * 2
    assert [getattr(throttle_of(om).stated, "cuts", None) for om in oms] == [0, 0]
    assert booked_rate(server.after(3.0)) >= 0.85 * 20


async def test_a_429_whose_wait_the_client_caps_short_still_cuts_the_stated_pace(
    serve: Callable[[LimitedServer], Awaitable[str]],
) -> None:
    # "Retry-After: 1", but the client waits at most 0.3 s (retry_after_cap): the short
    # pause leaves the slowdown to the pace, as a 429 without a wait does.
    time = SimulatedTime()
    server = LimitedServer(time, limit=20, stated=True, stated_as=40, retry_after="1")
    policy = RetryPolicy(sleep=time.sleep, jitter=lambda d: d, deadline=600, retry_after_cap=0.3)
    om = KlarnaOM(
        "u",
        "p",
        base_url=await serve(server),
        retry=policy,
        clock=time.clock,
        middlewares=[time.middleware],
    )
    async with om:
        statuses = await time.run(capture_all(om, 150, concurrency=16))
    assert statuses == [CaptureStatus.CAPTURED] * 150
    assert getattr(throttle_of(om).stated, "cuts", 0) >= 1


async def test_workers_kept_under_a_stated_pace_by_their_concurrency_settle_too(
    serve: Callable[[LimitedServer], Awaitable[str]],
) -> None:
    # Klarna states 200/s, lets 20 through, and answers (429s too) in 0.2 s; two workers of
    # 8 requests in flight each send about 40/s: no queue forms on a pace of 190/s, and
    # few answers get through, yet their own 429s (several a second) say they overshoot.
    # They were never cut: 429s for ever.
    time = SimulatedTime()
    server = LimitedServer(
        time, limit=20, stated=True, stated_as=200, latency=0.2, reject_latency=0.2
    )
    outcomes = await two_workers(time, await serve(server), 200, concurrency=8)
    assert outcomes == [[CaptureStatus.CAPTURED] * 200] * 2
    later = server.after(10.0)
    assert sum(a[1] == 429 for a in later) <= 0.05 * len(later)
    assert booked_rate(later) >= 0.85 * 20


async def test_the_users_rate_limit_wins_over_both(
    serve: Callable[[LimitedServer], Awaitable[str]],
) -> None:
    time = SimulatedTime()
    server = LimitedServer(time, limit=20, stated=True)
    url = await serve(server)
    async with client(url, time, rate_limit=25) as om:
        throttle = throttle_of(om)
        server.client_rate = lambda: throttle.rate
        statuses = await time.run(capture_all(om, 100, concurrency=32))
    assert statuses == [CaptureStatus.CAPTURED] * 100
    # 25/s is too fast for this server, and it says so, but the user's pace is the pace.
    assert om.rate_limited_count > 0
    assert all(a[2] == pytest.approx(25 * LIMIT_SHARE) for a in server.arrivals)
    assert min(gaps([a[0] for a in server.arrivals])) >= 1 / 25 - 1e-9
    assert throttle.adaptive.pace is None


async def test_the_users_rate_limit_wins_over_the_learned_pace(
    serve: Callable[[LimitedServer], Awaitable[str]],
) -> None:
    time = SimulatedTime()
    server = LimitedServer(time, limit=20)
    url = await serve(server)
    async with client(url, time, rate_limit=25) as om:
        throttle = throttle_of(om)
        server.client_rate = lambda: throttle.rate
        statuses = await time.run(capture_all(om, 100, concurrency=32))
    assert statuses == [CaptureStatus.CAPTURED] * 100
    assert om.rate_limited_count > 0
    assert all(a[2] == pytest.approx(25 * LIMIT_SHARE) for a in server.arrivals)
    assert min(gaps([a[0] for a in server.arrivals])) >= 1 / 25 - 1e-9
    assert throttle.adaptive.pace is None


async def test_a_server_saying_retry_after_0_beyond_its_limit_is_learned_from(
    serve: Callable[[LimitedServer], Awaitable[str]],
) -> None:
    # "Retry-After: 0" sets no wait, but the 429 still says "too fast" (review F4: such a
    # server used to get about 11 429s per capture at 20/s, none of them learned from).
    time = SimulatedTime()
    server = LimitedServer(time, limit=20, retry_after="0")
    url = await serve(server)
    async with client(url, time) as om:
        throttle = throttle_of(om)
        server.client_rate = lambda: throttle.rate
        statuses = await time.run(capture_all(om, 300, concurrency=32))
    assert statuses == [CaptureStatus.CAPTURED] * 300
    assert throttle.adaptive.decreases >= 1
    # Once learned, far fewer than one 429 per request: a few per overshoot of the limit.
    later = server.after(1.0 - 1e-9)
    assert sum(a[1] == 429 for a in later) <= 0.05 * len(later)
    assert om.rate_limited_count <= 0.2 * 300
    assert booked_rate(later) >= 0.9 * 20


def test_a_429_before_any_answer_learns_from_the_answers_its_pause_waits_for() -> None:
    # A batch's opening burst: the limit is met before the first answer comes back.
    rate = AdaptiveRate()
    assert not rate.limited(asked_at=-math.inf, now=0.01, resume_at=1.01)
    assert rate.pace is None
    # The answers to the requests in flight come during the pause: they are the estimate,
    # so the requests the pause held back leave on a grid, not all at once.
    for i in range(50):
        rate.answered(0.15 + i / 250)
    assert rate.ceiling == 50
    assert rate.rate_at(1.01) == pytest.approx(ADAPTIVE_DECREASE * 50)
    # The same burst's later 429s are the same event.
    assert not rate.limited(asked_at=-math.inf, now=0.5, resume_at=1.5)
    assert rate.decreases == 0


def test_a_lone_429_before_any_answer_still_teaches_nothing() -> None:
    rate = AdaptiveRate()
    assert not rate.limited(asked_at=-math.inf, now=0.0, resume_at=1.0)
    rate.answered(1.2)  # its own retry, after the pause: no measure of the limit
    assert rate.pace is None
    assert rate.rate_at(1.2) is None


def test_when_a_share_of_the_last_second_was_refused_what_got_through_is_the_limit() -> None:
    # A token bucket's first burst made the estimate too high (300 for a 200/s limit):
    # paced at 270/s, a fifth of the answers are 429s, and what got through is the limit.
    rate = AdaptiveRate()
    for i in range(300):
        rate.answered(0.001 + i / 300)
    assert rate.limited(asked_at=0.99, now=1.0, resume_at=1.0)
    assert rate.ceiling == 300
    for i in range(540):
        rate.answered(1.0 + i / 200)  # what the bucket lets through: 200/s
    # The first 429 at the new pace: nothing says yet that the pace, not a passing burst,
    # is too fast (one 429 in the last second): down from the rate the client was at.
    assert rate.limited(asked_at=2.6, now=2.6, resume_at=2.6)
    assert rate.ceiling > 250
    for i in range(40):  # 429s to requests sent within a window after it: the same event
        assert not rate.limited(asked_at=2.8, now=2.8 + i / 44, resume_at=2.8 + i / 44)
    # A window later, a fifth of the answers were 429s: the pace itself is too fast, and
    # what got through is the limit, averaged over two windows: 194.5 (of the last second's,
    # 189; the limit, 200).
    assert rate.limited(asked_at=3.7, now=3.75, resume_at=3.75)
    assert rate.ceiling == 194.5


def test_the_limit_is_not_learned_from_one_second_that_undercounts_it() -> None:
    # The first estimate came from an opening burst that two of Klarna's windows let
    # through (260 for a limit of 200). The next second holds that overshoot's 429s and a
    # pause: its answers (130) undercount the limit, and a pace learned from them would
    # idle a third of the quota for seconds. Two windows' answers average nearer to it
    # (169 here, where the seconds before the burst had few answers).
    rate = AdaptiveRate()
    for i in range(260):
        rate.answered(0.2 + i / 260)
    assert rate.limited(asked_at=1.15, now=1.2, resume_at=1.3)
    assert rate.ceiling == 260
    for i in range(40):  # the overshoot's 429s: the same event
        assert not rate.limited(asked_at=1.25, now=1.3 + i / 100, resume_at=1.4 + i / 100)
    for i in range(130):
        rate.answered(1.75 + i / 200)
    # A 429 to a request sent at the lowered pace (234/s, still too fast): the refusals
    # make the pace itself too fast, and what got through is the limit.
    assert rate.limited(asked_at=2.3, now=2.4, resume_at=2.4)
    assert rate.measured(2.4) == 130
    two_windows = sum(1 for i in range(260) if 0.2 + i / 260 > 2.4 - 2) + 130
    assert rate.ceiling == two_windows / 2 == 169


def test_a_pace_too_fast_that_probes_hold_back_is_lowered_to_what_got_through() -> None:
    # A token bucket's first burst made the estimate too high (300 for 200/s). Paced at
    # 270/s, each window empties the bucket once: one 429, then a probe's pause that holds
    # every request back, so few 429s (no refused share) and the pace is never measured
    # too fast by them. What the two windows since got through is.
    rate = AdaptiveRate()
    for i in range(300):
        rate.answered(0.001 + i / 300)
    assert rate.limited(asked_at=0.99, now=1.0, resume_at=1.1)
    for i in range(240):
        rate.answered(1.0 + i / 200)  # what the bucket lets through: 200/s
    # Within two windows of the opening its ramp is in the answers: down from the pace.
    first = rate.ceiling  # 300, raised a little by answers to requests then in flight
    assert rate.limited(asked_at=2.15, now=2.2, resume_at=2.3)
    assert rate.ceiling == pytest.approx(rate_after(first, 1.1))
    assert rate.ceiling > 280
    for i in range(240, 480):
        rate.answered(1.0 + i / 200)
    # A window later (two after the opening, one after the last decrease): what the two
    # windows got through, not the pace the client was at.
    assert rate.limited(asked_at=3.3, now=3.4, resume_at=3.5)
    assert rate.ceiling == pytest.approx(200, abs=1)


async def test_a_full_window_costs_a_probe_per_pause_not_a_429_per_slot(
    serve: Callable[[LimitedServer], Awaitable[str]],
) -> None:
    # The limit halves at t = 3 (another client of the merchant takes its share), so for
    # seconds the learned pace fills Klarna's window halfway through. Each 429 pauses the
    # client ADAPTIVE_PROBE; requests asleep on pace slots taken before it must not wake
    # into the full window one slot after another (before: a 429 every 10 ms, 64 in all).
    time = SimulatedTime()
    server = LimitedServer(time, limit=200, latency=0.25, reject_latency=0.01)
    capture = server.capture

    async def halving(request: web.Request) -> web.Response:
        if time.now >= 3.0:
            server.limit = 100
        return await capture(request)

    server.capture = halving  # type: ignore[method-assign]
    url = await serve(server)
    async with client(url, time) as om:
        statuses = await time.run(capture_all(om, 1500, concurrency=128))
        ceiling = throttle_of(om).adaptive.ceiling
    assert statuses == [CaptureStatus.CAPTURED] * 1500
    refused = [a[0] for a in server.after(3.0) if a[1] == 429]
    # The probe, and what was on its way before its 429 came back: never more in a pause.
    assert max(sum(1 for t in refused if s <= t < s + ADAPTIVE_PROBE) for s in refused) <= 3
    assert len(refused) <= 30
    assert 90 <= ceiling <= 100


def test_a_lone_429_to_a_client_sending_below_its_pace_keeps_the_pace() -> None:
    # A batch learned 100/s and ended; the application goes on with single calls (5/s). A
    # window and a half after the last decrease, one of them gets a 429 (another system of
    # the merchant used the quota up). The two windows' answers (the batch's tail and the
    # calls) are what the client sent, not what Klarna lets through: the pace stays.
    rate = AdaptiveRate()
    for i in range(500):
        rate.answered(0.005 + i / 100)
    assert rate.limited(asked_at=4.99, now=5.0, resume_at=5.1)
    for i in range(500, 1000):
        rate.answered(0.005 + i / 100)
    assert rate.limited(asked_at=9.99, now=10.0, resume_at=10.1)
    for i in range(20):
        rate.answered(10.1 + i / 100)  # the batch's tail
    for i in range(6):
        rate.answered(10.45 + i / 5)  # the single calls
    current = rate.rate_at(11.5)
    assert rate.limited(asked_at=11.45, now=11.5, resume_at=11.6)
    assert rate.ceiling == current


async def test_a_batchs_pace_holds_when_the_clients_pace_held_its_items_back(
    serve: Callable[[LimitedServer], Awaitable[str]],
) -> None:
    # A batch limited to 10/s beside 100 single calls on a client limited to 40/s: the
    # batch's items took their slots, then queued behind the single calls for the client's,
    # and left together at the client's pace (25 in one second).
    time = SimulatedTime()
    server = LimitedServer(time, limit=1000)
    url = await serve(server)

    async def batch(om: KlarnaOM) -> list[CaptureStatus]:
        items = [(f"b{i}", CaptureRequest(captured_amount=100)) for i in range(40)]
        return [o.status async for o in om.capture_many(items, concurrency=64, rate_limit=10)]

    async def singles(om: KlarnaOM) -> None:
        request = CaptureRequest(captured_amount=100)
        await asyncio.gather(*(om.captures.create(f"s{i}", request) for i in range(100)))

    async def both() -> list[CaptureStatus]:
        async with client(url, time, rate_limit=40) as om:
            statuses, _ = await asyncio.gather(batch(om), singles(om))
            return statuses

    assert await time.run(both()) == [CaptureStatus.CAPTURED] * 40
    sent = [a[0] for a in server.arrivals]
    batch_sent = [t for t, order in zip(sent, server.orders, strict=True) if order[0] == "b"]
    assert min(gaps(batch_sent)) >= 1 / 10 - 1e-9
    assert min(gaps(sent)) >= 1 / 40 - 1e-9  # and the client's pace held too


def test_a_stated_pace_is_cut_once_per_overshoot_and_climbs_back_no_higher() -> None:
    stated = StatedRate(20, now=0.0)  # paced at 19/s

    def limited(
        sent_at: float,
        measured: int,
        backlog: float = 5.0,
        paused_until: float = 0.0,
        refused: int = 1,
    ) -> bool:
        now = sent_at + 0.1
        return stated.limited(
            sent_at=sent_at,
            now=now,
            resume_at=now + 0.1,
            paused_until=paused_until,
            measured=measured,
            backlog=backlog,
            refused=refused,
        )

    def pace() -> float:
        return 1 / stated.pace.interval

    # Sent within a window of the limit being stated: sent into a window it had not seen.
    assert not limited(sent_at=0.5, measured=19)
    # What Klarna let through in the last window is W, when fewer than the pace.
    assert limited(sent_at=1.8, measured=12)
    assert pace() == pytest.approx(ADAPTIVE_DECREASE * 12)
    assert not limited(sent_at=2.6, measured=3)  # the same overshoot
    # On the curve: back at W after ADAPTIVE_RECOVERY, then above it, never above the
    # stated rate.
    assert 1 / stated.pace_at(2.0 + ADAPTIVE_RECOVERY).interval == pytest.approx(12)
    assert 1 / stated.pace_at(60.0).interval == pytest.approx(19)
    # A pause fell in the last window: its answers undercount, so W is the pace itself.
    assert limited(sent_at=61.0, measured=2, paused_until=60.8)
    assert pace() == pytest.approx(ADAPTIVE_DECREASE * 19)
    # Klarna states the limit anew while the pace climbs back: the cut stands.
    stated.state(21, now=61.5)
    stated.state(20, now=61.6)
    assert pace() == pytest.approx(ADAPTIVE_DECREASE * 19)
    # A web service's call, sent far below the pace, no queue on it (its retry may meet
    # the next call in one slot): its 429s (another client used the quota up) tell nothing
    # of the limit, however many.
    for second in range(100, 130):
        assert not limited(sent_at=float(second), measured=1, backlog=1.0, refused=2)
    assert 1 / stated.pace_at(130.0).interval == pytest.approx(19)
    assert stated.cuts == 2
    # A batch whose concurrency keeps it under the pace (no queue on it), beside another
    # worker: its own 429s say it overshoots.
    assert limited(sent_at=131.0, measured=9, backlog=0.0, refused=3)
    assert pace() == pytest.approx(ADAPTIVE_DECREASE * 19 / 2)  # W halved at most
    assert stated.cuts == 3
    # Klarna lowers the limit under the pace: it is the pace.
    stated.state(5, now=132.0)
    assert 1 / stated.pace_at(132.0).interval == pytest.approx(4.75)


def test_a_stated_pace_never_falls_under_the_floor_nor_rises_by_a_cut() -> None:
    stated = StatedRate(1, now=0.0)  # paced at 0.95/s, under MIN_ADAPTIVE_RATE
    for second in range(2, 40, 2):
        stated.limited(
            sent_at=float(second),
            now=second + 0.1,
            resume_at=second + 1.1,
            paused_until=0.0,
            measured=0,
            backlog=5.0,
            refused=1,
        )
        assert 1 / stated.pace_at(second + 0.1).interval == pytest.approx(0.95)
