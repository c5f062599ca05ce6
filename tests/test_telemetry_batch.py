"""OpenTelemetry for batches, reconciliation and the journal, against FakeKlarna over loopback:
a batch is one span with its counts, each item's calls a trace of their own linked to it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from test_telemetry import Telemetry, attributes, client, one, points
from test_telemetry import otel as otel  # the fixture, shared with test_telemetry

from klarna_om_async import (
    BatchItem,
    CaptureRequest,
    CaptureStatus,
    JournalStatus,
    KlarnaOM,
    MemoryJournal,
    ReleaseRemainingAuthorization,
    SQLiteJournal,
    Verdict,
)
from klarna_om_async.batch import batch_listeners, current_batch
from klarna_om_async.middleware import Handler, Request, Response
from klarna_om_async.reconcile import reconcile_listeners
from klarna_om_async.telemetry import instrument_journal
from klarna_om_async.testing import DropAfterProcessing, DropConnection, FakeKlarna, InstantSleep

DAY = 24 * 3600.0


def named(otel: Telemetry, name: str) -> list[ReadableSpan]:
    return [span for span in otel.spans() if span.name == name]


def linked_to(span: ReadableSpan, batch: ReadableSpan) -> bool:
    """Whether ``span`` starts a trace of its own whose one link is ``batch``."""
    assert batch.context is not None
    assert span.context is not None
    return (
        span.parent is None
        and span.context.trace_id != batch.context.trace_id
        and [link.context for link in span.links] == [batch.context]
    )


def items_counter(otel: Telemetry) -> Counter[tuple[str, str]]:
    found = otel.metrics().get("klarna.batch.items")
    counts: Counter[tuple[str, str]] = Counter()
    for point in points(found) if found else ():
        labels = dict(point.attributes or {})
        key = (str(labels["klarna.operation"]), str(labels["klarna.batch.status"]))
        counts[key] += int(point.value)  # type: ignore[union-attr]
    return counts


@pytest.fixture
async def journal(tmp_path: Path, fake: FakeKlarna) -> AsyncIterator[SQLiteJournal]:
    """A journal on disk that shares the fake's (driven) clock."""
    async with SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now) as opened:
        yield opened


async def test_a_batch_is_one_span_with_its_counts_and_each_item_a_trace_linked_to_it(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry
) -> None:
    orders = [fake.add_order(amount=10000) for _ in range(5)]
    amounts = [10000, 10000, 20000, 10000, 10000]  # the third asks for more than authorized
    items = [(o, CaptureRequest(captured_amount=a)) for o, a in zip(orders, amounts, strict=True)]
    tracer = otel.tracer_provider.get_tracer("the user's job")
    async with otel.instrument(client(fake, sleeps)) as om:
        with tracer.start_as_current_span("nightly captures") as job:
            statuses = []
            async for outcome in om.capture_many(items, concurrency=2):
                statuses.append(outcome.status)
                if len(statuses) == 1:  # the consumer's own calls stay in the consumer's trace
                    await om.orders.get(orders[0])
    assert Counter(statuses) == {CaptureStatus.CAPTURED: 4, CaptureStatus.REFUSED: 1}

    batch = one(named(otel, "klarna.batch"))
    assert batch.kind is SpanKind.INTERNAL
    assert batch.parent is not None
    assert batch.parent.span_id == job.get_span_context().span_id
    assert attributes(batch) == {
        "klarna.batch.concurrency": 2,
        "klarna.batch.only": "capture",
        "klarna.batch.items": 5,
        "klarna.batch.captured": 4,
        "klarna.batch.refused": 1,
        "klarna.batch.failed": 0,
        "klarna.batch.skipped": 0,
        "klarna.batch.needs_review": 0,
        "klarna.batch.operation.capture": 5,
    }
    assert batch.status.status_code is StatusCode.UNSET

    calls = named(otel, "klarna.captures.create")
    assert len(calls) == 5
    assert all(linked_to(call, batch) for call in calls)
    assert len({call.context.trace_id for call in calls if call.context}) == 5
    outcomes = Counter(attributes(call)["klarna.outcome"] for call in calls)
    assert outcomes == {"captured": 4, "refused": 1}
    for attempt in otel.spans(SpanKind.CLIENT):  # each attempt stays in its call's trace
        assert attempt.parent is not None
        assert attempt.context is not None
        (parent,) = (
            s for s in otel.spans() if s.context and s.context.span_id == attempt.parent.span_id
        )
        assert parent.context is not None
        assert parent.context.trace_id == attempt.context.trace_id
    read = one(named(otel, "klarna.orders.get"))
    assert read.links == ()
    assert read.parent is not None
    assert read.parent.span_id == job.get_span_context().span_id

    assert items_counter(otel) == {
        ("klarna.captures.create", "captured"): 4,
        ("klarna.captures.create", "refused"): 1,
    }
    assert otel.metrics()["klarna.batch.items"].unit == "{item}"


async def test_a_batch_stopped_early_or_aborted_says_so_on_its_span(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry
) -> None:
    orders = [fake.add_order(amount=100) for _ in range(3)]
    items = [(o, CaptureRequest(captured_amount=100)) for o in orders]
    async with otel.instrument(client(fake, sleeps)) as om:
        outcomes = om.capture_many(items, concurrency=1)
        async with contextlib.aclosing(outcomes):
            async for _ in outcomes:
                break
        wrong = otel.instrument(KlarnaOM(fake.username, "wrong", base_url=fake.base_url))
        async with wrong:
            with pytest.raises(Exception, match="stopped"):
                async for _ in wrong.capture_many(items, concurrency=1):
                    pass
    stopped, aborted = named(otel, "klarna.batch")
    assert attributes(stopped)["klarna.batch.stopped_early"] is True
    assert attributes(stopped)["klarna.batch.items"] == 1
    assert stopped.status.status_code is StatusCode.UNSET
    assert attributes(aborted)["error.type"] == "klarna_om_async.batch.BatchAbortedError"
    assert attributes(aborted)["klarna.batch.not_sent"] == 2
    assert attributes(aborted)["klarna.batch.refused"] == 1
    assert aborted.status.status_code is StatusCode.ERROR


async def test_a_batch_item_reconciled_is_a_reconcile_span_linked_to_its_batch(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry, journal: SQLiteJournal
) -> None:
    order_id = fake.add_order(amount=10000)
    items = [(order_id, CaptureRequest(captured_amount=4000, reference="box-1"))]
    async with otel.instrument(client(fake, sleeps)) as om:
        fake.inject(DropAfterProcessing(), method="POST", times=None)  # booked, answer lost
        [first] = [o async for o in om.capture_many(items, journal=journal)]
        assert first.status is CaptureStatus.FAILED
        fake.clear_faults()
        fake.advance_clock(DAY + 3600)  # Klarna has forgotten the key
        [second] = [o async for o in om.capture_many(items, journal=journal)]
    assert second.status is CaptureStatus.CAPTURED

    _, batch = named(otel, "klarna.batch")
    assert attributes(batch)["klarna.batch.captured"] == 1
    reconciled = one(named(otel, "klarna.reconcile"))
    assert linked_to(reconciled, batch)
    assert attributes(reconciled) == {
        "klarna.order_id": order_id,
        "klarna.item_key": f"{order_id}:box-1",
        "klarna.idempotency_key": first.idempotency_key,
        "klarna.item.operation": "capture",
        "klarna.reconcile.verdict": "captured",
        "klarna.reconcile.evidence": attributes(reconciled)["klarna.reconcile.evidence"],
        "klarna.reconcile.created_id": second.capture_id,
    }
    assert reconciled.context is not None
    # The order read is inside the reconcile (the first run's first read, before it sent
    # anything, told Klarna's time).
    read = one(
        [
            span
            for span in named(otel, "klarna.orders.get")
            if span.parent is not None and span.parent.span_id == reconciled.context.span_id
        ]
    )
    assert read.links == ()


async def test_om_reconcile_is_a_span_per_item_under_the_current_span(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry, journal: SQLiteJournal
) -> None:
    order_id = fake.add_order(amount=10000)
    items = [(order_id, CaptureRequest(captured_amount=4000, reference="box-1"))]
    tracer = otel.tracer_provider.get_tracer("the user's job")
    async with otel.instrument(client(fake, sleeps)) as om:
        fake.inject(DropConnection(), method="POST", times=None)  # never processed
        [first] = [o async for o in om.capture_many(items, journal=journal)]
        fake.advance_clock(DAY + 3600)
        with tracer.start_as_current_span("settle") as job:
            [result] = await om.reconcile(journal)
    assert first.status is CaptureStatus.FAILED
    assert result.verdict is Verdict.NOT_CAPTURED
    reconciled = one(named(otel, "klarna.reconcile"))
    assert reconciled.links == ()
    assert reconciled.parent is not None
    assert reconciled.parent.span_id == job.get_span_context().span_id
    assert attributes(reconciled)["klarna.reconcile.verdict"] == "not_captured"
    assert reconciled.status.status_code is StatusCode.UNSET
    assert reconciled.context is not None
    assert one(
        [
            span
            for span in named(otel, "klarna.orders.get")
            if span.parent is not None and span.parent.span_id == reconciled.context.span_id
        ]
    )


async def test_an_order_that_cannot_be_read_is_an_error_on_the_reconcile_span(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry, journal: SQLiteJournal
) -> None:
    items = [("no-such-order", CaptureRequest(captured_amount=100, reference="r"))]
    async with otel.instrument(client(fake, sleeps)) as om:
        fake.inject(DropConnection(), method="POST", times=None)
        [o async for o in om.capture_many(items, journal=journal)]
        fake.advance_clock(DAY + 3600)
        [result] = await om.reconcile(journal)
    assert result.verdict is None
    reconciled = one(named(otel, "klarna.reconcile"))
    assert attributes(reconciled)["klarna.reconcile.verdict"] == "unread"
    assert attributes(reconciled)["error.type"] == "404"
    assert reconciled.status.status_code is StatusCode.ERROR


async def test_a_mixed_batch_counts_each_operation(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry
) -> None:
    order_id = fake.add_order(amount=10000)
    items = [
        BatchItem(order_id=order_id, request=CaptureRequest(captured_amount=4000)),
        BatchItem(order_id=order_id, request=ReleaseRemainingAuthorization()),
    ]
    async with otel.instrument(client(fake, sleeps)) as om:
        outcomes = [o async for o in om.run_many(items)]
    assert [o.status for o in outcomes] == [CaptureStatus.CAPTURED] * 2
    batch = one(named(otel, "klarna.batch"))
    assert "klarna.batch.only" not in attributes(batch)
    assert attributes(batch)["klarna.batch.operation.capture"] == 1
    assert attributes(batch)["klarna.batch.operation.release"] == 1
    assert attributes(batch)["klarna.batch.captured"] == 2
    assert items_counter(otel) == {
        ("klarna.captures.create", "captured"): 1,
        ("klarna.orders.release_remaining_authorization", "captured"): 1,
    }
    for name in ("klarna.captures.create", "klarna.orders.release_remaining_authorization"):
        assert linked_to(one(named(otel, name)), batch)


class BrokenJournal(MemoryJournal):
    """A journal whose disk fails as a verdict is written."""

    async def finish(self, item_key: str, status: JournalStatus, **fields: Any) -> JournalStatus:
        if fields.get("reconciled"):
            raise OSError("disk full")
        return await super().finish(item_key, status, **fields)


async def test_a_journal_failing_during_a_reconciliation_ends_its_span_with_the_error(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry
) -> None:
    journal = BrokenJournal(clock=fake.now)
    items = [(fake.add_order(amount=100), CaptureRequest(captured_amount=100, reference="r"))]
    async with otel.instrument(client(fake, sleeps)) as om:
        fake.inject(DropConnection(), method="POST", times=None)
        [o async for o in om.capture_many(items, journal=journal)]
        fake.advance_clock(DAY + 3600)
        with pytest.raises(OSError, match="disk full"):
            await om.reconcile(journal)
    reconciled = one(named(otel, "klarna.reconcile"))
    assert attributes(reconciled)["error.type"] == "OSError"
    assert "klarna.reconcile.verdict" not in attributes(reconciled)
    assert reconciled.status.status_code is StatusCode.ERROR
    assert [event.name for event in reconciled.events] == ["exception"]


def journal_metrics(otel: Telemetry) -> tuple[int, float, float]:
    """(commits, seconds, entries) recorded by ``instrument_journal``."""
    found = otel.metrics()
    (duration,) = points(found["klarna.journal.commit.duration"])
    (entries,) = points(found["klarna.journal.commit.entries"])
    assert found["klarna.journal.commit.duration"].unit == "s"
    return duration.count, duration.sum, entries.sum  # type: ignore[union-attr]


async def test_instrument_journal_records_each_group_commit(
    fake: FakeKlarna, otel: Telemetry, tmp_path: Path
) -> None:
    opened = SQLiteJournal(tmp_path / "j.sqlite", clock=fake.now)
    assert instrument_journal(opened, meter_provider=otel.meter_provider) is opened
    instrument_journal(opened, meter_provider=otel.meter_provider)  # again: nothing more
    assert len(opened.commit_listeners) == 1
    orders = [fake.add_order(amount=100) for _ in range(3)]
    async with opened, KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as om:
        outcomes = [
            o
            async for o in om.capture_many(
                [(o, CaptureRequest(captured_amount=100)) for o in orders], journal=opened
            )
        ]
    assert {o.status for o in outcomes} == {CaptureStatus.CAPTURED}
    commits, seconds, entries = journal_metrics(otel)
    assert 2 <= commits <= opened.commits  # at least the claims' and the finishes' groups
    assert seconds > 0
    assert entries >= 6  # 3 claims and 3 finishes, however they were grouped


class Committing:
    """The journal interface ``instrument_journal`` asks for, and nothing else."""

    def __init__(self) -> None:
        self.commit_listeners: list[Callable[[float, int], None]] = []


def test_instrument_journal_listens_to_the_commit_listeners_interface(otel: Telemetry) -> None:
    journal = Committing()
    assert instrument_journal(journal, meter_provider=otel.meter_provider) is journal
    instrument_journal(journal, meter_provider=otel.meter_provider)
    (listener,) = journal.commit_listeners
    listener(0.004, 3)
    listener(0.002, 1)
    assert journal_metrics(otel) == (2, pytest.approx(0.006), 4)


def test_instrument_journal_refuses_a_journal_without_commits() -> None:
    with pytest.raises(TypeError, match="commit_listeners"):
        instrument_journal(MemoryJournal())


async def test_nothing_is_watched_or_recorded_without_instrument(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry, journal: SQLiteJournal
) -> None:
    seen: list[object] = []

    async def note_batch(request: Request, call_next: Handler) -> Response:
        seen.append(current_batch.get())
        return await call_next(request)

    # Another client instrumented in this process installs the hooks; this one is not.
    otel.instrument(KlarnaOM(fake.username, fake.password, base_url=fake.base_url))
    assert len(batch_listeners) == 1
    assert len(reconcile_listeners) == 1
    order_id = fake.add_order(amount=10000)
    items = [(order_id, CaptureRequest(captured_amount=100, reference="r"))]
    plain = client(fake, sleeps, middlewares=[note_batch])
    async with plain:
        fake.inject(DropConnection(), method="POST", times=None)
        [o async for o in plain.capture_many(items, journal=journal)]
        fake.clear_faults()
        fake.advance_clock(DAY + 3600)
        [o async for o in plain.capture_many(items, journal=journal)]
        await plain.reconcile(journal)
    assert seen
    assert all(value == () for value in seen)
    assert otel.spans() == []
    assert otel.metrics() == {}
    otel.instrument(KlarnaOM(fake.username, fake.password, base_url=fake.base_url))
    assert len(batch_listeners) == 1
    assert len(reconcile_listeners) == 1


_IMPORT_INSTALLS_NOTHING = """
import klarna_om_async.telemetry
from klarna_om_async.batch import batch_listeners
from klarna_om_async.reconcile import reconcile_listeners
assert batch_listeners == [] and reconcile_listeners == [], (batch_listeners, reconcile_listeners)
"""


def test_importing_telemetry_installs_no_hook() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(_IMPORT_INSTALLS_NOTHING)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
