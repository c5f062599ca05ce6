"""``SQLiteJournal``: the durable journal, one SQLite file written by one thread.

The decisions it applies (which key an item is sent with, what a rerun does) are in
:mod:`klarna_om_async.journal`; this module keeps them durable, fast and single-owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import queue
import shlex
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable
from datetime import datetime, timedelta
from typing import Any, Literal, Self, TypeVar

from ._klarna_clock import in_utc
from .journal import (
    DEFAULT_KEY_MAX_AGE,
    UNKNOWN_STATUSES,
    Claim,
    ClaimAction,
    ItemRecord,
    JournalEntry,
    JournalError,
    JournalInUseError,
    JournalStatus,
    NotAJournalError,
    _decide,
    _expired,
    _finish_change,
    _not_begun,
    _not_open,
    _one_line,
    _total_attempts,
    _utc_now,
    check_key_max_age,
)
from .operations import Operation

__all__ = ("SQLiteJournal",)


_SCHEMA_VERSION = 4
# "KOMJ": marks the file as ours, so another program's database is never written to.
_APPLICATION_ID = 0x4B4F4D4A
_COLUMNS = (
    "item_key, order_id, idempotency_key, status, capture_id, error, attempts, updated_at,"
    " fingerprint, captured_amount, reference, key_sent_at, uncertain, run_id, operation"
)
_COLUMN_NAMES = [name.strip() for name in _COLUMNS.split(",")]
_V1_COLUMNS = [
    "item_key",
    "order_id",
    "idempotency_key",
    "status",
    "capture_id",
    "error",
    "attempts",
    "updated_at",
]
# A rowid table (schema 4): rows lie in the order they were claimed, so the outcomes of items
# claimed together are written to the same few pages; keyed by item_key (WITHOUT ROWID, as
# before), each outcome of an order id as random as Klarna's dirtied a page of its own, and
# every dirty page is a frame the writer thread writes to the WAL at each commit (a quarter
# of the writer's work for 20,000 items with UUID order ids).
_CREATE = """
CREATE TABLE journal (
    item_key        TEXT PRIMARY KEY NOT NULL,
    order_id        TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    status          TEXT NOT NULL,
    capture_id      TEXT,
    error           TEXT,
    attempts        INTEGER NOT NULL,
    updated_at      TEXT NOT NULL,
    fingerprint     TEXT,
    captured_amount INTEGER,
    reference       TEXT,
    key_sent_at     TEXT,
    uncertain       INTEGER NOT NULL DEFAULT 0,
    run_id          TEXT,
    operation       TEXT NOT NULL DEFAULT 'capture'
);
"""
# Every key ever handed out, and to which item: Klarna replays a key's first answer for 24
# hours, so a key retired by a refused item must not be given to another.
_CREATE_KEYS = """
CREATE TABLE IF NOT EXISTS keys (
    idempotency_key TEXT PRIMARY KEY,
    item_key        TEXT NOT NULL
) WITHOUT ROWID;
"""
# Journals of version 1 kept no fingerprint and no key age: their keys count as expired, so
# an unknown item is reconciled rather than resent blindly.
_MIGRATE_V1 = """
ALTER TABLE journal ADD COLUMN fingerprint TEXT;
ALTER TABLE journal ADD COLUMN captured_amount INTEGER;
ALTER TABLE journal ADD COLUMN reference TEXT;
ALTER TABLE journal ADD COLUMN key_sent_at TEXT;
ALTER TABLE journal ADD COLUMN uncertain INTEGER NOT NULL DEFAULT 0;
ALTER TABLE journal ADD COLUMN run_id TEXT;
UPDATE journal SET uncertain = 1 WHERE status IN ('in_flight', 'failed');
"""
# Version 3 records each item's operation (capture, refund, release, extend, cancel); every
# item of an older journal is a capture, and its amount and id columns keep their meaning.
# ``captured_amount`` holds the operation's amount and ``capture_id`` the id it created.
_MIGRATE_V2 = """
ALTER TABLE journal ADD COLUMN operation TEXT NOT NULL DEFAULT 'capture'
"""
# An order's items by run (schema 4): a claim looks for another run's unsettled item of its
# order and skips its own run's items without reading them (see _CLAIM_READ). Made sure of
# at every open; the index by order alone (schema 3) is dropped.
_BY_ORDER = """
DROP INDEX IF EXISTS journal_by_order;
CREATE INDEX IF NOT EXISTS journal_by_order_run ON journal (order_id, run_id)
"""
# Version 4 rebuilds the table as a rowid table (see _CREATE), in the transaction that opens
# the file: every row is copied as it was, or nothing changes.
_MIGRATE_V3 = f"""
{_CREATE.replace("CREATE TABLE journal (", "CREATE TABLE journal_v4 (").strip().rstrip(";")};
INSERT INTO journal_v4 ({_COLUMNS}) SELECT {_COLUMNS} FROM journal;
DROP TABLE journal;
ALTER TABLE journal_v4 RENAME TO journal
"""
# Whether a run holds the file open (``open_by``: the path it opened), kept in the file.
_CREATE_STATE = (
    "CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"
)
_SELECT_OPEN_BY = "SELECT value FROM state WHERE name = 'open_by'"
_SET_OPEN_BY = "INSERT OR REPLACE INTO state VALUES ('open_by', ?)"
_CLEAR_OPEN_BY = "DELETE FROM state WHERE name = 'open_by'"
_FILL_KEYS = "INSERT OR IGNORE INTO keys SELECT idempotency_key, item_key FROM journal"
_UPSERT = f"""
INSERT INTO journal ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (item_key) DO UPDATE SET
    order_id = excluded.order_id, idempotency_key = excluded.idempotency_key,
    status = excluded.status, capture_id = excluded.capture_id, error = excluded.error,
    attempts = excluded.attempts, updated_at = excluded.updated_at,
    fingerprint = excluded.fingerprint, captured_amount = excluded.captured_amount,
    reference = excluded.reference, key_sent_at = excluded.key_sent_at,
    uncertain = excluded.uncertain, run_id = excluded.run_id, operation = excluded.operation
"""
# A finish needs only what decides the outcome, and writes only what the outcome changes.
_SELECT_STANDING = "SELECT status, attempts, uncertain FROM journal WHERE item_key = ?"
_SET_OUTCOME = """
UPDATE journal SET status = ?, capture_id = ?, error = ?, attempts = ?, uncertain = ?,
    updated_at = ?
WHERE item_key = ?
"""
_SET_ATTEMPTS = "UPDATE journal SET attempts = ?, updated_at = ? WHERE item_key = ?"
# The common finish in one statement: an item in flight that ends captured is recorded
# captured and certain, whatever else it held (see journal._finish_change). When no row
# changes, the item stands otherwise (or was never claimed, or its attempts would pass
# SQLite's integers) and the finish reads it first.
_SET_CAPTURED = """
UPDATE journal SET status = 'captured', capture_id = :capture_id, error = :error,
    attempts = attempts + :attempts, uncertain = 0, updated_at = :now
WHERE item_key = :item_key AND status = 'in_flight'
    AND attempts <= 9223372036854775807 - :attempts
"""
_ADD_KEY = "INSERT OR IGNORE INTO keys VALUES (?, ?)"
# What a claim decides on, in one statement (a statement costs more in Python than in
# SQLite): the owner of the offered key (:key), the item's entry (:item_key), and, for a
# new or refused item claimed by a run (:run_id), one unsettled item of the same order
# (:order_id) left by another run or by a journal that kept no run. That search reads the
# order's items of other runs (three ranges of journal_by_order_run: no run, and runs
# before and after :run_id in text order), never its own run's: a first run of thousands
# of items of one order read them all at each claim. Its first terms (on the parameters
# and the entry) end it at once when the decision does not need it, or a rerun's claims of
# a large order would cost its size each.
_OTHER_RUNS = " UNION ALL ".join(
    f"""SELECT item_key FROM journal
    WHERE :run_id IS NOT NULL AND coalesce(j.status, 'refused') = 'refused'
        AND order_id = :order_id AND {runs} AND item_key != :item_key
        AND status IN ('in_flight', 'failed', 'needs_review')"""
    for runs in ("run_id IS NULL", "run_id < :run_id", "run_id > :run_id")
)
_CLAIM_READ = f"""
SELECT (SELECT item_key FROM keys WHERE idempotency_key = :key),
    {", ".join("j." + name for name in _COLUMN_NAMES)},
    {", ".join("s." + name for name in _COLUMN_NAMES)}
FROM (SELECT 1)
LEFT JOIN journal AS j ON j.item_key = :item_key
LEFT JOIN journal AS s ON s.item_key = ({_OTHER_RUNS} LIMIT 1)
"""
# Where the claim read's row holds the entry and the sibling.
_ENTRY = slice(1, 1 + len(_COLUMN_NAMES))
_SIBLING = slice(1 + len(_COLUMN_NAMES), None)
# How many pages the WAL holds before a commit copies them into the file (SQLite's default is
# 1,000). Items scattered over the indexes (UUID order ids, random keys) write a few pages
# each, so the default copied every ~300 items, each page about once; ten times more copies
# a page written again meanwhile once, and syncs the file a tenth as often. For 200,000 UUID
# order ids the writer's CPU per item falls from about 94 to 77 µs (a quarter fewer reads
# and writes of pages). The WAL file reaches ~40 MB and is removed at close.
_CHECKPOINT_PAGES = 10_000
# Another process (a report) may hold the write lock briefly.
_BUSY_TIMEOUT_S = 30.0
# How long an outcome (a finish) waits for a claim to share its transaction, while claims
# are coming. In a batch an item's outcome and the next claim come from different items a
# few milliseconds apart (at Klarna's 200 per second, 5 ms); sharing one transaction, an
# item costs one commit and one wake-up of each thread instead of two. An outcome waits only
# if another item was claimed after its own, and lately: when the next claim can only come
# after this outcome (one item at a time, an order's items in turn, a reconciliation, a
# batch whose other items are stuck), it would wait for nothing. A claim or a read never
# waits.
_LINGER_S = 0.005
# "Lately": claims that come at least this often are taken as a stream.
_CLAIMED_LATELY_S = 0.010

_T = TypeVar("_T")


class _Group:
    """One transaction of the writer thread: its time, and how many entries it wrote."""

    __slots__ = ("now", "now_text", "writes")

    def __init__(self, now: datetime) -> None:
        #: The time recorded by every write of the group (``updated_at``, ``key_sent_at``).
        self.now = now
        self.now_text = _iso(now)
        #: Entries written (a claim that sends, a finish); for ``commit_listeners``.
        self.writes = 0

    def text(self, when: datetime | None) -> str | None:
        """``when`` as stored; the group's own time is formatted once, not per entry."""
        return self.now_text if when is self.now else _iso(when)


_Op = Callable[..., object]
# (op, args, future, sync): the writer thread calls op(conn, group, *args); sync asks for the
# group's commit to be fsynced before the future resolves. (None, (), future, False) asks
# the writer thread to stop; the future resolves once the file is closed. A claim or finish
# passes a module function and its arguments, not a closure: a closure's cells are a
# handful of objects per call for the garbage collector to count.
_Work = tuple[_Op | None, tuple[Any, ...], "asyncio.Future[Any]", bool]
# The queue carries the calls made in one event-loop turn together (see SQLiteJournal._call).
_Queue = queue.SimpleQueue[list[_Work]]
_Outcome = tuple["asyncio.Future[Any]", object, BaseException | None]
#: ``listener(seconds, entries)``: see ``SQLiteJournal.commit_listeners``.
CommitListener = Callable[[float, int], None]
# A group commit reported to the listeners: (listeners, seconds, entries).
_Commit = tuple[list[CommitListener], float, int]


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat(timespec="microseconds")


def _row_to_entry(row: tuple[Any, ...]) -> JournalEntry:
    (item_key, order_id, key, status, capture_id, error, attempts, updated_at) = row[:8]
    fingerprint, amount, reference, sent_at, uncertain, run_id, operation = row[8:]
    return JournalEntry(
        item_key=item_key,
        order_id=order_id,
        idempotency_key=key,
        status=JournalStatus(status),
        capture_id=capture_id,
        error=error,
        attempts=attempts,
        updated_at=in_utc(datetime.fromisoformat(updated_at)),
        fingerprint=fingerprint,
        captured_amount=amount,
        reference=reference,
        key_sent_at=None if sent_at is None else in_utc(datetime.fromisoformat(sent_at)),
        uncertain=bool(uncertain),
        run_id=run_id,
        operation=Operation(operation),
    )


def _entry_to_row(e: JournalEntry, group: _Group) -> tuple[object, ...]:
    return (
        e.item_key,
        e.order_id,
        e.idempotency_key,
        e.status.value,
        e.capture_id,
        e.error,
        e.attempts,
        group.text(e.updated_at),
        e.fingerprint,
        e.captured_amount,
        e.reference,
        group.text(e.key_sent_at),
        int(e.uncertain),
        e.run_id,
        e.operation.value,
    )


def _claim(
    conn: sqlite3.Connection,
    group: _Group,
    item: ItemRecord,
    new_key: str,
    run_id: str | None,
    key_max_age: timedelta,
) -> Claim:
    """``SQLiteJournal.claim`` on the writer thread: decide, and record a ``SEND``."""
    params = {
        "key": new_key,
        "item_key": item.item_key,
        "order_id": item.order_id,
        "run_id": run_id,
    }
    row = conn.execute(_CLAIM_READ, params).fetchone()
    owner, entry_row, sibling_row = row[0], row[_ENTRY], row[_SIBLING]
    old = None if entry_row[0] is None else _row_to_entry(entry_row)
    # Present only for a new or refused item claimed by a run (see _CLAIM_READ).
    sibling = None if sibling_row[0] is None else _row_to_entry(sibling_row)
    claim = _decide(
        old,
        item,
        new_key,
        key_owner=owner,
        sibling=sibling,
        now=group.now,
        key_max_age=key_max_age,
        run_id=run_id,
    )
    if claim.action is ClaimAction.SEND:
        entry = claim.entry
        conn.execute(_UPSERT, _entry_to_row(entry, group))
        conn.execute(_ADD_KEY, (entry.idempotency_key, entry.item_key))
        group.writes += 1
    return claim


def _finish(
    conn: sqlite3.Connection,
    group: _Group,
    item_key: str,
    status: JournalStatus,
    capture_id: str | None,
    error: str | None,
    attempts: int,
    reconciled: bool,
) -> JournalStatus:
    """``SQLiteJournal.finish`` on the writer thread."""
    # Only with the arguments as the batch passes them: anything else takes the read path,
    # which refuses it as it always did (an item never claimed first of all).
    if (
        status is JournalStatus.CAPTURED
        and type(attempts) is int
        and 0 <= attempts < 2**63
        and (capture_id is None or type(capture_id) is str)
        and (error is None or type(error) is str)
    ):
        captured = {
            "capture_id": capture_id,
            "error": _one_line(error),
            "attempts": attempts,
            "now": group.now_text,
            "item_key": item_key,
        }
        if conn.execute(_SET_CAPTURED, captured).rowcount:
            group.writes += 1
            return JournalStatus.CAPTURED
    # The same decision as journal._finish_change, on the three columns it depends on.
    row = conn.execute(_SELECT_STANDING, (item_key,)).fetchone()
    if row is None:
        raise _not_begun(item_key)
    old_status, old_attempts, old_uncertain = JournalStatus(row[0]), row[1], bool(row[2])
    total = _total_attempts(old_attempts, attempts)
    change = _finish_change(old_status, old_uncertain, status, reconciled)
    if change is None:  # never reopened
        conn.execute(_SET_ATTEMPTS, (total, group.now_text, item_key))
        recorded = old_status
    else:
        recorded, uncertain = change
        params = (
            recorded.value,
            capture_id,
            _one_line(error),
            total,
            int(uncertain),
            group.now_text,
            item_key,
        )
        conn.execute(_SET_OUTCOME, params)
    group.writes += 1
    return recorded


def _settle(outcomes: list[_Outcome], commit: _Commit | None = None) -> None:
    for future, result, exc in outcomes:
        if future.done():  # the caller was cancelled; its write stands anyway
            continue
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
    if commit is not None:
        listeners, seconds, entries = commit
        for listener in tuple(listeners):
            try:
                listener(seconds, entries)
            except Exception as exc:  # a broken listener must not stop the others
                asyncio.get_running_loop().call_exception_handler(
                    {"message": f"journal commit listener {listener!r} failed", "exception": exc}
                )


def _resolve(outcomes: list[_Outcome], commit: _Commit | None = None) -> None:
    # One wake-up per event loop per group, not one per call; the commit is reported on
    # the first loop, in the same wake-up.
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
    for loop, group in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_settle, group, commit)
        commit = None


# Journal files this process holds, by (device, inode): a second journal object on any name
# of a held file is refused before it opens the file, because closing any descriptor of a
# file drops every POSIX lock the process holds on it, SQLite's own included.
_HELD: set[tuple[int, int]] = set()
# flock(2) and SQLite's fcntl(2) locks are independent on Linux; elsewhere (BSD, macOS) they
# may interact, so the lock goes on a file beside the journal instead.
_LOCK_THE_FILE_ITSELF = sys.platform == "linux"


def _in_use(journal: str) -> JournalInUseError:
    return JournalInUseError(
        f"journal {journal} is in use by another run (a klarna-om batch or reconcile, or a"
        " program with an SQLiteJournal open); wait for it to finish, or use another journal"
    )


def _linked(journal: str, names: int) -> JournalError:
    # SQLite keeps the write-ahead log beside the name a file is opened by: a run killed
    # under one name leaves its fsynced claims in that name's log, unseen by a rerun under
    # another name, which would then send those items under new keys.
    return JournalError(
        f"journal {journal} has {names} names (hard links): SQLite keeps the claims of a run"
        " beside the name it opened, so a run under another name would not see them; keep"
        " only the name the last run used (remove the other links), and open it by that name"
    )


def _wal_of(path: str) -> str:
    # Beside the file a symlinked path names, where SQLite keeps it.
    return os.path.realpath(path) + "-wal"


def _left_open(journal: str, used_as: str) -> JournalError:
    clear = shlex.quote("DELETE FROM state WHERE name = 'open_by'")
    return JournalError(
        f"journal {journal} was left open by a run that used it as {used_as}, and that"
        f" run's last claims are in {used_as}-wal, which did not come with it: put that file"
        f" here as {os.path.realpath(journal)}-wal, or open the journal where it was; if it"
        " is lost, the items that run sent last are not in the journal: check their orders"
        f" at Klarna before any rerun, then clear this check: sqlite3 {shlex.quote(journal)}"
        f" {clear}"
    )


def _log_without_journal(journal: str) -> JournalError:
    return JournalError(
        f"{journal} does not exist, but its write-ahead log {_wal_of(journal)} does: a run's"
        " last claims are in it, and the journal they belong to was moved away; put the"
        " journal back here (or the log beside it), or remove the log if it is no journal's"
    )


def _links(path: str) -> int:
    try:
        return os.stat(path).st_nlink
    except FileNotFoundError:  # a new journal (its lock beside it, off Linux)
        return 1


class _OwnerLock:
    """An exclusive, non-blocking lock on the journal file, dropped by the OS if we die.

    On Linux it is flock(2) on the database file itself, so every name of the file (a hard
    link, a symlink) shares it. Elsewhere it is ``realpath(PATH) + ".lock"``. A file with
    more than one hard link is refused (see ``_linked``). Within one process, a registry by
    inode refuses a second journal object.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None

    def acquire(self) -> None:
        if not os.path.exists(self._path) and os.path.exists(_wal_of(self._path)):
            # SQLite would make a new journal here, and delete the log with those claims.
            raise _log_without_journal(self._path)
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self._path)
            if (st.st_dev, st.st_ino) in _HELD:
                raise _in_use(self._path)
        target = self._path if _LOCK_THE_FILE_ITSELF else os.path.realpath(self._path) + ".lock"
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_fd(fd)
        except OSError:
            os.close(fd)  # this process holds no lock on the file (see _HELD)
            raise _in_use(self._path) from None
        st = os.stat(self._path) if _LOCK_THE_FILE_ITSELF else os.fstat(fd)
        links = _links(self._path)
        if links > 1:
            os.close(fd)
            raise _linked(self._path, links)
        self._fd, self._id = fd, (st.st_dev, st.st_ino)
        _HELD.add(self._id)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if self._id is not None:
            _HELD.discard(self._id)
            self._id = None
        if fd is not None:
            os.close(fd)  # drops the lock; the journal's own connection is closed already


if sys.platform == "win32":  # pragma: no cover - CI runs on Linux
    import msvcrt

    def _lock_fd(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

else:
    import fcntl

    def _lock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class SQLiteJournal:
    """Journal in an SQLite file, written by one thread that commits queued writes together.

    Every call returns only once its write is committed: it survives ``kill -9``. With the
    default ``durability="full"`` (WAL, ``synchronous=FULL``) a claim is also fsynced before
    it returns: it survives a power loss or OS crash, so a rerun never hands out a new key for
    an item that may have been sent. An outcome (``finish``) is not fsynced on its own: it
    reaches the disk with the next claim that sends, or when the journal closes (``close``
    raises ``OSError`` if that fsync fails). A power loss before then leaves that item in
    flight, whose key the next run resends (or reconciles), never replaces.
    ``durability="normal"`` (``synchronous=NORMAL``) fsyncs no claim either: a power loss may
    undo the last claims.

    While open it holds an exclusive OS lock on the file: a second journal on it raises
    :class:`JournalInUseError`. A file that is not a klarna-om journal raises
    :class:`NotAJournalError`. ``key_max_age`` (default 23 hours) is how old an unknown item's
    key may be before it is reconciled instead of resent; it must be positive and at most
    Klarna's 24 hours (``ValueError`` otherwise: an older key resent would book again).
    ``clock`` returns the current UTC time (tests drive it; one without a zone is read as
    UTC); a batch checks it against Klarna's before it sends (``ClockSkewError``). Each
    item's operation is stored (schema 3); the items of a journal written before it read
    back as captures.

    A dedicated thread owns the connection: calls queue their work and await a future; the
    thread takes everything queued, applies it in ONE transaction, commits, then resolves the
    futures. A ``finish`` made while claims are coming (another item was claimed after its
    own, within 10 ms) waits up to 5 ms for a later call (the next item's claim) to share its
    transaction; every other call is sent at the end of the event loop's turn. The event
    loop never waits for the disk, and thousands of concurrent calls cost few commits (see
    :attr:`commits`). Cancelling a call does not withdraw its write.
    """

    commits: int
    """Transactions committed by the writer thread so far (for tests and metrics)."""

    write_failure: Exception | None
    """The first error that undid a whole group's transaction (a full disk, an I/O error, a
    lock another program held too long), or None. Each call of that group raised it; a
    caller that stopped waiting for them (a batch interrupted) learns here that outcomes
    it reported may not be recorded (their items stay in flight)."""

    commit_listeners: list[CommitListener]
    """Called as ``listener(seconds, entries)`` after each group commit: ``seconds`` is how
    long the COMMIT took (with ``durability="full"``, its fsync included) and ``entries``
    how many entries the group wrote (claims that send, finishes). Listeners run on the
    event loop's thread (that of the group's first call), in the same callback that wakes
    the group's callers, after their results are set; one that raises is reported to the
    loop's exception handler. Measured only while the list is not empty. Append to it or
    remove from it on the loop's thread."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Literal["normal", "full"] = "full",
        key_max_age: timedelta = DEFAULT_KEY_MAX_AGE,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if durability not in ("normal", "full"):
            raise ValueError(f"durability must be 'normal' or 'full', not {durability!r}")
        if os.fspath(path) in ("", ":memory:"):
            raise ValueError("an SQLiteJournal needs a file; MemoryJournal keeps one in memory")
        check_key_max_age(key_max_age)
        self._path = os.fspath(path)
        self._durability = durability
        self._key_max_age = key_max_age
        #: The journal's clock (the current UTC time): it dates each key. A batch checks it
        #: against Klarna's before it claims an item to send (``ClockSkewError``).
        self.clock = clock
        self._lock = _OwnerLock(self._path)
        self._work: _Queue | None = None
        # Calls made since the last flush; sent to the writer thread as one group.
        self._unsent: list[_Work] = []
        # The loop that sends them at the end of its turn, and the timer that sends them when
        # an outcome's wait for a claim ends (_LINGER_S), with its loop: a loop that ended
        # (asyncio.run returns) may not have run either, and a later loop must not wait on it.
        self._soon: asyncio.AbstractEventLoop | None = None
        self._lingering: asyncio.TimerHandle | None = None
        self._lingering_loop: asyncio.AbstractEventLoop | None = None
        # The item claimed last, and when (time.monotonic()): see _LINGER_S.
        self._last_claim: tuple[str, float] = ("", -math.inf)
        self._thread: threading.Thread | None = None
        # The writer thread's current PRAGMA synchronous (see _set_sync), and whether an
        # outcome has been committed since the last fsync (made durable at close).
        self._synchronous = durability.upper()
        self._unsynced = False
        self.commits = 0
        self.write_failure = None
        self.commit_listeners = []

    def __repr__(self) -> str:
        return f"SQLiteJournal({self._path!r}, durability={self._durability!r})"

    @property
    def path(self) -> str:
        """The journal file."""
        return self._path

    async def open(self) -> Self:
        """Take the file's lock, start the writer thread, create or check the schema.

        Raises :class:`JournalInUseError`, :class:`NotAJournalError`, or ``sqlite3.Error`` /
        ``OSError`` for a file that cannot be opened.
        """
        if self._work is not None:
            raise RuntimeError(f"{self!r} is already open")
        self._lock.acquire()
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
            work.put([(None, (), loop.create_future(), False)])
            self._lock.release()
            raise
        self._work, self._thread = work, thread
        return self

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Complete the queued writes, close the file, stop the thread, release the lock.

        With ``durability="full"``, outcomes written since the last claim are fsynced first;
        ``OSError`` if that fails (the file is closed and its lock released all the same).
        """
        work, thread = self._work, self._thread
        if work is None or thread is None:
            return
        self._send_unsent()  # calls made in this loop turn are written before the file closes
        self._work = self._thread = None
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        work.put([(None, (), closed, False)])
        try:
            await closed
            # The thread has closed the file and is returning, so this join does not wait.
            thread.join()
        finally:
            self._lock.release()

    async def claim(self, item: ItemRecord, new_key: str, *, run_id: str | None = None) -> Claim:
        """Decide what to do with ``item``; durably record a ``SEND`` as in flight."""
        self._last_claim = (item.item_key, time.monotonic())
        return await self._call(_claim, item, new_key, run_id, self._key_max_age, sync=True)

    async def finish(
        self,
        item_key: str,
        status: JournalStatus,
        *,
        capture_id: str | None = None,
        error: str | None = None,
        attempts: int = 0,
        reconciled: bool = False,
    ) -> JournalStatus:
        """Durably record an outcome; returns the status recorded (see :meth:`Journal.finish`)."""
        claimed, at = self._last_claim
        linger = claimed != item_key and time.monotonic() - at < _CLAIMED_LATELY_S
        return await self._call(
            _finish, item_key, status, capture_id, error, attempts, reconciled, linger=linger
        )

    async def entries(
        self,
        *,
        statuses: Iterable[JournalStatus] | None = None,
        order_id: str | None = None,
        item_key: str | None = None,
    ) -> list[JournalEntry]:
        """The entries (optionally only these statuses, this order's, or this item's), by
        ``item_key``."""
        where, params = [], []
        if statuses is not None:
            wanted = [JournalStatus(s).value for s in statuses]
            where.append(f"status IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        if order_id is not None:
            where.append("order_id = ?")
            params.append(order_id)
        if item_key is not None:
            where.append("item_key = ?")
            params.append(item_key)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT {_COLUMNS} FROM journal{clause} ORDER BY item_key"

        def op(conn: sqlite3.Connection, group: _Group) -> list[JournalEntry]:
            return [_row_to_entry(row) for row in conn.execute(sql, params)]

        return await self._call(op)

    async def unknown_except(
        self, item_keys: Collection[str], *, listed: int = 10
    ) -> tuple[int, list[JournalEntry]]:
        """The items whose outcome is unknown (in flight, failed or needing review) whose
        ``item_key`` is not in ``item_keys``: how many, and the first ``listed`` of them by
        ``item_key``. Read a row at a time (the journal may hold a million items);
        ``item_keys`` must not change until it returns."""
        sql = f"SELECT {_COLUMNS} FROM journal WHERE status IN (?, ?, ?) ORDER BY item_key"
        unknown = tuple(status.value for status in UNKNOWN_STATUSES)

        def op(conn: sqlite3.Connection, group: _Group) -> tuple[int, list[JournalEntry]]:
            count = 0
            first: list[JournalEntry] = []
            for row in conn.execute(sql, unknown):
                if row[0] not in item_keys:
                    count += 1
                    if len(first) < listed:
                        first.append(_row_to_entry(row))
            return count, first

        return await self._call(op)

    def key_expired(self, entry: JournalEntry) -> bool:
        """True when Klarna may have forgotten ``entry``'s key (older than ``key_max_age``)."""
        return _expired(entry, in_utc(self.clock()), self._key_max_age)

    async def summary(self) -> dict[JournalStatus, int]:
        """How many items are in each status (zero included)."""

        def op(conn: sqlite3.Connection, group: _Group) -> dict[JournalStatus, int]:
            counts = dict.fromkeys(JournalStatus, 0)
            rows = conn.execute("SELECT status, count(*) FROM journal GROUP BY status")
            counts.update((JournalStatus(status), n) for status, n in rows)
            return counts

        return await self._call(op)

    async def done_by_operation(self) -> dict[Operation, int]:
        """How many items Klarna booked (status ``captured``), per operation (none: absent)."""

        def op(conn: sqlite3.Connection, group: _Group) -> dict[Operation, int]:
            rows = conn.execute(
                "SELECT operation, count(*) FROM journal WHERE status = 'captured'"
                " GROUP BY operation"
            )
            counts = {Operation(operation): n for operation, n in rows}
            return {operation: counts[operation] for operation in Operation if operation in counts}

        return await self._call(op)

    def _call(
        self, op: Callable[..., _T], *args: Any, sync: bool = False, linger: bool = False
    ) -> asyncio.Future[_T]:
        """``op(conn, group, *args)`` on the writer thread, in the next group's transaction;
        await the future it returns (a plain function: one coroutine fewer per call).

        ``linger``: the call may wait up to ``_LINGER_S`` for another call to share its
        transaction (an outcome waits for the next claim); any other call sends it at once.
        """
        work = self._work
        if work is None:
            raise _not_open(type(self).__name__)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        # A batch's workers call in bursts (every answer read in one loop turn ends an item
        # and begins the next). Sending each call on its own woke the writer thread and
        # committed once per call; sending a turn's calls together commits them as one, and
        # an outcome waiting for the next claim shares its commit too.
        self._unsent.append((op, args, future, sync))
        if self._soon is loop:
            return future  # sent at the end of this turn anyway
        if not linger:
            self._soon = loop
            loop.call_soon(self._send_unsent)
        elif self._lingering is None or self._lingering_loop is not loop:
            self._lingering = loop.call_later(_LINGER_S, self._send_unsent)
            self._lingering_loop = loop
        return future

    def _send_unsent(self) -> None:
        self._soon = None
        lingering, self._lingering = self._lingering, None
        if lingering is not None and self._lingering_loop is asyncio.get_running_loop():
            lingering.cancel()  # (a timer of another loop is left to find nothing to send)
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
        failed: OSError | None = None
        try:
            stops = self._serve(conn, work)
        finally:
            try:
                if self._unsynced:
                    self._sync_wal()
            except OSError as exc:
                failed = exc
            finally:
                self._mark_closed(conn)
                conn.close()
        _resolve([(future, None, failed) for future in stops])

    def _connect(self) -> sqlite3.Connection:
        # Before SQLite opens the file (and makes a log of its own): a log left by a run.
        wal = _wal_of(self._path)
        logged = os.path.exists(wal) and os.path.getsize(wal) > 0
        # isolation_level=None: transactions are exactly the BEGIN/COMMIT issued here.
        conn = sqlite3.connect(self._path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._check_schema(conn)
            conn.execute("COMMIT")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {_CHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            self._mark_open(conn, logged)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if isinstance(exc, sqlite3.OperationalError):
                raise
            raise NotAJournalError(f"{self._path} is not a klarna-om journal: {exc}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _mark_open(self, conn: sqlite3.Connection, logged: bool) -> None:
        """Refuse a file a run left open elsewhere whose write-ahead log did not come with
        it, then mark the file open (in the file itself, not only in its log) until
        ``close``.

        SQLite keeps a run's last writes (its claims) in ``PATH-wal`` until they are copied
        into the file. A run killed, then the file moved or copied without that log, and a
        rerun would send those items again under new keys. Where the run left it, the file
        is trusted: a log missing there was copied in and removed (a ``sqlite3`` shell does
        so when it closes), or removed by hand.
        """
        here = os.path.realpath(self._path)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(_CREATE_STATE)
        row = conn.execute(_SELECT_OPEN_BY).fetchone()
        if row is not None and row[0] != here and not logged:
            conn.execute("ROLLBACK")
            raise _left_open(self._path, row[0])
        conn.execute(_SET_OPEN_BY, (here,))
        conn.execute("COMMIT")
        # Into the file: a copy of the file alone then carries the mark (and every write a
        # killed run's log held, now recovered). PASSIVE: a reader in a transaction would
        # hold any other mode for the whole busy timeout; the mark then stays in the log.
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @staticmethod
    def _mark_closed(conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):  # then the log stays, and with it the mark
            conn.execute(_CLEAR_OPEN_BY)

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        (app_id,) = conn.execute("PRAGMA application_id").fetchone()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        # Every schema object (tables, views, indexes, triggers): any of them makes it someone's.
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
        if app_id == _APPLICATION_ID:
            if version > _SCHEMA_VERSION:
                raise NotAJournalError(
                    f"{self._path}: journal schema version {version} is newer than this "
                    f"version of klarna-om-async supports ({_SCHEMA_VERSION}); upgrade it"
                )
            if version == 2:
                conn.execute(_MIGRATE_V2)
            if version < _SCHEMA_VERSION:
                self._execute_all(conn, _MIGRATE_V3)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            self._execute_all(conn, _BY_ORDER)
            return
        if not tables and app_id == 0:
            conn.execute(_CREATE)
            conn.execute(_CREATE_KEYS)
        elif app_id == 0 and version == 1 and tables == ["journal"] and self._v1(conn):
            self._execute_all(conn, _MIGRATE_V1)
            conn.execute(_MIGRATE_V2)
            conn.execute(_CREATE_KEYS)
            self._execute_all(conn, _MIGRATE_V3)
        else:
            what = ", ".join(tables[:3]) or f"application id {app_id}"
            raise NotAJournalError(
                f"{self._path} is not a klarna-om journal (it holds {what}); choose another"
                " journal path"
            )
        self._execute_all(conn, _BY_ORDER)
        conn.execute(_FILL_KEYS)
        conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @staticmethod
    def _execute_all(conn: sqlite3.Connection, script: str) -> None:
        # One statement at a time: executescript() would commit the transaction first.
        for statement in script.strip().split(";\n"):
            conn.execute(statement.rstrip(";"))

    @staticmethod
    def _v1(conn: sqlite3.Connection) -> bool:
        return [r[1] for r in conn.execute("PRAGMA table_info(journal)")] == _V1_COLUMNS

    def _serve(self, conn: sqlite3.Connection, work: _Queue) -> list[asyncio.Future[Any]]:
        while True:
            batch = work.get()
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.extend(work.get_nowait())
            calls = [work for work in batch if work[0] is not None]
            if calls:
                _resolve(*self._apply(conn, calls))
            stops = [future for op, _, future, _ in batch if op is None]
            if stops:
                return stops

    def _apply(
        self, conn: sqlite3.Connection, calls: list[_Work]
    ) -> tuple[list[_Outcome], _Commit | None]:
        """Apply ``calls`` in one transaction: their outcomes, and the commit to report."""
        group = _Group(in_utc(self.clock()))
        listeners = self.commit_listeners
        outcomes: list[_Outcome] = []
        try:
            self._set_sync(conn, any(sync for _, _, _, sync in calls))
            conn.execute("BEGIN IMMEDIATE")
            for op, args, future, _ in calls:
                assert op is not None  # _serve passes only calls
                try:
                    outcomes.append((future, op(conn, group, *args), None))
                except Exception as exc:
                    if not conn.in_transaction:
                        raise  # SQLite rolled back the whole transaction (disk full, I/O error)
                    # A failed statement undoes only itself; the others in the group stand.
                    outcomes.append((future, None, exc))
            started = time.perf_counter() if listeners else 0.0
            conn.execute("COMMIT")
            seconds = time.perf_counter() - started if listeners else 0.0
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            if self.write_failure is None:
                self.write_failure = exc  # read on the loop: one reference, set once
            return [(future, None, exc) for _, _, future, _ in calls], None
        self.commits += 1
        if group.writes and self._durability == "full":
            # A commit with synchronous=FULL fsyncs the whole WAL, earlier outcomes included.
            self._unsynced = self._synchronous == "NORMAL"
        return outcomes, (listeners, seconds, group.writes) if listeners else None

    def _set_sync(self, conn: sqlite3.Connection, sync: bool) -> None:
        # Only a claim must reach the disk before it returns: its key may leave the next
        # moment. An outcome that a power loss undoes leaves its item in flight, whose key
        # is resent (or reconciled), never replaced; it reaches the disk with the next
        # fsynced commit (the WAL is fsynced whole, in order) or at close (_sync_wal). Half
        # the fsyncs: less waiting for a slow disk.
        # The setting applies to the next transaction, so it is made before BEGIN. A group
        # that writes nothing (a claim that sends nothing) fsyncs nothing either.
        synchronous = "FULL" if sync and self._durability == "full" else "NORMAL"
        if synchronous != self._synchronous:
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            self._synchronous = synchronous

    def _sync_wal(self) -> None:
        # Closing checkpoints the WAL into the file (fsyncing both) only when no other
        # connection (a reader, a sqlite3 shell) has the file open; this does not depend on it.
        # SQLite locks the -shm file and the database, never the -wal: closing this
        # descriptor drops none of its locks.
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(_wal_of(self._path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._unsynced = False
