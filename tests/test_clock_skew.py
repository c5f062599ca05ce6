"""A journal's clock against Klarna's: a clock that is off must not get an expired key resent.

The journal dates each key by its clock and judges by that date whether Klarna (24 hours)
still remembers the key. Klarna's time comes from its answers' ``Date`` header. Every test
counts what FakeKlarna actually booked.
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web
from conftest import served_app
from test_exactly_once_batch import AgingSleep

from klarna_om_async import (
    BatchAbortedError,
    CaptureOutcome,
    CaptureRequest,
    CaptureStatus,
    ClockSkewError,
    ItemConflictError,
    JournalStatus,
    KlarnaConnectionError,
    KlarnaOM,
    RetryPolicy,
    SQLiteJournal,
    ValidationError,
)
from klarna_om_async._klarna_clock import KlarnaClock
from klarna_om_async.batch import MAX_CLOCK_SKEW, request_fingerprint
from klarna_om_async.journal import ItemRecord, MemoryJournal
from klarna_om_async.reconcile import Verdict, reconcile
from klarna_om_async.testing import (
    Delay,
    DropAfterProcessing,
    DropConnection,
    FakeKlarna,
    RateLimited,
)

DAY = 24 * 3600.0
Items = Iterable[tuple[str, CaptureRequest]] | AsyncIterable[tuple[str, CaptureRequest]]


def booked(fake: FakeKlarna) -> Counter[str]:
    return Counter(c.order_id for c in fake.booked_captures)


def each_captured_once(
    fake: FakeKlarna,
    items: list[tuple[str, CaptureRequest]],
    outcomes: list[CaptureOutcome],
    stopped: BatchAbortedError | None,
) -> None:
    assert stopped is None
    assert {o.status for o in outcomes} == {CaptureStatus.CAPTURED}
    assert booked(fake) == {order_id: 1 for order_id, _ in items}


def off_by(fake: FakeKlarna, seconds: float) -> Callable[[], datetime]:
    """A journal clock ``seconds`` ahead of the fake's (behind, when negative)."""
    return lambda: fake.now() + timedelta(seconds=seconds)


async def run(
    om: KlarnaOM, items: Items, journal: SQLiteJournal | MemoryJournal, concurrency: int = 1
) -> tuple[list[CaptureOutcome], BatchAbortedError | None]:
    outcomes: list[CaptureOutcome] = []
    try:
        async for outcome in om.capture_many(items, journal=journal, concurrency=concurrency):
            outcomes.append(outcome)
    except BatchAbortedError as stopped:
        return outcomes, stopped
    return outcomes, None


async def left_unknown(
    om: KlarnaOM, fake: FakeKlarna, path: Path, fault: DropAfterProcessing | DropConnection
) -> tuple[str, list[tuple[str, CaptureRequest]], CaptureOutcome]:
    """A first run on the right clock whose capture (1000 of an order of 3000) ends unknown:
    booked with its answer lost, or never processed."""
    order_id = fake.add_order(amount=3000)
    items = [(order_id, CaptureRequest(captured_amount=1000, reference="r"))]
    fake.inject(fault, method="POST", times=None)
    async with SQLiteJournal(path, clock=fake.now) as journal:
        [first], _ = await run(om, items, journal)
    fake.clear_faults()
    assert first.status is CaptureStatus.FAILED
    return order_id, items, first


def captures(fake: FakeKlarna, n: int) -> list[tuple[str, CaptureRequest]]:
    return [(fake.add_order(amount=1000), CaptureRequest(captured_amount=1000)) for _ in range(n)]


async def test_a_clock_set_back_does_not_resend_a_key_klarna_forgot(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    path = tmp_path / "j.sqlite"
    order_id, items, first = await left_unknown(om, fake, path, DropAfterProcessing())
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


async def test_a_clock_ahead_stops_the_batch_before_anything_is_sent_and_the_rerun_ends_it(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    items = captures(fake, 5)
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path, clock=off_by(fake, 2 * 3600)) as journal:
        outcomes, stopped = await run(om, items, journal, concurrency=3)
        statuses = {e.item_key: e.status for e in await journal.entries()}

    # Klarna's time came first (the first item's order read): no key went out misdated.
    assert booked(fake) == {}
    assert not [r for r in fake.requests if r.method == "POST"]
    refused = [o for o in outcomes if o.status is CaptureStatus.REFUSED]
    assert refused == outcomes
    assert len(outcomes) in (1, 2, 3)  # the items claimed as it stopped
    error = outcomes[0].error
    assert isinstance(error, ClockSkewError)
    assert not error.outcome_unknown
    assert error.skew is not None
    assert timedelta(hours=1, minutes=59) < error.skew < timedelta(hours=2, minutes=1)
    assert statuses == {}  # nothing claimed by a clock that is off (a claim cut short kept it)
    assert isinstance(stopped, BatchAbortedError)
    assert stopped.not_sent_count == 5 - len(outcomes)
    assert "2 h 0 min ahead of Klarna's" in str(stopped)

    async with SQLiteJournal(path, clock=fake.now) as journal:
        outcomes, stopped = await run(om, items, journal, concurrency=4)
    each_captured_once(fake, items, outcomes, stopped)


async def test_when_klarnas_time_cannot_be_read_nothing_is_sent(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    path = tmp_path / "j.sqlite"
    order_id, items, _ = await left_unknown(om, fake, path, DropAfterProcessing())
    fake.advance_clock(DAY + 3600)  # Klarna has forgotten the key
    # The clock was set back, and the read that would tell Klarna's time gets no answer.
    fake.inject(DropConnection(), method="GET", times=None)
    async with SQLiteJournal(path, clock=off_by(fake, -3 * 3600)) as journal:
        [second], stopped = await run(om, [*items, *captures(fake, 1)], journal)

    assert booked(fake) == {order_id: 1}
    assert second.status is CaptureStatus.FAILED
    assert isinstance(second.error, ClockSkewError)
    assert second.error.skew is None
    assert isinstance(second.error.failure, KlarnaConnectionError)
    assert isinstance(stopped, BatchAbortedError)
    assert str(stopped).startswith("stopped: Klarna's time could not be learned (reading the")
    assert "rerun once Klarna answers" in str(stopped)


async def test_answers_without_a_date_stop_a_journaled_batch_before_it_sends(
    tmp_path: Path,
) -> None:
    """A proxy that drops ``Date``: the journal's clock cannot be checked, so nothing goes."""
    posts: list[str] = []

    async def order(request: web.Request) -> web.Response:
        return web.json_response({"order_id": request.match_info["order_id"]})

    async def capture(request: web.Request) -> web.Response:
        posts.append(request.match_info["order_id"])
        return web.Response(status=201, headers={"Capture-Id": "c1"})

    async def undated(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Date"] = "sometime on Tuesday"  # aiohttp adds one when none is set

    app = web.Application()
    app.router.add_get("/ordermanagement/v1/orders/{order_id}", order)
    app.router.add_post("/ordermanagement/v1/orders/{order_id}/captures", capture)
    app.on_response_prepare.append(undated)
    async with (
        served_app(app) as url,
        KlarnaOM("u", "p", base_url=url) as om,
        SQLiteJournal(tmp_path / "j.sqlite") as journal,
    ):
        items = [("o1", CaptureRequest(captured_amount=100))]
        [outcome], _ = await run(om, items, journal)
    assert posts == []
    assert outcome.status is CaptureStatus.REFUSED
    assert "Klarna's answers tell no time (no HTTP Date header)" in str(outcome.error)


async def test_a_long_wait_before_the_check_is_no_clock_off(
    fake: FakeKlarna, tmp_path: Path
) -> None:
    """Seven minutes of 429s on the read of Klarna's time, on the fake's clock and the
    client's alike: the claims made before them are judged by the time they were made."""
    waits = AgingSleep(fake)
    policy = RetryPolicy(max_attempts=20, deadline=3600, jitter=lambda d: d, sleep=waits)
    fake.inject(RateLimited(retry_after="30"), method="GET", times=14)
    items = captures(fake, 6)
    async with (
        KlarnaOM(
            fake.username, fake.password, base_url=fake.base_url, retry=policy, clock=waits.clock
        ) as om,
        SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now) as journal,
    ):
        outcomes, stopped = await run(om, items, journal, concurrency=3)
    assert waits.waited >= 400
    each_captured_once(fake, items, outcomes, stopped)


async def test_a_machine_that_slept_mid_batch_is_measured_again_not_stopped(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    """Ten minutes pass for Klarna and the journal's clock, not for the client's monotonic
    clock (a suspended laptop): the time of the last answer is read again before judging."""
    items = captures(fake, 6)

    async def slept_after_three() -> AsyncIterator[tuple[str, CaptureRequest]]:
        for n, item in enumerate(items):
            if n == 3:
                fake.advance_clock(600)
            yield item

    gets_before = sum(r.method == "GET" for r in fake.requests)
    async with SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now) as journal:
        outcomes, stopped = await run(om, slept_after_three(), journal)
    each_captured_once(fake, items, outcomes, stopped)
    # Once to learn Klarna's time, once to learn it again after the sleep.
    assert sum(r.method == "GET" for r in fake.requests) == gets_before + 2


async def test_a_journal_clock_without_a_zone_is_read_as_utc(
    om: KlarnaOM, fake: FakeKlarna, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = captures(fake, 3)
    journal = MemoryJournal(clock=lambda: fake.now().replace(tzinfo=None))  # utcnow-like
    outcomes, stopped = await run(om, items, journal)
    assert stopped is None
    assert {o.status for o in outcomes} == {CaptureStatus.CAPTURED}

    # Local time without a zone (datetime.now()) in Tokyo is nine hours off UTC: a rerun
    # under another zone (or after a change to daylight saving time) would misjudge ages.
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        local = MemoryJournal(clock=lambda: fake.now().astimezone().replace(tzinfo=None))
        [outcome], stopped = await run(om, captures(fake, 2), local)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert isinstance(outcome.error, ClockSkewError)
    assert "9 h 0 min ahead of Klarna's" in str(outcome.error)
    assert isinstance(stopped, BatchAbortedError)


@pytest.mark.parametrize("first", ["without a zone", "with a zone"])
async def test_a_rerun_on_a_clock_with_or_without_a_zone_reads_the_other_runs_dates(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path, first: str
) -> None:
    """Both clocks right, one without a zone (``utcnow``-like), read as UTC: a run on one
    and its rerun on the other raised TypeError at every date the journal compared, the
    rerun's and reconciliation's (helper-87)."""
    path = tmp_path / "j.sqlite"
    zoneless = lambda: fake.now().replace(tzinfo=None)  # noqa: E731
    clocks = [zoneless, fake.now] if first == "without a zone" else [fake.now, zoneless]
    order_id = fake.add_order(amount=3000)
    items = [(order_id, CaptureRequest(captured_amount=1000, reference="r"))]
    fake.inject(DropConnection(), method="POST", times=None)
    async with SQLiteJournal(path, clock=clocks[0]) as journal:
        [first_run], _ = await run(om, items, journal)
    fake.clear_faults()
    async with SQLiteJournal(path, clock=clocks[1]) as journal:
        [resent], _ = await run(om, items, journal)  # its key is young: resent
    assert resent.status is CaptureStatus.CAPTURED
    assert resent.idempotency_key == first_run.idempotency_key
    other = fake.add_order(amount=3000)
    more = [(other, CaptureRequest(captured_amount=1000, reference="r"))]
    fake.inject(DropConnection(), method="POST", times=None)
    async with SQLiteJournal(path, clock=clocks[0]) as journal:
        await run(om, more, journal)
    fake.clear_faults()
    fake.advance_clock(25 * 3600)
    async with SQLiteJournal(path, clock=clocks[1]) as journal:
        [result] = await om.reconcile(journal)  # its key is old: judged by the order
    assert result.verdict is Verdict.NOT_CAPTURED
    assert booked(fake) == {order_id: 1}


@pytest.mark.parametrize("known", [False, True], ids=["no-time-yet", "time-known"])
async def test_a_clock_off_is_not_sent_when_the_read_of_klarnas_time_gets_no_answer(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path, known: bool
) -> None:
    """New keys too: dated 3 hours late, a lost answer's key would be resent (or missed by
    reconciliation) a day later, after Klarna forgot it."""
    if known:
        await om.orders.get(fake.add_order(amount=100))  # an answer told Klarna's time
    fake.inject(DropConnection(), method="GET", times=None)
    items = captures(fake, 4)
    async with SQLiteJournal(tmp_path / "j.sqlite", clock=off_by(fake, 3 * 3600)) as journal:
        outcomes, stopped = await run(om, items, journal, concurrency=2)
    assert booked(fake) == {}
    assert {o.status for o in outcomes} == {CaptureStatus.REFUSED}
    error = outcomes[0].error
    assert isinstance(error, ClockSkewError)
    assert error.skew is None
    assert isinstance(error.failure, KlarnaConnectionError)
    assert isinstance(stopped, BatchAbortedError)


async def test_a_batch_stopped_while_it_reads_klarnas_time_leaves_nothing_claimed(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    """Ctrl-C during the read: a claim made first kept a key dated by a clock 3 hours
    ahead; fixed and rerun, that key's send was misjudged a day later (helper-84)."""
    fake.inject(Delay(30), method="GET")
    items = captures(fake, 3)
    async with SQLiteJournal(tmp_path / "j.sqlite", clock=off_by(fake, 3 * 3600)) as journal:
        batch = asyncio.ensure_future(run(om, items, journal, concurrency=3))
        await asyncio.wait_for(fake.wait_for_requests(1), timeout=10)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        assert await journal.entries() == []
    assert booked(fake) == {}


async def test_a_key_is_not_reconciled_by_a_clock_that_makes_it_look_expired(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    """A day ahead, a key Klarna still remembers looks expired: reconciled, an order that
    does not show a capture yet (a request landing late) was "not captured", and the
    rerun took a new key (helper-84). The entry is left as it was."""
    path = tmp_path / "j.sqlite"
    order_id, items, first = await left_unknown(om, fake, path, DropConnection())
    async with SQLiteJournal(path, clock=off_by(fake, 23.5 * 3600)) as journal:
        [second], stopped = await run(om, [*items, *captures(fake, 1)], journal)
        entries = await journal.entries(order_id=order_id)
    assert [(e.status, e.idempotency_key) for e in entries] == [
        (JournalStatus.FAILED, first.idempotency_key)
    ]
    assert second.status is CaptureStatus.FAILED
    assert isinstance(second.error, ClockSkewError)
    assert second.error.outcome_unknown
    assert isinstance(stopped, BatchAbortedError)
    assert not [r for r in fake.requests if r.method == "POST" and r.fault is None]


async def test_om_reconcile_records_no_verdict_by_a_clock_off_klarnas(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    path = tmp_path / "j.sqlite"
    _, _, first = await left_unknown(om, fake, path, DropConnection())
    async with SQLiteJournal(path, clock=off_by(fake, 23.5 * 3600)) as journal:
        [result] = await om.reconcile(journal)
        [entry] = await journal.entries()
    assert result.verdict is None
    assert isinstance(result.error, ClockSkewError)
    assert "23 h 30 min ahead of Klarna's" in result.evidence
    assert (entry.status, entry.idempotency_key) == (JournalStatus.FAILED, first.idempotency_key)


async def test_om_reconcile_records_no_verdict_when_klarnas_answers_tell_no_time(
    tmp_path: Path,
) -> None:
    """Through a proxy that drops ``Date``, a journal clock a day ahead made a key Klarna
    still remembered look expired: "not captured" was recorded, the request landed late,
    and the rerun booked again under a new key (helper-87). A batch stops there; so does
    reconciliation now: no verdict, the entry left as it was."""

    async def order(request: web.Request) -> web.Response:
        return web.json_response({"order_id": request.match_info["order_id"], "captures": []})

    async def undated(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Date"] = "sometime on Tuesday"  # aiohttp adds one when none is set

    app = web.Application()
    app.router.add_get("/ordermanagement/v1/orders/{order_id}", order)
    app.on_response_prepare.append(undated)
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as journal:
        record = ItemRecord(
            item_key="o1:r", order_id="o1", captured_amount=100, reference="r", fingerprint="f"
        )
        sent = await journal.claim(record, "key-1", run_id="run-1")
    a_day_ahead = lambda: datetime.now(UTC) + timedelta(days=1)  # noqa: E731
    async with (
        served_app(app) as url,
        KlarnaOM("u", "p", base_url=url) as om,
        SQLiteJournal(path, clock=a_day_ahead) as journal,
    ):
        [result] = await om.reconcile(journal)
        [entry] = await journal.entries()
    assert result.verdict is None
    assert isinstance(result.error, ClockSkewError)
    assert "Klarna's answers tell no time (no HTTP Date header)" in result.evidence
    assert (entry.status, entry.idempotency_key) == (JournalStatus.IN_FLIGHT, "key-1")
    assert sent.entry == entry


async def test_reconcile_checks_the_clock_against_the_clock_skew_it_is_given(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    """A capture booked earlier than the key's date less ``clock_skew`` is not the item's:
    with ``clock_skew`` 30 s, a journal clock 4 minutes ahead must not judge (helper-87: it
    recorded "not captured" and the rerun booked again)."""
    path = tmp_path / "j.sqlite"
    _, _, first = await left_unknown(om, fake, path, DropConnection())
    async with SQLiteJournal(path, clock=off_by(fake, 240)) as journal:
        [result] = await reconcile(om.orders, journal, clock_skew=timedelta(seconds=30))
        [entry] = await journal.entries()
    assert result.verdict is None
    assert isinstance(result.error, ClockSkewError)
    assert re.search("4 min [01] s ahead of Klarna's", result.evidence)
    assert (entry.status, entry.idempotency_key) == (JournalStatus.FAILED, first.idempotency_key)


async def test_an_item_changed_since_it_was_done_is_refused_when_the_clock_is_off(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    """Captured at 1000, then edited to 2500: a rerun on a clock an hour off reported it
    done (skipped, the old capture's id; the CLI exited 0) where a right clock refuses it
    as changed (helper-87)."""
    path = tmp_path / "j.sqlite"
    order_id = fake.add_order(amount=3000)
    async with SQLiteJournal(path, clock=fake.now) as journal:
        [first], _ = await run(
            om, [(order_id, CaptureRequest(captured_amount=1000, reference="r"))], journal
        )
    edited = [(order_id, CaptureRequest(captured_amount=2500, reference="r"))]
    for clock in (off_by(fake, 3600), fake.now):
        async with SQLiteJournal(path, clock=clock) as journal:
            [second], _ = await run(om, edited, journal)
        assert second.status is CaptureStatus.REFUSED
        assert isinstance(second.error, ItemConflictError)
        assert "changed since it was journaled" in str(second.error)
        assert second.idempotency_key == first.idempotency_key
    assert [c.captured_amount for c in fake.captures(order_id)] == [1000]


async def test_a_clock_that_steps_during_the_claim_of_an_earlier_runs_key_says_it_is_unknown(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    """A crash's leftover (in flight, its key 25 hours old) claimed while the clock stepped
    3 hours ahead: the claim said "reconcile", the check after it found the clock off, and
    the item's error said nothing was sent (``outcome_unknown`` False, no key to retry
    with), though the earlier run may have booked it (helper-87)."""
    path = tmp_path / "j.sqlite"
    order_id = fake.add_order(amount=3000)
    request = CaptureRequest(captured_amount=1000, reference="r")
    record = ItemRecord(
        item_key=f"{order_id}:r",
        order_id=order_id,
        captured_amount=1000,
        reference="r",
        fingerprint=request_fingerprint(order_id, request),
    )
    async with SQLiteJournal(path, clock=fake.now) as journal:
        left = await journal.claim(record, "key-of-the-crashed-run", run_id="crashed")
    fake.advance_clock(25 * 3600)
    stepped = False

    def clock() -> datetime:
        nonlocal stepped
        stepped = stepped or threading.current_thread() is not threading.main_thread()
        return fake.now() + timedelta(hours=3 if stepped else 0)

    async with SQLiteJournal(path, clock=clock) as journal:
        [outcome], stopped = await run(om, [(order_id, request)], journal)
        [entry] = await journal.entries()
    assert stepped
    assert outcome.status is CaptureStatus.FAILED
    assert isinstance(outcome.error, ClockSkewError)
    assert outcome.error.outcome_unknown
    assert outcome.idempotency_key == outcome.error.idempotency_key == "key-of-the-crashed-run"
    assert (entry.status, entry.idempotency_key) == (
        JournalStatus.IN_FLIGHT,
        "key-of-the-crashed-run",
    )
    assert left.entry == entry
    assert stopped is None  # its only item has its outcome
    assert booked(fake) == {}


@pytest.mark.parametrize("bad", ["..", "ab\ncd"])
async def test_a_first_item_whose_order_id_cannot_be_sent_is_refused_not_a_stop(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path, bad: str
) -> None:
    """The read of Klarna's time took the first item's order id, which the client refuses
    to send: the whole batch stopped ("Klarna's time could not be learned"), its clock
    right, its other items unsent (helper-87). Only that item is refused, as without a
    journal."""
    items = [(bad, CaptureRequest(captured_amount=1000)), *captures(fake, 2)]
    async with SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now) as journal:
        outcomes, stopped = await run(om, items, journal)
        entries = await journal.entries()
    assert stopped is None
    assert [o.status for o in outcomes] == [
        CaptureStatus.REFUSED,
        CaptureStatus.CAPTURED,
        CaptureStatus.CAPTURED,
    ]
    assert isinstance(outcomes[0].error, ValidationError)
    assert "order_id" in str(outcomes[0].error)
    assert booked(fake) == {order_id: 1 for order_id, _ in items[1:]}
    assert len(entries) == 2


async def test_a_key_resent_is_checked_against_an_answer_that_came_after_its_claim(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    """A long-lived client's last answer and the journal's clock, both held by a pause (a
    snapshot restored: this machine's clocks stood still while Klarna's went on 25 hours),
    agree: the rerun judged the earlier run's key young and resent it, after Klarna had
    forgotten it (helper-87: booked twice). Nothing is resent; the key is reported."""
    path = tmp_path / "j.sqlite"
    order_id, items, first = await left_unknown(om, fake, path, DropAfterProcessing())
    held = fake.now()
    fake.advance_clock(DAY + 3600)
    async with SQLiteJournal(path, clock=lambda: held) as journal:
        [second], stopped = await run(om, [*items, *captures(fake, 1)], journal)
        [entry] = await journal.entries(order_id=order_id)
    assert second.status is CaptureStatus.FAILED
    assert isinstance(second.error, ClockSkewError)
    assert "1 day 1 h behind Klarna's" in str(second.error)
    assert second.error.outcome_unknown
    assert second.idempotency_key == second.error.idempotency_key == first.idempotency_key
    assert (entry.status, entry.idempotency_key) == (JournalStatus.FAILED, first.idempotency_key)
    assert isinstance(stopped, BatchAbortedError)
    assert booked(fake) == {order_id: 1}


async def test_a_clock_off_for_the_claims_own_reading_is_caught(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    """A journal clock a day behind for the one reading the claim took, right before and
    after it: the claim judged a key Klarna had forgotten young and resent it, and the
    checks around it, reading the clock again, passed (helper-87: booked twice). The time
    the claim was made at is checked; the next claim, on the right clock, reconciles."""
    glitch = False

    def clock() -> datetime:
        nonlocal glitch
        if glitch and sys._getframe(1).f_code.co_name == "claim":
            glitch = False
            return fake.now() - timedelta(days=1)
        return fake.now()

    journal = MemoryJournal(clock=clock)
    order_id = fake.add_order(amount=3000)
    items = [(order_id, CaptureRequest(captured_amount=1000, reference="r"))]
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    [first], _ = await run(om, items, journal)
    fake.clear_faults()
    fake.advance_clock(DAY + 3600)
    glitch = True
    [second], stopped = await run(om, items, journal)
    assert stopped is None
    assert second.status is CaptureStatus.CAPTURED  # reconciled: found by its reference
    assert booked(fake) == {order_id: 1}
    assert first.idempotency_key == second.idempotency_key


async def test_a_journal_without_a_clock_is_not_checked_nor_stopped(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    """A journal written to the ``Journal`` protocol, which lists no ``clock``: its claims
    cannot be checked (the guide says so), and a fresh client's batch refused every item
    ("Klarna's answers tell no time") though every answer had a Date (helper-89)."""

    class OwnJournal:
        def __init__(self) -> None:
            self._inner = MemoryJournal(clock=fake.now)
            self.claim = self._inner.claim
            self.finish = self._inner.finish
            self.entries = self._inner.entries
            self.key_expired = self._inner.key_expired

    items = captures(fake, 2)
    outcomes, stopped = await run(om, items, OwnJournal())  # type: ignore[arg-type]
    each_captured_once(fake, items, outcomes, stopped)


async def test_a_5xx_tells_no_time_a_key_could_be_resent_by(tmp_path: Path) -> None:
    """A 5xx may come from a proxy in front of Klarna, by its own clock: one on this
    machine, held by the same pause as the journal's clock, agreed with it, and an earlier
    run's key Klarna had forgotten was resent (helper-89). Only Klarna's own answers (and
    no 5xx) tell its time; the read got none, so nothing is sent."""
    held = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    posts: list[str | None] = []

    async def order(_request: web.Request) -> web.Response:
        stale = held.strftime("%a, %d %b %Y %H:%M:%S GMT")
        return web.Response(status=503, text="upstream reset", headers={"Date": stale})

    async def capture(request: web.Request) -> web.Response:
        posts.append(request.headers.get("Klarna-Idempotency-Key"))
        return web.Response(status=201, headers={"Capture-Id": "c1"})

    app = web.Application()
    app.router.add_get("/ordermanagement/v1/orders/{order_id}", order)
    app.router.add_post("/ordermanagement/v1/orders/{order_id}/captures", capture)
    request = CaptureRequest(captured_amount=1000, reference="r")
    record = ItemRecord(
        item_key="o1:r",
        order_id="o1",
        captured_amount=1000,
        reference="r",
        fingerprint=request_fingerprint("o1", request),
    )
    journal = MemoryJournal(clock=lambda: held)
    await journal.claim(record, "key-of-the-earlier-run", run_id="earlier")
    retry = RetryPolicy(max_attempts=2, jitter=lambda d: d, sleep=lambda _s: asyncio.sleep(0))
    async with served_app(app) as url, KlarnaOM("u", "p", base_url=url, retry=retry) as om:
        [outcome], _ = await run(om, [("o1", request)], journal)
    assert posts == []
    assert outcome.status is CaptureStatus.FAILED
    assert isinstance(outcome.error, ClockSkewError)
    assert "Klarna's time could not be learned" in str(outcome.error)
    assert outcome.idempotency_key == "key-of-the-earlier-run"


async def test_a_machine_that_slept_while_klarnas_time_was_read_is_not_stopped(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    fake.inject(Delay(0.2), method="GET")
    items = captures(fake, 4)

    async def sleep_during_the_read() -> None:
        await fake.wait_for_requests(1)
        fake.advance_clock(600)  # ten minutes for Klarna and the journal, not for monotonic

    async with SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now) as journal:
        sleeper = asyncio.ensure_future(sleep_during_the_read())
        outcomes, stopped = await run(om, items, journal, concurrency=2)
        await sleeper
    each_captured_once(fake, items, outcomes, stopped)


async def test_klarnas_time_is_read_once_when_the_read_gets_no_answer(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    """Every waiting item read it again in turn, each for the whole retry policy: at
    concurrency 128, two hours before the batch ended (helper-84)."""
    fake.inject(DropConnection(), method="GET", times=None)
    items = captures(fake, 12)
    async with SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now) as journal:
        outcomes, stopped = await run(om, items, journal, concurrency=8)
    reads = [r for r in fake.requests if r.method == "GET"]
    assert len({r.path for r in reads}) == 1  # one item's order read, with its retries
    assert len(reads) <= 2 * om.retry_policy.max_attempts  # (aiohttp retries a GET once)
    assert {o.status for o in outcomes} == {CaptureStatus.REFUSED}
    assert isinstance(stopped, BatchAbortedError)
    assert booked(fake) == {}


async def test_each_item_stopped_by_the_clock_has_an_error_of_its_own(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path
) -> None:
    fake.inject(DropConnection(), method="GET", times=None)
    items = captures(fake, 3)
    async with SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now) as journal:
        outcomes, _ = await run(om, items, journal, concurrency=3)
    errors = [o.error for o in outcomes]
    assert len({id(e) for e in errors}) == len(errors) == 3
    assert all(isinstance(e, ClockSkewError) and e.idempotency_key is None for e in errors)
    assert not any(o.error and o.error.outcome_unknown for o in outcomes)


@pytest.mark.parametrize("seconds", [-270.0, 270.0])
async def test_a_clock_within_the_allowed_skew_runs(
    om: KlarnaOM, fake: FakeKlarna, tmp_path: Path, seconds: float
) -> None:
    assert timedelta(seconds=abs(seconds)) < MAX_CLOCK_SKEW
    items = captures(fake, 6)
    async with SQLiteJournal(tmp_path / "j.sqlite", clock=off_by(fake, seconds)) as journal:
        outcomes, stopped = await run(om, items, journal, concurrency=2)
    each_captured_once(fake, items, outcomes, stopped)


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
    assert (clock.dated, clock.now()) == (0, None)
    clock.saw("Tue, 01 Dec 2026 10:00:00 GMT")
    ticks[0] += 30.5  # no answer for half a minute: Klarna's time moved on all the same
    assert clock.now() == datetime(2026, 12, 1, 10, 0, 30, 500_000, tzinfo=UTC)
    clock.saw("Tue, 01 Dec 2026 10:00:00 GMT")  # the same second: counted from this answer
    assert (clock.dated, clock.now()) == (2, datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC))
    clock.saw("not a date")
    clock.saw("not a date")
    assert (clock.dated, clock.now()) == (2, None)
    clock.saw("Tue, 01 Dec 2026 10:00:31 -0000")
    assert (clock.dated, clock.now()) == (3, datetime(2026, 12, 1, 10, 0, 31, tzinfo=UTC))
