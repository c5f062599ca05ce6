"""capture_many: bounded, lazy, one outcome per item, exactly-once with a journal."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from klarna_om_async import (
    BatchAbortedError,
    BatchItem,
    BatchProgress,
    CaptureCreated,
    CaptureNotAllowedError,
    CaptureOutcome,
    CaptureRequest,
    CaptureStatus,
    Journal,
    JournalInUseError,
    JournalStatus,
    KlarnaError,
    KlarnaOM,
    MemoryJournal,
    RefundRequest,
    Request,
    Response,
    RetryPolicy,
    ServerError,
    SQLiteJournal,
    ValidationError,
)
from klarna_om_async.batch import ItemHeldBackError, capture_many
from klarna_om_async.captures import CapturesService
from klarna_om_async.errors import RateLimitError
from klarna_om_async.journal import Claim, ItemRecord
from klarna_om_async.testing import (
    Delay,
    DropAfterProcessing,
    FakeKlarna,
    InstantSleep,
    NonJsonError,
    RateLimited,
    ServerFailure,
)
from klarna_om_async.throttle import ThrottleMiddleware


def full(fake: FakeKlarna, amounts: list[int]) -> list[tuple[str, CaptureRequest]]:
    """One full-capture item per new order of each amount."""
    return [(fake.add_order(amount=a), CaptureRequest(captured_amount=a)) for a in amounts]


async def collect(outcomes: AsyncIterator[CaptureOutcome]) -> dict[str, CaptureOutcome]:
    return {o.item_key: o async for o in outcomes}


async def into(seen: list[CaptureOutcome], outcomes: AsyncIterator[CaptureOutcome]) -> None:
    """Append each outcome to ``seen`` as it comes (what was yielded before a raise)."""
    async for outcome in outcomes:
        seen.append(outcome)


def booked_per_order(fake: FakeKlarna) -> Counter[str]:
    return Counter(c.order_id for c in fake.booked_captures)


async def test_mixed_outcomes_are_each_reported(om: KlarnaOM, fake: FakeKlarna) -> None:
    good = full(fake, [100, 200, 300])
    over = (fake.add_order(amount=50), CaptureRequest(captured_amount=51))
    flaky = fake.add_order(amount=70)
    fake.inject(ServerFailure(503), method="POST", path=flaky, times=4)
    items = [*good, over, (flaky, CaptureRequest(captured_amount=70)), ("", good[0][1])]

    outcomes = await collect(om.capture_many(items, concurrency=4))

    for order_id, _ in good:
        assert outcomes[order_id].status is CaptureStatus.CAPTURED
        assert outcomes[order_id].capture_id == fake.captures(order_id)[0].capture_id
        assert outcomes[order_id].attempts == 1
    refused = outcomes[over[0]]
    assert refused.status is CaptureStatus.REFUSED
    assert isinstance(refused.error, CaptureNotAllowedError)
    failed = outcomes[flaky]
    assert failed.status is CaptureStatus.FAILED
    assert isinstance(failed.error, ServerError)
    assert failed.error.outcome_unknown
    assert failed.attempts == 4
    assert failed.idempotency_key == failed.error.idempotency_key
    invalid = outcomes[""]
    assert invalid.status is CaptureStatus.REFUSED
    assert isinstance(invalid.error, ValidationError)
    assert invalid.attempts == 0
    assert sorted(booked_per_order(fake)) == sorted(o for o, _ in good)


async def test_a_lost_answer_inside_a_batch_is_captured_exactly_once(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    items = full(fake, [10] * 20)
    fake.inject(DropAfterProcessing(), method="POST", times=5)
    outcomes = await collect(om.capture_many(items, concurrency=8))
    assert {o.status for o in outcomes.values()} == {CaptureStatus.CAPTURED}
    assert len(fake.booked_captures) == 20
    assert set(booked_per_order(fake).values()) == {1}


async def test_a_rerun_with_the_journal_skips_captured_and_finishes_failed_with_their_key(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    items = full(fake, [10, 20, 30, 40])
    stuck = items[1][0]
    fake.inject(ServerFailure(503), method="POST", path=stuck, times=4)
    async with SQLiteJournal(tmp_path / "journal.sqlite") as journal:
        first = await collect(om.capture_many(items, journal=journal))
    assert first[stuck].status is CaptureStatus.FAILED

    async with SQLiteJournal(tmp_path / "journal.sqlite") as journal:
        second = await collect(om.capture_many(items, journal=journal))
        entries = {e.item_key: e for e in await journal.entries()}

    assert second[stuck].status is CaptureStatus.CAPTURED
    assert second[stuck].idempotency_key == first[stuck].idempotency_key
    for order_id, _ in items:
        if order_id != stuck:
            assert second[order_id].status is CaptureStatus.SKIPPED
            assert second[order_id].capture_id == first[order_id].capture_id
        assert entries[order_id].status is JournalStatus.CAPTURED
    assert set(booked_per_order(fake).values()) == {1}
    assert len(fake.booked_captures) == 4


@pytest.mark.parametrize(
    ("last", "times"),
    [
        (RateLimited(retry_after="1"), None),  # 429 on every retry until they run out
        (NonJsonError(403, "<html>Forbidden</html>"), 1),  # a proxy's refusal of the retry
    ],
    ids=["429", "proxy-403"],
)
async def test_an_error_after_a_lost_answer_fails_the_item_and_the_rerun_keeps_its_key(
    om: KlarnaOM, fake: FakeKlarna, last: RateLimited | NonJsonError, times: int | None
) -> None:
    # Attempt 1 is booked but its answer lost; what later attempts hear says nothing about it.
    [item] = full(fake, [4000])
    order_id = item[0]
    fake.inject(DropAfterProcessing(), method="POST")
    fake.inject(last, method="POST", times=times)
    journal = MemoryJournal()
    first = await collect(om.capture_many([item], journal=journal))
    assert first[order_id].status is CaptureStatus.FAILED  # booked, but we cannot know

    fake.clear_faults()
    second = await collect(om.capture_many([item], journal=journal))
    assert second[order_id].status is CaptureStatus.CAPTURED
    assert second[order_id].idempotency_key == first[order_id].idempotency_key
    assert len(fake.booked_captures) == 1


async def test_a_refused_item_is_retried_with_a_new_key_on_rerun(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=100)
    fake.set_order_status(order_id, "CANCELLED")
    journal = MemoryJournal()
    items = [(order_id, CaptureRequest(captured_amount=100))]
    [first] = [o async for o in om.capture_many(items, journal=journal)]
    assert first.status is CaptureStatus.REFUSED
    fake.set_order_status(order_id, "AUTHORIZED")
    [second] = [o async for o in om.capture_many(items, journal=journal)]
    assert second.status is CaptureStatus.CAPTURED
    assert second.idempotency_key != first.idempotency_key


async def test_a_duplicate_item_in_one_batch_is_refused_not_captured_twice(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=100)
    item = BatchItem(order_id=order_id, request=CaptureRequest(captured_amount=50))
    outcomes = [o async for o in om.capture_many([item, item], concurrency=1)]
    assert [o.status for o in outcomes] == [CaptureStatus.CAPTURED, CaptureStatus.REFUSED]
    assert isinstance(outcomes[1].error, ValidationError)
    assert len(fake.booked_captures) == 1


async def test_parts_of_one_order_are_distinct_items_by_reference(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=100)
    parts = [
        (order_id, CaptureRequest(captured_amount=40, reference="box-1")),
        (order_id, CaptureRequest(captured_amount=60, reference="box-2")),
    ]
    outcomes = await collect(om.capture_many(parts, concurrency=2))
    assert set(outcomes) == {f"{order_id}:box-1", f"{order_id}:box-2"}
    assert fake.order(order_id).remaining_authorized_amount == 0


async def test_concurrency_never_exceeds_the_limit(om: KlarnaOM, fake: FakeKlarna) -> None:
    fake.inject(Delay(0.02), method="POST", times=None)
    outcomes = await collect(om.capture_many(full(fake, [5] * 40), concurrency=6))
    assert len(outcomes) == 40
    assert 1 < fake.max_in_flight <= 6


async def test_the_rate_limit_holds_over_a_run(fake: FakeKlarna) -> None:
    rate = 20
    # Real sleeps: what is checked is when the server received each request.
    async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as om:
        items = full(fake, [5] * 30)
        outcomes = await collect(om.capture_many(items, concurrency=16, rate_limit=rate))
    assert len(outcomes) == 30
    times = sorted(r.received_at for r in fake.requests)
    # In any one-second window the fake saw at most `rate` requests (+1 for edge rounding).
    busiest = max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))
    assert busiest <= rate + 1
    assert times[-1] - times[0] >= 1.0


async def test_a_429_pauses_the_whole_batch(fake: FakeKlarna, sleeps: InstantSleep) -> None:
    fake.inject(Delay(0.05), method="POST", times=3)
    fake.inject(RateLimited(retry_after="1"), method="POST")
    # The real clock: the instant sleeps leave it "paused" for every request that follows.
    policy = RetryPolicy(max_attempts=4, jitter=lambda d: d, sleep=sleeps)
    async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url, retry=policy) as om:
        outcomes = await collect(om.capture_many(full(fake, [5] * 12), concurrency=4))
    assert {o.status for o in outcomes.values()} == {CaptureStatus.CAPTURED}
    # The rate-limited request waits Retry-After; the others, sent after it, wait out the
    # same pause instead of each running into the limit (the injected sleep is instant, so
    # the clock still says "paused" for them).
    paused = [w for w in sleeps.waits if 0 < w <= 1.0]
    assert sleeps.waits.count(1.0) >= 1
    assert len(paused) >= 4


async def test_throttle_pause_follows_retry_after_on_its_clock() -> None:
    now = [100.0]
    sleeps = InstantSleep()
    throttle = ThrottleMiddleware(sleep=sleeps, clock=lambda: now[0])
    calls = 0

    request = Request("POST", "/captures")
    ok = Response(201, {}, b"", request, "")

    async def limited(request: Request) -> Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            error = RateLimitError(status=429, retry_after=2.5)
            raise error
        return ok

    with pytest.raises(RateLimitError):
        await throttle(request, limited)
    now[0] += 1.0
    assert await throttle(request, limited) is ok
    assert sleeps.waits == [1.5]


class InstantCaptures:
    """Stands in for CapturesService to measure the batch engine alone (no HTTP)."""

    def __init__(self) -> None:
        self.peak_tasks = 0

    async def create(
        self, order_id: str, request: CaptureRequest, *, idempotency_key: str | None = None
    ) -> CaptureCreated:
        self.peak_tasks = max(self.peak_tasks, len(asyncio.all_tasks()))
        await asyncio.sleep(0)
        return CaptureCreated(
            capture_id=f"c-{order_id}", location="", idempotency_key=idempotency_key or ""
        )


async def test_100k_items_are_consumed_lazily_with_bounded_tasks() -> None:
    pulled = 0
    request = CaptureRequest(captured_amount=1)

    def items() -> Iterator[tuple[str, CaptureRequest]]:
        nonlocal pulled
        for n in range(100_000):
            pulled += 1
            yield f"order-{n}", request

    captures = InstantCaptures()
    lead = 0
    done = 0
    async for _outcome in capture_many(captures, items(), concurrency=16):  # type: ignore[arg-type]
        done += 1
        lead = max(lead, pulled - done)
    assert done == 100_000
    # Workers + the test's own task; items pulled ahead of the consumer stay bounded by the
    # workers plus the outcome queue.
    assert captures.peak_tasks <= 16 + 1
    assert lead <= 16 + 16 + 1


async def test_an_async_source_is_supported_and_progress_is_reported(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    pairs = full(fake, [1, 2, 3, 4, 5])

    async def source() -> AsyncIterator[tuple[str, CaptureRequest]]:
        for pair in pairs:
            yield pair

    seen: list[BatchProgress] = []
    outcomes = await collect(om.capture_many(source(), concurrency=3, on_progress=seen.append))
    assert len(outcomes) == 5
    assert [p.done for p in seen] == [1, 2, 3, 4, 5]
    assert seen[-1] == BatchProgress(done=5, captured=5)


async def test_stopping_early_starts_nothing_new_and_keeps_started_items_in_the_journal(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    items = full(fake, [5] * 30)
    fake.inject(Delay(0.05), method="POST", times=None)
    journal = MemoryJournal()
    batch = om.capture_many(items, concurrency=4, journal=journal)
    async for _first in batch:
        break
    await batch.aclose()  # type: ignore[attr-defined]
    entries = {e.item_key: e for e in await journal.entries()}
    started = len(entries)
    assert started <= 1 + 4 + 4  # finished + in flight + queued outcomes
    workers = [t for t in asyncio.all_tasks() if "_Run.work" in t.get_coro().__qualname__]
    assert workers == []
    fake.clear_faults()
    # The requests the stop cancelled hold their keys at Klarna until they end there (on
    # Python 3.12 they have reached the fake by now): a rerun sent meanwhile meets 409s.
    await fake.wait_until_idle()

    # The next run finishes every item, and nothing is captured twice.
    outcomes = await collect(om.capture_many(items, concurrency=4, journal=journal))
    assert len(outcomes) == 30
    assert {o.status for o in outcomes.values()} <= {CaptureStatus.CAPTURED, CaptureStatus.SKIPPED}
    assert len(fake.booked_captures) == 30
    assert set(booked_per_order(fake).values()) == {1}


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_journal_serves_one_run_at_a_time_in_a_process(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second batch on the same journal object took the first one's items in flight for an
    # earlier run's unknown ones and resent them: both runs reported them captured.
    monkeypatch.setattr("klarna_om_async.journal._IN_USE_GRACE_S", 0.01)  # it never ends
    items = full(fake, [5] * 10)
    fake.inject(Delay(0.05), method="POST", times=None)
    journal: Journal = (
        MemoryJournal() if kind == "memory" else await SQLiteJournal(tmp_path / "j").open()
    )
    first = om.capture_many(items, concurrency=4, journal=journal)
    async for _taken in first:
        break
    with pytest.raises(JournalInUseError, match="in use by another batch or reconciliation"):
        await collect(om.capture_many(items, journal=journal))
    with pytest.raises(JournalInUseError):
        await om.reconcile(journal)
    # Only the first batch sent (the second resent its keys in flight: 409s).
    assert {r.status for r in fake.requests if r.method == "POST"} <= {201, None}
    await first.aclose()  # type: ignore[attr-defined]
    await fake.wait_until_idle()
    fake.clear_faults()

    again = await collect(om.capture_many(items, journal=journal))  # closed: free again
    await om.reconcile(journal)
    await journal.close()
    assert {o.status for o in again.values()} <= {CaptureStatus.CAPTURED, CaptureStatus.SKIPPED}
    assert set(booked_per_order(fake).values()) == {1}
    assert len(booked_per_order(fake)) == 10


async def test_the_next_run_waits_for_a_batch_left_by_break_to_close(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # The generator a loop leaves is closed a few loop turns later; meanwhile the journal
    # is still its batch's, and the next run was refused.
    journal = MemoryJournal()
    items = full(fake, [5] * 10)
    async for _first in om.capture_many(items, concurrency=2, journal=journal):
        break
    again = await collect(om.capture_many(items, journal=journal))
    assert len(again) == 10
    assert set(booked_per_order(fake).values()) == {1}


class FinishFails(MemoryJournal):
    """A journal whose disk fills after ``recorded`` outcomes: the next finish raises."""

    def __init__(self, recorded: int) -> None:
        super().__init__()
        self.recorded = recorded

    async def finish(self, item_key: str, status: JournalStatus, **kwargs: Any) -> JournalStatus:
        if self.recorded == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.recorded -= 1
        return await super().finish(item_key, status, **kwargs)


@pytest.mark.parametrize("answer", [201, 403])
async def test_an_outcome_the_journal_cannot_record_is_still_reported_then_the_batch_stops(
    om: KlarnaOM, fake: FakeKlarna, answer: int
) -> None:
    # Klarna answered the third item, then its journal write failed: that outcome was
    # dropped, and the report undercounted what Klarna booked.
    items = full(fake, [100] * 6)
    third = items[2][0]
    if answer == 403:  # a refusal, not money moved, must reach the caller too
        items[2] = (third, CaptureRequest(captured_amount=101))
    journal = FinishFails(recorded=2)
    seen: list[CaptureOutcome] = []
    with pytest.raises(OSError, match="No space left"):
        await into(seen, om.capture_many(items, concurrency=1, journal=journal))

    assert [o.order_id for o in seen] == [o for o, _ in items[:3]]
    unrecorded = seen[2]
    if answer == 201:
        assert unrecorded.status is CaptureStatus.CAPTURED
        assert unrecorded.capture_id == fake.captures(third)[0].capture_id
    else:
        assert unrecorded.status is CaptureStatus.REFUSED
        assert isinstance(unrecorded.error, CaptureNotAllowedError)
    assert [o.status is CaptureStatus.CAPTURED for o in seen].count(True) == len(
        fake.booked_captures
    )
    # The journal still holds it in flight under the key reported: the rerun resends that
    # key (Klarna replays its answer) and books nothing twice.
    [entry] = await journal.entries(statuses=[JournalStatus.IN_FLIGHT])
    assert (entry.order_id, entry.idempotency_key) == (third, unrecorded.idempotency_key)
    journal.recorded = 100
    again = await collect(om.capture_many(items, concurrency=1, journal=journal))
    # (A refusal replayed for a key whose earlier send the journal holds as unknown proves
    # nothing on its own: it stays unknown, for reconciliation.)
    resent = CaptureStatus.CAPTURED if answer == 201 else CaptureStatus.FAILED
    assert again[third].status is resent
    assert again[third].idempotency_key == unrecorded.idempotency_key
    assert len(fake.booked_captures) == 5 + (answer == 201)
    assert set(booked_per_order(fake).values()) == {1}


async def test_an_unrecorded_refusal_after_an_unknown_send_is_reported_unknown(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # The journal holds the item unknown (Klarna answered 503s); the resend meets a refusal
    # and the journal fails: the report must not say "refused" of what may be booked.
    order_id = fake.add_order(amount=100)
    items = [(order_id, CaptureRequest(captured_amount=100))]
    journal = FinishFails(recorded=0)
    fake.inject(ServerFailure(503), method="POST", times=10)
    with pytest.raises(OSError, match="No space left"):
        await collect(om.capture_many(items, journal=journal))
    fake.clear_faults()
    await om.captures.create(order_id, CaptureRequest(captured_amount=100))  # by someone else
    seen: list[CaptureOutcome] = []
    with pytest.raises(OSError, match="No space left"):
        await into(seen, om.capture_many(items, journal=journal))
    [outcome] = seen
    assert outcome.status is CaptureStatus.FAILED
    assert isinstance(outcome.error, KlarnaError)
    assert outcome.error.outcome_unknown
    assert len(fake.booked_captures) == 1


async def test_an_order_s_later_items_wait_when_an_earlier_outcome_was_not_recorded(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # run_many: a refund must not follow a capture whose outcome the journal failed to
    # record; the capture is reported, the refund held back, and the batch stops.
    order_id = fake.add_order(amount=100)
    items = [
        BatchItem(order_id=order_id, request=CaptureRequest(captured_amount=100)),
        BatchItem(order_id=order_id, request=RefundRequest(refunded_amount=100)),
    ]
    seen: list[CaptureOutcome] = []
    with pytest.raises(OSError, match="No space left"):
        await into(seen, om.run_many(items, concurrency=4, journal=FinishFails(0)))
    assert [o.status for o in seen] == [CaptureStatus.CAPTURED, CaptureStatus.REFUSED]
    assert isinstance(seen[1].error, ItemHeldBackError)
    assert "ended without its outcome in the journal" in str(seen[1].error)
    assert len(fake.booked_captures) == 1
    assert not fake.booked_refunds


class Stop(BaseException):
    """Raised by a journal: no ``Exception``, as a misbehaving part may raise."""


@pytest.mark.parametrize("raised", [Stop, asyncio.CancelledError, GeneratorExit])
async def test_a_journal_raising_a_base_exception_stops_the_batch_without_hanging(
    om: KlarnaOM, fake: FakeKlarna, raised: type[BaseException]
) -> None:
    # A worker that died of it put no end-of-work mark: the batch waited forever, and the
    # outcome of the item Klarna had booked was never yielded.
    class Raising(MemoryJournal):
        async def finish(self, item_key: str, status: JournalStatus, **kw: Any) -> JournalStatus:
            raise raised()

    items = full(fake, [100] * 4)
    seen: list[CaptureOutcome] = []
    with pytest.raises(raised):
        async with asyncio.timeout(30):  # a guard: the failure this test looks for is a hang
            await into(seen, om.capture_many(items, concurrency=2, journal=Raising()))
    assert len(seen) == len(fake.booked_captures) > 0
    assert {o.status for o in seen} == {CaptureStatus.CAPTURED}


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks came with Python 3.12")
async def test_a_hold_failing_at_once_under_eager_tasks_stops_the_batch(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # An eager task runs its worker inside create_task: a hold failing there, before the
    # batch knew the worker's task, was taken for no failure of its own, and the batch
    # waited for that worker forever.
    class Boom(Exception):
        pass

    def hold(item: BatchItem) -> str | None:
        raise Boom

    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
    try:
        items = full(fake, [100])
        seen: list[CaptureOutcome] = []
        with pytest.raises(Boom):
            async with asyncio.timeout(30):  # a guard: the failure this test looks for is a hang
                await into(seen, om.run_many(items, concurrency=2, hold=hold))
    finally:
        loop.set_task_factory(None)
    assert [o.status for o in seen] == [CaptureStatus.FAILED]
    assert not fake.booked_captures


async def test_an_item_whose_claim_fails_is_reported_unknown_and_the_batch_stops(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # Its journal failed before it was sent: the item was reported nowhere, lost for good
    # when it came from a source read once (a message queue).
    class ClaimFails(MemoryJournal):
        claims = 0

        async def claim(self, item: ItemRecord, new_key: str, **kw: Any) -> Claim:
            self.claims += 1
            if self.claims == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return await super().claim(item, new_key, **kw)

    items = full(fake, [100] * 3)
    seen: list[CaptureOutcome] = []
    with pytest.raises(OSError, match="No space left"):
        await into(seen, om.capture_many(items, concurrency=1, journal=ClaimFails()))
    assert [(o.order_id, o.status) for o in seen] == [
        (items[0][0], CaptureStatus.CAPTURED),
        (items[1][0], CaptureStatus.FAILED),
    ]
    assert isinstance(seen[1].error, OSError)
    assert seen[1].idempotency_key == ""  # new to the journal: nothing was ever sent
    assert [c.order_id for c in fake.booked_captures] == [items[0][0]]


async def test_an_item_whose_claim_fails_in_a_rerun_is_reported_with_its_journaled_key(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # Left unknown by the first run under key K; the rerun's claim failed (a full disk) and
    # the item came back with no key, although K is what makes a retry safe.
    class ClaimFails(MemoryJournal):
        full = False

        async def claim(self, item: ItemRecord, new_key: str, **kw: Any) -> Claim:
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return await super().claim(item, new_key, **kw)

    items = full(fake, [100])
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    journal = ClaimFails()
    [first] = (await collect(om.capture_many(items, journal=journal))).values()
    assert first.status is CaptureStatus.FAILED
    journal.full = True
    seen: list[CaptureOutcome] = []
    with pytest.raises(OSError, match="No space left"):
        await into(seen, om.capture_many(items, journal=journal))
    [again] = seen
    assert again.status is CaptureStatus.FAILED
    assert again.idempotency_key == first.idempotency_key != ""


@pytest.mark.parametrize("part", ["journal", "source"])
async def test_a_batch_closed_while_a_part_swallows_the_cancellation_ends_and_sends_no_more(
    om: KlarnaOM, fake: FakeKlarna, part: str
) -> None:
    # A journal whose finish, or a source whose next item, came back normally when
    # cancelled: the worker waited on the full queue of outcomes (aclose hung), or started
    # the item the source gave after the consumer had stopped.
    parked = asyncio.Event()
    items = full(fake, [100] * 6)

    async def swallowed() -> None:
        parked.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()  # until the batch is closed

    class Swallowing(MemoryJournal):
        calls = 0

        async def finish(self, item_key: str, status: JournalStatus, **kw: Any) -> JournalStatus:
            self.calls += 1
            if part == "journal" and self.calls == 3:
                await swallowed()
            return await super().finish(item_key, status, **kw)

    async def source() -> AsyncIterator[tuple[str, CaptureRequest]]:
        for index, item in enumerate(items):
            if part == "source" and index == 2:
                await swallowed()
            yield item

    batch = om.capture_many(source(), concurrency=1, journal=Swallowing())
    await anext(batch)
    # The second outcome fills the queue; the third item is being recorded, or made.
    async with asyncio.timeout(30):  # guards: one failure this test looks for is a hang
        await parked.wait()
        await batch.aclose()
    assert len(fake.booked_captures) == (3 if part == "journal" else 2)


async def test_after_a_failure_workers_take_no_new_item_from_an_async_source(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # Workers waiting for their turn at an async source took their item after a journal
    # failure, and claimed and sent it: the run had said it stops taking items. The worker
    # waiting for the source's next item has its wait cut short (the source may never make
    # it): the source is cancelled there, and what it had not yet made stays with it.
    items = full(fake, [100] * 3)
    failed = asyncio.Event()
    made: list[str] = []

    class Failing(FinishFails):
        async def finish(self, item_key: str, status: JournalStatus, **kw: Any) -> JournalStatus:
            try:
                return await super().finish(item_key, status, **kw)
            finally:
                failed.set()

    cut: list[int] = []

    async def source() -> AsyncIterator[tuple[str, CaptureRequest]]:
        for index, item in enumerate(items):
            if index == 1:
                try:
                    await failed.wait()  # one worker waits here, another for its turn
                except asyncio.CancelledError:
                    cut.append(index)
                    raise
            made.append(item[0])
            yield item

    seen: list[CaptureOutcome] = []
    with pytest.raises(OSError, match="No space left"):
        await into(seen, om.capture_many(source(), concurrency=3, journal=Failing(recorded=0)))
    assert (made, cut) == ([items[0][0]], [1])
    assert [o.order_id for o in seen] == made
    assert [c.order_id for c in fake.booked_captures] == made


@pytest.mark.parametrize("raised", [Stop, OSError])
async def test_a_batch_closed_while_its_journal_turns_the_cancellation_into_an_error_ends(
    om: KlarnaOM, fake: FakeKlarna, raised: type[BaseException]
) -> None:
    # aclose() while a worker was in journal.finish and the outcome queue was full: the
    # journal raised its own error for the cancellation, the worker took it for a failure
    # and waited to put it in the full queue, and the batch's end waited for that worker.
    parked = asyncio.Event()

    class Converting(MemoryJournal):
        calls = 0

        async def finish(self, item_key: str, status: JournalStatus, **kw: Any) -> JournalStatus:
            self.calls += 1
            try:
                if self.calls == 3:
                    parked.set()
                    await asyncio.Event().wait()  # until the batch is closed
                return await super().finish(item_key, status, **kw)
            except BaseException as error:
                raise raised("the journal's own") from error

    items = full(fake, [100] * 5)
    batch = om.capture_many(items, concurrency=1, journal=Converting())
    first = await anext(batch)
    await parked.wait()  # the second outcome fills the queue; the third is being recorded
    async with asyncio.timeout(30):  # a guard: the failure this test looks for is a hang
        await batch.aclose()
    assert first.status is CaptureStatus.CAPTURED
    assert len(fake.booked_captures) == 3


_EXIT_IN_THE_JOURNAL = """
import asyncio
from klarna_om_async import CaptureRequest, KlarnaOM, MemoryJournal
from klarna_om_async.testing import Delay, FakeKlarna

class Exiting(MemoryJournal):
    async def finish(self, *args, **kwargs):
        raise SystemExit(3)

async def main():
    fake = FakeKlarna()
    await fake.start()
    fake.inject(Delay(0.05), times=None)
    om = KlarnaOM(fake.username, fake.password, base_url=fake.base_url)
    items = [(o, CaptureRequest(captured_amount=100)) for o in fake.add_orders(8, amount=100)]
    async for _ in om.capture_many(items, concurrency=4, journal=Exiting()):
        pass

loop = asyncio.new_event_loop()
try:
    loop.run_until_complete(main())
finally:
    loop.close()
"""


def test_workers_closed_with_their_loop_after_a_system_exit_say_nothing() -> None:
    # SystemExit from the journal ends the loop's run; closing the loop closes the other
    # workers' coroutines (GeneratorExit), which asked for the running task and printed
    # "Exception ignored ... RuntimeError: no running event loop" for each.
    run = subprocess.run(
        [sys.executable, "-c", _EXIT_IN_THE_JOURNAL], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 3, run.stderr
    # (aiohttp's and asyncio's own objects still say that their loop is closed.)
    assert "Exception ignored in: <coroutine object _Run.work" not in run.stderr
    assert "no running event loop" not in run.stderr


async def test_a_stopped_batch_cuts_short_its_wait_for_an_async_source_s_next_item(
    fake: FakeKlarna,
) -> None:
    # After a 401 the batch stops. It waited for the item the source was making (which may
    # never come: a queue consumer, a stream whose producer is silent), then read the rest
    # of the source to count it. Now the wait is cancelled and nothing more is read.
    items = full(fake, [100] * 4)
    aborted = asyncio.Event()
    made: list[str] = []
    cut: list[int] = []

    async def source() -> AsyncIterator[tuple[str, CaptureRequest]]:
        yield items[0]
        try:
            await aborted.wait()
        except asyncio.CancelledError:
            cut.append(1)
            raise
        for item in items[1:]:
            made.append(item[0])
            yield item

    policy = RetryPolicy(max_attempts=1)
    seen: list[CaptureOutcome] = []
    async with KlarnaOM(fake.username, "wrong", base_url=fake.base_url, retry=policy) as om:
        batch = om.capture_many(source(), concurrency=3, on_progress=lambda _: aborted.set())
        with pytest.raises(BatchAbortedError) as raised:
            await into(seen, batch)
    assert ([o.order_id for o in seen], made, cut) == ([items[0][0]], [], [1])
    assert {o.status for o in seen} == {CaptureStatus.REFUSED}
    assert (raised.value.not_sent, raised.value.not_sent_count) == ((), None)
    assert "; the rest of the source was not read; fix the credentials" in str(raised.value)
    assert sum(r.method == "POST" for r in fake.requests) == 1


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_a_stopped_batch_does_not_wait_for_an_async_source_that_never_ends(
    fake: FakeKlarna, concurrency: int
) -> None:
    # A queue consumer after a 401: the batch read it on to count what it did not send,
    # waiting forever and taking its messages. With two workers, one waits in the queue.
    items = full(fake, [100] * 3)
    waiting: asyncio.Queue[tuple[str, CaptureRequest]] = asyncio.Queue()
    waiting.put_nowait(items[0])

    async def consumer() -> AsyncIterator[tuple[str, CaptureRequest]]:
        while True:
            yield await waiting.get()

    policy = RetryPolicy(max_attempts=1)
    seen: list[CaptureOutcome] = []
    async with KlarnaOM(fake.username, "wrong", base_url=fake.base_url, retry=policy) as om:
        batch = om.capture_many(consumer(), concurrency=concurrency)
        with pytest.raises(BatchAbortedError) as raised:
            # A guard against the hang this test is about, not a timing: it ends at once.
            await asyncio.wait_for(into(seen, batch), 30)
    assert raised.value.not_sent_count is None
    assert [o.order_id for o in seen] == [items[0][0]]
    for item in items[1:]:  # messages sent to the queue later stay in it
        waiting.put_nowait(item)
    assert [waiting.get_nowait()[0] for _ in items[1:]] == [i[0] for i in items[1:]]


@pytest.mark.parametrize("on_cut", ["raises", "ends"])
async def test_a_source_that_raises_or_ends_when_its_wait_is_cut_still_stops_the_batch(
    fake: FakeKlarna, on_cut: str
) -> None:
    # A source that turns the cancellation into an error of its own (a consumer whose close
    # fails) left the cut pending: its worker never said it was done, and the batch waited
    # forever. One that takes it for its end ("graceful stop") made the batch end as if the
    # source had run dry: no BatchAbortedError, the items it never made unreported.
    items = full(fake, [100] * 4)
    never = asyncio.Event()

    async def source() -> AsyncIterator[tuple[str, CaptureRequest]]:
        yield items[0]
        try:
            await never.wait()
        except asyncio.CancelledError:
            if on_cut == "raises":
                raise ConnectionResetError("the consumer's connection closed") from None
            return
        yield items[1]

    policy = RetryPolicy(max_attempts=1)
    seen: list[CaptureOutcome] = []
    async with KlarnaOM(fake.username, "wrong", base_url=fake.base_url, retry=policy) as om:
        with pytest.raises(BatchAbortedError) as raised:
            # A guard against the hang this test is about, not a timing: it ends at once.
            await asyncio.wait_for(into(seen, om.capture_many(source(), concurrency=2)), 30)
    assert raised.value.not_sent_count is None
    assert [o.order_id for o in seen] == [items[0][0]]


async def test_a_stopped_batch_counts_the_rest_of_a_plain_iterable(fake: FakeKlarna) -> None:
    items = full(fake, [100] * 5)
    policy = RetryPolicy(max_attempts=1)
    seen: list[CaptureOutcome] = []
    async with KlarnaOM(fake.username, "wrong", base_url=fake.base_url, retry=policy) as om:
        with pytest.raises(BatchAbortedError) as raised:
            await into(seen, om.capture_many(iter(items), concurrency=1))
    assert [o.order_id for o in seen] == [items[0][0]]
    assert raised.value.not_sent_count == 4
    assert raised.value.not_sent == tuple(order_id for order_id, _ in items[1:])
    assert "; 4 items not sent; fix the credentials and rerun" in str(raised.value)


async def test_a_broken_source_surfaces_after_started_items_finish(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    pairs = full(fake, [1, 2])

    def source() -> Iterator[tuple[str, CaptureRequest]]:
        yield from pairs
        raise OSError("disk read failed")

    seen: list[CaptureOutcome] = []

    async def consume() -> None:
        async for outcome in om.capture_many(source(), concurrency=1):
            seen.append(outcome)

    with pytest.raises(OSError, match="disk read failed"):
        await consume()
    assert [o.status for o in seen] == [CaptureStatus.CAPTURED] * 2


async def test_bad_concurrency_is_refused(om: KlarnaOM) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        await anext(om.capture_many([], concurrency=0))
    with pytest.raises(ValueError, match="rate_limit"):
        await anext(om.capture_many([], rate_limit=0))


def test_captures_service_is_what_the_batch_drives() -> None:
    # capture_many only needs `create`; keep the stand-in above honest about the signature.
    assert CapturesService.create.__name__ == InstantCaptures.create.__name__
