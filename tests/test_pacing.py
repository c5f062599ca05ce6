"""Pacing on a fixed grid (GCRA): per client and per batch, with a clock the test drives."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klarna_om_async import CaptureRequest, KlarnaOM, Request, Response, RetryPolicy
from klarna_om_async.errors import ValidationError
from klarna_om_async.testing import FakeKlarna
from klarna_om_async.throttle import Pace, ThrottleMiddleware, rate_limited


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


def test_slots_lie_on_a_fixed_grid_taken_when_asked() -> None:
    pace = Pace(10)
    # Five requests at t=0 get 0, 0.1, ... 0.4, whenever each task later wakes up.
    assert [pace.delay(0.0) for _ in range(5)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    # A request at 0.25 gets the next free slot, 0.5: a late waker pushed nothing back.
    assert pace.delay(0.25) == pytest.approx(0.25)
    # After an idle spell no burst was banked: one slot now, the next a full interval on.
    assert pace.delay(5.0) == 0.0
    assert pace.delay(5.0) == pytest.approx(0.1)


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
    assert time.waits == pytest.approx([0.2] * 4)


async def test_a_batch_rate_and_the_client_rate_both_hold() -> None:
    time = FakeTime()
    throttle = ThrottleMiddleware(sleep=time.sleep, clock=time.clock, pace=Pace(10))
    sent: list[float] = []

    async def call_next(request: Request) -> Response:
        sent.append(time.now)
        return Response(200, {}, b"", request, "")

    with rate_limited(20):  # a batch's looser rate does not loosen the client's
        for _ in range(4):
            await throttle(Request("GET", "/o"), call_next)
    assert sent == pytest.approx([0.0, 0.1, 0.2, 0.3])
