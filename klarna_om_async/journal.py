"""Durable record of idempotency keys and outcomes, so a rerun batch captures each item once.

Before the first HTTP attempt of an item the batch calls ``begin``, which records the item's
idempotency key; after the outcome it calls ``finish``. A rerun with the same journal skips
finished items and retries in-flight ones with their original key, which Klarna answers by
replaying the first response instead of capturing again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, Self, TypeVar

import attrs

__all__ = (
    "KLARNA_OM_NAMESPACE",
    "Journal",
    "JournalEntry",
    "JournalStatus",
    "MemoryJournal",
    "SQLiteJournal",
    "deterministic_key",
)

KLARNA_OM_NAMESPACE = uuid.UUID("1d2b8123-73b1-4db4-8907-032af9f09d73")
"""Namespace of the keys made by :func:`deterministic_key`; fixed forever, keys depend on it."""


def deterministic_key(business_id: str, *, namespace: uuid.UUID = KLARNA_OM_NAMESPACE) -> str:
    """Return the idempotency key for ``business_id``: the same on every run, no journal needed.

    Derive it from a stable business id such as ``f"{order_id}:{capture_reference}"``; never
    reuse a key for a different operation — Klarna replays the first result for a key and
    ignores the new body.
    """
    return str(uuid.uuid5(namespace, business_id))


class JournalStatus(enum.StrEnum):
    """Where a batch item stands: in flight (outcome unknown) or a recorded outcome."""

    IN_FLIGHT = "in_flight"
    CAPTURED = "captured"
    REFUSED = "refused"
    FAILED = "failed"


@attrs.frozen(kw_only=True)
class JournalEntry:
    """One batch item: its key, its last outcome, and the HTTP attempts made over all runs."""

    item_key: str
    order_id: str
    idempotency_key: str
    status: JournalStatus
    capture_id: str | None
    error: str | None
    attempts: int
    updated_at: datetime


class Journal(Protocol):
    """What the batch code needs from a journal; bring your own or use :class:`SQLiteJournal`."""

    async def load(self) -> dict[str, JournalEntry]:
        """Return every entry, keyed by ``item_key``."""
        ...

    async def begin(self, item_key: str, order_id: str, idempotency_key: str) -> None:
        """Durably record an item as in flight; an existing item keeps its key unless refused."""
        ...

    async def finish(
        self,
        item_key: str,
        status: JournalStatus,
        *,
        capture_id: str | None = None,
        error: str | None = None,
        attempts: int = 0,
    ) -> None:
        """Durably record the outcome of a begun item and add ``attempts`` to its total."""
        ...

    async def close(self) -> None:
        """Release the journal's resources; pending writes are completed first."""
        ...


def _rebegin_key(old: JournalEntry, new_key: str) -> str:
    # A key that may have booked money must be reused; a refused one booked nothing, and the
    # batch retries it with a fresh key that the journal must then hold.
    return new_key if old.status is JournalStatus.REFUSED else old.idempotency_key


def _check_attempts(attempts: int) -> None:
    if attempts < 0:
        raise ValueError(f"attempts must be >= 0, not {attempts}")


def _one_line(error: str | None) -> str | None:
    # Reports print one entry per line.
    return None if error is None else " ".join(error.splitlines())


def _order_mismatch(item_key: str, existing: str, order_id: str) -> ValueError:
    return ValueError(
        f"item {item_key!r} was begun for order {existing!r}, not {order_id!r}; "
        "an item key must identify one capture of one order"
    )


def _not_begun(item_key: str) -> LookupError:
    return LookupError(f"finish() for item {item_key!r}, which was never begun in this journal")


def _not_open(name: str) -> RuntimeError:
    return RuntimeError(
        f"{name} is closed or was never opened; use 'async with {name}(...)' or 'await .open()'"
    )


class MemoryJournal:
    """Journal kept in memory: dedupes within one process, survives nothing; usable at once."""

    def __init__(self) -> None:
        self._entries: dict[str, JournalEntry] = {}
        self._open = True

    async def open(self) -> Self:
        """Reopen after :meth:`close`; the entries are kept."""
        self._open = True
        return self

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _check_open(self) -> None:
        if not self._open:
            raise _not_open(type(self).__name__)

    async def load(self) -> dict[str, JournalEntry]:
        """Return every entry, keyed by ``item_key``."""
        self._check_open()
        return dict(self._entries)

    async def begin(self, item_key: str, order_id: str, idempotency_key: str) -> None:
        """Record an item as in flight; an existing item keeps its key unless refused."""
        self._check_open()
        now = datetime.now(UTC)
        old = self._entries.get(item_key)
        if old is None:
            self._entries[item_key] = JournalEntry(
                item_key=item_key,
                order_id=order_id,
                idempotency_key=idempotency_key,
                status=JournalStatus.IN_FLIGHT,
                capture_id=None,
                error=None,
                attempts=0,
                updated_at=now,
            )
        elif old.order_id != order_id:
            raise _order_mismatch(item_key, old.order_id, order_id)
        else:
            key = _rebegin_key(old, idempotency_key)
            self._entries[item_key] = attrs.evolve(
                old, idempotency_key=key, status=JournalStatus.IN_FLIGHT, updated_at=now
            )

    async def finish(
        self,
        item_key: str,
        status: JournalStatus,
        *,
        capture_id: str | None = None,
        error: str | None = None,
        attempts: int = 0,
    ) -> None:
        """Record the outcome of a begun item and add ``attempts`` to its total."""
        self._check_open()
        _check_attempts(attempts)
        old = self._entries.get(item_key)
        if old is None:
            raise _not_begun(item_key)
        self._entries[item_key] = attrs.evolve(
            old,
            status=JournalStatus(status),
            capture_id=capture_id,
            error=_one_line(error),
            attempts=old.attempts + attempts,
            updated_at=datetime.now(UTC),
        )

    async def close(self) -> None:
        """Refuse further calls until :meth:`open`; the entries are kept."""
        self._open = False

    async def entries(self) -> list[JournalEntry]:
        """Return every entry, ordered by ``item_key``."""
        self._check_open()
        return sorted(self._entries.values(), key=lambda entry: entry.item_key)

    async def summary(self) -> dict[JournalStatus, int]:
        """Return how many items are in each status (zero included)."""
        self._check_open()
        counts = dict.fromkeys(JournalStatus, 0)
        for entry in self._entries.values():
            counts[entry.status] += 1
        return counts


_SCHEMA_VERSION = 1
_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS journal (
    item_key        TEXT PRIMARY KEY,
    order_id        TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    status          TEXT NOT NULL,
    capture_id      TEXT,
    error           TEXT,
    attempts        INTEGER NOT NULL,
    updated_at      TEXT NOT NULL
) WITHOUT ROWID;
PRAGMA user_version = {_SCHEMA_VERSION};
COMMIT;
"""
_COLUMNS = "item_key, order_id, idempotency_key, status, capture_id, error, attempts, updated_at"
_BEGIN = """
INSERT INTO journal (item_key, order_id, idempotency_key, status, attempts, updated_at)
VALUES (?, ?, ?, 'in_flight', 0, ?)
ON CONFLICT (item_key) DO UPDATE SET
    idempotency_key = CASE status WHEN 'refused' THEN excluded.idempotency_key
                      ELSE idempotency_key END,
    status = 'in_flight',
    updated_at = excluded.updated_at
WHERE order_id = excluded.order_id
"""
_FINISH = """
UPDATE journal SET status = ?, capture_id = ?, error = ?, attempts = attempts + ?, updated_at = ?
WHERE item_key = ?
"""
# Another process (a report, the CLI) may hold the write lock briefly.
_BUSY_TIMEOUT_S = 30.0

_T = TypeVar("_T")
_Op = Callable[[sqlite3.Connection, str], object]
# (None, future) asks the writer thread to stop; the future resolves once the file is closed.
_Work = tuple[_Op | None, "asyncio.Future[Any]"]
# The queue carries the calls made in one event-loop turn together (see SQLiteJournal._call).
_Queue = queue.SimpleQueue[list[_Work]]
_Outcome = tuple["asyncio.Future[Any]", object, BaseException | None]


def _row_to_entry(row: tuple[Any, ...]) -> JournalEntry:
    item_key, order_id, key, status, capture_id, error, attempts, updated_at = row
    return JournalEntry(
        item_key=item_key,
        order_id=order_id,
        idempotency_key=key,
        status=JournalStatus(status),
        capture_id=capture_id,
        error=error,
        attempts=attempts,
        updated_at=datetime.fromisoformat(updated_at),
    )


def _settle(outcomes: list[_Outcome]) -> None:
    for future, result, exc in outcomes:
        if future.done():  # the caller was cancelled; its write stands anyway
            continue
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)


def _resolve(outcomes: list[_Outcome]) -> None:
    # One wake-up per event loop per group, not one per call.
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
    for loop, group in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_settle, group)


class SQLiteJournal:
    """Journal in an SQLite file, written by one thread that commits queued writes together.

    Every call returns only once its write is committed. With ``durability="normal"`` (WAL,
    ``synchronous=NORMAL``) a committed write survives the process being killed (``kill -9``,
    OOM killer) but not a power loss or OS crash, which may undo the last commits (the file
    stays consistent). ``durability="full"`` (``synchronous=FULL``) fsyncs every commit and
    survives those too.

    A dedicated thread owns the connection: calls queue their work and await a future; the
    thread takes everything queued, applies it in ONE transaction, commits, then resolves the
    futures. The event loop never waits for the disk, and thousands of concurrent calls cost
    few commits (see :attr:`commits`). Cancelling a call does not withdraw its write.
    """

    commits: int
    """Transactions committed by the writer thread so far (for tests and metrics)."""

    def __init__(
        self, path: str | os.PathLike[str], *, durability: Literal["normal", "full"] = "normal"
    ) -> None:
        if durability not in ("normal", "full"):
            raise ValueError(f"durability must be 'normal' or 'full', not {durability!r}")
        self._path = os.fspath(path)
        self._durability = durability
        self._work: _Queue | None = None
        # Calls made since the last flush; sent to the writer thread as one group.
        self._unsent: list[_Work] = []
        self._thread: threading.Thread | None = None
        self.commits = 0

    def __repr__(self) -> str:
        return f"SQLiteJournal({self._path!r}, durability={self._durability!r})"

    async def open(self) -> Self:
        """Start the writer thread, open the file and create the schema if it is new."""
        if self._work is not None:
            raise RuntimeError(f"{self!r} is already open")
        loop = asyncio.get_running_loop()
        work: _Queue = queue.SimpleQueue()
        ready: asyncio.Future[None] = loop.create_future()
        thread = threading.Thread(
            target=self._run, args=(work, ready), name="klarna-om-journal", daemon=True
        )
        thread.start()
        try:
            await ready
        except BaseException:
            # Stops the thread if it got as far as serving (e.g. open() was cancelled).
            work.put([(None, loop.create_future())])
            raise
        self._work, self._thread = work, thread
        return self

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Complete the queued writes, close the file and stop the writer thread."""
        work, thread = self._work, self._thread
        if work is None or thread is None:
            return
        self._send_unsent()  # calls made in this loop turn are written before the file closes
        self._work = self._thread = None
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        work.put([(None, closed)])
        await closed
        # The thread has closed the file and is returning, so this join does not wait.
        thread.join()

    async def load(self) -> dict[str, JournalEntry]:
        """Return every entry, keyed by ``item_key``."""

        def op(conn: sqlite3.Connection, now: str) -> dict[str, JournalEntry]:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM journal")
            return {row[0]: _row_to_entry(row) for row in rows}

        return await self._call(op)

    async def begin(self, item_key: str, order_id: str, idempotency_key: str) -> None:
        """Durably record an item as in flight; an existing item keeps its key unless refused."""

        def op(conn: sqlite3.Connection, now: str) -> None:
            if conn.execute(_BEGIN, (item_key, order_id, idempotency_key, now)).rowcount == 0:
                (existing,) = conn.execute(
                    "SELECT order_id FROM journal WHERE item_key = ?", (item_key,)
                ).fetchone()
                raise _order_mismatch(item_key, existing, order_id)

        await self._call(op)

    async def finish(
        self,
        item_key: str,
        status: JournalStatus,
        *,
        capture_id: str | None = None,
        error: str | None = None,
        attempts: int = 0,
    ) -> None:
        """Durably record the outcome of a begun item and add ``attempts`` to its total."""
        _check_attempts(attempts)
        params = (JournalStatus(status).value, capture_id, _one_line(error), attempts)

        def op(conn: sqlite3.Connection, now: str) -> None:
            if conn.execute(_FINISH, (*params, now, item_key)).rowcount == 0:
                raise _not_begun(item_key)

        await self._call(op)

    async def entries(self) -> list[JournalEntry]:
        """Return every entry, ordered by ``item_key``."""

        def op(conn: sqlite3.Connection, now: str) -> list[JournalEntry]:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM journal ORDER BY item_key")
            return [_row_to_entry(row) for row in rows]

        return await self._call(op)

    async def summary(self) -> dict[JournalStatus, int]:
        """Return how many items are in each status (zero included)."""

        def op(conn: sqlite3.Connection, now: str) -> dict[JournalStatus, int]:
            counts = dict.fromkeys(JournalStatus, 0)
            rows = conn.execute("SELECT status, count(*) FROM journal GROUP BY status")
            counts.update((JournalStatus(status), n) for status, n in rows)
            return counts

        return await self._call(op)

    async def _call(self, op: Callable[[sqlite3.Connection, str], _T]) -> _T:
        work = self._work
        if work is None:
            raise _not_open(type(self).__name__)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        # A batch's workers call in bursts (every answer read in one loop turn ends an item
        # and begins the next). Sending each call on its own woke the writer thread and
        # committed once per call; sending a turn's calls together commits them as one.
        self._unsent.append((op, future))
        if len(self._unsent) == 1:
            loop.call_soon(self._send_unsent)
        return await future

    def _send_unsent(self) -> None:
        unsent, self._unsent = self._unsent, []
        # Empty when close() sent them first; _call refuses new calls once closed.
        if unsent and self._work is not None:
            self._work.put(unsent)

    # --- everything below runs on the writer thread ---

    def _run(self, work: _Queue, ready: asyncio.Future[None]) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:
            _resolve([(ready, None, exc)])
            return
        _resolve([(ready, None, None)])
        try:
            stops = self._serve(conn, work)
        finally:
            conn.close()
        _resolve([(future, None, None) for future in stops])

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are exactly the BEGIN/COMMIT issued here.
        conn = sqlite3.connect(self._path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self._durability.upper()}")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > _SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self._path}: journal schema version {version} is newer than this "
                    f"version of klarna-om-async supports ({_SCHEMA_VERSION})"
                )
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _serve(self, conn: sqlite3.Connection, work: _Queue) -> list[asyncio.Future[Any]]:
        while True:
            batch = work.get()
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.extend(work.get_nowait())
            calls = [(op, future) for op, future in batch if op is not None]
            if calls:
                _resolve(self._apply(conn, calls))
            stops = [future for op, future in batch if op is None]
            if stops:
                return stops

    def _apply(
        self, conn: sqlite3.Connection, calls: list[tuple[_Op, asyncio.Future[Any]]]
    ) -> list[_Outcome]:
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        outcomes: list[_Outcome] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, future in calls:
                try:
                    outcomes.append((future, op(conn, now), None))
                except Exception as exc:
                    if not conn.in_transaction:
                        raise  # SQLite rolled back the whole transaction (disk full, I/O error)
                    # A failed statement undoes only itself; the others in the group stand.
                    outcomes.append((future, None, exc))
            conn.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            return [(future, None, exc) for _, future in calls]
        self.commits += 1
        return outcomes
