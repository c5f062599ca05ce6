"""Pacing on a fixed grid (GCRA): per client and per batch, with a clock the test drives."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from klarna_om_async import CaptureRequest, KlarnaOM, Request, Response, RetryPolicy
from klarna_om_async.errors import RateLimitError, ValidationError, decode_error, reset_after
from klarna_om_async.middleware import Handler, RetryMiddleware
from klarna_om_async.testing import FakeKlarna, InstantSleep
from klarna_om_async.throttle import (
    LIMIT_SHARE,
    Pace,
    ThrottleMiddleware,
    ThrottleRefusal,
    rate_limited,
)


class FakeTime:
    """A clock that moves only when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def recording_throttle(
    pace: Pace,
) -> tuple[FakeTime, ThrottleMiddleware, list[float], Callable[[Request], Awaitable[Response]]]:
    """A throttle with ``pace`` on a ``FakeTime``, and a next handler that notes when each
    request was sent (in ``sent``) and answers 200."""
    time = FakeTime()
    throttle = ThrottleMiddleware(sleep=time.sleep, clock=time.clock, pace=pace)
    sent: list[float] = []

    async def call_next(request: Request) -> Response:
        sent.append(time.now)
        return Response(200, {}, b"", request, "")

    return time, throttle, sent, call_next


def test_slots_lie_on_a_fixed_grid_taken_when_asked() -> None:
    pace = Pace(10)
    # Five requests at t=0 get 0, 0.1, ... 0.4, whenever each task later wakes up.
    assert [pace.delay(0.0) for _ in range(5)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    # A request at 0.25 gets the next free slot, 0.5: a late waker pushed nothing back.
    assert pace.delay(0.25) == pytest.approx(0.25)
    # After an idle spell no burst was banked: one slot now, the next a full interval on.
    assert pace.delay(5.0) == 0.0
    assert pace.delay(5.0) == pytest.approx(0.1)


def test_a_grid_counts_the_requests_waiting_their_turn_after_any_hold() -> None:
    pace = Pace(10)
    for _ in range(4):
        pace.delay(0.0)  # slots 0, 0.1, 0.2, 0.3: three wait
    assert pace.backlog(0.0) == pytest.approx(4)
    assert pace.backlog(0.25) == pytest.approx(1.5)
    pace.hold(2.0)  # a 429's pause: no slot before 2.0 is no queue
    assert pace.backlog(0.5) == 0.0
    pace.delay(0.5)
    pace.delay(0.5)  # 2.0 and 2.1
    assert pace.backlog(0.5) == pytest.approx(2)


def test_a_deferred_grid_voids_only_the_slots_before_the_late_send() -> None:
    pace = Pace(10)
    slots = [pace.delay(0.0) for _ in range(6)]  # 0 ... 0.5
    pace.defer(0.3)  # a send that left at 0.2, held back by another pace
    assert [pace.voided(slot) for slot in slots] == [True, True, True, False, False, False]
    assert pace.delay(0.0) == pytest.approx(0.6)  # new slots after those that hold


def test_a_restarted_grid_voids_the_slots_handed_out_beyond_now() -> None:
    pace = Pace(10)
    assert [pace.delay(0.0) for _ in range(3)] == pytest.approx([0.0, 0.1, 0.2])
    pace.interval = 0.05  # faster now; the slots at 0.1 and 0.2 were given at the old rate
    pace.restart(0.0)  # right after the send at 0.0: the next is one new interval later
    assert pace.generation == 1  # their holders see it and take new slots
    assert pace.delay(0.0) == pytest.approx(0.05)
    assert pace.delay(0.0) == pytest.approx(0.1)
    pace.interval = 0.5  # slower: the grid then hands out slots 0.5 s apart
    pace.restart(0.07)  # void beyond 0.07, never sooner than the slots already taken
    assert pace.delay(0.07) == pytest.approx(0.08)
    assert pace.delay(0.07) == pytest.approx(0.58)
    pace.restart(10.0)  # never moves the grid forward
    assert pace.delay(1.0) == pytest.approx(0.15)


def test_a_restart_keeps_a_hold() -> None:
    # A changed stated limit restarted the grid: the hold that counted what the opening
    # ramp had sent (or a 429's pause) was undone, and its slots went at once.
    pace = Pace(10)
    pace.hold(0.8)
    pace.interval = 0.05
    pace.restart(0.1)
    assert pace.delay(0.1) == pytest.approx(0.7)  # at 0.8, not at 0.15


def test_a_respaced_grid_rescales_the_hold_that_counts_sends() -> None:
    # The opening ramp's 16 sends held a grid stated at 1 per second for 16 s; the limit
    # then stated as 100 kept that stall (17 s for 40 items).
    pace = Pace(1)
    pace.hold(16.0)
    pace.respace(100, 0.0)
    assert pace.delay(0.0) == pytest.approx(0.16)
    assert pace.delay(0.0) == pytest.approx(0.17)


@given(
    rate=st.integers(min_value=1, max_value=500),
    arrivals=st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=300),
)
def test_no_second_ever_holds_more_than_the_rate(rate: int, arrivals: list[float]) -> None:
    pace = Pace(rate)
    slots = sorted(t + pace.delay(t) for t in sorted(arrivals))
    assert all(b - a >= pace.interval * (1 - 1e-9) for a, b in itertools.pairwise(slots))
    for i, start in enumerate(slots):
        in_window = sum(1 for t in slots[i:] if t < start + 1.0 - 1e-9)
        assert in_window <= rate


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), 10_001])
def test_a_pace_refuses_rates_it_cannot_keep(bad: float) -> None:
    with pytest.raises(ValidationError, match="rate_limit"):
        Pace(bad)


async def test_the_client_pace_spaces_every_call_of_the_client(fake: FakeKlarna) -> None:
    time = FakeTime()
    policy = RetryPolicy(sleep=time.sleep)
    orders = [fake.add_order(amount=100) for _ in range(6)]
    async with KlarnaOM(
        fake.username,
        fake.password,
        base_url=fake.base_url,
        retry=policy,
        rate_limit=5,
        clock=time.clock,
    ) as om:
        await om.captures.create(orders[0], CaptureRequest(captured_amount=100))
        outcomes = [
            o
            async for o in om.capture_many(
                [(o, CaptureRequest(captured_amount=100)) for o in orders[1:4]], concurrency=1
            )
        ]
        await om.orders.get(orders[0])
    assert len(outcomes) == 3
    assert len(fake.booked_captures) == 4
    # One grid for single calls and batches: every send after the first waited 1/5 s.
    assert time.waits == pytest.approx([1 / (5 * LIMIT_SHARE)] * 4)  # 99% of the limit


async def test_a_batch_rate_and_the_client_rate_both_hold() -> None:
    _, throttle, sent, call_next = recording_throttle(Pace(10))

    with rate_limited(20):  # a batch's looser rate does not loosen the client's
        for _ in range(4):
            await throttle(Request("GET", "/o"), call_next)
    assert sent == pytest.approx([0.0, 0.1, 0.2, 0.3])


# --- limits Klarna states in X-Ratelimit-* headers -----------------------------------------


@pytest.fixture
async def stated_limit() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A server that books every capture and states a limit of 10/s; the test edits the
    headers of the next answers (a list, consumed first in first out)."""
    plan: list[dict[str, str]] = []

    async def capture(request: web.Request) -> web.Response:
        headers = {"Capture-Id": "cap", "X-Ratelimit-Limit": "10", "X-Ratelimit-Remaining": "5"}
        headers.update(plan.pop(0) if plan else {})
        headers = {name: value for name, value in headers.items() if value}  # "": no header
        status = int(headers.pop("status", "201"))
        return web.Response(status=status, headers=headers)

    app = web.Application()
    app.router.add_post("/ordermanagement/v1/orders/{order}/captures", capture)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", plan
    finally:
        await runner.cleanup()


async def test_a_stated_limit_paces_the_client_and_a_spent_window_pauses_it(
    stated_limit: tuple[str, list[dict[str, str]]],
) -> None:
    url, plan = stated_limit
    time = FakeTime()
    policy = RetryPolicy(sleep=time.sleep)
    async with KlarnaOM("u", "p", base_url=url, retry=policy, clock=time.clock) as om:
        for _ in range(3):
            await om.captures.create("o", CaptureRequest(captured_amount=1))
        # The first answer said 10/s: from then on, slots 1/9.5 s apart, counted from the
        # request that answer came to (it is in Klarna's window too).
        assert time.waits == pytest.approx([1 / 9.5, 1 / 9.5])
        plan.append({"X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": "0.75"})
        await om.captures.create("o", CaptureRequest(captured_amount=1))
        await om.captures.create("o", CaptureRequest(captured_amount=1))
    # The window was used up: the client waited for its reset before the next request.
    assert time.waits == pytest.approx([1 / 9.5, 1 / 9.5, 1 / 9.5, 0.75])


async def test_a_stated_limit_that_changes_respaces_the_grid_it_paces_on(
    stated_limit: tuple[str, list[dict[str, str]]],
) -> None:
    # Each new value laid a new grid whose first slot was free: a limit alternating 20/21
    # let 155 requests out in a second.
    url, plan = stated_limit
    time = FakeTime()
    sent: list[float] = []
    plan.extend({"X-Ratelimit-Limit": limit} for limit in ["20", "10", "20", "10", "20"])

    async def note(request: Request, call_next: Handler) -> Response:
        sent.append(time.now)
        return await call_next(request)

    policy = RetryPolicy(sleep=time.sleep)
    async with KlarnaOM(
        "u", "p", base_url=url, retry=policy, clock=time.clock, middlewares=[note]
    ) as om:
        for _ in range(6):
            await om.captures.create("o", CaptureRequest(captured_amount=1))
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
    # After the first answer every send waits its slot on the spacing then stated (19/s,
    # 9.5/s, ...): none goes at once.
    assert min(gaps) >= 1 / 19 - 1e-9


async def test_a_429_without_retry_after_pauses_until_the_window_resets(
    stated_limit: tuple[str, list[dict[str, str]]],
) -> None:
    url, plan = stated_limit
    time = FakeTime()
    plan.append({"status": "429", "X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": "0.4"})
    policy = RetryPolicy(sleep=time.sleep, jitter=lambda d: d, initial_delay=0.1)
    async with KlarnaOM("u", "p", base_url=url, retry=policy, clock=time.clock) as om:
        created = await om.captures.create("o", CaptureRequest(captured_amount=1))
    assert created.attempts == 2
    assert 0.4 in time.waits  # the retry waited for the reset, not a guessed backoff


def test_a_429_says_the_limit_it_states() -> None:
    assert decode_error(429, {"X-Ratelimit-Limit": "20"}, b"").stated_limit == 20.0
    for odd in ("", "many", "nan", "inf"):
        assert decode_error(429, {"X-Ratelimit-Limit": odd}, b"").stated_limit is None


def test_a_reset_is_seconds_or_a_unix_time() -> None:
    assert reset_after({"X-Ratelimit-Reset": "1.5"}) == 1.5
    assert reset_after({"X-Ratelimit-Reset": "2000000002"}, now=2_000_000_000) == 2.0
    for bad in ("-1", "inf", "nan", "soon", ""):
        assert reset_after({"X-Ratelimit-Reset": bad}) is None


# --- found by a hostile review of the pacing ----------------------------------------------


async def test_a_pace_slot_past_the_calls_deadline_is_refused_unsent() -> None:
    _, throttle, sent, call_next = recording_throttle(Pace(1))

    due = Request("POST", "/o", deadline=1.5)
    await throttle(due, call_next)
    await throttle(due, call_next)  # its slot, 1 s away, is within the deadline
    with pytest.raises(RateLimitError, match="rate limit"):
        await throttle(due, call_next)  # its slot, at 2 s, is past it: not sent
    assert sent == [0.0, 1.0]


async def test_a_call_the_pace_refuses_counts_no_attempt_and_names_no_429(
    fake: FakeKlarna,
) -> None:
    # Refusals were counted as attempts of their call (a CLI summary said 34 attempts for 2
    # requests) and read "429 on POST ...", for requests Klarna never saw.
    order_id = fake.add_order(amount=10_000)
    time = FakeTime()
    policy = RetryPolicy(sleep=time.sleep, deadline=0.5)
    async with KlarnaOM(
        fake.username,
        fake.password,
        base_url=fake.base_url,
        retry=policy,
        clock=time.clock,
        rate_limit=1,
    ) as om:
        await om.captures.create(order_id, CaptureRequest(captured_amount=1))
        with pytest.raises(RateLimitError) as refused:
            await om.captures.create(order_id, CaptureRequest(captured_amount=1))
    error = refused.value
    assert error.attempts == 0
    assert not error.outcome_unknown
    assert str(error).startswith("not sent: this client is waiting for the client's rate limit")
    assert "429" not in str(error)
    assert "for 1.1s more, and the call's deadline is 0.5s away" in str(error)
    assert len(fake.captures(order_id)) == 1


async def test_a_call_the_client_pace_would_refuse_takes_no_slot_of_the_batchs() -> None:
    time, throttle, sent, call_next = recording_throttle(Pace(1))

    with rate_limited(2):
        await throttle(Request("POST", "/o"), call_next)
        # Its batch slot (0.5 s) is within its deadline, but its client slot (1 s) is not:
        # refused at once, and the batch slot it would have wasted goes to the next call.
        with pytest.raises(RateLimitError, match="client's rate limit"):
            await throttle(Request("POST", "/o", deadline=0.9), call_next)
        assert time.now == 0.0
        await throttle(Request("POST", "/o"), call_next)
    assert sent == [0.0, 1.0]


async def test_an_attempt_a_pause_held_at_its_connection_is_not_sent_past_its_deadline() -> None:
    now = [0.0]

    async def late_sleep(seconds: float) -> None:
        now[0] += seconds + 0.05  # a loaded event loop wakes every sleeper 50 ms late

    throttle = ThrottleMiddleware(sleep=late_sleep, clock=lambda: now[0])

    async def too_many(request: Request) -> Response:
        raise decode_error(429, {"Retry-After": "1"}, b"")

    with pytest.raises(RateLimitError):
        await throttle(Request("POST", "/o/a/captures"), too_many)  # pauses the client 1 s
    # An attempt that passed the throttle before the 429 and queued for a connection: the
    # pause ends within its deadline, but the loop wakes it after.
    queued = Request("POST", "/o/b/captures", deadline=1.02)
    waiting = throttle.recheck(queued)
    assert waiting is not None
    with pytest.raises(ThrottleRefusal, match="past its deadline"):
        await waiting


def test_the_slowest_pace_is_one_request_per_100_seconds() -> None:
    with pytest.raises(ValidationError, match=r"at least 0\.01"):
        Pace(0.001)
    assert Pace(0.01).interval == pytest.approx(100)


async def test_429s_are_never_retried_in_a_tight_loop() -> None:
    sleeps = InstantSleep()
    script = [RateLimitError(status=429, retry_after=0.0)] * 3
    policy = RetryPolicy(initial_delay=0, sleep=sleeps, jitter=lambda d: d)

    async def call_next(request: Request) -> Response:
        if script:
            raise script.pop()
        return Response(200, {}, b"", request, "")

    retry = RetryMiddleware(policy, clock=sleeps.clock)
    assert (await retry(Request("GET", "/o"), call_next)).attempts == 4
    assert sleeps.waits == [0.1, 0.1, 0.1]


async def test_a_spent_window_pauses_even_without_a_stated_limit(
    stated_limit: tuple[str, list[dict[str, str]]],
) -> None:
    url, plan = stated_limit
    time = FakeTime()
    plan.append({"X-Ratelimit-Limit": "", "X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": "2"})
    async with KlarnaOM(
        "u", "p", base_url=url, retry=RetryPolicy(sleep=time.sleep), clock=time.clock
    ) as om:
        await om.captures.create("o", CaptureRequest(captured_amount=1))
        await om.captures.create("o", CaptureRequest(captured_amount=1))
    assert time.waits == pytest.approx([2.0])


def test_a_429_storm_prints_nothing_when_logging_is_not_configured() -> None:
    # Python's last-resort handler prints WARNING and above to stderr when nothing is
    # configured: a retried 429 must stay below that (INFO, shown by ``klarna-om -v``).
    script = textwrap.dedent(
        """
        import asyncio, logging, sys
        from klarna_om_async import CaptureRequest, KlarnaOM, RetryPolicy
        from klarna_om_async.testing import FakeKlarna, InstantSleep, RateLimited

        async def main() -> None:
            async with FakeKlarna() as fake:
                orders = fake.add_orders(8, amount=100)
                fake.inject(RateLimited(retry_after=None), method="POST", times=30)
                sleeps = InstantSleep()
                policy = RetryPolicy(sleep=sleeps, deadline=3600)
                async with KlarnaOM(
                    fake.username, fake.password, base_url=fake.base_url, retry=policy,
                    clock=sleeps.clock,
                ) as om:
                    items = [(o, CaptureRequest(captured_amount=100)) for o in orders]
                    outcomes = [o async for o in om.capture_many(items, concurrency=8)]
                    print(len(outcomes), om.rate_limited_count)

        if sys.argv[1] == "warning":
            logging.basicConfig()  # WARNING, the default level
        asyncio.run(main())
        """
    )
    for configured in ("none", "warning"):
        done = subprocess.run(
            [sys.executable, "-W", "error", "-c", script, configured],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout.split() == ["8", "30"]


async def test_every_wait_is_reported_to_the_wait_listeners_with_its_reason() -> None:
    time = FakeTime()
    throttle = ThrottleMiddleware(sleep=time.sleep, clock=time.clock, pace=Pace(2))
    heard: list[tuple[str, float, str]] = []
    throttle.wait_listeners.append(lambda why, seconds, r: heard.append((why, seconds, r.path)))

    async def ok(request: Request) -> Response:
        return Response(200, {}, b"", request, "")

    async def too_many(request: Request) -> Response:
        raise RateLimitError(status=429, retry_after=2.0)

    with rate_limited(1):
        await throttle(Request("GET", "/a"), ok)  # the first slot of both paces: no wait
        await throttle(Request("GET", "/b"), ok)  # the batch's next slot: 1 / 0.99 s away
    await throttle(Request("GET", "/c"), ok)  # the client's next slot, half a second later
    with pytest.raises(RateLimitError):
        await throttle(Request("GET", "/d"), too_many)  # at its slot: a 2 s pause
    await throttle(Request("GET", "/e"), ok)
    assert heard == [
        ("pace", pytest.approx(1 / LIMIT_SHARE), "/b"),
        ("pace", pytest.approx(0.5), "/c"),
        ("pace", pytest.approx(0.5), "/d"),
        ("pause", 2.0, "/e"),
    ]

    # A pace learned from 429s is slept in steps, but told as one wait.
    learning = ThrottleMiddleware(sleep=time.sleep, clock=time.clock)
    learning.wait_listeners.append(lambda why, seconds, r: heard.append((why, seconds, r.path)))
    for _ in range(10):
        learning.adaptive.answered(time.now)
    assert learning.adaptive.limited(-float("inf"), time.now, time.now)
    heard.clear()
    await learning(Request("GET", "/f"), ok)
    await learning(Request("GET", "/g"), ok)
    # "/f"'s answer, within a second of the 429, raised the estimate to 11: 9.9 requests/s.
    assert heard == [("pace", pytest.approx(1 / 9.9), "/g")]
