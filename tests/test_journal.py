from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klarna_om_async.journal import (
    KLARNA_OM_NAMESPACE,
    Journal,
    JournalStatus,
    MemoryJournal,
    SQLiteJournal,
    deterministic_key,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60


@pytest.fixture(params=["sqlite", "memory"])
async def journal(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Journal]:
    j: SQLiteJournal | MemoryJournal
    j = SQLiteJournal(tmp_path / "j.sqlite") if request.param == "sqlite" else MemoryJournal()
    async with j:
        yield j


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
    await journal.begin("o1:c1", "o1", "key-1")
    await journal.finish("o1:c1", JournalStatus.CAPTURED, capture_id="cap-1", attempts=2)
    await reopen(journal)

    entry = (await journal.load())["o1:c1"]
    assert entry.order_id == "o1"
    assert entry.idempotency_key == "key-1"
    assert entry.status is JournalStatus.CAPTURED
    assert entry.capture_id == "cap-1"
    assert entry.error is None
    assert entry.attempts == 2
    assert entry.updated_at.utcoffset() == timedelta(0)


async def test_begin_is_durable_as_in_flight_before_any_outcome(journal: Journal) -> None:
    await journal.begin("o1:c1", "o1", "key-1")
    await reopen(journal)
    entry = (await journal.load())["o1:c1"]
    assert (entry.status, entry.idempotency_key, entry.attempts) == (
        JournalStatus.IN_FLIGHT,
        "key-1",
        0,
    )
    assert entry.capture_id is None


async def test_rebegin_keeps_original_key_and_returns_to_in_flight(journal: Journal) -> None:
    await journal.begin("o1:c1", "o1", "original")
    await journal.finish("o1:c1", JournalStatus.FAILED, error="timeout", attempts=3)
    await journal.begin("o1:c1", "o1", "a-new-key-that-must-be-ignored")

    entry = (await journal.load())["o1:c1"]
    assert entry.idempotency_key == "original"
    assert entry.status is JournalStatus.IN_FLIGHT
    assert entry.attempts == 3


async def test_rebegin_after_refusal_takes_the_new_key(journal: Journal) -> None:
    # Nothing was booked under a refused key, and the batch retries with a fresh one.
    await journal.begin("o1:c1", "o1", "refused-key")
    await journal.finish("o1:c1", JournalStatus.REFUSED, error="CAPTURE_NOT_ALLOWED", attempts=1)
    await journal.begin("o1:c1", "o1", "fresh-key")
    await journal.begin("o1:c1", "o1", "yet-another-key")

    entry = (await journal.load())["o1:c1"]
    assert (entry.idempotency_key, entry.status) == ("fresh-key", JournalStatus.IN_FLIGHT)
    assert entry.attempts == 1


async def test_attempts_accumulate_over_runs(journal: Journal) -> None:
    await journal.begin("o1:c1", "o1", "key-1")
    await journal.finish("o1:c1", JournalStatus.FAILED, error="503", attempts=4)
    await reopen(journal)
    await journal.begin("o1:c1", "o1", "key-1")
    await journal.finish("o1:c1", JournalStatus.CAPTURED, capture_id="cap-1", attempts=1)

    entry = (await journal.load())["o1:c1"]
    assert entry.attempts == 5
    assert entry.error is None  # the outcome replaces the last error


async def test_load_returns_every_entry(journal: Journal) -> None:
    for i in range(10):
        await journal.begin(f"item-{i}", f"order-{i}", f"key-{i}")
    for i in range(0, 10, 2):
        await journal.finish(f"item-{i}", JournalStatus.REFUSED, error="CAPTURE_NOT_ALLOWED")

    loaded = await journal.load()
    assert sorted(loaded) == sorted(f"item-{i}" for i in range(10))
    assert {e.item_key: e.idempotency_key for e in loaded.values()} == {
        f"item-{i}": f"key-{i}" for i in range(10)
    }
    assert [e.status for _, e in sorted(loaded.items())].count(JournalStatus.REFUSED) == 5


async def test_entries_and_summary_report_every_status(journal: Journal) -> None:
    assert isinstance(journal, SQLiteJournal | MemoryJournal)
    for key in "dcba":
        await journal.begin(key, f"order-{key}", f"key-{key}")
    await journal.finish("a", JournalStatus.CAPTURED, capture_id="cap-a")
    await journal.finish("b", JournalStatus.FAILED, error="line one\nline two")

    assert [e.item_key for e in await journal.entries()] == ["a", "b", "c", "d"]
    assert (await journal.load())["b"].error == "line one line two"
    assert await journal.summary() == {
        JournalStatus.IN_FLIGHT: 2,
        JournalStatus.CAPTURED: 1,
        JournalStatus.REFUSED: 0,
        JournalStatus.FAILED: 1,
    }


async def test_finish_of_an_item_never_begun_is_an_error(journal: Journal) -> None:
    with pytest.raises(LookupError, match="never begun"):
        await journal.finish("ghost", JournalStatus.CAPTURED)


async def test_item_key_reused_for_another_order_is_an_error(journal: Journal) -> None:
    await journal.begin("item", "order-1", "key-1")
    with pytest.raises(ValueError, match="order-1"):
        await journal.begin("item", "order-2", "key-2")
    assert (await journal.load())["item"].order_id == "order-1"


async def test_negative_attempts_are_rejected(journal: Journal) -> None:
    await journal.begin("item", "order", "key")
    with pytest.raises(ValueError, match="attempts"):
        await journal.finish("item", JournalStatus.FAILED, attempts=-1)


async def test_closed_journal_raises_a_clear_error(journal: Journal) -> None:
    await journal.close()
    await journal.close()  # closing twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        await journal.begin("item", "order", "key")
    with pytest.raises(RuntimeError, match="closed"):
        await journal.load()
    await reopen(journal)  # leave it open for the fixture's own close


async def test_concurrent_calls_are_all_recorded(journal: Journal) -> None:
    async def capture(i: int) -> None:
        await journal.begin(f"item-{i}", f"order-{i}", f"key-{i}")
        await journal.finish(f"item-{i}", JournalStatus.CAPTURED, capture_id=f"cap-{i}", attempts=1)

    await asyncio.gather(*(capture(i) for i in range(2000)))

    loaded = await journal.load()
    assert len(loaded) == 2000
    assert all(
        (e.status, e.capture_id, e.attempts) == (JournalStatus.CAPTURED, f"cap-{i}", 1)
        for i, e in ((int(k.removeprefix("item-")), e) for k, e in loaded.items())
    )
    if isinstance(journal, SQLiteJournal):
        assert journal.commits < 4000  # 4000 writes: the writer grouped them


# --- SQLiteJournal only ---


async def test_a_new_journal_on_the_same_file_sees_earlier_runs(tmp_path: Path) -> None:
    async with SQLiteJournal(tmp_path / "j.sqlite", durability="full") as j:
        await j.begin("item", "order", "key")
    async with SQLiteJournal(tmp_path / "j.sqlite") as j:
        assert (await j.load())["item"].idempotency_key == "key"


CRASH_SCRIPT = """
import asyncio, sys
from klarna_om_async.journal import SQLiteJournal

async def main() -> None:
    journal = await SQLiteJournal(sys.argv[1]).open()
    for i in range(int(sys.argv[2])):
        await journal.begin(f"item-{i}", f"order-{i}", f"key-{i}")
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_awaited_begins_survive_kill_9(tmp_path: Path) -> None:
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
        loaded = await j.load()
    assert {k: (e.status, e.idempotency_key) for k, e in loaded.items()} == {
        f"item-{i}": (JournalStatus.IN_FLIGHT, f"key-{i}") for i in range(n)
    }


async def test_event_loop_runs_while_writes_wait_for_the_disk(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        commits_before = j.commits
        with write_lock(path):  # the writer thread blocks in SQLite until it is released
            pending = [
                asyncio.create_task(j.begin(f"item-{i}", "order", f"key-{i}")) for i in range(100)
            ]
            for _ in range(10):
                await asyncio.sleep(0)  # other work runs while the writes are pending
                assert not any(task.done() for task in pending)
        await asyncio.wait_for(asyncio.gather(*pending), TIMEOUT_S)

        assert len(await j.load()) == 100
        # At most the first call went alone; the 99 that queued meanwhile shared a commit.
        assert j.commits - commits_before <= 3  # +1 for load()


async def test_cancelled_call_still_writes_and_the_journal_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        with write_lock(path):
            task = asyncio.create_task(j.begin("item", "order", "key"))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await j.begin("other", "order", "key-2")
        assert set(await j.load()) == {"item", "other"}


async def test_failed_call_does_not_undo_its_group(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        with write_lock(path):  # queue them while the writer waits, so they are applied together
            tasks = [
                asyncio.create_task(j.begin("a", "order-a", "key-a")),
                asyncio.create_task(j.finish("ghost", JournalStatus.CAPTURED)),
                asyncio.create_task(j.begin("b", "order-b", "key-b")),
            ]
            await asyncio.sleep(0)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results[0] is None
        assert results[2] is None
        assert isinstance(results[1], LookupError)
    async with SQLiteJournal(path) as j:
        assert set(await j.load()) == {"a", "b"}


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
            tasks = [asyncio.create_task(j.begin(k, "order", f"key-{k}")) for k in keys]
            await asyncio.sleep(0)
        results = dict(zip(keys, await asyncio.gather(*tasks, return_exceptions=True), strict=True))
        assert isinstance(results["poison"], sqlite3.IntegrityError)
        loaded = await j.load()
        # No call is told "done" unless its write was committed.
        for key, result in results.items():
            assert (result is None) == (key in loaded)
            assert result is None or "poisoned" in str(result)
        await j.begin("later", "order", "key-later")  # the writer thread is still serving
        assert "later" in await j.load()


@pytest.mark.parametrize("bad", ["missing-dir/j.sqlite", "."])
async def test_unopenable_path_raises_on_open(tmp_path: Path, bad: str) -> None:
    j = SQLiteJournal(tmp_path / bad)
    with pytest.raises(sqlite3.OperationalError):
        await asyncio.wait_for(j.open(), TIMEOUT_S)
    with pytest.raises(RuntimeError, match="closed"):
        await j.load()


async def test_file_that_is_not_a_journal_raises_on_open(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    path.write_bytes(b"this is not an SQLite database\n" * 200)
    with pytest.raises(sqlite3.DatabaseError):
        await asyncio.wait_for(SQLiteJournal(path).open(), TIMEOUT_S)


async def test_journal_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        await SQLiteJournal(path).open()


async def test_database_error_in_the_writer_reaches_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with SQLiteJournal(path) as j:
        await j.begin("item", "order", "key")
        with sqlite3.connect(path) as other:
            other.execute("DROP TABLE journal")
        other.close()
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await asyncio.wait_for(j.finish("item", JournalStatus.CAPTURED), TIMEOUT_S)
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await asyncio.wait_for(j.load(), TIMEOUT_S)


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
