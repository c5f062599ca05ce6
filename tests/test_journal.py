from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klarna_om_async.journal import (
    KLARNA_OM_NAMESPACE,
    MAX_KEY_MAX_AGE,
    Claim,
    ClaimAction,
    ItemRecord,
    Journal,
    JournalEntry,
    JournalError,
    JournalInUseError,
    JournalStatus,
    MemoryJournal,
    NotAJournalError,
    deterministic_key,
)
from klarna_om_async.operations import Operation
from klarna_om_async.sqlite_journal import SQLiteJournal

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60


@pytest.fixture(params=["sqlite", "memory"])
async def journal(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Journal]:
    j: SQLiteJournal | MemoryJournal
    j = SQLiteJournal(tmp_path / "j.sqlite") if request.param == "sqlite" else MemoryJournal()
    async with j:
        yield j


def record(
    item_key: str, order_id: str, amount: int = 100, reference: str | None = None
) -> ItemRecord:
    return ItemRecord(
        item_key=item_key,
        order_id=order_id,
        captured_amount=amount,
        reference=reference,
        fingerprint=f"{order_id}/{amount}/{reference}",
    )


async def begin(j: Journal, item_key: str, order_id: str, key: str, amount: int = 100) -> Claim:
    return await j.claim(record(item_key, order_id, amount), key)


async def load(j: Journal) -> dict[str, JournalEntry]:
    return {e.item_key: e for e in await j.entries()}


async def reopen(j: Journal) -> None:
    await j.close()
    assert isinstance(j, SQLiteJournal | MemoryJournal)
    await j.open()


@contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """Hold the database's write lock from another connection, so the writer thread waits."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


# --- shared behaviour: SQLiteJournal and MemoryJournal ---


async def test_begin_then_finish_persists_across_reopen(journal: Journal) -> None:
    await begin(journal, "o1:c1", "o1", "key-1")
    await journal.finish("o1:c1", JournalStatus.CAPTURED, capture_id="cap-1", attempts=2)
    await reopen(journal)

    entry = (await load(journal))["o1:c1"]
    assert entry.order_id == "o1"
    assert entry.idempotency_key == "key-1"
    assert entry.status is JournalStatus.CAPTURED
    assert entry.capture_id == "cap-1"
    assert entry.error is None
    assert entry.attempts == 2
    assert entry.updated_at.utcoffset() == timedelta(0)


async def test_begin_is_durable_as_in_flight_before_any_outcome(journal: Journal) -> None:
    await begin(journal, "o1:c1", "o1", "key-1")
    await reopen(journal)
    entry = (await load(journal))["o1:c1"]
    assert (entry.status, entry.idempotency_key, entry.attempts) == (
        JournalStatus.IN_FLIGHT,
        "key-1",
        0,
    )
    assert entry.capture_id is None


async def test_rebegin_keeps_original_key_and_returns_to_in_flight(journal: Journal) -> None:
    await begin(journal, "o1:c1", "o1", "original")
    await journal.finish("o1:c1", JournalStatus.FAILED, error="timeout", attempts=3)
    await begin(journal, "o1:c1", "o1", "a-new-key-that-must-be-ignored")

    entry = (await load(journal))["o1:c1"]
    assert entry.idempotency_key == "original"
    assert entry.status is JournalStatus.IN_FLIGHT
    assert entry.attempts == 3


async def test_rebegin_after_refusal_takes_the_new_key(journal: Journal) -> None:
    # Nothing was booked under a refused key, and the batch retries with a fresh one.
    await begin(journal, "o1:c1", "o1", "refused-key")
    await journal.finish("o1:c1", JournalStatus.REFUSED, error="CAPTURE_NOT_ALLOWED", attempts=1)
    await begin(journal, "o1:c1", "o1", "fresh-key")
    await begin(journal, "o1:c1", "o1", "yet-another-key")

    entry = (await load(journal))["o1:c1"]
    assert (entry.idempotency_key, entry.status) == ("fresh-key", JournalStatus.IN_FLIGHT)
    assert entry.attempts == 1


async def test_attempts_accumulate_over_runs(journal: Journal) -> None:
    await begin(journal, "o1:c1", "o1", "key-1")
    await journal.finish("o1:c1", JournalStatus.FAILED, error="503", attempts=4)
    await reopen(journal)
    await begin(journal, "o1:c1", "o1", "key-1")
    await journal.finish("o1:c1", JournalStatus.CAPTURED, capture_id="cap-1", attempts=1)

    entry = (await load(journal))["o1:c1"]
    assert entry.attempts == 5
    assert entry.error is None  # the outcome replaces the last error


async def test_attempts_stop_at_the_largest_integer_a_journal_stores(journal: Journal) -> None:
    # SQLite's integers end at 2**63 - 1: the SQLite journal raised OverflowError and kept
    # the item in flight where the memory journal recorded the outcome.
    await begin(journal, "o1:c1", "o1", "key-1")
    await journal.finish("o1:c1", JournalStatus.FAILED, attempts=2)
    await begin(journal, "o1:c1", "o1", "key-1")
    await journal.finish("o1:c1", JournalStatus.CAPTURED, capture_id="cap-1", attempts=2**63 - 1)
    await journal.finish("o1:c1", JournalStatus.CAPTURED, capture_id="cap-1", attempts=2**64)

    entry = (await load(journal))["o1:c1"]
    assert (entry.status, entry.capture_id, entry.attempts) == ("captured", "cap-1", 2**63 - 1)


async def test_load_returns_every_entry(journal: Journal) -> None:
    for i in range(10):
        await begin(journal, f"item-{i}", f"order-{i}", f"key-{i}")
    for i in range(0, 10, 2):
        await journal.finish(f"item-{i}", JournalStatus.REFUSED, error="CAPTURE_NOT_ALLOWED")

    loaded = await load(journal)
    assert sorted(loaded) == sorted(f"item-{i}" for i in range(10))
    assert {e.item_key: e.idempotency_key for e in loaded.values()} == {
        f"item-{i}": f"key-{i}" for i in range(10)
    }
    assert [e.status for _, e in sorted(loaded.items())].count(JournalStatus.REFUSED) == 5


async def test_entries_and_summary_report_every_status(journal: Journal) -> None:
    assert isinstance(journal, SQLiteJournal | MemoryJournal)
    for key in "dcba":
        await begin(journal, key, f"order-{key}", f"key-{key}")
    await journal.finish("a", JournalStatus.CAPTURED, capture_id="cap-a")
    await journal.finish("b", JournalStatus.FAILED, error="line one\nline two")

    assert [e.item_key for e in await journal.entries()] == ["a", "b", "c", "d"]
    assert (await load(journal))["b"].error == "line one line two"
    assert await journal.summary() == {
        JournalStatus.IN_FLIGHT: 2,
        JournalStatus.CAPTURED: 1,
        JournalStatus.REFUSED: 0,
        JournalStatus.FAILED: 1,
        JournalStatus.NEEDS_REVIEW: 0,
    }


async def test_unknown_except_counts_the_items_in_doubt_not_named(journal: Journal) -> None:
    assert isinstance(journal, SQLiteJournal | MemoryJournal)
    for key in "fedcba":
        await begin(journal, key, f"order-{key}", f"key-{key}")
    await journal.finish("a", JournalStatus.CAPTURED, capture_id="cap-a")
    await journal.finish("b", JournalStatus.FAILED, error="lost")
    await journal.finish("e", JournalStatus.NEEDS_REVIEW, error="expired", reconciled=True)
    await journal.finish("f", JournalStatus.REFUSED, error="no")
    count, first = await journal.unknown_except(set())
    assert (count, [e.item_key for e in first]) == (4, ["b", "c", "d", "e"])
    count, first = await journal.unknown_except({"b", "x"}, listed=1)
    assert (count, [e.item_key for e in first]) == (3, ["c"])


async def test_finish_of_an_item_never_begun_is_an_error(journal: Journal) -> None:
    with pytest.raises(LookupError, match="never claimed"):
        await journal.finish("ghost", JournalStatus.CAPTURED)


@pytest.mark.parametrize("status", [None, *JournalStatus])
async def test_item_key_reused_for_another_order_is_a_conflict(
    journal: Journal, status: JournalStatus | None
) -> None:
    await begin(journal, "item", "order-1", "key-1")
    if status is not None and status is not JournalStatus.IN_FLIGHT:
        await journal.finish("item", status, reconciled=True)
    claim = await begin(journal, "item", "order-2", "key-2")
    assert claim.action is ClaimAction.CONFLICT
    assert claim.reason is not None
    assert "'order-1', not 'order-2'" in claim.reason
    entry = (await load(journal))["item"]
    assert (entry.order_id, entry.idempotency_key) == ("order-1", "key-1")


async def test_negative_attempts_are_rejected(journal: Journal) -> None:
    await begin(journal, "item", "order", "key")
    with pytest.raises(ValueError, match="attempts"):
        await journal.finish("item", JournalStatus.FAILED, attempts=-1)


async def test_closed_journal_raises_a_clear_error(journal: Journal) -> None:
    await journal.close()
    await journal.close()  # closing twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        await begin(journal, "item", "order", "key")
    with pytest.raises(RuntimeError, match="closed"):
        await load(journal)
    await reopen(journal)  # leave it open for the fixture's own close


async def test_concurrent_calls_are_all_recorded(journal: Journal) -> None:
    async def capture(i: int) -> None:
        await begin(journal, f"item-{i}", f"order-{i}", f"key-{i}")
        await journal.finish(f"item-{i}", JournalStatus.CAPTURED, capture_id=f"cap-{i}", attempts=1)

    await asyncio.gather(*(capture(i) for i in range(2000)))

    loaded = await load(journal)
    assert len(loaded) == 2000
    assert all(
        (e.status, e.capture_id, e.attempts) == (JournalStatus.CAPTURED, f"cap-{i}", 1)
        for i, e in ((int(k.removeprefix("item-")), e) for k, e in loaded.items())
    )
    if isinstance(journal, SQLiteJournal):
        assert journal.commits < 4000  # 4000 writes: the writer grouped them


async def test_a_refusal_after_an_uncertain_send_stays_failed(journal: Journal) -> None:
    # Run 1 lost the answer; run 2 got a 401 with the same key: that proves nothing.
    await begin(journal, "item", "order", "key-1")
    assert await journal.finish("item", JournalStatus.FAILED, error="timeout") == "failed"
    claim = await begin(journal, "item", "order", "key-2")
    assert (claim.action, claim.entry.idempotency_key) == (ClaimAction.SEND, "key-1")
    recorded = await journal.finish("item", JournalStatus.REFUSED, error="401")
    assert recorded is JournalStatus.FAILED
    claim = await begin(journal, "item", "order", "key-3")
    assert claim.entry.idempotency_key == "key-1"
    # Only a success (or a reconciliation) settles it.
    await journal.finish("item", JournalStatus.CAPTURED, capture_id="cap")
    assert (await begin(journal, "item", "order", "key-4")).action is ClaimAction.SKIP


async def test_a_killed_run_leaves_the_item_uncertain(journal: Journal) -> None:
    await begin(journal, "item", "order", "key-1")  # claimed, never finished
    await begin(journal, "item", "order", "key-2")  # the rerun
    assert await journal.finish("item", JournalStatus.REFUSED) is JournalStatus.FAILED


async def test_a_refused_item_without_doubt_takes_a_new_key_and_new_content(
    journal: Journal,
) -> None:
    await begin(journal, "item", "order", "key-1", amount=7000)
    await journal.finish("item", JournalStatus.REFUSED, error="CAPTURE_NOT_ALLOWED")
    claim = await begin(journal, "item", "order", "key-2", amount=5000)
    assert (claim.action, claim.entry.idempotency_key) == (ClaimAction.SEND, "key-2")
    assert claim.entry.captured_amount == 5000


@pytest.mark.parametrize("status", [JournalStatus.FAILED, JournalStatus.IN_FLIGHT])
async def test_an_edited_unknown_item_is_a_conflict_naming_both_amounts(
    journal: Journal, status: JournalStatus
) -> None:
    await begin(journal, "item", "order", "key-1", amount=1000)
    await journal.finish("item", status)
    claim = await begin(journal, "item", "order", "key-2", amount=7000)
    assert claim.action is ClaimAction.CONFLICT
    assert claim.reason is not None
    assert "7000 now, 1000 in the journal" in claim.reason
    assert "key-1" in claim.reason
    assert (await load(journal))["item"].idempotency_key == "key-1"


async def test_a_captured_item_is_never_reopened(journal: Journal) -> None:
    await begin(journal, "item", "order", "key-1", amount=1000)
    await journal.finish("item", JournalStatus.CAPTURED, capture_id="cap-1")
    assert await journal.finish("item", JournalStatus.FAILED) is JournalStatus.CAPTURED
    changed = await begin(journal, "item", "order", "key-2", amount=3000)
    assert changed.action is ClaimAction.CONFLICT
    assert changed.reason is not None
    assert "already captured (capture cap-1)" in changed.reason
    entry = (await load(journal))["item"]
    assert (entry.status, entry.capture_id) == (JournalStatus.CAPTURED, "cap-1")


async def test_a_key_of_another_item_is_a_conflict(journal: Journal) -> None:
    await begin(journal, "a", "order-a", "shared-key")
    claim = await begin(journal, "b", "order-b", "shared-key")
    assert claim.action is ClaimAction.CONFLICT
    assert claim.reason is not None
    assert "already belongs to item 'a'" in claim.reason
    assert "b" not in await load(journal)


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_an_unknown_item_whose_key_aged_past_key_max_age_is_reconciled(
    tmp_path: Path, kind: str
) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    j: SQLiteJournal | MemoryJournal
    if kind == "sqlite":
        j = SQLiteJournal(tmp_path / "j.sqlite", clock=lambda: now[0])
    else:
        j = MemoryJournal(clock=lambda: now[0])
    async with j:
        await begin(j, "item", "order", "key-1")
        await j.finish("item", JournalStatus.FAILED)
        entry = (await load(j))["item"]
        assert entry.key_sent_at == now[0]
        now[0] += timedelta(hours=22, minutes=59)
        assert not j.key_expired(entry)
        assert (await begin(j, "item", "order", "key-2")).action is ClaimAction.SEND
        await j.finish("item", JournalStatus.FAILED)
        now[0] += timedelta(minutes=1)  # 23 h after the key was first sent, not last resent
        assert j.key_expired(entry)
        claim = await begin(j, "item", "order", "key-3")
        assert (claim.action, claim.entry.idempotency_key) == (ClaimAction.RECONCILE, "key-1")


async def test_a_retired_key_is_never_given_to_another_item(journal: Journal) -> None:
    # Klarna replays a key's first answer for 24 h: a refused item's old key stays its own.
    await begin(journal, "a", "order-a", "K")
    await journal.finish("a", JournalStatus.REFUSED, error="CAPTURE_NOT_ALLOWED")
    assert (await begin(journal, "a", "order-a", "K2")).entry.idempotency_key == "K2"
    claim = await begin(journal, "b", "order-b", "K")
    assert claim.action is ClaimAction.CONFLICT
    assert claim.reason is not None
    assert "already belongs to item 'a'" in claim.reason


async def test_a_new_item_next_to_another_runs_unknown_item_is_held_back(journal: Journal) -> None:
    await journal.claim(record("o:box-1", "o"), "k1", run_id="run-1")
    await journal.finish("o:box-1", JournalStatus.FAILED)
    # The same run may add parts; another run may not while box-1 is unknown.
    assert (await journal.claim(record("o:box-2", "o"), "k2", run_id="run-1")).action == "send"
    claim = await journal.claim(record("o:box-1b", "o"), "k3", run_id="run-2")
    assert claim.action is ClaimAction.CONFLICT
    assert claim.reason is not None
    assert "is new, but order o has a capture of 100 whose outcome is" in claim.reason
    await journal.finish("o:box-1", JournalStatus.CAPTURED, capture_id="c")
    await journal.finish("o:box-2", JournalStatus.CAPTURED, capture_id="c2")
    assert (await journal.claim(record("o:box-3", "o"), "k4", run_id="run-3")).action == "send"


async def test_an_item_refused_before_is_held_back_like_a_new_one(journal: Journal) -> None:
    # A refused item takes a new key, so the sibling rule applies to it as to a new item: a
    # release refused in an earlier run must not go out while a capture of its order is
    # unknown (it would end the authorization that capture may still need).
    release = ItemRecord(
        item_key="release:o",
        order_id="o",
        captured_amount=None,
        fingerprint="release/o",
        operation=Operation.RELEASE,
    )
    await journal.claim(release, "k-release", run_id="run-1")
    await journal.finish("release:o", JournalStatus.REFUSED, error="NOT_ALLOWED")
    await journal.claim(record("o:last", "o"), "k-capture", run_id="run-1")
    await journal.finish("o:last", JournalStatus.FAILED)
    claim = await journal.claim(release, "k-release-2", run_id="run-2")
    assert claim.action is ClaimAction.CONFLICT
    assert claim.entry.idempotency_key == "k-release"  # as journaled: no new key handed out
    assert claim.reason is not None
    assert "item 'release:o' was refused before, but order o has a capture of 100" in claim.reason
    # A release has no reference to change: the message says what to do instead.
    assert "changed reference" not in claim.reason
    assert "a release of the order waits until that one is settled" in claim.reason
    assert (await load(journal))["release:o"].status is JournalStatus.REFUSED
    # A refused capture is held back too; once the capture is settled, both may go.
    await journal.claim(record("o:x", "o"), "k-x", run_id="run-1")
    await journal.finish("o:x", JournalStatus.REFUSED)
    held = await journal.claim(record("o:x", "o"), "k-x2", run_id="run-2")
    assert held.action is ClaimAction.CONFLICT
    assert held.reason is not None
    assert "changed reference" in held.reason
    await journal.finish("o:last", JournalStatus.CAPTURED, capture_id="c")
    sent = await journal.claim(release, "k-release-3", run_id="run-3")
    assert (sent.action, sent.entry.idempotency_key) == (ClaimAction.SEND, "k-release-3")


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
@pytest.mark.parametrize("minutes", [0, -60, 23 * 60 + 50.001, 23 * 60 + 55, 24 * 60, 48 * 60])
def test_a_key_max_age_past_klarnas_24_hours_less_the_clock_skew_or_not_positive_is_refused(
    tmp_path: Path, kind: str, minutes: float
) -> None:
    # Klarna forgets a key 24 hours after its first use, and a batch trusts a journal clock
    # up to 5 minutes off Klarna's: a key dated 5 minutes ahead and judged 5 minutes behind
    # looks 10 minutes younger. A journal that trusts a key longer resends a landed
    # operation's forgotten key (helper-87: 24 h with a clock 4 min 50 s behind resent a key
    # Klarna had forgotten 2 minutes before; helper-89: 23 h 55 min, dated 4 min 50 s ahead
    # and judged 4 min 50 s behind), and Klarna books it again.
    with pytest.raises(ValueError, match="key_max_age must be") as raised:
        journal_of(kind, tmp_path, timedelta(minutes=minutes))
    assert "\n" not in str(raised.value)
    if minutes > 0:
        assert "Klarna forgets a key 24 hours after its first use" in str(raised.value)
        assert "at most 23:50:00" in str(raised.value)


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_a_key_max_age_of_24_hours_less_the_clock_skew_is_accepted(
    tmp_path: Path, kind: str
) -> None:
    assert timedelta(hours=23, minutes=50) == MAX_KEY_MAX_AGE
    journal_of(kind, tmp_path, MAX_KEY_MAX_AGE)


def journal_of(kind: str, tmp_path: Path, key_max_age: timedelta) -> Journal:
    if kind == "sqlite":
        return SQLiteJournal(tmp_path / "j.sqlite", key_max_age=key_max_age)
    return MemoryJournal(key_max_age=key_max_age)


# --- SQLiteJournal only ---


def test_an_sqlite_journal_needs_a_file() -> None:
    with pytest.raises(ValueError, match="MemoryJournal"):
        SQLiteJournal(":memory:")


async def test_every_name_of_a_journal_file_shares_its_lock(tmp_path: Path) -> None:
    path, link = tmp_path / "j.sqlite", tmp_path / "sym-link.sqlite"
    async with SQLiteJournal(path):
        link.symlink_to(path)
        with pytest.raises(JournalInUseError):
            await SQLiteJournal(link).open()  # this process: refused by inode
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLD_SCRIPT,
        str(path),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), TIMEOUT_S) == b"ready\n"
        with pytest.raises(JournalInUseError):
            await SQLiteJournal(link).open()  # another process: refused by the OS lock
    finally:
        proc.kill()
        await proc.communicate()
    async with SQLiteJournal(link):  # the dead holder's lock is gone
        pass


async def test_a_journal_file_with_another_hard_link_is_refused(tmp_path: Path) -> None:
    # SQLite keeps the write-ahead log beside the name it opened: a run killed under one name
    # left its fsynced claims there, and a rerun under another name sent those items again
    # under new keys.
    path, link = tmp_path / "j.sqlite", tmp_path / "hard-link.sqlite"
    async with SQLiteJournal(path) as journal:
        await begin(journal, "o1:c1", "o1", "key-1")
    os.link(path, link)
    for name in (path, link):
        with pytest.raises(JournalError, match=r"has 2 names \(hard links\)"):
            await SQLiteJournal(name).open()
    path.unlink()
    async with SQLiteJournal(link) as journal:
        assert [e.idempotency_key for e in await journal.entries()] == ["key-1"]


KILLED_SCRIPT = """
import asyncio, os, signal, sys
from klarna_om_async import SQLiteJournal
from klarna_om_async.journal import ItemRecord

async def main() -> None:
    journal = await SQLiteJournal(sys.argv[1]).open()
    for n in range(3):
        record = ItemRecord(item_key=f"o{n}", order_id=f"o{n}", fingerprint="f", captured_amount=1)
        await journal.claim(record, f"key-{n}")
    os.kill(os.getpid(), signal.SIGKILL)  # the claims are in the -wal file only

asyncio.run(main())
"""


def killed_run(path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", KILLED_SCRIPT, str(path)], cwd=REPO_ROOT, timeout=TIMEOUT_S
    )
    assert done.returncode == -signal.SIGKILL


async def test_a_journal_moved_without_the_log_of_a_killed_run_is_refused(tmp_path: Path) -> None:
    # The claims a killed run made last stay in PATH-wal; the file moved (or copied) alone,
    # a rerun saw none of them and sent those items again under new keys.
    path, moved = tmp_path / "j.sqlite", tmp_path / "moved.sqlite"
    killed_run(path)
    path.rename(moved)
    with pytest.raises(JournalError, match="was left open by a run that used it as"):
        await SQLiteJournal(moved).open()
    # Nor with an empty log beside it (a run killed before any claim leaves one).
    open(f"{moved}-wal", "wb").close()  # noqa: ASYNC230 - as `touch` would
    with pytest.raises(JournalError, match="was left open by a run that used it as"):
        await SQLiteJournal(moved).open()
    # Nor at the old name, where only the log is left: SQLite would delete it.
    with pytest.raises(JournalError, match="does not exist, but its write-ahead log"):
        await SQLiteJournal(path).open()
    os.rename(f"{path}-wal", f"{moved}-wal")  # as the error says
    async with SQLiteJournal(moved) as journal:
        assert sorted(e.idempotency_key for e in await journal.entries()) == [
            "key-0",
            "key-1",
            "key-2",
        ]
    # Closed cleanly, the file alone holds everything: it may move.
    moved.rename(path)
    async with SQLiteJournal(path) as journal:
        assert len(await journal.entries()) == 3


@pytest.mark.parametrize("looked", [False, True])
async def test_a_killed_run_is_recovered_where_it_ran(tmp_path: Path, looked: bool) -> None:
    path = tmp_path / "j.sqlite"
    killed_run(path)
    if looked:  # a sqlite3 shell read it: closing, it copied the log in and removed it
        with contextlib.closing(sqlite3.connect(path)) as shell:
            shell.execute("SELECT count(*) FROM journal").fetchone()
        assert not os.path.exists(f"{path}-wal")  # noqa: ASYNC240
    async with SQLiteJournal(path) as journal:
        assert len(await journal.entries()) == 3


HOLD_SCRIPT = """
import asyncio, sys
from klarna_om_async import SQLiteJournal

async def main() -> None:
    async with SQLiteJournal(sys.argv[1]):
        print("ready", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_two_journals_on_one_file_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path):
        with pytest.raises(JournalInUseError, match="is in use by another run"):
            await SQLiteJournal(path).open()
    async with SQLiteJournal(path) as j:  # released on close
        await begin(j, "item", "order", "key")


@pytest.mark.parametrize(
    "ddl",
    [
        "CREATE TABLE journal (id INTEGER PRIMARY KEY, note TEXT)",
        "CREATE TABLE invoices (id INTEGER PRIMARY KEY)",
        "PRAGMA application_id = 42",
        "CREATE VIEW answers AS SELECT 42",
    ],
)
async def test_another_programs_database_is_refused_untouched(tmp_path: Path, ddl: str) -> None:
    path = tmp_path / "theirs.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(ddl)
    conn.close()
    before = path.read_bytes()
    with pytest.raises(NotAJournalError, match="is not a klarna-om journal"):
        await SQLiteJournal(path).open()
    assert path.read_bytes() == before


async def test_a_version_1_journal_is_migrated_and_its_unknown_items_reconciled(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE journal (item_key TEXT PRIMARY KEY, order_id TEXT NOT NULL,"
            " idempotency_key TEXT NOT NULL, status TEXT NOT NULL, capture_id TEXT,"
            " error TEXT, attempts INTEGER NOT NULL, updated_at TEXT NOT NULL) WITHOUT ROWID"
        )
        conn.execute("PRAGMA user_version = 1")
        now = datetime.now(UTC).isoformat()
        conn.executemany(
            "INSERT INTO journal VALUES (?, ?, ?, ?, ?, NULL, 1, ?)",
            [("a", "oa", "ka", "in_flight", None, now), ("b", "ob", "kb", "captured", "cb", now)],
        )
    conn.close()
    async with SQLiteJournal(path) as j:
        entries = await load(j)
        assert entries["a"].uncertain
        assert not entries["b"].uncertain
        assert (await begin(j, "a", "oa", "new")).action is ClaimAction.RECONCILE
        assert (await begin(j, "b", "ob", "new")).action is ClaimAction.SKIP


_V3_SCHEMA = """
CREATE TABLE journal (
    item_key TEXT PRIMARY KEY, order_id TEXT NOT NULL, idempotency_key TEXT NOT NULL,
    status TEXT NOT NULL, capture_id TEXT, error TEXT, attempts INTEGER NOT NULL,
    updated_at TEXT NOT NULL, fingerprint TEXT, captured_amount INTEGER, reference TEXT,
    key_sent_at TEXT, uncertain INTEGER NOT NULL DEFAULT 0, run_id TEXT,
    operation TEXT NOT NULL DEFAULT 'capture'
) WITHOUT ROWID;
CREATE TABLE keys (idempotency_key TEXT PRIMARY KEY, item_key TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX journal_by_order ON journal (order_id);
PRAGMA application_id = 1263488330;
PRAGMA user_version = 3;
"""


async def test_a_version_3_journal_is_rebuilt_with_every_row_and_key_as_it_was(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v3.sqlite"
    now = datetime.now(UTC)
    rows = [
        ("captured", "oa", "ka", "captured", "ca", None, 1, 0, "run1", "capture"),
        ("flight", "ob", "kb", "in_flight", None, None, 2, 1, "run1", "capture"),
        ("refused", "oc", "kc2", "refused", None, "403 ...", 5, 0, None, "refund"),
        ("review", "od", "kd", "needs_review", None, "??", 1, 1, "run2", "capture"),
    ]
    with sqlite3.connect(path) as conn:
        conn.executescript(_V3_SCHEMA)
        for item_key, order_id, key, status, capture_id, error, attempts, doubt, run, op in rows:
            stamp = now.isoformat()
            fingerprint = f"{order_id}/100/None"
            row = (item_key, order_id, key, status, capture_id, error, attempts, stamp)
            row_v3 = (*row, fingerprint, 100, None, stamp, doubt, run, op)
            conn.execute(f"INSERT INTO journal VALUES ({', '.join('?' * 15)})", row_v3)
            conn.execute("INSERT INTO keys VALUES (?, ?)", (key, item_key))
        conn.execute("INSERT INTO keys VALUES ('kc1', 'refused')")  # retired by the refusal
        before = conn.execute("SELECT * FROM journal ORDER BY item_key").fetchall()
    conn.close()

    async with SQLiteJournal(path) as j:
        assert (await begin(j, "flight", "ob", "new")).entry.idempotency_key == "kb"
        assert (await begin(j, "captured", "oa", "new")).action is ClaimAction.SKIP
        taken = await begin(j, "another", "oe", "kc1")  # the refused item's first key
        assert taken.action is ClaimAction.CONFLICT
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (4,)
        after = conn.execute("SELECT * FROM journal ORDER BY item_key").fetchall()
        # A rowid table now (a table WITHOUT ROWID has no such column).
        assert conn.execute("SELECT count(rowid) FROM journal").fetchone() == (4,)
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(journal)")}
    conn.close()
    # Every row as it was, but the one the rerun resent (in flight again, its doubt kept).
    assert [r for r in after if r[0] != "flight"] == [r for r in before if r[0] != "flight"]
    assert [r[:3] for r in after if r[0] == "flight"] == [("flight", "ob", "kb")]
    assert indexes == {"journal_by_order_run", "sqlite_autoindex_journal_1"}


async def test_a_journal_opened_gets_the_order_index_by_run_whatever_index_it_had(
    tmp_path: Path,
) -> None:
    # Schema 4's first form had the order index by order alone: claims then read every
    # item of the order, their own run's too.
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        await begin(j, "a", "oa", "ka")
    with sqlite3.connect(path) as conn:
        conn.execute("DROP INDEX journal_by_order_run")
        conn.execute("CREATE INDEX journal_by_order ON journal (order_id)")
    conn.close()
    async with SQLiteJournal(path) as j:
        assert (await begin(j, "a", "oa", "new")).entry.idempotency_key == "ka"
    with sqlite3.connect(path) as conn:
        indexes = {r[1]: r[2] for r in conn.execute("PRAGMA index_list(journal)")}
        columns = [r[2] for r in conn.execute("PRAGMA index_info(journal_by_order_run)")]
    conn.close()
    assert set(indexes) == {"journal_by_order_run", "sqlite_autoindex_journal_1"}
    assert columns == ["order_id", "run_id"]


# --- SQLiteJournal only (older tests) ---


async def test_a_new_journal_on_the_same_file_sees_earlier_runs(tmp_path: Path) -> None:
    async with SQLiteJournal(tmp_path / "j.sqlite", durability="full") as j:
        await begin(j, "item", "order", "key")
    async with SQLiteJournal(tmp_path / "j.sqlite") as j:
        assert (await load(j))["item"].idempotency_key == "key"


CRASH_SCRIPT = """
import asyncio, sys
from klarna_om_async import ItemRecord, JournalStatus, SQLiteJournal

async def main() -> None:
    journal = await SQLiteJournal(sys.argv[1]).open()
    for i in range(int(sys.argv[2])):
        item = ItemRecord(
            item_key=f"item-{i}", order_id=f"order-{i}", captured_amount=1, fingerprint="f"
        )
        await journal.claim(item, f"key-{i}")
        if i % 2:  # an outcome is committed without an fsync of its own
            await journal.finish(item.item_key, JournalStatus.CAPTURED, capture_id=f"c-{i}")
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_awaited_claims_and_outcomes_survive_kill_9(tmp_path: Path) -> None:
    path, n = tmp_path / "j.sqlite", 50
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASH_SCRIPT,
        str(path),
        str(n),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        _, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    assert line == b"ready\n", stderr.decode()
    assert proc.returncode == -signal.SIGKILL

    async with SQLiteJournal(path) as j:
        loaded = await load(j)
    assert {k: (e.status, e.idempotency_key) for k, e in loaded.items()} == {
        f"item-{i}": (JournalStatus.CAPTURED if i % 2 else JournalStatus.IN_FLIGHT, f"key-{i}")
        for i in range(n)
    }


@pytest.mark.parametrize("durability", ["full", "normal"])
async def test_only_claims_wait_for_an_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: Literal["full", "normal"]
) -> None:
    # A claim's key may leave the moment it returns, so its commit is fsynced
    # (synchronous=FULL, 2) under durability="full". An outcome is committed without one
    # (NORMAL, 1): a power loss that undoes it leaves the item in flight, resent under the
    # same key or reconciled, and it reaches the disk with the next claim or at close.
    seen: list[tuple[str, int]] = []
    set_sync = SQLiteJournal._set_sync

    def spy(self: SQLiteJournal, conn: sqlite3.Connection, sync: bool) -> None:
        set_sync(self, conn, sync)
        seen.append(
            ("claim" if sync else "other", conn.execute("PRAGMA synchronous").fetchone()[0])
        )

    monkeypatch.setattr(SQLiteJournal, "_set_sync", spy)
    async with SQLiteJournal(tmp_path / "j.sqlite", durability=durability) as j:
        await begin(j, "a", "order-a", "key-a")
        await j.finish("a", JournalStatus.CAPTURED, capture_id="c")
        await load(j)
        await asyncio.gather(
            begin(j, "b", "order-b", "key-b"), j.finish("a", JournalStatus.CAPTURED)
        )
    full = 2 if durability == "full" else 1
    assert seen == [("claim", full), ("other", 1), ("other", 1), ("claim", full)]


@pytest.mark.parametrize("last", ["finish", "claim"])
async def test_close_fsyncs_outcomes_left_unsynced_even_with_a_reader_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, last: str
) -> None:
    # Closing checkpoints (and fsyncs) the WAL only when no other connection has the file
    # open; a reader (a progress monitor, a sqlite3 shell) must not leave outcomes unsynced.
    path = tmp_path / "j.sqlite"
    synced: list[str] = []
    fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    reader = sqlite3.connect(path)
    try:
        async with SQLiteJournal(path) as j:
            await begin(j, "a", "order-a", "key-a")
            reader.execute("SELECT count(*) FROM journal").fetchall()
            await j.finish("a", JournalStatus.CAPTURED, capture_id="c")
            if last == "claim":  # its fsync covers the outcome before it
                await begin(j, "b", "order-b", "key-b")
            assert synced == []
    finally:
        reader.close()
    wal = str(path.resolve()) + "-wal"
    assert synced == ([wal] if last == "finish" else [])


async def test_event_loop_runs_while_writes_wait_for_the_disk(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        commits_before = j.commits
        with write_lock(path):  # the writer thread blocks in SQLite until it is released
            pending = [
                asyncio.create_task(begin(j, f"item-{i}", "order", f"key-{i}")) for i in range(100)
            ]
            for _ in range(10):
                await asyncio.sleep(0)  # other work runs while the writes are pending
                assert not any(task.done() for task in pending)
        await asyncio.wait_for(asyncio.gather(*pending), TIMEOUT_S)

        assert len(await load(j)) == 100
        # At most the first call went alone; the 99 that queued meanwhile shared a commit.
        assert j.commits - commits_before <= 3  # +1 for load()


async def test_cancelled_call_still_writes_and_the_journal_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        with write_lock(path):
            task = asyncio.create_task(begin(j, "item", "order", "key"))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await begin(j, "other", "order", "key-2")
        assert set(await load(j)) == {"item", "other"}


async def test_failed_call_does_not_undo_its_group(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        with write_lock(path):  # queue them while the writer waits, so they are applied together
            tasks = [
                asyncio.create_task(begin(j, "a", "order-a", "key-a")),
                asyncio.create_task(j.finish("ghost", JournalStatus.CAPTURED)),
                asyncio.create_task(begin(j, "b", "order-b", "key-b")),
            ]
            await asyncio.sleep(0)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], Claim)
        assert isinstance(results[2], Claim)
        assert isinstance(results[1], LookupError)
    async with SQLiteJournal(path) as j:
        assert set(await load(j)) == {"a", "b"}


async def test_error_that_rolls_back_the_transaction_fails_the_whole_group(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        with sqlite3.connect(path) as other:
            other.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON journal WHEN NEW.item_key = 'poison'"
                " BEGIN SELECT RAISE(ROLLBACK, 'poisoned'); END"
            )
        other.close()
        keys = ["a", "poison", "b"]
        with write_lock(path):
            tasks = [asyncio.create_task(begin(j, k, "order", f"key-{k}")) for k in keys]
            await asyncio.sleep(0)
        results = dict(zip(keys, await asyncio.gather(*tasks, return_exceptions=True), strict=True))
        assert isinstance(results["poison"], sqlite3.IntegrityError)
        loaded = await load(j)
        # No call is told "done" unless its write was committed.
        for key, result in results.items():
            assert isinstance(result, Claim) == (key in loaded)
            assert isinstance(result, Claim) or "poisoned" in str(result)
        await begin(j, "later", "order", "key-later")  # the writer thread is still serving
        assert "later" in await load(j)


@pytest.mark.parametrize("bad", ["missing-dir/j.sqlite", "."])
async def test_unopenable_path_raises_on_open(tmp_path: Path, bad: str) -> None:
    j = SQLiteJournal(tmp_path / bad)
    with pytest.raises((sqlite3.OperationalError, OSError)):
        await asyncio.wait_for(j.open(), TIMEOUT_S)
    with pytest.raises(RuntimeError, match="closed"):
        await load(j)


async def test_file_that_is_not_a_journal_raises_on_open(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    path.write_bytes(b"this is not an SQLite database\n" * 200)
    with pytest.raises(NotAJournalError, match="not a klarna-om journal"):
        await asyncio.wait_for(SQLiteJournal(path).open(), TIMEOUT_S)


async def test_journal_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(NotAJournalError, match="newer"):
        await SQLiteJournal(path).open()


async def test_database_error_in_the_writer_reaches_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        await begin(j, "item", "order", "key")
        with sqlite3.connect(path) as other:
            other.execute("DROP TABLE journal")
        other.close()
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await asyncio.wait_for(j.finish("item", JournalStatus.CAPTURED), TIMEOUT_S)
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await asyncio.wait_for(j.entries(), TIMEOUT_S)


async def test_open_twice_is_an_error(tmp_path: Path) -> None:
    async with SQLiteJournal(tmp_path / "j.sqlite") as j:
        with pytest.raises(RuntimeError, match="already open"):
            await j.open()


def test_unknown_durability_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="durability"):
        SQLiteJournal(tmp_path / "j.sqlite", durability="sometimes")  # type: ignore[arg-type]


# --- deterministic_key ---


def test_deterministic_key_is_pinned() -> None:
    # Changing this value would make reruns capture again: keys must never change.
    assert deterministic_key("order-1:capture-1") == "8d8bb4f3-0c8d-5e70-84c1-6fa07ffac64a"
    assert str(KLARNA_OM_NAMESPACE) == "1d2b8123-73b1-4db4-8907-032af9f09d73"


@given(st.text())
def test_deterministic_key_is_stable(business_id: str) -> None:
    key = deterministic_key(business_id)
    assert key == deterministic_key(business_id)
    assert uuid.UUID(key).version == 5


@given(st.text(), st.text())
def test_deterministic_key_differs_for_different_ids(a: str, b: str) -> None:
    if a != b:
        assert deterministic_key(a) != deterministic_key(b)


@given(st.text(), st.uuids())
def test_deterministic_key_depends_on_namespace(business_id: str, namespace: uuid.UUID) -> None:
    if namespace != KLARNA_OM_NAMESPACE:
        assert deterministic_key(business_id, namespace=namespace) != deterministic_key(business_id)


async def test_finish_decides_from_the_row_as_it_is_now(tmp_path: Path) -> None:
    # A row changed since its claim (here by hand) is what finish() decides from: a
    # captured row stays captured, whatever this run reports.
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        await begin(j, "item", "order", "key")
        with sqlite3.connect(path) as other:
            other.execute(
                "UPDATE journal SET status = 'captured', capture_id = 'cap-1', attempts = 2"
                " WHERE item_key = 'item'"
            )
        other.close()
        assert await j.finish("item", JournalStatus.REFUSED, attempts=1) is JournalStatus.CAPTURED
        entry = (await load(j))["item"]
        assert (entry.status, entry.capture_id, entry.attempts) == ("captured", "cap-1", 3)
        # A claim whose finish comes after a reopen finds its row.
        await begin(j, "next", "order", "key-next")
        await reopen(j)
        assert await j.finish("next", JournalStatus.CAPTURED, capture_id="c") == "captured"
        assert (await load(j))["next"].capture_id == "c"


async def test_a_failed_fsync_at_close_is_raised_and_the_journal_still_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    path = tmp_path / "j.sqlite"
    j = await SQLiteJournal(path).open()
    await begin(j, "a", "order-a", "key-a")
    await j.finish("a", JournalStatus.CAPTURED, capture_id="c")
    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output error"):
        await j.close()
    monkeypatch.undo()
    async with SQLiteJournal(path) as again:  # the file and its lock were released
        assert (await load(again))["a"].status is JournalStatus.CAPTURED
