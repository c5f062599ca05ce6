"""The SQLite journal applies the calls of one event-loop turn together (one transaction):
every call must still get what it would get alone, in call order.

MemoryJournal, which applies each call on its own, is the oracle.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klarna_om_async.journal import (
    ItemRecord,
    Journal,
    JournalEntry,
    JournalStatus,
    MemoryJournal,
)
from klarna_om_async.sqlite_journal import SQLiteJournal

NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
# Two items per order: a new item's only possible sibling is the other one, so which
# sibling a conflict names does not depend on the journal.
ORDER_OF = {"a1": "A", "a2": "A", "b1": "B", "b2": "B"}

Call = Callable[[Journal], Awaitable[object]]


def record(item_key: str, order_id: str | None = None, amount: int = 100) -> ItemRecord:
    order_id = order_id or ORDER_OF[item_key]
    return ItemRecord(
        item_key=item_key,
        order_id=order_id,
        captured_amount=amount,
        reference=None,
        fingerprint=f"{order_id}/{amount}",
    )


def claim(item: ItemRecord, key: str, run_id: str | None = "run-1") -> Call:
    return lambda j: j.claim(item, key, run_id=run_id)


def finish(item_key: str, status: JournalStatus, **kwargs: Any) -> Call:
    return lambda j: j.finish(item_key, status, **kwargs)


async def outcomes(j: Journal, calls: list[Call]) -> list[object]:
    """Every call made in one loop turn; exceptions by type (their texts may name objects)."""
    results = await asyncio.gather(*(call(j) for call in calls), return_exceptions=True)
    return [type(r) if isinstance(r, BaseException) else r for r in results]


async def both(path: Path, turns: list[list[Call]]) -> None:
    """The turns against SQLite (each turn one group) and MemoryJournal: the same answers."""
    memory = MemoryJournal(clock=lambda: NOW)
    async with SQLiteJournal(path, clock=lambda: NOW) as j:
        for calls in turns:
            commits = j.commits
            got = await outcomes(j, calls)
            assert j.commits == commits + 1  # the turn was one group
            assert got == [(await outcomes(memory, [call]))[0] for call in calls]
        assert await j.entries() == await memory.entries()


def poison(path: Path, action: str) -> None:
    """Make inserting the item 'poison' fail: ABORT fails the statement, ROLLBACK all."""
    with sqlite3.connect(path) as other:
        other.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON journal WHEN NEW.item_key = 'poison'"
            f" BEGIN SELECT RAISE({action}, 'poisoned'); END"
        )
    other.close()


async def test_claim_finish_claim_of_one_item_in_one_turn(tmp_path: Path) -> None:
    a1 = record("a1")
    calls = [
        claim(a1, "k1"),
        finish("a1", JournalStatus.REFUSED, attempts=1),
        claim(a1, "k2"),  # refused without doubt: a new key
        finish("a1", JournalStatus.FAILED, attempts=1),
        claim(a1, "k3"),  # failed: the same key k2, resent
    ]
    await both(tmp_path / "j.sqlite", [calls])


async def test_a_duplicate_item_in_one_turn(tmp_path: Path) -> None:
    b1 = record("b1")
    calls = [
        claim(b1, "k1"),
        claim(b1, "k2"),
        finish("b1", JournalStatus.CAPTURED),
        claim(b1, "k3"),
    ]
    await both(tmp_path / "j.sqlite", [calls, [claim(b1, "k4"), claim(record("b2"), "k4")]])


async def test_calls_that_see_each_others_writes_in_one_turn(tmp_path: Path) -> None:
    turns = [
        # run-1 leaves a1 unknown; in the same turn run-2 claims a2, its sibling, then b1 and b2
        # take one key, then a2 is claimed by run-1 (no sibling of its own run).
        [
            claim(record("a1"), "k1"),
            finish("a1", JournalStatus.FAILED),
            claim(record("a2"), "k2", run_id="run-2"),
            claim(record("b1"), "k3"),
            claim(record("b2"), "k3"),
            claim(record("a2"), "k4"),
        ],
        # a key of an item read in this turn; an item journaled for another order
        [
            claim(record("b2"), "k1"),
            finish("a1", JournalStatus.CAPTURED),
            claim(record("a1", "B"), "k5"),
        ],
    ]
    await both(tmp_path / "j.sqlite", turns)


async def test_one_key_claimed_for_two_items_in_one_turn(tmp_path: Path) -> None:
    turns = [
        [claim(record("a1"), "k1"), claim(record("b1"), "k1", run_id=None)],
        [claim(record("a2"), "k2", run_id=None), claim(record("b2"), "k2")],
    ]
    await both(tmp_path / "j.sqlite", turns)


async def test_a_key_missing_from_the_keys_table_is_taken_back_first(tmp_path: Path) -> None:
    # A row whose key the keys table lacks (edited by hand): resending it records the key,
    # so a new item asking for that key in the same turn is refused.
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        await j.claim(record("a1"), "k1")
        await j.finish("a1", JournalStatus.FAILED)
        with sqlite3.connect(path) as other:
            other.execute("DELETE FROM keys")
        other.close()
        resent, other_item = await asyncio.gather(
            j.claim(record("a1"), "k9"), j.claim(record("b1"), "k1")
        )
        assert (resent.action, resent.entry.idempotency_key) == ("send", "k1")
        assert other_item.action == "conflict"


async def test_decisions_that_fail_fail_alone(tmp_path: Path) -> None:
    calls = [
        claim(record("a1"), "k1"),
        finish("ghost", JournalStatus.CAPTURED),  # never claimed: LookupError
        finish("a1", JournalStatus.CAPTURED, attempts=-1),  # ValueError
        finish("a1", JournalStatus.CAPTURED, attempts=1),
        claim(record("b1"), "k2"),
    ]
    await both(tmp_path / "j.sqlite", [calls])


async def test_a_failed_statement_fails_its_own_call_only(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        poison(path, "ABORT")
        unbindable = ItemRecord(
            item_key="odd",
            order_id="O",
            captured_amount=100,
            reference=["not", "text"],  # type: ignore[arg-type]
            fingerprint="f",
        )
        calls = [
            claim(record("a1"), "k1"),
            claim(record("poison", "P"), "k2"),
            claim(record("b1"), "k3"),
            claim(unbindable, "k4"),
            finish("a1", JournalStatus.CAPTURED, capture_id="c1"),
        ]
        commits = j.commits
        got = await asyncio.gather(*(call(j) for call in calls), return_exceptions=True)
        assert j.commits == commits + 1
        assert isinstance(got[1], sqlite3.IntegrityError)
        assert isinstance(got[3], sqlite3.Error)
        assert got[4] is JournalStatus.CAPTURED
        entries = {e.item_key: e for e in await j.entries()}
        assert {k: e.status for k, e in entries.items()} == {
            "a1": JournalStatus.CAPTURED,
            "b1": JournalStatus.IN_FLIGHT,
        }
        # The keys of the failed claims were not taken: other items may have them.
        assert (await j.claim(record("b2"), "k2")).action == "send"


items = st.sampled_from(sorted(ORDER_OF))
calls = st.one_of(
    st.builds(
        claim,
        st.builds(record, items, amount=st.sampled_from([100, 100, 200])),
        st.sampled_from(["k1", "k2", "k3", "k4", "k5"]),
        st.sampled_from([None, "run-1", "run-2"]),
    ),
    st.builds(
        finish,
        items,
        st.sampled_from(list(JournalStatus)),
        capture_id=st.sampled_from([None, "c1"]),
        error=st.sampled_from([None, "refused\nby Klarna"]),
        attempts=st.integers(-1, 2),
        reconciled=st.booleans(),
    ),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(calls, min_size=1, max_size=8), min_size=1, max_size=4))
def test_any_turns_decide_as_one_call_after_another(turns: list[list[Call]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(both(Path(folder) / "j.sqlite", turns))


@pytest.mark.parametrize("size", [1, 2, 300, 600])
async def test_large_turns(tmp_path: Path, size: int) -> None:
    # More values than one statement takes (_IN_MAX), and odd sizes.
    batch = [record(f"item-{i}", f"order-{i % 7}") for i in range(size)]
    turns = [
        [claim(item, f"key-{i}", run_id=None) for i, item in enumerate(batch)],
        [finish(item.item_key, JournalStatus.CAPTURED) for item in batch]
        + [claim(item, f"key-{i}") for i, item in enumerate(batch)],
    ]
    await both(tmp_path / "j.sqlite", turns)


async def test_a_rolled_back_transaction_fails_the_whole_group(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        poison(path, "ROLLBACK")
        # The poisoned claim is applied alone (after another kind of call), yet takes all down.
        got = await asyncio.gather(
            j.claim(record("a1"), "k1"),
            j.summary(),
            j.claim(record("poison", "P"), "k2"),
            return_exceptions=True,
        )
        assert [type(r) for r in got] == [sqlite3.IntegrityError] * 3
        assert await j.entries() == []


async def test_commit_listeners_hear_each_group_on_the_loop_thread(tmp_path: Path) -> None:
    heard: list[tuple[float, int, int]] = []

    def listener(seconds: float, entries: int) -> None:
        heard.append((seconds, entries, threading.get_ident()))

    async with SQLiteJournal(tmp_path / "j.sqlite") as j:
        j.commit_listeners.append(listener)
        commits = j.commits
        # One turn: two claims that send, one that does not (a conflict), one read.
        got = await outcomes(
            j,
            [
                claim(record("a1"), "k1"),
                claim(record("b1"), "k2"),
                claim(record("b2"), "k2"),
                lambda j: j.entries(),
            ],
        )
        assert [c.action for c in got[:3]] == ["send", "send", "conflict"]  # type: ignore[attr-defined]
        await outcomes(j, [finish("a1", JournalStatus.CAPTURED, capture_id="c1")])
        await j.entries()  # a group of reads only
        assert j.commits == commits + 3
    assert [entries for _, entries, _ in heard] == [2, 1, 0]
    assert all(seconds > 0 for seconds, _, _ in heard)
    assert {thread for _, _, thread in heard} == {threading.get_ident()}


async def test_a_failing_commit_listener_is_reported_and_changes_nothing(tmp_path: Path) -> None:
    reported: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
    heard: list[int] = []

    def broken(seconds: float, entries: int) -> None:
        raise RuntimeError("listener broke")

    async with SQLiteJournal(tmp_path / "j.sqlite") as j:
        j.commit_listeners.extend([broken, lambda seconds, entries: heard.append(entries)])
        assert (await j.claim(record("a1"), "k1")).action == "send"
        assert await j.finish("a1", JournalStatus.CAPTURED, capture_id="c1") == "captured"
        # Without listeners, nothing is measured or reported.
        j.commit_listeners.clear()
        assert (await j.claim(record("b1"), "k2")).action == "send"
    assert heard == [1, 1]
    assert [type(c["exception"]) for c in reported] == [RuntimeError, RuntimeError]
    assert "commit listener" in reported[0]["message"]


class _CountingSteps:
    """``sqlite3.connect`` that counts the virtual-machine steps of every connection it makes
    (a progress handler every 10 steps), so a test can tell how much a call read."""

    def __init__(self, connect: Callable[..., sqlite3.Connection]) -> None:
        self.steps = 0
        self._connect = connect

    def _tick(self) -> int:
        self.steps += 10
        return 0  # 0: go on

    def __call__(self, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = self._connect(*args, **kwargs)
        conn.set_progress_handler(self._tick, 10)
        return conn


async def _rerun_claim_steps(path: Path, items: int, counting: _CountingSteps) -> float:
    """Steps per claim of a rerun (another run) over an order whose ``items`` are captured."""
    records = [record(f"o:{i}", "O") for i in range(items)]
    async with SQLiteJournal(path, durability="normal") as journal:
        await asyncio.gather(
            *(journal.claim(r, f"k{i}", run_id="run-1") for i, r in enumerate(records))
        )
        await asyncio.gather(*(journal.finish(r.item_key, JournalStatus.CAPTURED) for r in records))
        counting.steps = 0
        claims = await asyncio.gather(
            *(journal.claim(r, f"x{i}", run_id="run-2") for i, r in enumerate(records))
        )
    assert {c.action.value for c in claims} == {"skip"}
    return counting.steps / items


async def test_a_rerun_claim_of_a_journaled_item_reads_no_other_item_of_its_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a new or refused item is checked against its order's unsettled items; a claim
    # that read the whole order anyway made a rerun of a large order quadratic.
    counting = _CountingSteps(sqlite3.connect)
    monkeypatch.setattr("klarna_om_async.sqlite_journal.sqlite3.connect", counting)
    small = await _rerun_claim_steps(tmp_path / "small.sqlite", 20, counting)
    large = await _rerun_claim_steps(tmp_path / "large.sqlite", 400, counting)
    assert large < small * 2, (small, large)


async def test_an_item_in_flight_that_ends_captured_is_finished_without_reading_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The common finish writes in one statement; any other standing is read first, and
    # still recorded as journal._finish_change decides (the oracle tests above).
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr("klarna_om_async.sqlite_journal.sqlite3.connect", traced)
    async with SQLiteJournal(tmp_path / "j.sqlite") as journal:
        for item_key in ("a1", "b1"):
            assert (await journal.claim(record(item_key), f"k-{item_key}")).action == "send"
        await journal.finish("b1", JournalStatus.FAILED, attempts=1)
        statements.clear()
        assert await journal.finish("a1", JournalStatus.CAPTURED, attempts=2) == "captured"
        in_flight = [s for s in statements if s.lstrip().startswith(("SELECT", "UPDATE"))]
        statements.clear()
        assert await journal.finish("b1", JournalStatus.CAPTURED, attempts=1) == "captured"
        failed = [s for s in statements if s.lstrip().startswith(("SELECT", "UPDATE"))]
        entries = {e.item_key: e for e in await journal.entries()}
    assert [s.split()[0] for s in in_flight] == ["UPDATE"]
    assert [s.split()[0] for s in failed] == ["UPDATE", "SELECT", "UPDATE"]
    assert (entries["a1"].attempts, entries["a1"].uncertain) == (2, False)
    assert (entries["b1"].attempts, entries["b1"].uncertain) == (2, False)


async def test_the_one_statement_finish_refuses_what_a_finish_always_refused(
    tmp_path: Path,
) -> None:
    # Arguments the batch never passes take the read path: an item never claimed is named
    # first, and attempts past SQLite's integers stop at its largest.
    async with SQLiteJournal(tmp_path / "j.sqlite") as journal:
        with pytest.raises(LookupError, match="never claimed"):
            await journal.finish("a1", JournalStatus.CAPTURED, error=ValueError("x"))  # type: ignore[arg-type]
        assert (await journal.claim(record("a1"), "k1")).action == "send"
        await journal.finish("a1", JournalStatus.FAILED, attempts=1)
        assert (await journal.claim(record("a1"), "k1")).action == "send"
        await journal.finish("a1", JournalStatus.CAPTURED, attempts=2**63 - 1)
        [entry] = await journal.entries()
    assert (entry.status, entry.attempts) == (JournalStatus.CAPTURED, 2**63 - 1)


def _wait_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """An outcome waits an hour for a claim, and a claim is recent for an hour: exact tests."""
    monkeypatch.setattr("klarna_om_async.sqlite_journal._LINGER_S", 3600.0)
    monkeypatch.setattr("klarna_om_async.sqlite_journal._CLAIMED_LATELY_S", 3600.0)


async def test_an_outcome_waits_for_the_next_claim_and_shares_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a batch an item's outcome and the next item's claim come from different items a
    # few milliseconds apart: one commit for both. (A long wait makes the test exact.)
    _wait_long(monkeypatch)
    async with SQLiteJournal(tmp_path / "j.sqlite") as journal:
        for item_key in ("a1", "b1"):  # two items being sent
            assert (await journal.claim(record(item_key), f"k-{item_key}")).action == "send"
        commits = journal.commits
        finishing = asyncio.ensure_future(journal.finish("a1", JournalStatus.CAPTURED))
        # Sent on its own, the outcome would be committed within this wait (a few ms); it
        # waits for the claim instead (the wait bounds the test, not the library).
        done, _ = await asyncio.wait({finishing}, timeout=0.5)
        assert not done
        assert journal.commits == commits
        assert (await journal.claim(record("a2"), "k-a2")).action == "send"
        assert await finishing == "captured"
        assert journal.commits == commits + 1


async def test_an_outcome_of_the_item_claimed_last_does_not_wait_for_a_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One item at a time (concurrency 1, an order's items in turn, the others stuck or
    # abandoned by a cancelled batch): the next claim can only come after this outcome.
    _wait_long(monkeypatch)
    async with SQLiteJournal(tmp_path / "j.sqlite") as journal:
        for item_key in ("b1", "b2"):  # in flight, never finished here
            assert (await journal.claim(record(item_key), f"k-{item_key}")).action == "send"
        for item_key in ("a1", "a2"):
            assert (await journal.claim(record(item_key), f"k-{item_key}")).action == "send"
            finishing = journal.finish(item_key, JournalStatus.CAPTURED)
            assert await asyncio.wait_for(finishing, timeout=30) == "captured"


async def test_a_read_or_close_sends_a_waiting_outcome_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _wait_long(monkeypatch)
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as journal:
        for item_key in ("a1", "b1", "a2"):
            assert (await journal.claim(record(item_key), f"k-{item_key}")).action == "send"
        finishing = asyncio.ensure_future(journal.finish("a1", JournalStatus.CAPTURED))
        await asyncio.sleep(0)  # the finish is queued, waiting for a claim
        [entry] = await journal.entries(item_key="a1")  # a read after it sees it
        assert entry.status is JournalStatus.CAPTURED
        assert await finishing == "captured"
        closing = asyncio.ensure_future(journal.finish("b1", JournalStatus.FAILED))
        await asyncio.sleep(0)
    assert await closing == "failed"  # closing wrote it, without waiting
    async with SQLiteJournal(path) as journal:
        [entry] = await journal.entries(item_key="b1")
    assert entry.status is JournalStatus.FAILED


def test_an_outcome_left_waiting_by_an_ended_loop_does_not_stall_the_next_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncio.run may end while an outcome waits for a claim: its timer never runs, and a
    # later loop using the same journal must not wait for it (it waited for ever).
    _wait_long(monkeypatch)
    journal = SQLiteJournal(tmp_path / "j.sqlite")

    async def first() -> None:
        await journal.open()
        for item_key in ("a1", "b1", "a2"):
            assert (await journal.claim(record(item_key), f"k-{item_key}")).action == "send"
        waiting = asyncio.ensure_future(journal.finish("a1", JournalStatus.CAPTURED))
        await asyncio.sleep(0)
        assert not waiting.done()  # asyncio.run cancels its caller; the write stays queued

    async def second() -> list[JournalEntry]:
        finishing = journal.finish("b1", JournalStatus.CAPTURED)
        assert await asyncio.wait_for(finishing, timeout=30) == "captured"
        entries = await journal.entries()
        await journal.close()
        return entries

    asyncio.run(first())
    monkeypatch.setattr("klarna_om_async.sqlite_journal._LINGER_S", 0.005)  # still waits
    entries = {e.item_key: e.status for e in asyncio.run(second())}
    assert entries == {"a1": "captured", "b1": "captured", "a2": "in_flight"}


async def test_outcomes_of_items_claimed_together_are_written_to_few_pages(
    tmp_path: Path,
) -> None:
    # Each page a commit changes is written to the WAL. Order ids as random as Klarna's
    # spread items keyed by order over the whole table, so 60 outcomes written together
    # changed some 60 pages; rows in claim order put them on a few.
    path = tmp_path / "j.sqlite"
    items = [record(f"{uuid.uuid4()}:ref", f"order-{n}") for n in range(3060)]
    async with SQLiteJournal(path) as j:
        for group in (items[:3000], items[3000:]):
            await asyncio.gather(*(j.claim(item, str(uuid.uuid4())) for item in group))
        await asyncio.gather(
            *(
                j.finish(item.item_key, JournalStatus.CAPTURED, capture_id="c")
                for item in items[:3000]
            )
        )
        with sqlite3.connect(path) as other:  # the journal is idle: empty its WAL
            assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
            (page_size,) = other.execute("PRAGMA page_size").fetchone()
        other.close()
        await asyncio.gather(
            *(
                j.finish(item.item_key, JournalStatus.CAPTURED, capture_id="c")
                for item in items[3000:]
            )
        )
        wal = await asyncio.to_thread(os.path.getsize, f"{path}-wal")
    frames = (wal - 32) // (page_size + 24)
    assert 0 < frames <= 8


async def test_a_claim_reads_none_of_its_own_runs_items_of_the_order(tmp_path: Path) -> None:
    # A new item's claim looks for another run's unsettled item of its order. It read every
    # item of the order, its own run's too: a first run of 8,000 items of one order took
    # seconds of claims. Counted in SQLite's steps, not in time.
    from klarna_om_async.sqlite_journal import _CLAIM_READ

    def steps(path: Path, order_id: str) -> int:
        count = 0

        def step() -> int:
            nonlocal count
            count += 1
            return 0

        with sqlite3.connect(path) as conn:
            conn.set_progress_handler(step, 1)
            params = {
                "key": "new-key",
                "item_key": f"{order_id}:new",
                "order_id": order_id,
                "run_id": "run-1",
            }
            conn.execute(_CLAIM_READ, params)
            conn.set_progress_handler(None, 1)
        conn.close()
        return count

    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        for order_id, size in (("small", 10), ("large", 1000)):
            items = [record(f"{order_id}:{n}", order_id) for n in range(size)]
            await asyncio.gather(
                *(j.claim(item, f"k-{item.item_key}", run_id="run-1") for item in items)
            )
    assert steps(path, "large") < steps(path, "small") + 50  # not the 990 items more


@pytest.mark.parametrize("other_run", [None, "run-0", "run-2"])
async def test_a_new_item_waits_for_any_other_runs_unsettled_item_of_its_order(
    tmp_path: Path, other_run: str | None
) -> None:
    # The search reads three ranges (no run, runs before and after this one in text order):
    # an unsettled item of each must hold a new item of its order back, as before.
    async with SQLiteJournal(tmp_path / "j.sqlite") as j:
        assert (await j.claim(record("a1"), "k-a1", run_id=other_run)).action == "send"
        assert (await j.claim(record("b1"), "k-b1", run_id="run-1")).action == "send"
        held = await j.claim(record("a2"), "k-a2", run_id="run-1")
        sent = await j.claim(record("b2"), "k-b2", run_id="run-1")  # its own run's: sent
    assert (held.action, sent.action) == ("conflict", "send")
    assert "under item 'a1'" in (held.reason or "")
