"""Exactly once through the throttle: its own refusals, 429 storms, the slow-start ramp, and
the batch's hot path (real client against FakeKlarna over loopback, a fake clock).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from klarna_om_async import (
    BatchAbortedError,
    CaptureRequest,
    CaptureStatus,
    KlarnaError,
    KlarnaOM,
    RateLimitError,
    RetryPolicy,
    SQLiteJournal,
)
from klarna_om_async.middleware import Handler, Request, Response
from klarna_om_async.testing import (
    DropAfterProcessing,
    FakeKlarna,
    InstantSleep,
    RateLimited,
    ServerFailure,
)
from klarna_om_async.throttle import ThrottleRefusal


def booked(fake: FakeKlarna) -> Counter[str]:
    return Counter(c.order_id for c in fake.booked_captures)


class PauseAfterFirstPost:
    """After the first POST attempt fails, another call on the same client meets a 429
    whose Retry-After pauses the client past the POST's deadline (a busy neighbour)."""

    def __init__(self, busy_order: str) -> None:
        self.om: KlarnaOM | None = None
        self.busy_order = busy_order
        self.fired = False

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        try:
            return await call_next(request)
        except KlarnaError:
            if request.method == "POST" and not self.fired:
                self.fired = True
                assert self.om is not None
                with pytest.raises(RateLimitError):
                    await self.om.orders.get(self.busy_order)
            raise


@pytest.fixture
async def journal(tmp_path: Path, fake: FakeKlarna) -> AsyncIterator[SQLiteJournal]:
    async with SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now) as opened:
        yield opened


async def _client(fake: FakeKlarna, *middlewares: object, deadline: float = 10.0) -> KlarnaOM:
    sleeps = InstantSleep()
    policy = RetryPolicy(
        max_attempts=4, jitter=lambda d: d, sleep=sleeps, deadline=deadline, retry_after_cap=60
    )
    return KlarnaOM(
        fake.username,
        fake.password,
        base_url=fake.base_url,
        retry=policy,
        clock=sleeps.clock,
        middlewares=middlewares,  # type: ignore[arg-type]
    )


async def test_lost_answer_then_throttle_refusal_stays_unknown_and_reruns_once(
    fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order = fake.add_order(amount=10000)
    busy = fake.add_order(amount=10000)
    hook = PauseAfterFirstPost(busy)
    fake.inject(DropAfterProcessing(), method="POST", times=1)
    fake.inject(RateLimited(retry_after="30"), method="GET", times=1, path=busy)
    async with await _client(fake, hook) as om:
        hook.om = om
        items = [(order, CaptureRequest(captured_amount=4000))]
        first = [o async for o in om.capture_many(items, journal=journal)]
        assert hook.fired
        [outcome] = first
        assert booked(fake) == {order: 1}  # attempt 1 was booked, its answer lost
        assert outcome.status is CaptureStatus.FAILED
        assert isinstance(outcome.error, ThrottleRefusal)  # attempt 2: refused unsent
        assert outcome.error.outcome_unknown
        assert outcome.error.idempotency_key == outcome.idempotency_key
    async with await _client(fake) as om:
        second = [o async for o in om.capture_many(items, journal=journal)]
    assert [o.idempotency_key for o in second] == [outcome.idempotency_key]
    assert booked(fake) == {order: 1}


async def test_never_sent_throttle_refusal_is_not_unknown(fake: FakeKlarna) -> None:
    order = fake.add_order(amount=10000)
    busy = fake.add_order(amount=10000)
    fake.inject(RateLimited(retry_after="30"), method="GET", times=1)
    async with await _client(fake) as om:
        with pytest.raises(RateLimitError):
            await om.orders.get(busy)
        posts_before = sum(r.method == "POST" for r in fake.requests)
        with pytest.raises(ThrottleRefusal) as caught:
            await om.captures.create(order, CaptureRequest(captured_amount=4000))
    assert sum(r.method == "POST" for r in fake.requests) == posts_before
    assert not caught.value.outcome_unknown
    assert booked(fake) == {}


@pytest.mark.parametrize("retry_after", [None, "0", "1"])
async def test_429_storm_batch_never_refuses_and_books_what_it_reports(
    fake: FakeKlarna, journal: SQLiteJournal, retry_after: str | None
) -> None:
    orders = [fake.add_order(amount=10000) for _ in range(60)]
    fake.inject(RateLimited(retry_after=retry_after), method="POST", times=None, probability=0.7)
    async with await _client(fake, deadline=30.0) as om:
        items = [(o, CaptureRequest(captured_amount=4000)) for o in orders]

        async def singles() -> list[object]:
            return [await om.orders.get(o) for o in orders[:10]]

        batch_task = asyncio.create_task(asyncio.wait_for(_collect(om, items, journal), timeout=60))
        await singles()
        outcomes = await batch_task
    statuses = Counter(o.status for o in outcomes)
    assert CaptureStatus.REFUSED not in statuses, [
        repr(o.error) for o in outcomes if o.status is CaptureStatus.REFUSED
    ]
    captured = {o.order_id for o in outcomes if o.status is CaptureStatus.CAPTURED}
    assert set(booked(fake)) == captured
    assert all(n == 1 for n in booked(fake).values())


async def _collect(om: KlarnaOM, items: list[tuple[str, CaptureRequest]], journal: SQLiteJournal):  # type: ignore[no-untyped-def]
    return [o async for o in om.capture_many(items, journal=journal, concurrency=32)]


async def test_429_forever_every_item_failed_not_refused_and_rerun_keeps_keys(
    fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    orders = [fake.add_order(amount=10000) for _ in range(40)]
    fake.inject(RateLimited(retry_after=None), method="POST", times=None)
    async with await _client(fake, deadline=20.0) as om:
        items = [(o, CaptureRequest(captured_amount=4000)) for o in orders]
        first = await asyncio.wait_for(_collect(om, items, journal), timeout=60)
    assert {o.status for o in first} == {CaptureStatus.FAILED}
    assert not any(o.error is not None and o.error.outcome_unknown for o in first)
    fake.clear_faults()
    async with await _client(fake) as om:
        second = await asyncio.wait_for(_collect(om, items, journal), timeout=60)
    assert {o.status for o in second} == {CaptureStatus.CAPTURED}
    assert booked(fake) == dict.fromkeys(orders, 1)


async def test_cancelled_calls_mid_ramp_leak_no_slot(fake: FakeKlarna) -> None:
    orders = [fake.add_order(amount=10000) for _ in range(80)]
    async with await _client(fake) as om:
        tasks = [asyncio.create_task(om.orders.get(o)) for o in orders]
        for _ in range(5):
            await asyncio.sleep(0)
        for t in tasks[::2]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        start = om._throttle.slow_start
        if start is not None:
            assert start.in_flight == 0
        # The client still works at full width.
        more = [asyncio.create_task(om.orders.get(o)) for o in orders]
        await asyncio.wait_for(asyncio.gather(*more), timeout=30)


@pytest.mark.parametrize("refusal", ["throttle", "klarna-429"])
async def test_rerun_refused_unsent_after_a_lost_answer_says_outcome_unknown(
    fake: FakeKlarna, journal: SQLiteJournal, refusal: str
) -> None:
    # Run 1: booked, answer lost. Run 2: the throttle refuses unsent (or Klarna says 429
    # till the deadline). The money DID move in run 1; CaptureOutcome.error documents
    # "error.outcome_unknown says if money may have moved".
    order = fake.add_order(amount=10000)
    busy = fake.add_order(amount=10000)
    items = [(order, CaptureRequest(captured_amount=4000))]
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    async with await _client(fake) as om:
        [first] = [o async for o in om.capture_many(items, journal=journal)]
    assert first.status is CaptureStatus.FAILED
    assert first.error is not None
    assert first.error.outcome_unknown
    fake.clear_faults()
    async with await _client(fake) as om:
        if refusal == "throttle":
            fake.inject(RateLimited(retry_after="30"), method="GET", times=1)
            with pytest.raises(RateLimitError):
                await om.orders.get(busy)  # pauses this client past the deadline
        else:
            fake.inject(RateLimited(retry_after=None), method="POST", times=None)
        [second] = [o async for o in om.capture_many(items, journal=journal)]
    assert booked(fake) == {order: 1}
    assert second.idempotency_key == first.idempotency_key
    if refusal == "throttle":
        # Held back unsent by the pause, the item waits it out and resends its key:
        # Klarna replays run 1's capture.
        assert second.status is CaptureStatus.CAPTURED
        assert second.capture_id == fake.captures(order)[0].capture_id
        return
    assert second.status is CaptureStatus.FAILED
    assert second.error is not None
    assert second.error.outcome_unknown, repr(second.error)  # FAILS: says nothing moved


async def test_run_many_item_held_back_behind_a_busy_429_is_not_refused(
    fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    # Promise: "a batch item is never refused because Klarna was busy". The capture meets
    # 429s until its deadline (failed, nothing booked); the release after it is held back
    # and reported REFUSED although Klarna refused nothing: it was only busy.
    from klarna_om_async.operations import ReleaseRemainingAuthorization

    order = fake.add_order(amount=10000)
    _busy_for_captures(fake, order)
    items = [
        (order, CaptureRequest(captured_amount=4000)),
        (order, ReleaseRemainingAuthorization()),
    ]
    async with await _client(fake) as om:
        outcomes = [o async for o in om.run_many(items, journal=journal)]  # type: ignore[arg-type]
    by_op = {o.operation.value: o for o in outcomes}
    assert by_op["capture"].status is CaptureStatus.FAILED
    assert booked(fake) == {}
    assert by_op["release"].status is not CaptureStatus.REFUSED, repr(by_op["release"].error)


def _busy_for_captures(fake: FakeKlarna, order: str) -> None:
    """Every capture POST to ``order`` meets a 429 without Retry-After, from now on."""
    fake.inject(
        RateLimited(retry_after=None),
        method="POST",
        path=f"/ordermanagement/v1/orders/{order}/captures",
        times=None,
    )


async def test_edited_item_held_back_behind_a_busy_429_is_refused(
    fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    # Busy or not, an item changed since it was journaled is refused (as a claim refuses
    # it): "failed" would invite a rerun of the edited amount under the old key.
    order = fake.add_order(amount=10000)
    async with await _client(fake) as om:
        first = [
            o
            async for o in om.run_many(
                [(order, CaptureRequest(captured_amount=1000, reference="b"))], journal=journal
            )
        ]
        assert [o.status for o in first] == [CaptureStatus.CAPTURED]
        _busy_for_captures(fake, order)
        items = [
            (order, CaptureRequest(captured_amount=1000, reference="a")),
            (order, CaptureRequest(captured_amount=2000, reference="b")),  # edited
        ]
        second = {o.item_key: o async for o in om.run_many(items, journal=journal)}
    assert booked(fake) == {order: 1}
    assert second[f"{order}:a"].status is CaptureStatus.FAILED
    edited = second[f"{order}:b"]
    assert edited.status is CaptureStatus.REFUSED, repr(edited.error)
    assert "changed since it was journaled" in str(edited.error)
    assert edited.idempotency_key == first[0].idempotency_key


async def test_capture_request_subclass_is_refused_unsent_not_crashed(
    fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    import attrs

    @attrs.frozen
    class MyCapture(CaptureRequest):
        pass

    order = fake.add_order(amount=10000)
    async with await _client(fake) as om:
        [outcome] = [
            o
            async for o in om.capture_many(
                [(order, MyCapture(captured_amount=4000))], journal=journal
            )
        ]
    assert outcome.status is CaptureStatus.REFUSED
    assert isinstance(outcome.error, TypeError)
    assert booked(fake) == {}
    assert not any(r.method == "POST" for r in fake.requests)


async def test_items_the_pace_holds_back_past_their_deadline_wait_their_turn(
    fake: FakeKlarna,
) -> None:
    # 10 workers at 20 captures/s with a 0.1 s deadline: each item past the first few was
    # refused unsent at once, and the batch failed most of its source in no time. (Real
    # time: the clock must not move for one task while another waits.)
    policy = RetryPolicy(deadline=0.1, jitter=lambda d: d)
    orders = [fake.add_order(amount=100) for _ in range(10)]
    items = [(order, CaptureRequest(captured_amount=100)) for order in orders]
    async with KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, retry=policy, rate_limit=20
    ) as om:
        outcomes = [o async for o in om.capture_many(items, concurrency=10)]
    assert [o.status for o in outcomes] == [CaptureStatus.CAPTURED] * 10
    assert {o.attempts for o in outcomes} == {1}  # waiting is no attempt
    assert booked(fake) == dict.fromkeys(orders, 1)


async def test_items_waiting_their_turn_send_nothing_once_the_batch_stops(
    fake: FakeKlarna,
) -> None:
    # After the first 401 the batch starts nothing new, but the items already waiting for
    # their pace slot sent one by one: 20 401s, and the abort 19 s late.
    policy = RetryPolicy(deadline=0.1, jitter=lambda d: d)
    items = [(fake.add_order(amount=100), CaptureRequest(captured_amount=100)) for _ in range(20)]
    async with KlarnaOM(
        fake.username, "wrong", base_url=fake.base_url, retry=policy, rate_limit=20
    ) as om:
        with pytest.raises(BatchAbortedError):
            [o async for o in om.capture_many(items, concurrency=10)]
    # Only those whose slot lay within their first deadline (0.1 s at 20/s) were sent.
    assert sum(r.method == "POST" for r in fake.requests) <= 3


class SleepThatPassesNoTime:
    """A retry sleep that returns at once and moves no clock (a test's stand-in)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, seconds: float) -> None:
        self.calls += 1
        if self.calls > 1000:  # the batch would ask again for ever
            raise AssertionError("the batch kept waiting on a sleep that passes no time")


async def test_a_sleep_that_passes_no_time_does_not_hold_an_item_for_ever(
    fake: FakeKlarna,
) -> None:
    sleep = SleepThatPassesNoTime()
    policy = RetryPolicy(deadline=0.2, sleep=sleep, jitter=lambda d: d)
    items = [(fake.add_order(amount=100), CaptureRequest(captured_amount=100)) for _ in range(5)]
    async with KlarnaOM(
        fake.username,
        fake.password,
        base_url=fake.base_url,
        retry=policy,
        rate_limit=1,
        clock=lambda: 0.0,
    ) as om:
        outcomes = [o async for o in om.capture_many(items)]
    statuses = sorted(o.status.value for o in outcomes)
    assert statuses == ["captured"] + ["failed"] * 4  # failed unsent, as before the wait
    assert sleep.calls <= 5


@pytest.mark.parametrize("how", ["klarna-429", "throttle"])
async def test_never_sent_item_is_not_left_unknown_forever(
    fake: FakeKlarna, journal: SQLiteJournal, how: str
) -> None:
    # Nothing ever reached Klarna's booking (only 429s, or the throttle refused unsent), yet
    # once the key ages past key_max_age the reference-less item is never resent.
    order = fake.add_order(amount=10000)
    busy = fake.add_order(amount=10000)
    items = [(order, CaptureRequest(captured_amount=4000))]
    async with await _client(fake) as om:
        if how == "throttle":
            fake.inject(RateLimited(retry_after="30"), method="GET", times=1)
            with pytest.raises(RateLimitError):
                await om.orders.get(busy)
        else:
            fake.inject(RateLimited(retry_after=None), method="POST", times=None)
        [first] = [o async for o in om.capture_many(items, journal=journal)]
    if how == "throttle":  # held back unsent, the item waits out the pause and is sent
        assert first.status is CaptureStatus.CAPTURED
        assert booked(fake) == {order: 1}
        return
    assert first.status is CaptureStatus.FAILED
    assert first.error is not None
    assert not first.error.outcome_unknown
    fake.clear_faults()
    fake.advance_clock(24 * 3600.0 + 3600)
    async with await _client(fake) as om:
        [second] = [o async for o in om.capture_many(items, journal=journal)]
    assert second.status is CaptureStatus.CAPTURED, (second.status, repr(second.error))
    assert booked(fake) == {order: 1}


async def test_an_edited_item_held_back_after_its_booked_send_stays_unknown(
    fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    # Run 1: item b's capture is booked, its answer lost: failed (unknown) under key K.
    # Run 2: a new item of the order waits for b, and the edited b is held back behind it:
    # never sent, and reported unknown under K (not "refused": K booked 1000).
    order = fake.add_order(amount=10000)
    fake.inject(DropAfterProcessing(), method="POST", times=1)
    fake.inject(ServerFailure(503), method="POST", times=None)
    async with await _client(fake) as om:
        b = CaptureRequest(captured_amount=1000, reference="b")
        [first] = [o async for o in om.run_many([(order, b)], journal=journal)]
        assert first.status is CaptureStatus.FAILED
        fake.clear_faults()
        items = [
            (order, CaptureRequest(captured_amount=500, reference="a")),
            (order, CaptureRequest(captured_amount=2000, reference="b")),  # edited
        ]
        second = {o.item_key: o async for o in om.run_many(items, journal=journal)}
    assert booked(fake) == {order: 1}
    edited = second[f"{order}:b"]
    assert edited.status is CaptureStatus.FAILED, repr(edited.error)
    assert edited.idempotency_key == first.idempotency_key
    assert edited.error is not None
    assert edited.error.outcome_unknown
    assert f"earlier send under key {first.idempotency_key} is unknown" in str(edited.error)
