"""One batch engine for every money-moving operation: refunds, releases, extensions and
cancellations run, journal and reconcile with the exactly-once rules of captures.

Every test counts what FakeKlarna actually booked.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import attrs
import orjson
import pytest
from click.testing import CliRunner, Result

from klarna_om_async import (
    BatchItem,
    CaptureOutcome,
    CaptureRequest,
    CaptureStatus,
    IdempotencyKeyReusedError,
    ItemConflictError,
    JournalStatus,
    KlarnaOM,
    NeedsReviewError,
    Order,
    OrderLine,
    RefundRequest,
    RetryPolicy,
    SQLiteJournal,
)
from klarna_om_async._convert import to_json
from klarna_om_async.batch import BatchOutcome, ItemHeldBackError, request_fingerprint, run_many
from klarna_om_async.cli import main
from klarna_om_async.cli._batchfile import BadLine, BatchFileError, Row, detect_format, open_batch
from klarna_om_async.journal import Claim, ItemRecord, JournalEntry, MemoryJournal
from klarna_om_async.operations import (
    CancelOrder,
    ExtendAuthorizationTime,
    Operation,
    OperationRequest,
    ReleaseRemainingAuthorization,
    Services,
    operation_of,
)
from klarna_om_async.reconcile import Verdict, judge, order_shows
from klarna_om_async.testing import (
    Delay,
    DropAfterProcessing,
    DropConnection,
    FakeKlarna,
    InstantSleep,
    ServerFailure,
)

T = TypeVar("T")
#: How FakeKlarna's ``order.operations`` names a release and a cancel.
WORDS = {Operation.RELEASE: "releaseRemainingAuthorization", Operation.CANCEL: "cancelOrder"}
DAY = 24 * 3600.0
ORDERS = "/ordermanagement/v1/orders"


async def run(
    om: KlarnaOM,
    items: Iterable[BatchItem | tuple[str, OperationRequest]],
    journal: SQLiteJournal | MemoryJournal,
) -> list[CaptureOutcome]:
    return [o async for o in om.run_many(items, journal=journal, concurrency=4)]


def refunds_booked(fake: FakeKlarna) -> Counter[str]:
    return Counter(r.order_id for r in fake.booked_refunds)


def posts(fake: FakeKlarna, suffix: str = "") -> int:
    return sum(r.method == "POST" and r.path.endswith(suffix) for r in fake.requests)


async def captured_order(om: KlarnaOM, fake: FakeKlarna, captured: int = 6000) -> str:
    order_id = fake.add_order(amount=10_000)
    await om.captures.create(order_id, CaptureRequest(captured_amount=captured))
    return order_id


@pytest.fixture
async def journal(tmp_path: Path, fake: FakeKlarna) -> AsyncIterator[SQLiteJournal]:
    """A journal on disk that shares the fake's (driven) clock."""
    async with SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now) as opened:
        yield opened


# --- the items ------------------------------------------------------------------------------


def test_an_items_operation_follows_from_its_request_and_names_its_default_key() -> None:
    capture = BatchItem(order_id="o", request=CaptureRequest(captured_amount=1, reference="r"))
    refund = BatchItem(order_id="o", request=RefundRequest(refunded_amount=1, reference=" r "))
    release = BatchItem(order_id=" o ", request=ReleaseRemainingAuthorization())
    cases = [
        (capture, Operation.CAPTURE, "o:r"),  # as it always was: old journals keep matching
        (BatchItem(order_id="o", request=CaptureRequest(captured_amount=1)), "capture", "o"),
        (refund, Operation.REFUND, "refund:o:r"),
        (BatchItem(order_id="o", request=RefundRequest(refunded_amount=1)), "refund", "refund:o"),
        (release, Operation.RELEASE, "release:o"),
        (BatchItem(order_id="o", request=ExtendAuthorizationTime()), "extend", "extend:o"),
        (BatchItem(order_id="o", request=CancelOrder()), "cancel", "cancel:o"),
    ]
    for item, operation, key in cases:
        assert (item.operation, item.item_key) == (operation, key)
    with pytest.raises(TypeError, match="must be one of CaptureRequest, RefundRequest"):
        operation_of("capture")


def test_a_captures_fingerprint_is_byte_identical_to_the_one_journals_hold() -> None:
    lines = (OrderLine(name="a", quantity=1, unit_price=100, total_amount=100),)
    request = CaptureRequest(captured_amount=100, reference="r", order_lines=lines)
    before = orjson.dumps(["o", 100, "r"]) + to_json(lines)
    assert request_fingerprint("o", request) == hashlib.blake2b(before, digest_size=16).hexdigest()
    # The other operations name themselves: a refund is never "the same item" as a capture.
    refund = RefundRequest(refunded_amount=100, reference="r", order_lines=lines)
    prints = {
        request_fingerprint("o", r)
        for r in (request, refund, ReleaseRemainingAuthorization(), CancelOrder())
    }
    assert len(prints) == 4


async def test_capture_many_refuses_other_operations_and_sends_nothing(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = await captured_order(om, fake)
    before = len(fake.requests)
    items: list[tuple[str, OperationRequest]] = [
        (order_id, RefundRequest(refunded_amount=100)),
        (order_id, CancelOrder()),
    ]
    outcomes = [o async for o in om.capture_many(items)]
    assert {o.status for o in outcomes} == {CaptureStatus.REFUSED}
    assert all("om.run_many" in str(o.error) for o in outcomes)
    assert len(fake.requests) == before


# --- refunds: lost answers, reruns -------------------------------------------------------


async def test_a_refund_batch_with_lost_answers_books_each_refund_once(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    orders = [await captured_order(om, fake) for _ in range(6)]
    items = [
        BatchItem(order_id=o, request=RefundRequest(refunded_amount=2500, reference=f"RMA-{i}"))
        for i, o in enumerate(orders)
    ]
    # Run 1: the first three refunds are answered; the others are booked, answers lost.
    for order in orders[3:]:
        fake.inject(DropAfterProcessing(), method="POST", path=f"/{order}/refunds", times=None)
    first = {o.order_id: o for o in await run(om, items, journal)}
    assert [first[o].status for o in orders] == [CaptureStatus.CAPTURED] * 3 + [
        CaptureStatus.FAILED
    ] * 3
    assert all(first[o].operation is Operation.REFUND for o in orders)
    assert all(first[o].refund_id and first[o].capture_id is None for o in orders[:3])
    assert refunds_booked(fake) == dict.fromkeys(orders, 1)
    fake.clear_faults()

    # Run 2: the answered ones are skipped, the unknown ones resent with their own keys.
    posts_before = posts(fake, "/refunds")
    second = {o.order_id: o for o in await run(om, items, journal)}
    assert [second[o].status for o in orders] == [CaptureStatus.SKIPPED] * 3 + [
        CaptureStatus.CAPTURED
    ] * 3
    assert posts(fake, "/refunds") == posts_before + 3
    assert all(second[o].idempotency_key == first[o].idempotency_key for o in orders)
    refund_ids = {r.order_id: r.refund_id for r in fake.booked_refunds}
    assert {o: second[o].refund_id for o in orders} == refund_ids
    assert refunds_booked(fake) == dict.fromkeys(orders, 1)
    assert all(fake.order(o).refunded_amount == 2500 for o in orders)
    entries = await journal.entries()
    assert {(e.operation, e.status) for e in entries} == {
        (Operation.REFUND, JournalStatus.CAPTURED)
    }
    assert {e.captured_amount for e in entries} == {2500}  # the refunded amount
    assert {e.item_key for e in entries} == {f"refund:{o}:RMA-{i}" for i, o in enumerate(orders)}


# --- a mixed batch ------------------------------------------------------------------------


async def test_a_mixed_batch_runs_every_operation_once_in_order_per_order(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    a, b, c = (fake.add_order(amount=10_000) for _ in range(3))
    items: list[tuple[str, OperationRequest]] = [
        (a, CaptureRequest(captured_amount=4000, reference="part-1")),
        (a, RefundRequest(refunded_amount=1500, reference="RMA-1")),
        (a, ReleaseRemainingAuthorization()),  # after the capture: one order's items in turn
        (b, CancelOrder()),
        (c, ExtendAuthorizationTime()),
    ]
    expires_before = fake.order(c).expires_at
    fake.advance_clock(3 * DAY)
    outcomes = await run(om, items, journal)

    by_key = {o.item_key: o for o in outcomes}
    assert {k: (o.operation.value, o.status) for k, o in by_key.items()} == {
        f"{a}:part-1": ("capture", CaptureStatus.CAPTURED),
        f"refund:{a}:RMA-1": ("refund", CaptureStatus.CAPTURED),
        f"release:{a}": ("release", CaptureStatus.CAPTURED),
        f"cancel:{b}": ("cancel", CaptureStatus.CAPTURED),
        f"extend:{c}": ("extend", CaptureStatus.CAPTURED),
    }
    assert by_key[f"{a}:part-1"].created_id == fake.captures(a)[0].capture_id
    assert by_key[f"refund:{a}:RMA-1"].created_id == fake.refunds(a)[0].refund_id
    order_a = fake.order(a)
    assert (order_a.captured_amount, order_a.refunded_amount) == (4000, 1500)
    assert order_a.remaining_authorized_amount == 0
    assert fake.order(b).status == "CANCELLED"
    assert fake.order(c).expires_at > expires_before

    # A rerun skips all five and sends nothing.
    before = posts(fake)
    again = await run(om, items, journal)
    assert {o.status for o in again} == {CaptureStatus.SKIPPED}
    assert posts(fake) == before
    entries = {e.item_key: e for e in await journal.entries()}
    assert entries[f"refund:{a}:RMA-1"].capture_id == fake.refunds(a)[0].refund_id
    assert entries[f"release:{a}"].captured_amount is None


async def test_an_edited_operation_under_the_same_item_key_is_never_sent_and_stays_unknown(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order_id = await captured_order(om, fake)
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    item = BatchItem(order_id=order_id, request=RefundRequest(refunded_amount=500), item_key="K")
    [first] = await run(om, [item], journal)
    assert first.status is CaptureStatus.FAILED
    fake.clear_faults()
    before = len(fake.requests)

    edited = BatchItem(order_id=order_id, request=ReleaseRemainingAuthorization(), item_key="K")
    [second] = await run(om, [edited], journal)

    assert second.status is CaptureStatus.FAILED  # the refund sent before may be booked
    assert second.error is not None
    assert second.error.outcome_unknown
    assert isinstance(second.error, ItemConflictError)
    assert "it is a release now, a refund in the journal" in str(second.error)
    assert len(fake.requests) == before
    assert refunds_booked(fake) == {order_id: 1}


async def test_an_edited_refund_amount_is_never_sent_names_both_amounts_and_stays_unknown(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order_id = await captured_order(om, fake)
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    [first] = await run(om, [(order_id, RefundRequest(refunded_amount=500))], journal)
    fake.clear_faults()
    [second] = await run(om, [(order_id, RefundRequest(refunded_amount=900))], journal)
    assert second.status is CaptureStatus.FAILED  # the refund sent before may be booked
    assert second.error is not None
    assert second.error.outcome_unknown
    assert "refunded_amount is 900 now, 500 in the journal" in str(second.error)
    assert second.idempotency_key == first.idempotency_key
    assert refunds_booked(fake) == {order_id: 1}


async def test_a_refund_of_an_order_captured_in_the_same_journal_is_its_own_item(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order_id = fake.add_order(amount=10_000)
    [captured] = await run(om, [(order_id, CaptureRequest(captured_amount=5000))], journal)
    [refunded] = await run(om, [(order_id, RefundRequest(refunded_amount=5000))], journal)
    assert (captured.status, refunded.status) == (CaptureStatus.CAPTURED, CaptureStatus.CAPTURED)
    assert fake.order(order_id).refunded_amount == 5000


async def test_duplicate_refund_items_in_one_batch_are_refused(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order_id = await captured_order(om, fake)
    request = RefundRequest(refunded_amount=100, reference="RMA")
    outcomes = await run(om, [(order_id, request), (order_id, request)], journal)
    assert sorted(o.status for o in outcomes) == [CaptureStatus.CAPTURED, CaptureStatus.REFUSED]
    assert refunds_booked(fake) == {order_id: 1}


# --- release and cancel after a lost answer ----------------------------------------------


@pytest.mark.parametrize("request_", [ReleaseRemainingAuthorization(), CancelOrder()])
async def test_a_release_or_cancel_whose_answer_was_lost_is_done_on_the_rerun(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal, request_: OperationRequest
) -> None:
    order_id = fake.add_order(amount=10_000)
    if isinstance(request_, ReleaseRemainingAuthorization):
        await om.captures.create(order_id, CaptureRequest(captured_amount=4000))
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    [first] = await run(om, [(order_id, request_)], journal)
    assert first.status is CaptureStatus.FAILED
    fake.clear_faults()

    [second] = await run(om, [(order_id, request_)], journal)  # same key: Klarna's 204 again

    assert second.status is CaptureStatus.CAPTURED
    assert second.idempotency_key == first.idempotency_key
    order = fake.order(order_id)
    assert order.remaining_authorized_amount == 0
    word = (
        "releaseRemainingAuthorization" if first.operation is Operation.RELEASE else "cancelOrder"
    )
    assert order.operations.count(word) == 1


@pytest.mark.parametrize(
    "request_", [ReleaseRemainingAuthorization(), ExtendAuthorizationTime(), CancelOrder()]
)
async def test_a_retried_release_extend_or_cancel_reports_every_attempt_it_took(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal, request_: OperationRequest
) -> None:
    order_id = fake.add_order(amount=10_000)
    if isinstance(request_, ReleaseRemainingAuthorization):
        await om.captures.create(order_id, CaptureRequest(captured_amount=4000))
    before = posts(fake)
    fake.inject(ServerFailure(503), method="POST", times=2)  # then the third attempt's 204
    [done] = await run(om, [(order_id, request_)], journal)
    assert done.status is CaptureStatus.CAPTURED
    assert done.attempts == posts(fake) - before == 3
    [entry] = [e for e in await journal.entries() if e.operation is done.operation]
    assert entry.attempts == 3


@pytest.mark.parametrize("request_", [ReleaseRemainingAuthorization(), CancelOrder()])
async def test_a_refused_resend_of_a_release_or_cancel_that_landed_is_reported_done(
    sleeps: InstantSleep, tmp_path: Path, request_: OperationRequest
) -> None:
    # Klarna forgot the key (here after 12 hours) while the journal (23 hours) still trusts
    # it: the resend is refused (already released / cancelled), but it moved no money, and
    # the order's state proves the first send landed.
    policy = RetryPolicy(max_attempts=4, jitter=lambda d: d, sleep=sleeps)
    async with (
        FakeKlarna(idempotency_ttl=12 * 3600) as fake,
        KlarnaOM(
            fake.username, fake.password, base_url=fake.base_url, retry=policy, clock=sleeps.clock
        ) as om,
        SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now) as journal,
    ):
        order_id = fake.add_order(amount=10_000)
        if isinstance(request_, ReleaseRemainingAuthorization):
            await om.captures.create(order_id, CaptureRequest(captured_amount=4000))
        fake.inject(DropAfterProcessing(), method="POST", times=None)
        [first] = await run(om, [(order_id, request_)], journal)
        fake.clear_faults()
        fake.advance_clock(13 * 3600)
        [second] = await run(om, [(order_id, request_)], journal)
        [entry] = await journal.entries()
    assert first.status is CaptureStatus.FAILED
    assert second.status is CaptureStatus.CAPTURED
    assert second.error is None
    assert entry.status is JournalStatus.CAPTURED


async def test_a_release_never_sent_for_an_order_with_nothing_left_is_refused(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    # Only a journal that knows an earlier send may have landed turns a refusal into done.
    order_id = fake.add_order(amount=4000)
    await om.captures.create(order_id, CaptureRequest(captured_amount=4000))
    [outcome] = await run(om, [(order_id, ReleaseRemainingAuthorization())], journal)
    assert outcome.status is CaptureStatus.REFUSED


# --- an order's later items wait for its earlier ones ----------------------------------------


@pytest.mark.parametrize("closing", [ReleaseRemainingAuthorization(), CancelOrder()])
async def test_a_release_or_cancel_is_held_back_after_an_unknown_capture_of_the_same_order(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal, closing: OperationRequest
) -> None:
    # "Capture the last part, then release the rest": the capture's answer never came (it
    # never reached Klarna). A release (or cancel) sent anyway would end the authorization,
    # and the rerun's capture (same key) could never book.
    order_id = fake.add_order(amount=10_000)
    already = 0
    if isinstance(closing, ReleaseRemainingAuthorization):  # a release needs a capture before
        already = 2000
        await om.captures.create(order_id, CaptureRequest(captured_amount=already))
    fake.inject(DropConnection(), method="POST", path=f"/{order_id}/captures", times=None)
    last = CaptureRequest(captured_amount=6000, reference="last")
    items: list[tuple[str, OperationRequest]] = [(order_id, last), (order_id, closing)]
    first = await run(om, items, journal)
    fake.clear_faults()
    assert [o.status for o in first] == [CaptureStatus.FAILED, CaptureStatus.REFUSED]
    held = first[1]
    assert isinstance(held.error, ItemHeldBackError)
    assert str(held.error) == (
        f"held back: an earlier item of order {order_id} (item_key '{order_id}:last') ended"
        " failed; rerun after it is settled"
    )
    assert (held.attempts, held.idempotency_key) == (0, "")
    assert not held.error.outcome_unknown
    assert [e.item_key for e in await journal.entries()] == [f"{order_id}:last"]  # not claimed
    assert WORDS[operation_of(closing)] not in fake.order(order_id).operations

    second = await run(om, items, journal)
    assert second[0].status is CaptureStatus.CAPTURED
    assert fake.order(order_id).captured_amount == already + 6000
    # Now sent: the release is done; a cancel is refused by Klarna (the order has captures).
    released = isinstance(closing, ReleaseRemainingAuthorization)
    assert second[1].status is (CaptureStatus.CAPTURED if released else CaptureStatus.REFUSED)


async def test_a_refused_item_holds_its_orders_later_items_back_without_a_journal_too(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # Klarna refuses the capture (more than authorized): the release after it must wait for
    # a person, and another order's items are not held.
    order_id, other = fake.add_order(amount=10_000), fake.add_order(amount=10_000)
    await om.captures.create(order_id, CaptureRequest(captured_amount=2000))
    items = [
        BatchItem(order_id=order_id, request=CaptureRequest(captured_amount=99_000), line=2),
        BatchItem(order_id=order_id, request=ReleaseRemainingAuthorization(), line=3),
        BatchItem(order_id=order_id, request=RefundRequest(refunded_amount=10), line=4),
        BatchItem(order_id=other, request=CaptureRequest(captured_amount=1000), line=5),
    ]
    outcomes = {o.line: o for o in [o async for o in om.run_many(items, concurrency=4)]}
    assert [outcomes[n].status for n in (2, 3, 4, 5)] == [
        CaptureStatus.REFUSED,
        CaptureStatus.REFUSED,
        CaptureStatus.REFUSED,
        CaptureStatus.CAPTURED,
    ]
    for n in (3, 4):  # each names the item that held it back (the first), by line and key
        assert str(outcomes[n].error).startswith(
            f"held back: an earlier item of order {order_id} (line 2, item_key '{order_id}')"
            " ended refused; rerun after it is settled"
        )
    assert "releaseRemainingAuthorization" not in fake.order(order_id).operations
    assert fake.order(order_id).refunded_amount == 0


async def test_a_held_back_item_keeps_the_key_and_status_its_journal_gives_it(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    # The release itself was unknown from an earlier run: held back, it stays failed under
    # its key (it may have landed), never "refused" with no key.
    order_id = await captured_order(om, fake, captured=2000)
    release = (order_id, ReleaseRemainingAuthorization())
    fake.inject(DropConnection(), method="POST", path=f"/{order_id}/", times=None)
    [lost] = await run(om, [release], journal)
    assert lost.status is CaptureStatus.FAILED
    last = (order_id, CaptureRequest(captured_amount=1000, reference="last"))
    capture, held = await run(om, [last, release], journal)
    # The capture is new next to the unknown release (the journal's sibling rule) ...
    assert capture.status is CaptureStatus.REFUSED
    assert "is new, but order" in str(capture.error)
    # ... and the release after it is held back, still unknown under its own key.
    assert (held.status, held.idempotency_key) == (CaptureStatus.FAILED, lost.idempotency_key)
    assert isinstance(held.error, ItemHeldBackError)
    assert held.error.outcome_unknown
    assert f"this item's own earlier send is unknown under key {lost.idempotency_key}" in str(
        held.error
    )


async def test_a_release_refused_in_an_earlier_run_waits_while_a_capture_of_its_order_is_unknown(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    # A refused item takes a new key, so the journal holds it back as it holds a new one
    # while another run left an item of its order unknown.
    order_id = fake.add_order(amount=10_000)
    release = (order_id, ReleaseRemainingAuthorization())
    [refused] = await run(om, [release], journal)  # nothing captured yet: Klarna refuses
    assert refused.status is CaptureStatus.REFUSED
    fake.inject(DropConnection(), method="POST", path=f"/{order_id}/captures", times=None)
    last = (order_id, CaptureRequest(captured_amount=6000, reference="last"))
    [lost] = await run(om, [last], journal)
    assert lost.status is CaptureStatus.FAILED
    fake.clear_faults()
    await om.captures.create(order_id, CaptureRequest(captured_amount=2000))  # by hand

    [held] = await run(om, [release], journal)
    assert held.status is CaptureStatus.REFUSED
    assert isinstance(held.error, ItemConflictError)
    assert f"item 'release:{order_id}' was refused before, but order" in str(held.error)
    assert "a release of the order waits until that one is settled" in str(held.error)
    assert "releaseRemainingAuthorization" not in fake.order(order_id).operations
    # Settled (the rerun books the capture with its key): the release goes out.
    capture, released = await run(om, [last, release], journal)
    assert (capture.status, released.status) == (CaptureStatus.CAPTURED, CaptureStatus.CAPTURED)


class _JournalWithoutOperation:
    """A journal written to the ``Journal`` protocol before operations were recorded: it
    keeps every ``ItemRecord`` field it knew, so every entry reads back as a capture."""

    def __init__(self, inner: MemoryJournal) -> None:
        self.inner = inner

    async def claim(self, item: ItemRecord, new_key: str, *, run_id: str | None = None) -> Claim:
        return await self.inner.claim(
            attrs.evolve(item, operation=Operation.CAPTURE), new_key, run_id=run_id
        )

    async def finish(self, item_key: str, status: JournalStatus, **kwargs: Any) -> JournalStatus:
        return await self.inner.finish(item_key, status, **kwargs)

    async def entries(self, **kwargs: Any) -> list[JournalEntry]:
        return await self.inner.entries(**kwargs)

    def key_expired(self, entry: JournalEntry) -> bool:
        return self.inner.key_expired(entry)

    async def close(self) -> None:
        await self.inner.close()


async def test_a_journal_that_does_not_keep_the_operation_never_gets_a_refund_resent(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # Judged by what the journal read back (a capture), the refund would be looked for among
    # the captures, found "not captured", and refunded again under a new key.
    order_id = await captured_order(om, fake)
    journal = _JournalWithoutOperation(MemoryJournal(clock=fake.now))
    items = [(order_id, RefundRequest(refunded_amount=1000, reference="RMA-1"))]
    fake.inject(DropAfterProcessing(), method="POST", path=f"/{order_id}/refunds", times=None)
    [first] = [o async for o in om.run_many(items, journal=journal)]
    assert first.status is CaptureStatus.FAILED
    fake.clear_faults()
    fake.advance_clock(DAY + 3600)  # Klarna has forgotten the key
    for _ in range(2):  # refused, and again on a later run: never a new key
        [again] = [o async for o in om.run_many(items, journal=journal)]
        assert again.status is CaptureStatus.REFUSED
        assert isinstance(again.error, ItemConflictError)
        assert "this journal does not record operations" in str(again.error)
        assert again.idempotency_key == first.idempotency_key
    assert len(fake.booked_refunds) == 1
    [entry] = await journal.entries()
    assert (entry.status, entry.idempotency_key) == (JournalStatus.FAILED, first.idempotency_key)


# --- a key the caller gave to a release or cancel ---------------------------------------------


@pytest.mark.parametrize("request_", [ReleaseRemainingAuthorization(), CancelOrder()])
async def test_a_204_replayed_for_a_callers_key_of_another_order_is_not_reported_done(
    om: KlarnaOM, fake: FakeKlarna, request_: OperationRequest
) -> None:
    # Two runs (two journals) give the same key to the same operation on two orders: Klarna
    # replays the first 204 to the second. A 204 names nothing, so the order is read back.
    orders = [fake.add_order(amount=10_000) for _ in range(2)]
    if isinstance(request_, ReleaseRemainingAuthorization):
        for order_id in orders:
            await om.captures.create(order_id, CaptureRequest(captured_amount=4000))
    outcomes = []
    for order_id in orders:  # two processes: two clients, two journals
        item = BatchItem(order_id=order_id, request=request_, idempotency_key="ticket-4711")
        journal = MemoryJournal(clock=fake.now)
        async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as client:
            outcomes += [o async for o in client.run_many([item], journal=journal)]
        [entry] = await journal.entries()
    first, second = outcomes
    assert first.status is CaptureStatus.CAPTURED
    assert second.status is CaptureStatus.REFUSED
    assert isinstance(second.error, IdempotencyKeyReusedError)
    assert not second.error.outcome_unknown
    assert "the given idempotency key ticket-4711 was used before" in str(second.error)
    assert second.idempotency_key == "ticket-4711"
    assert entry.status is JournalStatus.REFUSED
    assert WORDS[operation_of(request_)] not in fake.order(orders[1]).operations


async def test_a_callers_own_key_is_confirmed_by_the_order_and_a_journal_key_is_not_read(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    given, made = fake.add_order(amount=10_000), fake.add_order(amount=10_000)
    items = [
        BatchItem(order_id=given, request=CancelOrder(), idempotency_key="cancel-given-1"),
        BatchItem(order_id=made, request=CancelOrder()),
    ]
    outcomes = [o async for o in om.run_many(items, journal=MemoryJournal(clock=fake.now))]
    assert {o.status for o in outcomes} == {CaptureStatus.CAPTURED}
    reads = [r.path for r in fake.requests if r.method == "GET"]
    # The first read, before anything is sent, tells Klarna's time (to check the journal's).
    assert reads[0] in (f"{ORDERS}/{given}", f"{ORDERS}/{made}")
    assert reads[1:] == [f"{ORDERS}/{given}"]


# --- a key the caller gave to a capture or refund ----------------------------------------------


@pytest.mark.parametrize("operation", [Operation.CAPTURE, Operation.REFUND])
@pytest.mark.parametrize("changed", ["amount", "reference", "no reference"])
async def test_a_201_replayed_for_a_callers_key_used_before_on_the_order_needs_review(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal, operation: Operation, changed: str
) -> None:
    # The key was used before on this order for another amount (or reference): Klarna
    # replayed that 201, and the item was reported done with the earlier capture's id, so
    # its own amount was never captured (the journal skipped it on every rerun). Nor is it
    # "refused": that earlier request may have been this item before an edit.
    order_id = await captured_order(om, fake)
    amount, reference = {
        "amount": (700, "box-1"),
        "reference": (500, "box-2"),
        "no reference": (500, None),
    }[changed]
    earlier: CaptureRequest | RefundRequest
    request: CaptureRequest | RefundRequest
    # By another process (this client would refuse a key it sent with another body).
    async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as other:
        if operation is Operation.CAPTURE:
            earlier = CaptureRequest(captured_amount=500, reference="box-1")
            request = CaptureRequest(captured_amount=amount, reference=reference)
            await other.captures.create(order_id, earlier, idempotency_key="ticket-4711")
        else:
            earlier = RefundRequest(refunded_amount=500, reference="box-1")
            request = RefundRequest(refunded_amount=amount, reference=reference)
            await other.refunds.create(order_id, earlier, idempotency_key="ticket-4711")
    item = BatchItem(order_id=order_id, request=request, idempotency_key="ticket-4711")

    [outcome] = [o async for o in om.run_many([item], journal=journal)]

    assert outcome.status is CaptureStatus.NEEDS_REVIEW
    assert outcome.created_id is None
    assert isinstance(outcome.error, NeedsReviewError)
    assert outcome.error.outcome_unknown
    asked = f"of {amount}" + ("" if reference is None else f" with reference {reference!r}")
    assert f"not the {operation.value} {asked} asked" in str(outcome.error)
    assert "with reference 'box-1' under the given key ticket-4711" in str(outcome.error)
    # Nothing more was booked.
    assert [c.captured_amount for c in fake.captures(order_id)] == (
        [6000, 500] if operation is Operation.CAPTURE else [6000]
    )
    assert [r.refunded_amount for r in fake.refunds(order_id)] == (
        [] if operation is Operation.CAPTURE else [500]
    )
    [entry] = await journal.entries()
    assert entry.status is JournalStatus.NEEDS_REVIEW


async def test_a_callers_key_read_back_compares_references_as_the_item_names_them(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # " A " is the item "A", and a blank reference is none: the same request, not a reuse.
    orders = [fake.add_order(amount=10_000) for _ in range(2)]
    async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as other:
        for order_id, sent in zip(orders, [" A ", " "], strict=True):
            request = CaptureRequest(captured_amount=700, reference=sent)
            await other.captures.create(order_id, request, idempotency_key=f"k-{order_id}")
    items = [
        BatchItem(
            order_id=order_id,
            request=CaptureRequest(captured_amount=700, reference=asked),
            idempotency_key=f"k-{order_id}",
        )
        for order_id, asked in zip(orders, ["A", None], strict=True)
    ]
    outcomes = [o async for o in om.capture_many(items)]
    assert [o.status for o in outcomes] == [CaptureStatus.CAPTURED] * 2
    assert [len(fake.captures(o)) for o in orders] == [1, 1]


async def test_a_callers_key_is_checked_by_reading_what_it_created(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order_id = fake.add_order(amount=10_000)
    request = CaptureRequest(captured_amount=700, reference="box-1")
    given = BatchItem(order_id=order_id, request=request, idempotency_key="ticket-4712")
    [outcome] = [o async for o in om.capture_many([given], journal=journal)]
    assert outcome.status is CaptureStatus.CAPTURED
    capture_id = fake.captures(order_id)[0].capture_id
    assert outcome.capture_id == capture_id
    reads = [r.path for r in fake.requests if r.method == "GET"]
    # (The first tells Klarna's time, before anything is sent: see test_clock_skew.)
    assert reads == [f"{ORDERS}/{order_id}", f"{ORDERS}/{order_id}/captures/{capture_id}"]
    # A key the journal made is this item's own: nothing is read.
    other = fake.add_order(amount=10_000)
    [made] = [o async for o in om.capture_many([(other, request)], journal=journal)]
    assert made.status is CaptureStatus.CAPTURED
    assert [r.path for r in fake.requests if r.method == "GET"] == reads


async def test_a_callers_key_whose_capture_cannot_be_read_back_stays_unknown(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order_id = fake.add_order(amount=10_000)
    request = CaptureRequest(captured_amount=700, reference="box-1")
    item = BatchItem(order_id=order_id, request=request, idempotency_key="ticket-4713")
    # Reads fail from the capture's read-back on (the read before it tells Klarna's time).
    fake.inject(DropConnection(), method="GET", times=None, path="/captures/")
    [first] = [o async for o in om.capture_many([item], journal=journal)]
    assert first.status is CaptureStatus.FAILED
    assert first.error is not None
    assert "reading it back to check that it is this item's failed" in str(first.error)
    assert getattr(first.error, "outcome_unknown", False)
    fake.clear_faults()
    [second] = [o async for o in om.capture_many([item], journal=journal)]  # resent: replayed
    assert second.status is CaptureStatus.CAPTURED
    assert second.capture_id == first.capture_id == fake.captures(order_id)[0].capture_id
    assert len(fake.captures(order_id)) == 1


# --- reconciliation of expired keys --------------------------------------------------------


async def test_an_expired_refund_key_is_reconciled_found_not_found_or_ambiguous(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    found, lost, twice = [await captured_order(om, fake) for _ in range(3)]
    items = [
        (found, RefundRequest(refunded_amount=1000, reference="RMA-1")),
        (lost, RefundRequest(refunded_amount=1000, reference="RMA-2")),
        (twice, RefundRequest(refunded_amount=1000)),  # no reference: ambiguous below
    ]
    fake.inject(DropAfterProcessing(), method="POST", path=f"/{found}/", times=None)
    fake.inject(DropConnection(), method="POST", path=f"/{lost}/", times=None)
    fake.inject(DropAfterProcessing(), method="POST", path=f"/{twice}/", times=None)
    first = {o.order_id: o for o in await run(om, items, journal)}
    assert {o.status for o in first.values()} == {CaptureStatus.FAILED}
    fake.clear_faults()
    # Someone else refunds the same amount on `twice` (by hand, in the portal).
    await om.refunds.create(twice, RefundRequest(refunded_amount=1000))
    fake.advance_clock(DAY + 3600)  # Klarna has forgotten the keys

    posts_before = posts(fake, "/refunds")
    second = {o.order_id: o for o in await run(om, items, journal)}

    assert second[found].status is CaptureStatus.CAPTURED
    assert second[found].refund_id == fake.refunds(found)[0].refund_id
    assert second[lost].status is CaptureStatus.CAPTURED
    assert second[lost].idempotency_key != first[lost].idempotency_key  # a new key
    assert second[twice].status is CaptureStatus.NEEDS_REVIEW
    assert isinstance(second[twice].error, NeedsReviewError)
    assert "2 refund(s)" in str(second[twice].error)
    assert posts(fake, "/refunds") == posts_before + 1  # only `lost` was sent
    assert refunds_booked(fake) == {found: 1, lost: 1, twice: 2}


@pytest.mark.parametrize("landed", [True, False])
@pytest.mark.parametrize("request_", [ReleaseRemainingAuthorization(), CancelOrder()])
async def test_an_expired_release_or_cancel_is_reconciled_by_the_orders_state(
    om: KlarnaOM,
    fake: FakeKlarna,
    journal: SQLiteJournal,
    request_: OperationRequest,
    landed: bool,
) -> None:
    order_id = fake.add_order(amount=10_000)
    if isinstance(request_, ReleaseRemainingAuthorization):
        await om.captures.create(order_id, CaptureRequest(captured_amount=4000))
    fault = DropAfterProcessing() if landed else DropConnection()
    fake.inject(fault, method="POST", path=f"/{order_id}/", times=None)
    [first] = await run(om, [(order_id, request_)], journal)
    assert first.status is CaptureStatus.FAILED
    fake.clear_faults()
    fake.advance_clock(DAY + 3600)

    results = await om.reconcile(journal)
    assert [r.verdict for r in results] == [Verdict.CAPTURED if landed else Verdict.NOT_CAPTURED]
    [second] = await run(om, [(order_id, request_)], journal)

    assert second.status is (CaptureStatus.SKIPPED if landed else CaptureStatus.CAPTURED)
    assert fake.order(order_id).remaining_authorized_amount == 0
    word = (
        "releaseRemainingAuthorization" if first.operation is Operation.RELEASE else "cancelOrder"
    )
    assert fake.order(order_id).operations.count(word) == 1


async def test_a_release_that_never_landed_is_not_reported_released_because_the_order_expired(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    # "Nothing left authorized" is also what an expired (or cancelled) order shows.
    order_id = await captured_order(om, fake, captured=4000)
    fake.inject(DropConnection(), method="POST", path=f"/{order_id}/release", times=None)
    [first] = await run(om, [(order_id, ReleaseRemainingAuthorization())], journal)
    assert first.status is CaptureStatus.FAILED
    fake.clear_faults()
    fake.advance_clock(30 * DAY)  # the authorization expires; the key is long forgotten
    assert fake.order(order_id).status == "EXPIRED"
    [second] = await run(om, [(order_id, ReleaseRemainingAuthorization())], journal)
    assert "releaseRemainingAuthorization" not in fake.order(order_id).operations
    assert second.status is CaptureStatus.REFUSED  # Klarna refuses a release of it


def _order(status: str, *, amount: int = 10_000, captured: int = 4000, left: int = 0) -> Order:
    return Order(
        status=status,
        order_amount=amount,
        captured_amount=captured,
        remaining_authorized_amount=left,
    )


@pytest.mark.parametrize(
    ("order", "released"),
    [
        (_order("CAPTURED"), True),
        (_order("CLOSED"), True),
        (_order("EXPIRED"), False),
        (_order("CANCELLED", captured=0), False),
        (_order("CAPTURED", captured=10_000), False),  # fully captured: nothing to release
        (_order("PART_CAPTURED", left=6000), False),
        (Order(status="CAPTURED"), False),  # no amounts: proves nothing
    ],
)
def test_only_a_released_order_proves_a_release(order: Order, released: bool) -> None:
    assert order_shows(Operation.RELEASE, order)[0] is released
    entry = JournalEntry(
        item_key="release:o",
        order_id="o",
        idempotency_key="k",
        status=JournalStatus.FAILED,
        capture_id=None,
        error=None,
        attempts=1,
        updated_at=datetime.now(UTC),
        operation=Operation.RELEASE,
    )
    verdict = judge(entry, order)[0]
    assert verdict is (Verdict.CAPTURED if released else Verdict.NOT_CAPTURED)


@pytest.mark.parametrize("status", ["AUTHORIZED", "EXPIRED", "CLOSED", "CAPTURED"])
def test_only_a_cancelled_order_proves_a_cancel(status: str) -> None:
    assert order_shows(Operation.CANCEL, _order(status, captured=0)) == (
        False,
        f"the order is {status}, not cancelled",
    )
    assert order_shows(Operation.CANCEL, _order("CANCELLED", captured=0))[0]


async def test_an_expired_extend_is_sent_again_with_a_new_key(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    order_id = fake.add_order(amount=10_000)
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    [first] = await run(om, [(order_id, ExtendAuthorizationTime())], journal)
    fake.clear_faults()
    fake.advance_clock(DAY + 3600)
    [second] = await run(om, [(order_id, ExtendAuthorizationTime())], journal)
    assert (first.status, second.status) == (CaptureStatus.FAILED, CaptureStatus.CAPTURED)
    assert second.idempotency_key != first.idempotency_key


# --- the journal file ------------------------------------------------------------------------

_V2_SCHEMA = """
CREATE TABLE journal (
    item_key TEXT PRIMARY KEY, order_id TEXT NOT NULL, idempotency_key TEXT NOT NULL,
    status TEXT NOT NULL, capture_id TEXT, error TEXT, attempts INTEGER NOT NULL,
    updated_at TEXT NOT NULL, fingerprint TEXT, captured_amount INTEGER, reference TEXT,
    key_sent_at TEXT, uncertain INTEGER NOT NULL DEFAULT 0, run_id TEXT
) WITHOUT ROWID;
CREATE TABLE keys (idempotency_key TEXT PRIMARY KEY, item_key TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX journal_by_order ON journal (order_id);
PRAGMA application_id = 1263488330;
PRAGMA user_version = 2;
"""


async def test_a_version_2_journal_opens_migrates_and_its_captures_keep_matching(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    order_id = fake.add_order(amount=10_000)
    created = await om.captures.create(order_id, CaptureRequest(captured_amount=4000))
    request = CaptureRequest(captured_amount=4000, reference="box")
    path = tmp_path / "v2.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(_V2_SCHEMA)
        now = fake.now().isoformat()
        row: tuple[object, ...] = (f"{order_id}:box", order_id, "K1", "captured")
        row += (created.capture_id, None, 1, now, request_fingerprint(order_id, request))
        row += (4000, "box", now, 0, "run")
        conn.execute(f"INSERT INTO journal VALUES ({', '.join('?' * 14)})", row)
        conn.execute("INSERT INTO keys VALUES ('K1', ?)", (f"{order_id}:box",))
    conn.close()

    async with SQLiteJournal(path, clock=fake.now) as journal:
        [entry] = await journal.entries()
        assert (entry.operation, entry.capture_id) == (Operation.CAPTURE, created.capture_id)
        before = len(fake.requests)
        [same] = await run(om, [(order_id, request)], journal)
        [refund] = await run(om, [(order_id, RefundRequest(refunded_amount=100))], journal)
        assert await journal.done_by_operation() == {Operation.CAPTURE: 1, Operation.REFUND: 1}
    assert (same.status, same.capture_id) == (CaptureStatus.SKIPPED, created.capture_id)
    assert len(fake.requests) == before + 1  # the refund only
    assert refund.status is CaptureStatus.CAPTURED
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (4,)
        columns = [r[1] for r in conn.execute("PRAGMA table_info(journal)")]
    conn.close()
    assert columns[-1] == "operation"


async def test_the_memory_journal_records_operations_as_the_sqlite_one_does() -> None:
    journal = MemoryJournal()
    record = ItemRecord(
        item_key="refund:o",
        order_id="o",
        captured_amount=100,
        fingerprint="f",
        operation=Operation.REFUND,
    )
    claim = await journal.claim(record, "K")
    assert claim.entry.operation is Operation.REFUND
    await journal.finish("refund:o", JournalStatus.CAPTURED, capture_id="r1")
    assert await journal.done_by_operation() == {Operation.REFUND: 1}
    changed = await journal.claim(
        ItemRecord(item_key="refund:o", order_id="o", captured_amount=None, fingerprint="g"), "K2"
    )
    assert changed.reason is not None
    assert "it is a capture now, a refund in the journal" in changed.reason
    assert "already refunded (refund r1)" in changed.reason


def test_batch_outcome_is_the_capture_outcome_and_each_operation_has_its_word() -> None:
    assert BatchOutcome is CaptureOutcome
    assert [op.done for op in Operation] == [
        "captured",
        "refunded",
        "released",
        "extended",
        "cancelled",
    ]


# --- batch files: the operation column / field ------------------------------------------------


def read_rows(tmp_path: Path, name: str, text: str) -> list[Row]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with open_batch(str(path), detect_format(str(path))) as rows:
        return list(rows)


def test_a_csv_operation_column_defaults_to_capture_and_names_each_lines_operation(
    tmp_path: Path,
) -> None:
    text = (
        "order_id,operation,captured_amount,refunded_amount,reference\n"
        "o1,,100,,INV-1\n"
        "o1,refund,,40,RMA-1\n"
        "o1,Release,,,\n"
        "o2,extend,,,\n"
        "o3,cancel,,,\n"
    )
    rows = read_rows(tmp_path, "a.csv", text)
    assert rows == [
        BatchItem(order_id="o1", request=CaptureRequest(captured_amount=100, reference="INV-1")),
        BatchItem(order_id="o1", request=RefundRequest(refunded_amount=40, reference="RMA-1")),
        BatchItem(order_id="o1", request=ReleaseRemainingAuthorization()),
        BatchItem(order_id="o2", request=ExtendAuthorizationTime()),
        BatchItem(order_id="o3", request=CancelOrder()),
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("o1,refund,,", "line 2: refunded_amount: is required"),
        ("o1,refund,5,5", "line 2: captured_amount: a refund takes no amount; leave it empty"),
        ("o1,capture,5,5", "line 2: refunded_amount: a capture takes no amount"),
        ("o1,release,5,", "line 2: captured_amount: a release takes no amount; leave it empty"),
        ("o1,cancel,,7", "line 2: refunded_amount: a cancel takes no amount"),
        ("o1,extend,,,R", "line 2: reference: an extend takes no reference"),
        ("o1,refund,,x", "line 2: refunded_amount: must be a whole number of minor units"),
        ("o1,void,,", "line 2: operation: unknown operation 'void'; expected one of capture,"),
    ],
)
def test_a_csv_line_with_a_wrong_operation_or_amount_is_one_bad_line(
    tmp_path: Path, row: str, message: str
) -> None:
    header = "order_id,operation,captured_amount,refunded_amount,reference\n"
    [bad, good] = read_rows(tmp_path, "a.csv", f"{header}{row}\no2,refund,,1\n")
    assert isinstance(bad, BadLine)
    assert str(bad.error).startswith(message), str(bad.error)
    assert bad.order_id == "o1"
    assert isinstance(good, BatchItem)


def test_a_csv_without_an_operation_column_still_requires_captured_amount(
    tmp_path: Path,
) -> None:
    with pytest.raises(
        BatchFileError,
        match="missing required column\\(s\\) captured_amount; to refund, add an operation"
        " column with refund;",
    ):
        read_rows(tmp_path, "a.csv", "order_id,refunded_amount\no1,5\n")
    [row] = read_rows(tmp_path, "b.csv", "order_id,operation\no1,release\n")
    assert row == BatchItem(order_id="o1", request=ReleaseRemainingAuthorization())


def test_a_refund_line_in_a_csv_without_an_operation_column_says_how_to_refund(
    tmp_path: Path,
) -> None:
    text = "order_id,captured_amount,refunded_amount\no1,,2500\no2,100,\n"
    refund, capture = read_rows(tmp_path, "a.csv", text)
    assert isinstance(refund, BadLine)
    assert str(refund.error) == (
        "line 2: refunded_amount: this file has no operation column, so every line is a"
        " capture; to refund, add an operation column with refund on this line"
    )
    assert capture == BatchItem(order_id="o2", request=CaptureRequest(captured_amount=100))


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"order_id": "o", "captured_amount": 5}', CaptureRequest(captured_amount=5)),
        (
            '{"order_id": "o", "operation": "refund", "refunded_amount": 5, "reference": "R"}',
            RefundRequest(refunded_amount=5, reference="R"),
        ),
        ('{"order_id": "o", "operation": "cancel"}', CancelOrder()),
        ('{"order_id": "o", "operation": "release", "idempotency_key": "k"}', None),
    ],
)
def test_a_jsonl_operation_field_reads_klarnas_shape_of_that_operation(
    tmp_path: Path, line: str, expected: OperationRequest | None
) -> None:
    [row] = read_rows(tmp_path, "a.jsonl", line + "\n")
    assert isinstance(row, BatchItem)
    if expected is None:
        assert (row.request, row.idempotency_key) == (ReleaseRemainingAuthorization(), "k")
    else:
        assert row.request == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"order_id": "o", "operation": "void"}', "line 1: operation: unknown operation 'void'"),
        ('{"order_id": "o", "operation": 3}', "line 1: operation: must be a string"),
        (
            '{"order_id": "o", "operation": "release", "captured_amount": 5}',
            "line 1: captured_amount: a release takes no amount",
        ),
        (
            '{"order_id": "o", "operation": "refund", "captured_amount": 5}',
            "line 1: captured_amount: unknown field; expected one of",
        ),
        (
            '{"order_id": "o", "operation": "refund", "refunded_amount": 5, "shipping_info": []}',
            "line 1: shipping_info: unknown field",
        ),
        ('{"order_id": "o", "operation": "refund"}', "line 1: refunded_amount: is required"),
    ],
)
def test_a_jsonl_line_with_a_wrong_operation_is_one_bad_line(
    tmp_path: Path, line: str, message: str
) -> None:
    [row] = read_rows(tmp_path, "a.jsonl", line + "\n")
    assert isinstance(row, BadLine)
    assert str(row.error).startswith(message), str(row.error)


# --- the command --------------------------------------------------------------------------

USERNAME = "merchant-ops"
PASSWORD = "pw-ops-S3cret-do-not-print"


class ServedFake:
    """A FakeKlarna serving from its own event loop in a background thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-klarna")
        self._thread.start()
        self.fake = self.run(self._start())

    @staticmethod
    async def _start() -> FakeKlarna:
        fake = FakeKlarna(username=USERNAME, password=PASSWORD, seed=5)
        await fake.start()
        return fake

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def do(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return self.run(call())

    def captured_order(self, captured: int = 6000) -> str:
        """An order of 10000 with ``captured`` captured."""

        async def make() -> str:
            order_id = self.fake.add_order(amount=10_000)
            async with KlarnaOM(USERNAME, PASSWORD, base_url=self.fake.base_url) as om:
                await om.captures.create(order_id, CaptureRequest(captured_amount=captured))
            return order_id

        return self.run(make())

    def refunds(self, order_id: str) -> list[str | None]:
        """Idempotency keys of the refund POSTs received for ``order_id``."""
        path = f"{ORDERS}/{order_id}/refunds"
        return self.do(lambda: [r.idempotency_key for r in self.fake.requests if r.path == path])

    def booked(self, order_id: str) -> int:
        return self.do(lambda: len(self.fake.refunds(order_id)))

    def close(self) -> None:
        self.run(self.fake.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


@pytest.fixture
def served() -> Iterator[ServedFake]:
    served = ServedFake()
    try:
        yield served
    finally:
        served.close()


def env_for(served: ServedFake) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLARNA_")}
    env.update(
        KLARNA_USERNAME=USERNAME, KLARNA_PASSWORD=PASSWORD, KLARNA_BASE_URL=served.fake.base_url
    )
    return env


def cli(args: list[str], served: ServedFake) -> Result:
    env: dict[str, str | None] = {
        "KLARNA_USERNAME": USERNAME,
        "KLARNA_PASSWORD": PASSWORD,
        "KLARNA_BASE_URL": served.fake.base_url,
        "KLARNA_REGION": None,
        "KLARNA_PLAYGROUND": None,
    }
    result = CliRunner().invoke(main, args, env=env)
    assert PASSWORD not in result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def test_batch_runs_a_mixed_csv_and_says_what_was_done_per_operation(
    served: ServedFake, tmp_path: Path
) -> None:
    a = served.captured_order()
    b = served.do(lambda: served.fake.add_order(amount=5000))
    path = tmp_path / "ops.csv"
    path.write_text(
        "order_id,operation,captured_amount,refunded_amount,reference\n"
        f"{a},refund,,2000,RMA-1\n"
        f"{a},release,,,\n"
        f"{b},cancel,,,\n"
        f"{b},void,,,\n"
        f"{b},extend,5,,\n",
        encoding="utf-8",
    )
    result = cli(["batch", str(path), "--json"], served)
    assert result.exit_code == 1, result.output  # two bad lines
    lines = json_lines(result.stdout)
    outcomes = [o for o in lines if o["type"] == "outcome"]
    by_line = {o.get("line"): o for o in outcomes}
    assert (by_line[2]["operation"], by_line[2]["status"], by_line[2]["result"]) == (
        "refund",
        "captured",
        "refunded",
    )
    assert by_line[2]["refund_id"] == served.do(lambda: served.fake.refunds(a)[0].refund_id)
    assert (by_line[3]["result"], by_line[4]["result"]) == ("released", "cancelled")
    assert "operation: unknown operation 'void'" in by_line[5]["error"]
    assert "captured_amount: an extend takes no amount" in by_line[6]["error"]
    [summary] = [o for o in lines if o["type"] == "summary"]
    assert summary["done"] == {"refund": 1, "release": 1, "cancel": 1}
    assert (summary["captured"], summary["refused"]) == (3, 2)

    # The people's summary names each operation; a rerun resumes from the journal.
    human = cli(["batch", str(path)], served)
    assert "already done" in human.stderr
    assert "skipped" in human.stdout
    assert "Not done" in human.stdout
    assert served.booked(a) == 1
    assert served.do(lambda: served.fake.order(b).status) == "CANCELLED"


def test_batch_summary_names_refunded_and_released_for_people(
    served: ServedFake, tmp_path: Path
) -> None:
    a = served.captured_order()
    path = tmp_path / "ops.jsonl"
    path.write_text(
        f'{{"order_id": "{a}", "operation": "refund", "refunded_amount": 100}}\n'
        f'{{"order_id": "{a}", "operation": "release"}}\n',
        encoding="utf-8",
    )
    result = cli(["batch", str(path)], served)
    assert result.exit_code == 0, result.output
    assert re.search(r"refunded\s*│\s*1", result.stdout), result.stdout
    assert re.search(r"released\s*│\s*1", result.stdout), result.stdout


def test_batch_holds_a_release_back_while_the_capture_line_before_it_is_unknown(
    served: ServedFake, tmp_path: Path
) -> None:
    # The README's "capture the last part, then release the rest" as a batch file; the
    # capture's connection drops every time (nothing booked, outcome unknown).
    order_id = served.captured_order(captured=2000)
    served.do(
        lambda: served.fake.inject(
            DropConnection(), method="POST", path=f"/{order_id}/captures", times=None
        )
    )
    path = tmp_path / "ops.csv"
    path.write_text(
        "order_id,operation,captured_amount,reference\n"
        f"{order_id},capture,6000,last\n{order_id},release,,\n",
        encoding="utf-8",
    )
    first = cli(["batch", str(path), "--json", "--concurrency", "2"], served)
    assert first.exit_code == 1, first.output
    by_line = {o["line"]: o for o in json_lines(first.stdout) if o["type"] == "outcome"}
    assert (by_line[2]["status"], by_line[3]["status"]) == ("failed", "refused")
    assert by_line[3]["error"] == (
        f"held back: an earlier item of order {order_id} (line 2, item_key '{order_id}:last')"
        " ended failed; rerun after it is settled"
    )
    served.do(served.fake.clear_faults)
    assert "releaseRemainingAuthorization" not in served.do(
        lambda: served.fake.order(order_id).operations
    )
    rerun = cli(["batch", str(path), "--json"], served)
    assert rerun.exit_code == 0, rerun.output
    order = served.do(lambda: served.fake.order(order_id))
    assert order.captured_amount == 8000
    assert order.operations.count("releaseRemainingAuthorization") == 1


def test_batch_holds_an_orders_later_lines_back_after_a_line_that_cannot_be_read(
    served: ServedFake, tmp_path: Path
) -> None:
    order_id = served.captured_order(captured=2000)
    path = tmp_path / "ops.csv"
    path.write_text(
        "order_id,operation,captured_amount,reference\n"
        f"{order_id},capture,60.00,last\n{order_id},release,,\n",
        encoding="utf-8",
    )
    result = cli(["batch", str(path), "--json"], served)
    assert result.exit_code == 1, result.output
    by_line = {o["line"]: o for o in json_lines(result.stdout) if o["type"] == "outcome"}
    assert "captured_amount: must be a whole number" in by_line[2]["error"]
    assert by_line[3]["status"] == "refused"
    assert by_line[3]["error"] == (
        f"held back: an earlier item of order {order_id} (line 2) could not be read; rerun"
        " after it is settled"
    )
    # The people's view lists the held line with its reason; nothing is sent on a rerun.
    human = cli(["batch", str(path)], served)
    assert "held back" in " ".join(human.stdout.split()), human.stdout
    assert "releaseRemainingAuthorization" not in served.do(
        lambda: served.fake.order(order_id).operations
    )


@pytest.mark.parametrize(
    ("name", "lines", "encoding"),
    [
        # A cp1252 export read as UTF-8: the capture line cannot be decoded.
        (
            "ops.csv",
            "order_id,operation,captured_amount,reference\n{o},capture,60.00,Müller\n"
            "{o},release,,\n",
            "cp1252",
        ),
        # A quote left open: which field is the order is unknown (order_id is not first).
        (
            "ops.csv",
            'operation,order_id,captured_amount,reference\ncapture,{o},60.00,"last\n'
            "release,{o},,\n",
            "utf-8",
        ),
        (
            "ops.jsonl",
            '{{"order_id": "{o}", "captured_amount": 6000, "reference": "last"\n'
            '{{"order_id": "{o}", "operation": "release"}}\n',
            "utf-8",
        ),
    ],
)
def test_batch_holds_back_a_release_after_a_line_whose_order_cannot_be_read(
    served: ServedFake, tmp_path: Path, name: str, lines: str, encoding: str
) -> None:
    order_id = served.captured_order(captured=2000)
    path = tmp_path / name
    path.write_bytes(lines.format(o=order_id).encode(encoding))
    result = cli(["batch", str(path), "--json"], served)
    outcomes = [o for o in json_lines(result.stdout) if o["type"] == "outcome"]
    bad, release = sorted(outcomes, key=lambda o: o["line"])
    assert (bad["status"], release["status"]) == ("refused", "refused")
    assert release["error"] == (
        f"held back: line {bad['line']} could not be read, and the order it names may be"
        " misread; a release waits until it is fixed; rerun after it is settled"
    )
    assert "releaseRemainingAuthorization" not in served.do(
        lambda: served.fake.order(order_id).operations
    )


def test_batch_holds_back_past_the_orders_whose_bad_lines_it_names(
    served: ServedFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the first HELD_LISTED broken orders keep the line that broke them (memory), but
    # every broken order's later lines are held back: here the second, with a limit of 1.
    from klarna_om_async.cli import _runner

    monkeypatch.setattr(_runner, "HELD_LISTED", 1)
    first, second = served.captured_order(captured=2000), served.captured_order(captured=2000)
    path = tmp_path / "ops.csv"
    path.write_text(
        "order_id,operation,captured_amount,reference\n"
        f"{first},capture,x,last\n{second},capture,y,last\n{second},release,,\n",
        encoding="utf-8",
    )
    result = cli(["batch", str(path), "--json"], served)
    by_line = {o["line"]: o for o in json_lines(result.stdout) if o["type"] == "outcome"}
    assert by_line[4]["status"] == "refused"
    assert by_line[4]["error"] == (
        f"held back: an earlier item of order {second} could not be read; rerun after it is settled"
    )
    assert "releaseRemainingAuthorization" not in served.do(
        lambda: served.fake.order(second).operations
    )


@pytest.mark.parametrize("operation", ["cancel", "release"])
def test_batch_does_not_report_a_204_replayed_for_another_orders_key_as_done(
    served: ServedFake, tmp_path: Path, operation: str
) -> None:
    # Two files (two journals) whose idempotency_key column gives the same key to the same
    # operation on two orders: Klarna replays the first 204 to the second.
    if operation == "release":
        orders = [served.captured_order(captured=4000) for _ in range(2)]
    else:
        orders = [served.do(lambda: served.fake.add_order(amount=10_000)) for _ in range(2)]
    outcomes = []
    for n, order_id in enumerate(orders):
        path = tmp_path / f"day{n}.csv"
        path.write_text(
            f"order_id,operation,idempotency_key\n{order_id},{operation},ticket-4711\n",
            encoding="utf-8",
        )
        result = cli(["batch", str(path), "--json"], served)
        assert result.exit_code == n, result.output
        outcomes += [o for o in json_lines(result.stdout) if o["type"] == "outcome"]
    assert [o["status"] for o in outcomes] == ["captured", "refused"]
    assert "the given idempotency key ticket-4711 was used before" in outcomes[1]["error"]
    acted = "cancelOrder" if operation == "cancel" else "releaseRemainingAuthorization"
    assert acted not in served.do(lambda: served.fake.order(orders[1]).operations)


def klarna_om_command() -> list[str]:
    script = Path(sysconfig.get_path("scripts")) / "klarna-om"
    return [str(script)] if script.exists() else [sys.executable, "-m", "klarna_om_async.cli"]


def journal_summary(path: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        async with SQLiteJournal(path) as journal:
            return {status.value: n for status, n in (await journal.summary()).items() if n}

    return asyncio.run(read())


def test_kill_9_mid_refund_batch_then_a_rerun_refunds_every_order_exactly_once(
    served: ServedFake, tmp_path: Path
) -> None:
    orders = [served.captured_order() for _ in range(20)]
    # Refunds of orders 8-11 are booked but their answers never come: with 4 workers, the
    # batch is stuck there, 8 refunded and 4 in flight, whatever the machine's speed.
    stuck = orders[8:12]

    def hold(order: str) -> None:
        served.fake.inject(
            Delay(30, after_processing=True), method="POST", path=f"/{order}/refunds"
        )

    for order in stuck:
        served.do(functools.partial(hold, order))
    path = tmp_path / "r.csv"
    path.write_text(
        "order_id,operation,refunded_amount,reference\n"
        + "".join(f"{o},refund,2500,RMA-{i}\n" for i, o in enumerate(orders)),
        encoding="utf-8",
    )
    journal = f"{path}.journal.sqlite"
    requests_before = served.do(lambda: len(served.fake.requests))
    batch = subprocess.Popen(
        [*klarna_om_command(), "batch", str(path), "--concurrency", "4", "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env_for(served),
    )
    try:
        served.run(
            asyncio.wait_for(served.fake.wait_for_requests(requests_before + 12), timeout=25)
        )
    finally:
        batch.kill()  # SIGKILL: no cleanup, no final journal write
        _, stderr = batch.communicate(timeout=20)
    assert batch.returncode == -signal.SIGKILL, stderr
    assert journal_summary(journal) == {"captured": 8, "in_flight": 4}

    rerun = cli(["batch", str(path), "--json"], served)
    assert rerun.exit_code == 0, rerun.output
    outcomes = {o["order_id"]: o for o in json_lines(rerun.stdout) if o["type"] == "outcome"}
    results = {o: outcomes[o]["result"] for o in orders}
    assert results == {o: "skipped" if i < 8 else "refunded" for i, o in enumerate(orders)}
    assert all(served.booked(order) == 1 for order in orders)
    # The in-flight refunds were resent with the key the killed run recorded, so Klarna
    # replayed the booked refund instead of refunding again.
    assert all(len(set(served.refunds(order))) == 1 for order in stuck)
    assert all(len(served.refunds(order)) == 2 for order in stuck)
    assert journal_summary(journal) == {"captured": 20}


def test_reconcile_settles_a_refund_that_needs_review_by_its_refund_id(
    served: ServedFake, tmp_path: Path
) -> None:
    order_id = served.captured_order()

    async def refund() -> str:
        async with KlarnaOM(USERNAME, PASSWORD, base_url=served.fake.base_url) as om:
            made = await om.refunds.create(order_id, RefundRequest(refunded_amount=700))
        return made.refund_id

    refund_id = served.run(refund())
    path = str(tmp_path / "j.sqlite")
    key = f"refund:{order_id}"

    async def journal_a_refund_needing_review() -> None:
        async with SQLiteJournal(path) as journal:
            record = ItemRecord(
                item_key=key,
                order_id=order_id,
                captured_amount=700,
                fingerprint="f",
                operation=Operation.REFUND,
            )
            await journal.claim(record, "K")
            await journal.finish(key, JournalStatus.FAILED)
            await journal.finish(key, JournalStatus.NEEDS_REVIEW, reconciled=True)

    asyncio.run(journal_a_refund_needing_review())
    wrong = cli(["reconcile", path, "--captured", key, "nope"], served)
    assert wrong.exit_code != 0
    assert f"order {order_id} has no refund 'nope'" in wrong.output

    settled = cli(["reconcile", path, "--captured", key, refund_id], served)
    assert settled.exit_code == 0, settled.output
    assert journal_summary(path) == {"captured": 1}


async def test_an_operation_without_its_service_is_refused_before_anything_is_sent(
    fake: FakeKlarna,
) -> None:
    items: list[tuple[str, OperationRequest]] = [
        ("o1", CaptureRequest(captured_amount=1)),
        ("o2", RefundRequest(refunded_amount=1)),
        ("o3", CancelOrder()),
        ("o4", "capture"),  # type: ignore[list-item]
    ]
    outcomes = [o async for o in run_many(Services(), items, concurrency=1)]
    assert [o.status for o in outcomes] == [CaptureStatus.REFUSED] * 4
    assert [type(o.error) for o in outcomes] == [TypeError] * 4
    assert "no captures service" in str(outcomes[0].error)
    assert "no refunds service" in str(outcomes[1].error)
    assert "no orders service" in str(outcomes[2].error)
    assert "must be one of" in str(outcomes[3].error)
    assert not fake.requests


def _operations(served: ServedFake, order_id: str) -> list[str]:
    return list(served.do(lambda: served.fake.order(order_id).operations))


def _outcomes(text: str) -> dict[int, dict[str, Any]]:
    return {o["line"]: o for o in json_lines(text) if o["type"] == "outcome"}


# A CSV line whose values do not line up with the header names whatever its order_id
# column holds: after any bad line, every later release, cancel and refund waits.
@pytest.mark.parametrize(
    ("header", "bad", "release"),
    [
        # An unquoted comma in a description before order_id: one value too many.
        (
            "description,order_id,operation,captured_amount",
            "Blue, large,{o},capture,6000",
            ",{o},release,",
        ),
        # The operation cell left out (not left empty): the order id lands in "operation".
        ("operation,order_id,captured_amount", "{o},6000", "release,{o},"),
        # A semicolon file (Excel) with one line written with commas: the whole line is
        # read as the order id.
        ("order_id;operation;captured_amount", "{o},capture,6000", "{o};release;"),
        # A byte order mark inside the file (files concatenated): "\ufeff<o>" is not <o>.
        ("order_id,operation,captured_amount", "\ufeff{o},capture,60.00", "{o},release,"),
    ],
    ids=["extra-value", "missing-value", "wrong-delimiter", "inner-bom"],
)
def test_batch_holds_back_a_release_after_a_misaligned_line_of_any_order(
    served: ServedFake, tmp_path: Path, header: str, bad: str, release: str
) -> None:
    o = served.captured_order(captured=2000)
    path = tmp_path / "ops.csv"
    path.write_text(f"{header}\n{bad.format(o=o)}\n{release.format(o=o)}\n", encoding="utf-8")
    result = cli(["batch", str(path), "--json"], served)
    by_line = _outcomes(result.stdout)
    assert by_line[2]["status"] == "refused"  # the capture was never sent
    assert by_line[3]["status"] == "refused", by_line
    assert "releaseRemainingAuthorization" not in _operations(served, o)


# A release held back by an unreadable line holds its order's later lines back too: the
# capture after it must not go out before it.
def test_batch_holds_back_an_orders_lines_after_its_held_back_release(
    served: ServedFake, tmp_path: Path
) -> None:
    o = served.captured_order(captured=2000)
    path = tmp_path / "ops.csv"
    path.write_text(
        "order_id,operation,captured_amount,reference\n"
        '"broken,capture,1000,x\n'
        f"{o},release,,\n"
        f"{o},capture,3000,late\n",
        encoding="utf-8",
    )
    result = cli(["batch", str(path), "--json"], served)
    by_line = _outcomes(result.stdout)
    assert by_line[3]["status"] == "refused"  # the release: held back, not sent
    assert by_line[4]["status"] == "refused", by_line[4]
    assert served.do(lambda: served.fake.order(o).captured_amount) == 2000


# A refund after an unreadable capture line waits: sent, it would give back money of an
# earlier capture for a capture that never happened.
def test_batch_holds_back_a_refund_after_a_line_that_cannot_be_read(
    served: ServedFake, tmp_path: Path
) -> None:
    o = served.captured_order(captured=6000)
    path = tmp_path / "ops.csv"
    path.write_text(
        "operation,order_id,captured_amount,refunded_amount,reference\n"
        f'capture,{o},3000,,"late\n'
        f"refund,{o},,3000,rma-late\n",
        encoding="utf-8",
    )
    result = cli(["batch", str(path), "--json"], served)
    by_line = _outcomes(result.stdout)
    assert by_line[2]["status"] == "refused"
    assert by_line[3]["status"] == "refused", by_line[3]
    assert served.booked(o) == 0


def test_a_held_back_line_still_takes_its_idempotency_key_in_the_batch(
    served: ServedFake, tmp_path: Path
) -> None:
    # The refund waits behind the bad line, but its key is taken: the capture of another
    # order under the same key is refused as a duplicate (as without the bad line), so
    # nothing is booked under K-1 in this run, and a rerun cannot find it "refused" though
    # booked.
    o1 = served.captured_order(captured=6000)
    o2 = served.do(lambda: served.fake.add_order(amount=10_000))
    path = tmp_path / "ops.csv"
    path.write_text(
        "order_id,operation,captured_amount,refunded_amount,reference,idempotency_key\n"
        "zz,extend,60.00,,,\n"
        f"{o1},refund,,1000,rma,K-1\n"
        f"{o2},capture,3000,,part,K-1\n",
        encoding="utf-8",
    )
    by_line = _outcomes(cli(["batch", str(path), "--json", "--concurrency", "1"], served).stdout)
    assert (by_line[3]["status"], by_line[4]["status"]) == ("refused", "refused")
    assert "is given to two items of this batch" in by_line[4]["error"]
    assert served.do(lambda: served.fake.order(o2).captured_amount) == 0
    assert served.booked(o1) == 0


def test_a_duplicate_line_after_a_bad_line_is_refused_as_a_duplicate(
    served: ServedFake, tmp_path: Path
) -> None:
    o = served.captured_order(captured=6000)
    path = tmp_path / "ops.csv"
    path.write_text(
        "order_id,operation,refunded_amount,reference\n"
        f"{o},refund,1000,rma\n"
        "zz,refund,1x,\n"
        f"{o},refund,1000,rma\n",
        encoding="utf-8",
    )
    by_line = _outcomes(cli(["batch", str(path), "--json", "--concurrency", "1"], served).stdout)
    assert served.booked(o) == 1
    assert (by_line[2]["status"], by_line[4]["status"]) == ("captured", "refused")
    assert "appears twice in this batch" in by_line[4]["error"]


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (ReleaseRemainingAuthorization(), "an order is released once"),
        (CancelOrder(), "an order is cancelled once"),
        (RefundRequest(refunded_amount=100), "give each part of a split refund its own reference"),
    ],
)
async def test_a_duplicate_item_is_told_what_to_do_about_it(
    om: KlarnaOM, fake: FakeKlarna, request_: OperationRequest, says: str
) -> None:
    # A second release was told to give each part of a split release its own reference,
    # which a release refuses.
    cancel = isinstance(request_, CancelOrder)  # only an order not captured yet
    order_id = fake.add_order(amount=10_000) if cancel else await captured_order(om, fake)
    items = [BatchItem(order_id=order_id, request=request_) for _ in range(2)]
    first, second = [o async for o in om.run_many(items, concurrency=1)]
    assert first.status is CaptureStatus.CAPTURED
    assert second.status is CaptureStatus.REFUSED
    assert says in str(second.error)


async def test_run_many_holds_back_what_hold_names_and_its_orders_later_items(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    held, other = await captured_order(om, fake), await captured_order(om, fake)
    items = [
        BatchItem(order_id=held, request=ReleaseRemainingAuthorization()),
        BatchItem(order_id=held, request=CaptureRequest(captured_amount=100, reference="x")),
        BatchItem(order_id=other, request=ReleaseRemainingAuthorization()),
    ]
    asked: list[str] = []

    def hold(item: BatchItem) -> str | None:
        asked.append(item.item_key)
        return "the warehouse has not confirmed" if item.order_id == held else None

    outcomes = {
        o.item_key: o async for o in om.run_many(items, journal=journal, concurrency=1, hold=hold)
    }
    release, capture = outcomes[f"release:{held}"], outcomes[f"{held}:x"]
    assert release.status is CaptureStatus.REFUSED
    assert isinstance(release.error, ItemHeldBackError)
    assert "the warehouse has not confirmed" in str(release.error)
    assert capture.status is CaptureStatus.REFUSED  # held too (hold names its order)
    assert "the warehouse has not confirmed" in str(capture.error)
    assert outcomes[f"release:{other}"].status is CaptureStatus.CAPTURED
    assert "releaseRemainingAuthorization" not in fake.order(held).operations
    assert await journal.entries(order_id=held) == []  # held items are never claimed
    assert sorted(asked) == sorted(outcomes)  # asked once per item


async def test_a_cancel_sent_whose_confirmation_the_journal_fails_is_reported_with_its_attempt(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # A cancel resent under the caller's key is refused; the journal records it failed and
    # cannot then be read to confirm it by the order: the item was reported as if nothing
    # had been sent (0 attempts).
    class ReadFails(MemoryJournal):
        broken = False

        async def entries(self, **kw: Any) -> list[JournalEntry]:
            if self.broken:
                raise OSError(5, "Input/output error")
            return await super().entries(**kw)

    order_id = fake.add_order(amount=1000)
    item = BatchItem(order_id=order_id, request=CancelOrder(), idempotency_key="k-cancel")
    journal = ReadFails()
    fake.inject(DropConnection(), method="POST", times=None)
    [unknown] = [x async for x in om.run_many([item], journal=journal)]
    assert unknown.status is CaptureStatus.FAILED
    fake.clear_faults()
    fake.set_order_status(order_id, "EXPIRED")  # the resend is refused
    journal.broken = True
    seen: list[CaptureOutcome] = []

    async def rerun() -> None:
        async for outcome in om.run_many([item], journal=journal):
            seen.append(outcome)

    posts_before = posts(fake)
    with pytest.raises(OSError, match="Input/output error"):
        await rerun()
    [outcome] = seen
    assert (outcome.status, outcome.idempotency_key) == (CaptureStatus.FAILED, "k-cancel")
    assert outcome.attempts == posts(fake) - posts_before == 1


class HoldBroke(Exception):
    pass


async def test_a_hold_that_raises_stops_the_batch_and_its_orders_later_items(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    o = await captured_order(om, fake)
    items = [
        BatchItem(order_id=o, request=CaptureRequest(captured_amount=100, reference="a")),
        BatchItem(order_id=o, request=CaptureRequest(captured_amount=200, reference="b")),
        BatchItem(order_id=o, request=ReleaseRemainingAuthorization()),
    ]

    def hold(item: BatchItem) -> str | None:
        if item.item_key == f"{o}:b":
            raise HoldBroke("hold broke")
        return None

    seen: list[CaptureOutcome] = []

    async def run() -> None:
        async for outcome in om.run_many(items, journal=journal, concurrency=3, hold=hold):
            seen.append(outcome)

    with pytest.raises(HoldBroke):
        await run()
    # b is never sent nor claimed, but reported (failed, with the error); the release waiting
    # behind it never goes.
    statuses = {x.item_key: x.status for x in seen}
    assert statuses[f"{o}:b"] is CaptureStatus.FAILED
    assert isinstance(next(x for x in seen if x.item_key == f"{o}:b").error, HoldBroke)
    assert statuses.get(f"release:{o}", CaptureStatus.REFUSED) is CaptureStatus.REFUSED
    assert [c.captured_amount for c in fake.booked_captures if c.order_id == o][1:] == [100]
    assert "releaseRemainingAuthorization" not in fake.order(o).operations


async def test_a_held_item_the_journal_has_done_still_holds_its_orders_later_items(
    om: KlarnaOM, fake: FakeKlarna, journal: SQLiteJournal
) -> None:
    o = await captured_order(om, fake)
    first = BatchItem(order_id=o, request=CaptureRequest(captured_amount=100, reference="a"))
    [done] = [x async for x in om.run_many([first], journal=journal)]
    assert done.status is CaptureStatus.CAPTURED
    items = [first, BatchItem(order_id=o, request=ReleaseRemainingAuthorization())]

    def hold(item: BatchItem) -> str | None:
        return "the warehouse has not confirmed" if item.item_key == f"{o}:a" else None

    outcomes = {x.item_key: x async for x in om.run_many(items, journal=journal, hold=hold)}
    assert outcomes[f"{o}:a"].status is CaptureStatus.SKIPPED  # done in run 1, as it says
    release = outcomes[f"release:{o}"]
    assert release.status is CaptureStatus.REFUSED
    assert "was held back: the warehouse has not confirmed" in str(release.error)
    assert "releaseRemainingAuthorization" not in fake.order(o).operations


@pytest.mark.parametrize("answer", ["", "  ", False, 0])
async def test_a_hold_answer_that_is_no_reason_stops_the_batch(
    om: KlarnaOM, fake: FakeKlarna, answer: object
) -> None:
    o = await captured_order(om, fake)
    items = [BatchItem(order_id=o, request=ReleaseRemainingAuthorization())]
    with pytest.raises(TypeError, match="hold must return None or a non-empty reason"):
        async for _ in om.run_many(items, hold=lambda item: answer):  # type: ignore[arg-type,return-value]
            pass
    assert "releaseRemainingAuthorization" not in fake.order(o).operations


def test_an_async_hold_is_refused_at_the_call(om: KlarnaOM) -> None:
    async def hold(item: BatchItem) -> str | None:
        return None

    with pytest.raises(TypeError, match="not async"):
        om.run_many([], hold=hold)  # type: ignore[arg-type]
