"""A journal's clock against Klarna's: a clock that is off must not get an expired key resent.

The journal dates each key by its clock and judges by that date whether Klarna (24 hours)
still remembers the key. Klarna's time comes from its answers' ``Date`` header. Every test
counts what FakeKlarna actually booked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from klarna_om_async import (
    BatchAbortedError,
    CaptureOutcome,
    CaptureRequest,
    CaptureStatus,
    ClockSkewError,
    JournalStatus,
    KlarnaOM,
    SQLiteJournal,
)
from klarna_om_async._klarna_clock import KlarnaClock
from klarna_om_async.batch import MAX_CLOCK_SKEW
from klarna_om_async.testing import DropAfterProcessing, FakeKlarna

DAY = 24 * 3600.0
Items = Iterable[tuple[str, CaptureRequest]]


def booked(fake: FakeKlarna) -> Counter[str]:
    return Counter(c.order_id for c in fake.booked_captures)


def off_by(fake: FakeKlarna, seconds: float) -> Callable[[], datetime]:
    """A journal clock ``seconds`` ahead of the fake's (behind, when negative)."""
    return lambda: fake.now() + timedelta(seconds=seconds)


async def run(
    om: KlarnaOM, items: Items, journal: SQLiteJournal, concurrency: int = 1
) -> tuple[list[CaptureOutcome], BatchAbortedError | None]:
    outcomes: list[CaptureOutcome] = []
    try:
        async for outcome in om.capture_many(items, journal=journal, concurrency=concurrency):
            outcomes.append(outcome)
    except BatchAbortedError as stopped:
        return outcomes, stopped
    return outcomes, None


def captures(fake: FakeKlarna, n: int) -> list[tuple[str, CaptureRequest]]:
    return [(fake.add_order(amount=1000), CaptureRequest(captured_amount=1000)) for _ in range(n)]


async def test_a_clock_set_back_does_not_resend_a_key_klarna_forgot(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    order_id = fake.add_order(amount=10_000)
    items = [(order_id, CaptureRequest(captured_amount=4000, reference="box-1"))]
    path = tmp_path / "j.sqlite"
    fake.inject(DropAfterProcessing(), method="POST", times=None)  # booked, answer lost
    async with SQLiteJournal(path, clock=fake.now) as journal:
        [first], _ = await run(om, items, journal)
    assert first.status is CaptureStatus.FAILED
    fake.clear_faults()
    fake.advance_clock(DAY + 3600)  # Klarna has forgotten the key
    gets_before = sum(r.method == "GET" for r in fake.requests)

    # This machine's clock was set back 3 hours: the key looks 22 hours old to the journal.
    later = captures(fake, 1)
    async with SQLiteJournal(path, clock=off_by(fake, -3 * 3600)) as journal:
        outcomes, stopped = await run(om, [*items, *later], journal)
        [entry] = await journal.entries(order_id=order_id)

    assert booked(fake)[order_id] == 1  # resent, the forgotten key would have booked again
    [second] = outcomes
    assert second.status is CaptureStatus.FAILED  # still unknown, under the same key
    assert second.idempotency_key == first.idempotency_key
    assert isinstance(second.error, ClockSkewError)
    assert second.error.outcome_unknown
    assert (entry.status, entry.idempotency_key) == (JournalStatus.FAILED, first.idempotency_key)
    # Klarna's time came from reading the order, before anything was sent.
    assert sum(r.method == "GET" for r in fake.requests) == gets_before + 1
    assert isinstance(stopped, BatchAbortedError)
    assert stopped.cause is second.error
    assert (stopped.not_sent, stopped.not_sent_count) == ((later[0][0],), 1)
    assert str(stopped).startswith(
        "stopped: the journal's clock is 3 h 0 min behind Klarna's (Klarna's answers say "
    )
    assert "set this machine's clock right (NTP), then rerun" in str(stopped)

    # With the clock right again, the rerun reconciles the key (older than 23 hours).
    async with SQLiteJournal(path, clock=fake.now) as journal:
        [third, fourth], stopped = await run(om, [*items, *later], journal)
    assert stopped is None
    assert (third.status, fourth.status) == (CaptureStatus.CAPTURED, CaptureStatus.CAPTURED)
    assert booked(fake) == {order_id: 1, later[0][0]: 1}


async def test_a_clock_ahead_stops_the_batch_at_the_first_answer_and_the_rerun_ends_it(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    items = captures(fake, 5)
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path, clock=off_by(fake, 2 * 3600)) as journal:
        outcomes, stopped = await run(om, items, journal)
        statuses = {e.item_key: e.status for e in await journal.entries()}

    # The first item went out before any answer told Klarna's time; the second was not sent.
    assert [o.status for o in outcomes] == [CaptureStatus.CAPTURED, CaptureStatus.REFUSED]
    assert isinstance(outcomes[1].error, ClockSkewError)
    assert not outcomes[1].error.outcome_unknown
    assert outcomes[1].error.skew > timedelta(hours=1, minutes=59)
    assert statuses == {items[0][0]: JournalStatus.CAPTURED, items[1][0]: JournalStatus.REFUSED}
    assert isinstance(stopped, BatchAbortedError)
    assert stopped.not_sent_count == 3
    assert "2 h 0 min ahead of Klarna's" in str(stopped)
    assert booked(fake) == {items[0][0]: 1}

    async with SQLiteJournal(path, clock=fake.now) as journal:
        outcomes, stopped = await run(om, items, journal, concurrency=4)
    assert stopped is None
    assert [o.status for o in outcomes].count(CaptureStatus.CAPTURED) == 4
    assert booked(fake) == {order_id: 1 for order_id, _ in items}


@pytest.mark.parametrize("seconds", [-270.0, 270.0])
async def test_a_clock_within_the_allowed_skew_runs(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path, seconds: float
) -> None:
    assert timedelta(seconds=abs(seconds)) < MAX_CLOCK_SKEW
    items = captures(fake, 6)
    async with SQLiteJournal(tmp_path / "j.sqlite", clock=off_by(fake, seconds)) as journal:
        outcomes, stopped = await run(om, items, journal, concurrency=2)
    assert stopped is None
    assert {o.status for o in outcomes} == {CaptureStatus.CAPTURED}
    assert booked(fake) == {order_id: 1 for order_id, _ in items}


async def test_a_batch_without_a_journal_dates_no_key_and_is_not_stopped(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    fake.advance_clock(3 * DAY)
    items = captures(fake, 3)
    outcomes = [o async for o in om.capture_many(items, concurrency=1)]
    assert {o.status for o in outcomes} == {CaptureStatus.CAPTURED}


async def test_klarna_now_is_the_time_of_klarnas_answers(om: KlarnaOM, fake: FakeKlarna) -> None:
    assert om.klarna_now() is None  # before any answer
    fake.advance_clock(5 * 3600)
    await om.orders.get(fake.add_order(amount=100))
    told = om.klarna_now()
    assert told is not None
    assert abs(told - fake.now()) < timedelta(seconds=2)


def test_a_date_header_is_read_once_a_second_and_nonsense_is_ignored() -> None:
    ticks = [100.0]
    clock = KlarnaClock(lambda: ticks[0])
    clock.saw(None)  # an answer without a date tells no time
    assert (clock.answers, clock.now()) == (1, None)
    clock.saw("Tue, 01 Dec 2026 10:00:00 GMT")
    ticks[0] += 30.5  # no answer for half a minute: Klarna's time moved on all the same
    assert clock.now() == datetime(2026, 12, 1, 10, 0, 30, 500_000, tzinfo=UTC)
    clock.saw("Tue, 01 Dec 2026 10:00:00 GMT")  # the same second: counted from this answer
    assert clock.now() == datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)
    clock.saw("not a date")
    assert (clock.answers, clock.now()) == (4, None)
    clock.saw("Tue, 01 Dec 2026 10:00:31 -0000")
    assert clock.now() == datetime(2026, 12, 1, 10, 0, 31, tzinfo=UTC)
