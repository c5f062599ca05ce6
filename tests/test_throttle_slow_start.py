"""The opening ramp while the limit is unknown, and a 429 with ``Retry-After: 0`` as a signal.

No network and no sleeps: the throttle is driven by hand with scripted answers and a clock
that only moves when a test moves it.
"""

from __future__ import annotations

import asyncio

import pytest

from klarna_om_async.errors import RateLimitError, decode_error
from klarna_om_async.middleware import Request, Response
from klarna_om_async.testing import InstantSleep
from klarna_om_async.throttle import (
    SLOW_START_WINDOW,
    Pace,
    SlowStart,
    ThrottleMiddleware,
    ThrottleRefusal,
)


def answer(request: Request, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        status=status, headers=headers or {}, body=b"", request=request, url="http://k/o"
    )


def too_many(retry_after: str | None = None) -> Exception:
    return decode_error(429, {"Retry-After": retry_after} if retry_after else {}, b"")


class Held:
    """A call_next whose answers the test releases one by one (in the order sent)."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[Response]] = []

    async def __call__(self, request: Request) -> Response:
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        return await future

    def release(self, outcome: Response | Exception) -> None:
        future = self.waiting.pop(0)
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_slow_start_opens_one_more_per_answer_and_ends_when_it_no_longer_binds() -> None:
    start = SlowStart(window=2)
    entered: list[int] = []

    async def attempt(n: int) -> None:
        await start.enter()
        entered.append(n)

    tasks = [asyncio.create_task(attempt(n)) for n in range(5)]
    await settle()
    assert entered == [0, 1]  # the window: two in flight
    start.leave()  # an answer: one out, and the window grows to 3: two more go
    await settle()
    assert entered == [0, 1, 2, 3]
    assert start.in_flight == 3
    # A waiter cancelled after it was woken passes its room on.
    start.leave()
    tasks[4].cancel()
    await settle()
    assert start.window == 4
    start.end()
    assert start.over
    await asyncio.gather(*tasks, return_exceptions=True)
    # Over: nobody waits, whatever is in flight.
    for _ in range(10):
        await start.enter()
    assert start.in_flight == 12


async def test_slow_start_ends_by_itself_at_twice_the_most_in_flight() -> None:
    start = SlowStart(window=4)
    for _ in range(3):
        await start.enter()
    for _ in range(2):
        start.leave()
        await start.enter()
    assert not start.over  # 6 allowed, 3 the most in flight
    start.leave()
    assert not start.over  # 7: past twice the 3, but not yet twice the first window (4)
    await start.enter()
    start.leave()
    assert start.over  # the window (8) is past twice the 3: it no longer binds


async def test_a_lone_call_first_does_not_end_slow_start_for_the_burst_after_it() -> None:
    # A journaled batch reads one order (Klarna's time) before its 128 first sends: its
    # answer ended the ramp (the window, 17, was past twice the 1 in flight).
    start = SlowStart(window=SLOW_START_WINDOW)
    await start.enter()
    start.leave()
    assert not start.over
    entered = [asyncio.create_task(start.enter()) for _ in range(3 * SLOW_START_WINDOW)]
    await settle()
    assert start.in_flight == SLOW_START_WINDOW + 1
    for task in entered:
        task.cancel()
    await asyncio.gather(*entered, return_exceptions=True)


async def test_the_opening_burst_waits_for_answers_and_a_429_ends_the_ramp() -> None:
    throttle = ThrottleMiddleware(sleep=InstantSleep(), clock=lambda: 0.0)
    held = Held()
    calls = [
        asyncio.create_task(throttle(Request("POST", f"/o{n}/captures"), held))
        for n in range(3 * SLOW_START_WINDOW)
    ]
    await settle()
    assert len(held.waiting) == SLOW_START_WINDOW  # not 48 at once
    request = Request("POST", "/o0/captures")
    held.release(answer(request, 201))
    await settle()
    assert len(held.waiting) == SLOW_START_WINDOW + 1  # one answered, two more sent
    held.release(too_many())
    await settle()
    assert throttle.slow_start is None  # the learned pace takes over from here
    assert throttle.adaptive.pace is not None  # one answer in the last second
    while held.waiting:
        held.release(answer(request, 201))
        await settle()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert sum(isinstance(r, Exception) for r in results) == 1


async def test_a_stated_limit_or_the_users_pace_skips_the_ramp() -> None:
    throttle = ThrottleMiddleware(sleep=InstantSleep(), clock=lambda: 0.0)
    request = Request("GET", "/o")

    async def stated(request: Request) -> Response:
        return answer(request, 200, {"X-Ratelimit-Limit": "200"})

    await throttle(request, stated)
    assert throttle.slow_start is None
    assert throttle.rate == pytest.approx(190.0)
    paced = ThrottleMiddleware(sleep=InstantSleep(), clock=lambda: 0.0, pace=Pace(50))
    assert paced.slow_start is None


async def test_a_429_saying_retry_after_0_teaches_a_pace_too() -> None:
    # "Retry-After: 0" (or a date gone by) sets no wait, but says "too fast" all the same.
    now = [0.0]
    throttle = ThrottleMiddleware(sleep=InstantSleep(), clock=lambda: now[0])

    async def ok(request: Request) -> Response:
        return answer(request)

    async def refused(request: Request) -> Response:
        raise too_many("0")

    for i in range(10):
        now[0] = 0.05 + i / 10
        await throttle(Request("GET", "/o"), ok)
    now[0] = 1.0
    with pytest.raises(RateLimitError):
        await throttle(Request("GET", "/o"), refused)
    assert throttle.rate_limited_count == 1
    assert throttle.rate == pytest.approx(9.0)  # 90% of the 10 let through in that second


async def test_a_user_paced_client_still_takes_retry_after_0_as_no_wait() -> None:
    sleeps = InstantSleep()
    throttle = ThrottleMiddleware(sleep=sleeps, clock=lambda: 0.0, pace=Pace(10_000))

    async def refused(request: Request) -> Response:
        raise too_many("0")

    with pytest.raises(RateLimitError):
        await throttle(Request("GET", "/o"), refused)

    async def ok(request: Request) -> Response:
        return answer(request)

    await throttle(Request("GET", "/o"), ok)
    # Its pace's next slot only, no pause: the pace is the user's, and Klarna asked for none.
    assert sleeps.waits == [pytest.approx(1 / 10_000)]
    assert throttle.adaptive.pace is None


async def test_a_wait_for_the_ramp_is_reported_to_the_wait_listeners() -> None:
    now = [0.0]
    throttle = ThrottleMiddleware(sleep=InstantSleep(), clock=lambda: now[0])
    throttle.slow_start = SlowStart(window=1)
    heard: list[tuple[str, float, str]] = []
    throttle.wait_listeners.append(lambda why, seconds, r: heard.append((why, seconds, r.path)))
    held = Held()
    first = asyncio.create_task(throttle(Request("GET", "/first"), held))
    second = asyncio.create_task(throttle(Request("GET", "/second"), held))
    await settle()
    assert len(held.waiting) == 1  # the second waits for room in the window
    now[0] = 0.5
    held.release(answer(Request("GET", "/first")))
    await settle()
    held.release(answer(Request("GET", "/second")))
    await asyncio.gather(first, second)
    assert heard == [("ramp", 0.5, "/second")]  # the first went at once: no wait to tell


async def test_a_call_that_waited_in_the_ramp_past_its_deadline_is_not_sent() -> None:
    now = [0.0]
    throttle = ThrottleMiddleware(sleep=InstantSleep(), clock=lambda: now[0])
    throttle.slow_start = ramp = SlowStart(window=1)
    held = Held()
    first = asyncio.create_task(throttle(Request("GET", "/first"), held))
    late = Request("POST", "/late", deadline=2.0, idempotency_key="k-1")
    second = asyncio.create_task(throttle(late, held))
    await settle()
    now[0] = 2.5  # the first answer comes after the second call's deadline
    held.release(answer(Request("GET", "/first")))
    await first
    await settle()
    assert held.waiting == []  # never sent
    assert second.done()
    with pytest.raises(ThrottleRefusal) as refused:
        await second
    error = refused.value
    assert (error.request_sent, error.outcome_unknown, error.idempotency_key) == (
        False,
        False,
        "k-1",
    )
    assert "opening ramp" in str(error)
    assert ramp.in_flight == 0  # the room it took is given back
