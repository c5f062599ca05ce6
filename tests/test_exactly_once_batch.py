"""Exactly-once at the edges of a run: reruns, edits, expired keys, reconciliation.

Every test counts what FakeKlarna actually booked.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest

from klarna_om_async import (
    BatchItem,
    CaptureOutcome,
    CaptureRequest,
    CaptureStatus,
    ItemConflictError,
    JournalStatus,
    KlarnaConnectionError,
    KlarnaError,
    KlarnaOM,
    NeedsReviewError,
    Order,
    RetryPolicy,
    SQLiteJournal,
    ValidationError,
    Verdict,
)
from klarna_om_async.batch import ItemHeldBackError
from klarna_om_async.journal import (
    DEFAULT_KEY_MAX_AGE,
    MAX_KEY_MAX_AGE,
    Claim,
    ItemRecord,
    MemoryJournal,
)
from klarna_om_async.reconcile import reconcile
from klarna_om_async.testing import (
    DropAfterProcessing,
    DropConnection,
    FakeKlarna,
    InstantSleep,
    NonJsonError,
    RateLimited,
    ServerFailure,
)

DAY = 24 * 3600.0


async def run(
    om: KlarnaOM, items: Iterable[BatchItem | tuple[str, CaptureRequest]], journal: SQLiteJournal
) -> list[CaptureOutcome]:
    return [o async for o in om.capture_many(items, journal=journal, concurrency=4)]


def booked(fake: FakeKlarna) -> Counter[str]:
    return Counter(c.order_id for c in fake.booked_captures)


@pytest.fixture
async def journal(tmp_path: Path, fake: FakeKlarna) -> AsyncIterator[SQLiteJournal]:
    """A journal on disk that shares the fake's (driven) clock."""
    async with SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now) as opened:
        yield opened


@pytest.fixture
async def wrong_password(fake: FakeKlarna) -> AsyncIterator[KlarnaOM]:
    policy = RetryPolicy(max_attempts=4, jitter=lambda d: d, sleep=InstantSleep())
    async with KlarnaOM(fake.username, "wrong", base_url=fake.base_url, retry=policy) as client:
        yield client


@pytest.mark.parametrize("refusal", ["401", "429", "proxy-403"])
async def test_a_refusal_in_a_rerun_keeps_the_key_that_may_have_booked(
    om: KlarnaOM,
    wrong_password: KlarnaOM,
    fake: FakeKlarna,
    journal: SQLiteJournal,
    refusal: str,
) -> None:
    orders = [fake.add_order(amount=10000) for _ in range(3)]
    items = [(o, CaptureRequest(captured_amount=4000)) for o in orders]
    # Run 1: every capture is booked and its answer lost.
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    first = await run(om, items, journal)
    assert {o.status for o in first} == {CaptureStatus.FAILED}
    fake.clear_faults()
    # Run 2: every attempt is refused, for a reason that says nothing about run 1.
    client = om
    if refusal == "401":
        client = wrong_password
    elif refusal == "429":
        fake.inject(RateLimited(retry_after="1"), method="POST", times=None)
    else:
        fake.inject(NonJsonError(403, "<html>Forbidden</html>"), method="POST", times=None)
    second = await run(client, items, journal)
    assert {o.status for o in second} == {CaptureStatus.FAILED}
    assert all(o.error is not None for o in second)
    entries = {e.order_id: e for e in await journal.entries()}
    assert {e.status for e in entries.values()} == {JournalStatus.FAILED}
    fake.clear_faults()
    # Run 3: the original keys are resent, so Klarna replays run 1's captures.
    third = await run(om, items, journal)
    assert {o.status for o in third} == {CaptureStatus.CAPTURED}
    keys = {o.order_id: o.idempotency_key for o in first}
    assert {o.order_id: o.idempotency_key for o in third} == keys
    assert booked(fake) == dict.fromkeys(orders, 1)
    assert {o.capture_id for o in third} == {c.capture_id for c in fake.booked_captures}


async def test_an_edited_amount_is_never_sent_names_both_amounts_and_stays_unknown(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order_id = fake.add_order(amount=10000)
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    [first] = await run(om, [(order_id, CaptureRequest(captured_amount=1000))], journal)
    assert first.status is CaptureStatus.FAILED
    fake.clear_faults()
    sent_before = len(fake.requests)

    [second] = await run(om, [(order_id, CaptureRequest(captured_amount=7000))], journal)

    # Not "refused": the 1000 sent under the key was booked (its answer lost), and the
    # outcome says so (unknown, with the key), so nobody retypes the line under a new key.
    assert second.status is CaptureStatus.FAILED
    assert isinstance(second.error, ItemConflictError)
    assert second.error.outcome_unknown
    assert "7000 now, 1000 in the journal" in str(second.error)
    assert second.idempotency_key == first.idempotency_key
    assert len(fake.requests) == sent_before  # nothing was sent
    assert [c.captured_amount for c in fake.booked_captures] == [1000]


async def test_a_reused_file_with_a_new_line_for_a_captured_item_is_refused(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order_id = fake.add_order(amount=10000)
    [first] = await run(om, [(order_id, CaptureRequest(captured_amount=4000))], journal)
    assert first.status is CaptureStatus.CAPTURED
    fake.advance_clock(DAY)  # "the next day", same file name, a new line for the order
    [second] = await run(om, [(order_id, CaptureRequest(captured_amount=3000))], journal)
    assert second.status is CaptureStatus.REFUSED  # not "skipped": the 3000 was never captured
    assert "already captured" in str(second.error)
    assert [c.captured_amount for c in fake.booked_captures] == [4000]


async def test_two_items_with_one_explicit_key_are_not_both_reported_captured(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    a, b = fake.add_order(amount=100), fake.add_order(amount=100)
    items = [
        BatchItem(order_id=o, request=CaptureRequest(captured_amount=100), idempotency_key="K")
        for o in (a, b)
    ]
    outcomes = [o async for o in om.capture_many(items, journal=journal, concurrency=1)]
    assert [o.status for o in outcomes] == [CaptureStatus.CAPTURED, CaptureStatus.REFUSED]
    assert isinstance(outcomes[1].error, ValidationError)
    assert "idempotency_key" in str(outcomes[1].error)
    assert booked(fake) == {a: 1}
    # A later run that gives the key to another item is refused by the journal as well.
    [later] = await run(om, [items[1]], journal)
    assert later.status is CaptureStatus.REFUSED
    assert isinstance(later.error, ItemConflictError)
    assert booked(fake) == {a: 1}


# --- keys older than Klarna's 24 hours: reconciliation -----------------------------------


async def test_an_expired_key_whose_capture_was_booked_is_reconciled_as_captured(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order_id = fake.add_order(amount=10000)
    items = [(order_id, CaptureRequest(captured_amount=4000, reference="box-1"))]
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    [first] = await run(om, items, journal)
    assert first.status is CaptureStatus.FAILED
    fake.clear_faults()
    fake.advance_clock(DAY + 3600)  # Klarna has forgotten the key

    posts_before = sum(r.method == "POST" for r in fake.requests)
    [second] = await run(om, items, journal)

    assert second.status is CaptureStatus.CAPTURED
    assert second.capture_id == fake.captures(order_id)[0].capture_id
    assert sum(r.method == "POST" for r in fake.requests) == posts_before  # read, not resent
    assert booked(fake) == {order_id: 1}
    [entry] = await journal.entries()
    assert (entry.status, entry.capture_id) == (JournalStatus.CAPTURED, second.capture_id)


async def test_an_expired_key_never_booked_is_sent_with_a_new_key(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order_id = fake.add_order(amount=10000)
    items = [(order_id, CaptureRequest(captured_amount=4000, reference="box-1"))]
    fake.inject(DropConnection(), method="POST", times=None)  # never processed
    [first] = await run(om, items, journal)
    assert first.status is CaptureStatus.FAILED
    fake.clear_faults()
    fake.advance_clock(DAY + 3600)

    [second] = await run(om, items, journal)

    assert second.status is CaptureStatus.CAPTURED
    assert second.idempotency_key != first.idempotency_key
    assert booked(fake) == {order_id: 1}


class AgingSleep:
    """Retry waits that pass on the fake's clock too: Klarna's memory of a key ages with them."""

    def __init__(self, fake: FakeKlarna) -> None:
        self.fake = fake
        self.waited = 0.0

    async def __call__(self, seconds: float) -> None:
        self.fake.advance_clock(seconds)
        self.waited += seconds

    def clock(self) -> float:
        return time.monotonic() + self.waited


def patient(fake: FakeKlarna, waits: AgingSleep, deadline: float) -> KlarnaOM:
    """A client that retries every 10-20 minutes (on the fake's clock) until ``deadline``."""
    policy = RetryPolicy(
        max_attempts=100,
        initial_delay=600,
        max_delay=1200,
        deadline=deadline,
        jitter=lambda d: d,
        sleep=waits,
    )
    return KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, retry=policy, clock=waits.clock
    )


@pytest.mark.parametrize("age", [timedelta(hours=23), MAX_KEY_MAX_AGE])
async def test_a_key_an_earlier_run_sent_is_never_retried_past_the_journals_key_max_age(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path, age: timedelta
) -> None:
    # The rerun claimed the key 1,000 s before key_max_age and met 503s; its retries (a
    # patient policy: a 2-hour deadline) went on after Klarna had forgotten the key, and the
    # one that got through booked the capture a second time.
    order_id = fake.add_order(amount=10000)
    items = [(order_id, CaptureRequest(captured_amount=4000, reference="box-1"))]
    waits = AgingSleep(fake)
    async with (
        SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now, key_max_age=age) as journal,
        patient(fake, waits, deadline=7200) as rerun,
    ):
        fake.inject(DropAfterProcessing(), method="POST", times=None)
        [first] = await run(om, items, journal)
        assert first.status is CaptureStatus.FAILED
        fake.clear_faults()
        fake.advance_clock(age.total_seconds() - 1000)
        fake.inject(ServerFailure(), method="POST", times=6)
        posts_before = sum(r.method == "POST" for r in fake.requests)

        [second] = await run(rerun, items, journal)

        # Sent at once and 600 s later; the next wait (1,200 s) would pass key_max_age.
        assert sum(r.method == "POST" for r in fake.requests) - posts_before == 2
        assert second.status is CaptureStatus.FAILED
        assert second.idempotency_key == first.idempotency_key
        assert isinstance(second.error, KlarnaError)
        assert second.error.outcome_unknown
        fake.clear_faults()
        [third] = await run(om, items, journal)  # an expired key: the order is read
    assert third.status is CaptureStatus.CAPTURED
    assert booked(fake) == {order_id: 1}


async def test_a_resent_key_ages_while_klarnas_time_is_read(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    """The key of an earlier run, claimed 1,000 s before key_max_age, waits for a read of
    Klarna's time that meets 429s for an hour: its time left was counted from the send, not
    the claim, and it went out after Klarna had forgotten it (helper-90: booked twice)."""
    order_id, other = fake.add_order(amount=10000), fake.add_order(amount=10000)
    items = [(order_id, CaptureRequest(captured_amount=4000, reference="box-1"))]
    waits = AgingSleep(fake)
    async with (
        SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now) as journal,
        patient(fake, waits, deadline=7200) as rerun,
    ):
        fake.inject(DropAfterProcessing(), method="POST", times=None)
        [first] = await run(om, items, journal)
        fake.clear_faults()
        fake.advance_clock(DEFAULT_KEY_MAX_AGE.total_seconds() - 1000)
        await rerun.orders.get(other)  # the client knows Klarna's time
        posts_before = sum(r.method == "POST" for r in fake.requests)
        fake.inject(RateLimited(retry_after="1200"), method="GET", times=3)
        [second] = await run(rerun, items, journal)
        assert sum(r.method == "POST" for r in fake.requests) == posts_before  # not resent
        assert second.status is CaptureStatus.FAILED
        assert second.idempotency_key == first.idempotency_key
        assert isinstance(second.error, KlarnaError)
        assert second.error.outcome_unknown
        [third] = await run(om, items, journal)  # an expired key: the order is read
    assert third.status is CaptureStatus.CAPTURED
    assert booked(fake) == {order_id: 1}


async def test_the_bound_of_a_resent_key_is_that_send_alone(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    # The bound stayed set in the worker's task, where the item source runs too: a keyed
    # call the source made next got the resent key's last minutes, not its own deadline.
    order_id, other = fake.add_order(amount=10_000), fake.add_order(amount=10_000)
    item = (order_id, CaptureRequest(captured_amount=4000, reference="box-1"))
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    [first] = await run(om, [item], journal)
    assert first.status is CaptureStatus.FAILED
    fake.clear_faults()
    fake.advance_clock(23 * 3600 - 900)  # 15 minutes of the key's life left
    waits = AgingSleep(fake)
    acknowledged: list[str] = []
    async with patient(fake, waits, deadline=7200) as rerun:

        async def source() -> AsyncIterator[tuple[str, CaptureRequest]]:
            yield item
            # Three 503s: 600 + 1200 + 1200 s of retries, within the call's 2 hours.
            fake.inject(ServerFailure(), method="POST", path="acknowledge", times=3)
            await rerun.orders.acknowledge(other, idempotency_key="ack-1")
            acknowledged.append(other)
            yield (other, CaptureRequest(captured_amount=4000))

        outcomes = [o async for o in rerun.capture_many(source(), journal=journal, concurrency=1)]
    assert acknowledged == [other]
    assert [o.status for o in outcomes] == [CaptureStatus.CAPTURED] * 2
    assert booked(fake) == {order_id: 1, other: 1}


class ClaimsOfItsOwn(MemoryJournal):
    """A journal of one's own: its claims say no ``key_time_left``, and its times are
    ``sent_at(entry)`` (a time without a zone, or none)."""

    def __init__(self, sent_at: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sent_at = sent_at

    async def claim(self, item: ItemRecord, new_key: str, *, run_id: str | None = None) -> Claim:
        claim = await super().claim(item, new_key, run_id=run_id)
        entry = attrs.evolve(claim.entry, key_sent_at=self.sent_at(claim.entry))
        return Claim(claim.action, entry, claim.reason, claim.outcome_unknown)


async def test_a_journal_of_ones_own_with_times_without_a_zone_runs(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # Its claims raised TypeError (naive minus aware), and the batch sent nothing.
    journal = ClaimsOfItsOwn(lambda entry: entry.key_sent_at.replace(tzinfo=None))
    items = [(fake.add_order(amount=100), CaptureRequest(captured_amount=100)) for _ in range(3)]
    outcomes = await run(om, items, journal)  # type: ignore[arg-type]
    assert [o.status for o in outcomes] == [CaptureStatus.CAPTURED] * 3


async def test_a_resent_key_of_unknown_age_is_not_sent_again(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # A journal of one's own that knows no key_sent_at: an earlier run's key was given a
    # new key's 23 hours, and retried 23.5 hours after that run's send (booked twice).
    journal = ClaimsOfItsOwn(lambda _entry: None, clock=fake.now, key_max_age=MAX_KEY_MAX_AGE)
    order_id = fake.add_order(amount=10_000)
    items = [(order_id, CaptureRequest(captured_amount=4000, reference="box-1"))]
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    [first] = await run(om, items, journal)  # type: ignore[arg-type]
    assert first.status is CaptureStatus.FAILED  # a new key: sent and retried
    fake.clear_faults()
    fake.advance_clock(23.5 * 3600)
    posts = sum(r.method == "POST" for r in fake.requests)
    waits = AgingSleep(fake)
    async with patient(fake, waits, deadline=DAY) as client:
        fake.inject(ServerFailure(), method="POST", times=3)
        [again] = [o async for o in client.capture_many(items, journal=journal)]
    assert again.status is CaptureStatus.FAILED
    assert again.idempotency_key == first.idempotency_key
    assert sum(r.method == "POST" for r in fake.requests) == posts
    assert booked(fake) == {order_id: 1}


async def test_a_call_never_resends_its_key_after_23_hours_whatever_its_deadline(
    fake: FakeKlarna,
) -> None:
    # A deadline may be a day; Klarna forgets a key 24 hours after its first use, so a
    # resend a day later books the capture again.
    order_id = fake.add_order(amount=10000)
    waits = AgingSleep(fake)
    fake.inject(DropAfterProcessing(), method="POST")  # booked, the answer lost
    fake.inject(ServerFailure(), method="POST", times=100)
    async with patient(fake, waits, deadline=DAY) as client:
        with pytest.raises(KlarnaError) as caught:
            await client.captures.create(order_id, CaptureRequest(captured_amount=4000))
    assert caught.value.outcome_unknown
    assert caught.value.idempotency_key is not None
    assert 22 * 3600 <= waits.waited <= 23 * 3600
    assert booked(fake) == {order_id: 1}


async def test_an_expired_key_without_a_reference_needs_review_and_is_never_sent(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order_id = fake.add_order(amount=10000)
    items = [(order_id, CaptureRequest(captured_amount=4000))]
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    await run(om, items, journal)
    fake.clear_faults()
    fake.advance_clock(DAY + 3600)
    posts_before = sum(r.method == "POST" for r in fake.requests)

    [second] = await run(om, items, journal)
    [third] = await run(om, items, journal)

    for outcome in (second, third):
        assert outcome.status is CaptureStatus.NEEDS_REVIEW
        assert isinstance(outcome.error, NeedsReviewError)
        assert outcome.error.outcome_unknown
        assert fake.captures(order_id)[0].capture_id in str(outcome.error)
    assert sum(r.method == "POST" for r in fake.requests) == posts_before
    assert booked(fake) == {order_id: 1}


async def test_om_reconcile_gives_each_unknown_item_its_verdict(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    booked_ref, never, no_ref, fresh = (fake.add_order(amount=10000) for _ in range(4))
    # Three items whose keys will expire, then one whose key is still valid.
    fake.inject(DropAfterProcessing(), method="POST", path=booked_ref, times=None)
    fake.inject(DropConnection(), method="POST", path=never, times=None)
    fake.inject(DropAfterProcessing(), method="POST", path=no_ref, times=None)
    await run(
        om,
        [
            (booked_ref, CaptureRequest(captured_amount=100, reference="r1")),
            (never, CaptureRequest(captured_amount=100, reference="r2")),
            (no_ref, CaptureRequest(captured_amount=100)),
        ],
        journal,
    )
    fake.advance_clock(DAY)
    fake.inject(DropConnection(), method="POST", path=fresh, times=None)
    await run(om, [(fresh, CaptureRequest(captured_amount=100, reference="r4"))], journal)
    fake.clear_faults()

    results = {r.order_id: r for r in await om.reconcile(journal)}

    assert results[booked_ref].verdict is Verdict.CAPTURED
    assert results[booked_ref].capture_id == fake.captures(booked_ref)[0].capture_id
    assert results[never].verdict is Verdict.NOT_CAPTURED
    assert results[no_ref].verdict is Verdict.NEEDS_REVIEW
    assert results[fresh].verdict is Verdict.RESEND  # the key still settles it exactly
    status = {e.order_id: e.status for e in await journal.entries()}
    assert status == {
        booked_ref: JournalStatus.CAPTURED,
        never: JournalStatus.REFUSED,
        no_ref: JournalStatus.NEEDS_REVIEW,
        fresh: JournalStatus.FAILED,
    }
    assert booked(fake) == {booked_ref: 1, no_ref: 1}


async def test_om_reconcile_reads_at_most_concurrency_orders_at_once_with_a_task_each(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    # A task per order was started at once: a journal of a million unknown items made a
    # million tasks. Now `concurrency` workers take the orders in turn, in journal order.
    orders = [fake.add_order(amount=10000) for _ in range(40)]
    fake.inject(DropConnection(), method="POST", times=None)
    await run(
        om, [(o, CaptureRequest(captured_amount=100, reference="r")) for o in orders], journal
    )
    fake.clear_faults()
    fake.advance_clock(DAY)
    tasks: list[int] = []
    reading = 0
    most = 0

    class Counting:
        async def get(self, order_id: str) -> Order:
            nonlocal reading, most
            tasks.append(len(asyncio.all_tasks()))
            reading += 1
            most = max(most, reading)
            try:
                return await om.orders.get(order_id)
            finally:
                reading -= 1

    results = await reconcile(Counting(), journal, concurrency=3)  # type: ignore[arg-type]

    assert [r.order_id for r in results] == sorted(orders)
    assert {r.verdict for r in results} == {Verdict.NOT_CAPTURED}
    assert most == 3
    assert max(tasks) - min(tasks) <= 3


@pytest.mark.parametrize("concurrency", [0, 2.5, True, 10_001])
async def test_om_reconcile_refuses_a_concurrency_that_is_no_count(
    om: KlarnaOM, journal: SQLiteJournal, concurrency: Any
) -> None:
    # 2.5 was taken, then failed inside as a TypeError once workers were counted from it.
    with pytest.raises(ValueError, match="concurrency: must be a whole number from 1 to"):
        await om.reconcile(journal, concurrency=concurrency)


async def test_a_reconciled_capture_is_not_given_to_a_second_item(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    # Two lost captures of one order with the same amount but their own references: each
    # item is matched to its own capture, never both to one.
    order_id = fake.add_order(amount=10000)
    items = [
        (order_id, CaptureRequest(captured_amount=500, reference="a")),
        (order_id, CaptureRequest(captured_amount=500, reference="b")),
    ]
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    await run(om, items, journal)
    fake.clear_faults()
    fake.advance_clock(DAY + 1)
    outcomes = await run(om, items, journal)
    assert {o.status for o in outcomes} == {CaptureStatus.CAPTURED}
    assert {o.capture_id for o in outcomes} == {c.capture_id for c in fake.captures(order_id)}
    assert booked(fake) == {order_id: 2}


def test_key_max_age_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key_max_age"):
        SQLiteJournal(tmp_path / "j.sqlite", key_max_age=timedelta(0))


# --- found by a hostile review -----------------------------------------------------------


async def test_reconciling_with_another_accounts_credentials_leaves_the_item_unknown(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal, sleeps: InstantSleep
) -> None:
    # Another account (or region) sees no such order: a 404 proves nothing was booked there.
    order_id = fake.add_order(amount=10000)
    items = [(order_id, CaptureRequest(captured_amount=3000, reference="r"))]
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    await run(om, items, journal)
    fake.clear_faults()
    fake.advance_clock(DAY + 3600)
    policy = RetryPolicy(max_attempts=2, jitter=lambda d: d, sleep=sleeps)
    async with (
        FakeKlarna() as elsewhere,
        KlarnaOM(
            elsewhere.username, elsewhere.password, base_url=elsewhere.base_url, retry=policy
        ) as other,
    ):
        assert [r.verdict for r in await other.reconcile(journal)] == [None]
        [wrong] = await run(other, items, journal)
        assert wrong.status is CaptureStatus.FAILED
        assert not [r for r in elsewhere.requests if r.method == "POST"]
    [entry] = await journal.entries()
    assert (entry.status, entry.uncertain) == (JournalStatus.FAILED, True)
    [right] = await run(om, items, journal)
    assert right.status is CaptureStatus.CAPTURED
    assert booked(fake) == {order_id: 1}


@pytest.mark.parametrize(("before", "after"), [("box-1", "box-1b"), (None, "box-1")])
async def test_a_changed_reference_after_a_lost_answer_is_held_back(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal, before: str | None, after: str
) -> None:
    order_id = fake.add_order(amount=10000)
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    [first] = await run(
        om, [(order_id, CaptureRequest(captured_amount=3000, reference=before))], journal
    )
    assert first.status is CaptureStatus.FAILED
    fake.clear_faults()
    posts = sum(r.method == "POST" for r in fake.requests)

    [edited] = await run(
        om, [(order_id, CaptureRequest(captured_amount=3000, reference=after))], journal
    )

    assert edited.status is CaptureStatus.REFUSED
    assert isinstance(edited.error, ItemConflictError)
    assert "outcome is failed" in str(edited.error)
    assert first.idempotency_key in str(edited.error)
    assert sum(r.method == "POST" for r in fake.requests) == posts
    assert booked(fake) == {order_id: 1}


async def test_items_sharing_a_reference_are_reconciled_one_at_a_time(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    # Two items (own item keys) with one reference and amount: only `a` was booked. Each must
    # not be given the same capture.
    order_id = fake.add_order(amount=10000)
    items = [
        BatchItem(
            order_id=order_id,
            request=CaptureRequest(captured_amount=500, reference="r"),
            item_key=name,
        )
        for name in ("a", "b")
    ]
    fake.inject(DropAfterProcessing(), method="POST", times=4)  # a's four attempts
    fake.inject(DropConnection(), method="POST", times=4)  # b's: never processed
    first = [o async for o in om.capture_many(items, journal=journal, concurrency=1)]
    assert [o.status for o in first] == [CaptureStatus.FAILED] * 2
    assert booked(fake) == {order_id: 1}
    fake.advance_clock(DAY + 3600)

    second = {o.item_key: o for o in await run(om, items, journal)}

    assert {o.status for o in second.values()} == {CaptureStatus.CAPTURED}
    assert second["a"].capture_id != second["b"].capture_id
    assert booked(fake) == {order_id: 2}


# --- found by a second hostile review ------------------------------------------------------


async def test_an_order_id_with_spaces_is_the_same_item(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order_id, other = fake.add_order(amount=10000), fake.add_order(amount=10000)
    one_batch = [
        (f" {order_id}", CaptureRequest(captured_amount=5000)),
        (order_id, CaptureRequest(captured_amount=5000)),
    ]
    outcomes = [o async for o in om.capture_many(one_batch, journal=journal, concurrency=1)]
    assert [o.status for o in outcomes] == [CaptureStatus.CAPTURED, CaptureStatus.REFUSED]
    # Across runs: a lost answer under " X", then "X" in the rerun, resends the same key.
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    [first] = await run(om, [(f"{other} ", CaptureRequest(captured_amount=5000))], journal)
    assert first.status is CaptureStatus.FAILED
    fake.clear_faults()
    [second] = await run(om, [(other, CaptureRequest(captured_amount=5000))], journal)
    assert (second.status, second.idempotency_key) == (
        CaptureStatus.CAPTURED,
        first.idempotency_key,
    )
    assert booked(fake) == {order_id: 1, other: 1}


@pytest.mark.parametrize(("a", "b"), [(" ", None), (" box", "box"), ("box ", "box")])
async def test_references_that_differ_only_in_spaces_are_one_item(
    om: KlarnaOM, fake: FakeKlarna, a: str, b: str | None
) -> None:
    order_id = fake.add_order(amount=10000)
    items = [
        (order_id, CaptureRequest(captured_amount=2500, reference=a)),
        (order_id, CaptureRequest(captured_amount=2500, reference=b)),
    ]
    outcomes = [o async for o in om.capture_many(items, concurrency=1)]
    assert [o.status for o in outcomes] == [CaptureStatus.CAPTURED, CaptureStatus.REFUSED]
    assert booked(fake) == {order_id: 1}


def test_a_connect_failure_after_an_unknown_attempt_does_not_say_nothing_was_sent() -> None:
    error = KlarnaConnectionError(
        "Could not connect to h:1 (Connection refused)", request_sent=False
    )
    error.bind(method="POST", url="http://h:1/x", idempotency_key="K", attempts=3)
    assert "nothing was sent" in str(error)
    assert not error.outcome_unknown
    error.earlier_attempt_unknown = True
    assert "nothing was sent" not in str(error)
    assert "an earlier one may have been booked" in str(error)
    assert error.outcome_unknown


async def test_a_busy_merchant_never_refuses_an_item(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal, sleeps: InstantSleep
) -> None:
    # 429s outlast max_attempts (4) and the deadline: the item is not refused, and the rerun
    # sends it once.
    orders = [fake.add_order(amount=100) for _ in range(3)]
    items = [(o, CaptureRequest(captured_amount=100)) for o in orders]
    fake.inject(RateLimited(retry_after="1"), method="POST", path=orders[0], times=None)
    fake.inject(RateLimited(retry_after="1"), method="POST", times=6)
    first = {o.order_id: o for o in await run(om, items, journal)}
    assert first[orders[0]].status is CaptureStatus.FAILED
    assert first[orders[0]].attempts > om.retry_policy.max_attempts
    assert {first[o].status for o in orders[1:]} == {CaptureStatus.CAPTURED}
    fake.clear_faults()
    [again] = await run(om, items[:1], journal)
    assert again.status is CaptureStatus.CAPTURED
    assert booked(fake) == dict.fromkeys(orders, 1)


async def test_an_item_moved_to_another_order_and_held_back_names_its_unknown_key(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    # Run 1: item "inv-7" captures 3000 on order a; Klarna books it, the answer is lost.
    a, b = fake.add_order(amount=10_000), fake.add_order(amount=10_000)
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    item = BatchItem(order_id=a, request=CaptureRequest(captured_amount=3000), item_key="inv-7")
    [lost] = await run(om, [item], journal)
    fake.clear_faults()
    assert lost.status is CaptureStatus.FAILED
    # Run 2: the line now names order b, behind an earlier item of b that Klarna refuses.
    # Held back, it says what its claim would: money may have moved under its key.
    moved = BatchItem(order_id=b, request=CaptureRequest(captured_amount=3000), item_key="inv-7")
    first = BatchItem(order_id=b, request=CaptureRequest(captured_amount=99_000), item_key="big")
    refused, held = [o async for o in om.run_many([first, moved], journal=journal)]
    assert refused.status is CaptureStatus.REFUSED
    assert isinstance(held.error, ItemHeldBackError)
    assert (held.status, held.idempotency_key) == (CaptureStatus.FAILED, lost.idempotency_key)
    assert held.error.outcome_unknown
    assert booked(fake) == {a: 1}


async def test_an_amount_edit_is_caught_by_the_amount_a_row_without_fingerprint_records(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal, tmp_path: Path
) -> None:
    order_id = fake.add_order(amount=10_000)
    [first] = await run(
        om, [(order_id, CaptureRequest(captured_amount=1000, reference="r"))], journal
    )
    assert first.status is CaptureStatus.CAPTURED
    with contextlib.closing(sqlite3.connect(tmp_path / "j.sqlite")) as db, db:
        db.execute("UPDATE journal SET fingerprint = NULL")
    [edited] = await run(
        om, [(order_id, CaptureRequest(captured_amount=2000, reference="r"))], journal
    )
    assert edited.status is CaptureStatus.REFUSED  # not "skipped": 2000 is not what was done
    assert "captured_amount is 2000 now, 1000 in the journal" in str(edited.error)
    assert booked(fake) == {order_id: 1}
