"""The authority on every batch item: which idempotency key it is sent with, and its outcome.

Before an item is sent the batch asks the journal to ``claim`` it; the journal answers with
what to do and the key to send, and durably records the claim. After the outcome the batch
calls ``finish``. The journal decides from everything it holds, never from what one run saw:

- An item's key never changes while money may have moved under it. Once a key may have been
  sent, the item is *uncertain* until a success or a reconciliation settles it; a later
  refusal (401, 403, 429, validation) in this or any later run proves nothing and is
  recorded as ``failed`` (outcome unknown), so the next run resends the same key.
- Only a refused item that never had an uncertain send gets a new key.
- The journal remembers what each item asked for (a fingerprint of the request). An item
  that differs from the journaled one is refused, never resent under the old key or skipped.
- Klarna keeps a key for 24 hours. The journal records when each key was first handed out;
  an uncertain item whose key is older than ``key_max_age`` is not resent but reconciled
  (see :mod:`klarna_om_async.reconcile`).
- One owner per journal file: :class:`~klarna_om_async.sqlite_journal.SQLiteJournal` holds
  an exclusive OS lock on its file while open, so two runs can never send from the same
  journal.

This module holds the decisions (shared by every journal) and :class:`MemoryJournal`; the
durable journal is in :mod:`klarna_om_async.sqlite_journal`.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import Callable, Collection, Iterable
from datetime import UTC, datetime, timedelta
from typing import Protocol, Self

import attrs

from ._keys import KEY_RESEND_WINDOW_S
from ._klarna_clock import in_utc
from .operations import Operation

__all__ = (
    "DEFAULT_KEY_MAX_AGE",
    "KLARNA_KEY_LIFETIME",
    "KLARNA_OM_NAMESPACE",
    "MAX_KEY_MAX_AGE",
    "UNKNOWN_STATUSES",
    "Claim",
    "ClaimAction",
    "ItemRecord",
    "Journal",
    "JournalEntry",
    "JournalError",
    "JournalInUseError",
    "JournalStatus",
    "MemoryJournal",
    "NotAJournalError",
    "check_key_max_age",
    "deterministic_key",
)

KLARNA_OM_NAMESPACE = uuid.UUID("1d2b8123-73b1-4db4-8907-032af9f09d73")
"""Namespace of the keys made by :func:`deterministic_key`; fixed forever, keys depend on it."""

#: Klarna honours a key for 24 hours after its first use; an hour's margin covers clock skew
#: and a send that was slow to leave.
DEFAULT_KEY_MAX_AGE = timedelta(seconds=KEY_RESEND_WINDOW_S)
#: How long Klarna honours a key: a ``key_max_age`` beyond it would resend a key Klarna may
#: have forgotten, which books the operation again.
KLARNA_KEY_LIFETIME = timedelta(hours=24)
#: How far apart this machine's clock and Klarna's may be (reconciliation's ``clock_skew``,
#: and how far a journal's clock may be from Klarna's before a batch stops).
DEFAULT_CLOCK_SKEW = timedelta(minutes=5)
#: The longest ``key_max_age``: Klarna's 24 hours less twice the ``DEFAULT_CLOCK_SKEW`` a
#: journal's clock may be off Klarna's. A key's age is one run's clock (its date) against
#: another's (now): 5 minutes ahead then and 5 behind now, it looks 10 minutes younger.
MAX_KEY_MAX_AGE = KLARNA_KEY_LIFETIME - 2 * DEFAULT_CLOCK_SKEW


def check_key_max_age(key_max_age: timedelta) -> timedelta:
    """``key_max_age`` if it is positive and at most ``MAX_KEY_MAX_AGE`` (23 h 50 min:
    Klarna's 24 hours less the clock skew a batch allows, twice); ``ValueError`` else."""
    if key_max_age <= timedelta(0):
        raise ValueError(f"key_max_age must be positive, not {key_max_age!r}")
    if key_max_age > MAX_KEY_MAX_AGE:
        raise ValueError(
            f"key_max_age must be at most {MAX_KEY_MAX_AGE}, not {key_max_age}: Klarna forgets"
            " a key 24 hours after its first use, the clocks that date a key and judge its"
            " age may each be 5 minutes off Klarna's, and an older key resent books the"
            " operation again"
        )
    return key_max_age


def deterministic_key(business_id: str, *, namespace: uuid.UUID = KLARNA_OM_NAMESPACE) -> str:
    """Return the idempotency key for ``business_id``: the same on every run, no journal needed.

    Derive it from a stable business id such as ``f"{order_id}:{capture_reference}"``; never
    reuse a key for a different operation — Klarna replays the first result for a key and
    ignores the new body. Klarna forgets a key 24 hours after its first use.
    """
    return str(uuid.uuid5(namespace, business_id))


class JournalStatus(enum.StrEnum):
    """Where an item stands in the journal."""

    #: Claimed for sending: the send is under way, or the run died during it (unknown).
    IN_FLIGHT = "in_flight"
    #: Klarna booked it (for every operation: captured, refunded, released, ...);
    #: ``capture_id`` holds the created id (the capture's or the refund's), if any.
    CAPTURED = "captured"
    #: Nothing was booked under any key this item had; the next run sends a new key.
    REFUSED = "refused"
    #: The outcome is unknown; the next run resends the same key (or reconciles it).
    FAILED = "failed"
    #: Reconciliation could not decide; never sent again until a person settles it.
    NEEDS_REVIEW = "needs_review"


_UNKNOWN = frozenset({JournalStatus.IN_FLIGHT, JournalStatus.FAILED})
#: Outcomes not settled: unknown, or waiting for a person.
_UNSETTLED = frozenset({*_UNKNOWN, JournalStatus.NEEDS_REVIEW})


@attrs.frozen(kw_only=True)
class ItemRecord:
    """What an item asks for, as the journal keeps it to recognise the item in a later run."""

    #: The item's identity in the journal (by default ``order_id`` or ``order_id:reference``
    #: for a capture, ``operation:order_id[:reference]`` for the others).
    item_key: str
    order_id: str
    #: The operation's amount in minor units (a refund's ``refunded_amount``); ``None`` for
    #: the body-less operations (release, extend, cancel).
    captured_amount: int | None
    reference: str | None = None
    #: A digest of everything that decides the money moved (operation, order, amount,
    #: lines, reference).
    fingerprint: str
    operation: Operation = Operation.CAPTURE


#: The statuses of an item whose outcome is unknown: money may have moved (``unknown_except``).
UNKNOWN_STATUSES = (JournalStatus.IN_FLIGHT, JournalStatus.FAILED, JournalStatus.NEEDS_REVIEW)


@attrs.frozen(kw_only=True)
class JournalEntry:
    """One item: its key, its last outcome, what it asked for, and when its key was first sent."""

    item_key: str
    order_id: str
    idempotency_key: str
    status: JournalStatus
    #: The id the operation created: the capture's, or the refund's (None for 204s).
    capture_id: str | None
    #: Why it was refused, failed or needs review (one line).
    error: str | None
    #: HTTP attempts made over all runs.
    attempts: int
    updated_at: datetime
    #: ``None`` only in journals written before fingerprints were kept.
    fingerprint: str | None = None
    #: The operation's amount (a refund's ``refunded_amount``); None when body-less.
    captured_amount: int | None = None
    reference: str | None = None
    #: When the current key was first handed out for sending (``None``: not known).
    key_sent_at: datetime | None = None
    #: True while a send under ``idempotency_key`` may have booked money unseen.
    uncertain: bool = False
    #: The run (``capture_many`` or ``run_many`` call) that last claimed it.
    run_id: str | None = None
    #: What the item does; journals written before operations were kept hold captures.
    operation: Operation = Operation.CAPTURE


class ClaimAction(enum.StrEnum):
    """What the journal tells the batch to do with an item."""

    #: Send it now with ``claim.entry.idempotency_key``.
    SEND = "send"
    #: Already captured (``claim.entry.capture_id``); send nothing.
    SKIP = "skip"
    #: Its outcome is unknown and its key older than ``key_max_age``: read the order first.
    RECONCILE = "reconcile"
    #: It needs review by a person; send nothing.
    REVIEW = "review"
    #: It differs from the journaled item, or its key belongs to another item; send nothing.
    CONFLICT = "conflict"


@attrs.frozen
class Claim:
    """The journal's answer to :meth:`Journal.claim`."""

    action: ClaimAction
    #: The item's entry after the claim (for ``SEND``, already durably in flight).
    entry: JournalEntry
    #: Why, for ``CONFLICT``: one line for the user.
    reason: str | None = None
    #: For ``CONFLICT``: the item changed since it was sent under ``entry.idempotency_key``,
    #: whose outcome is still unknown or needs review (money may have moved under that key).
    outcome_unknown: bool = False
    #: For ``SEND``: seconds until the key is older than ``key_max_age`` (from its first
    #: send, perhaps by an earlier run); the send must not be retried past them, or Klarna,
    #: having forgotten the key, would book it again.
    key_time_left: float | None = None


class JournalError(Exception):
    """The journal cannot be used; nothing was sent."""


class JournalInUseError(JournalError):
    """Another run (process or journal object) holds this journal file."""


class NotAJournalError(JournalError):
    """The file is not a klarna-om journal (another program's database, or not SQLite)."""


class Journal(Protocol):
    """What the batch needs from a journal; ``SQLiteJournal`` is the durable one.

    A journal must store each item's ``operation`` (``ItemRecord.operation``) and give it
    back on its entries (``JournalEntry.operation``): an entry whose key Klarna may have
    forgotten is judged by it (a refund against the order's refunds, a release by the
    order's state). ``SQLiteJournal`` (schema 3) and ``MemoryJournal`` store it; the items
    of an SQLite journal written before schema 3 read back as captures, which they were.
    A journal that does not store it (one written to this protocol before operations were
    recorded) reads every entry back as a capture: the batch then refuses, with an
    ``ItemConflictError`` saying so, to reconcile an item whose operation differs (nothing
    is sent; the item stays unknown under its key), and ``om.reconcile(journal)``, which
    knows no items, judges its entries as captures. Its ``key_max_age`` must be at most
    ``MAX_KEY_MAX_AGE``, Klarna's 24 hours less 10 minutes (see :func:`check_key_max_age`).
    """

    async def claim(self, item: ItemRecord, new_key: str, *, run_id: str | None = None) -> Claim:
        """Decide what to do with ``item`` and durably record a ``SEND`` as in flight.

        ``new_key`` is used only when the item gets a new key (new, or refused before). A
        ``SEND`` claim's entry has ``updated_at`` set to the journal's clock now: the batch
        checks that clock against Klarna's before it sends (see ``ClockSkewError``).
        ``run_id`` names the run claiming (one per ``capture_many`` call): given, an item
        that would take a new key (new, or refused before) is refused while another run left
        an item of the same order unknown (or needing review).
        """
        ...

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
        """Durably record an outcome and return the status the journal recorded.

        A ``REFUSED`` outcome of an uncertain item is recorded as ``FAILED`` unless
        ``reconciled`` (Klarna's order proved nothing was booked). A captured item stays
        captured whatever is reported later.
        """
        ...

    async def entries(
        self,
        *,
        statuses: Iterable[JournalStatus] | None = None,
        order_id: str | None = None,
        item_key: str | None = None,
    ) -> list[JournalEntry]:
        """The entries (optionally only these statuses, this order's, or this item's), by
        ``item_key``."""
        ...

    def key_expired(self, entry: JournalEntry) -> bool:
        """True when Klarna may have forgotten ``entry``'s key (older than ``key_max_age``)."""
        ...

    async def close(self) -> None:
        """Release the journal's resources; pending writes are completed first."""
        ...


# --- the decisions, shared by every journal ------------------------------------------------


def _changed(old: JournalEntry, item: ItemRecord) -> str | None:
    """Why ``item`` is not the item journaled as ``old``, or None if it is the same."""
    if old.order_id != item.order_id:
        return f"it was journaled for order {old.order_id!r}, not {item.order_id!r}"
    if old.operation != item.operation:
        return f"it is a {item.operation.value} now, a {old.operation.value} in the journal"
    if old.fingerprint == item.fingerprint:
        return None
    if old.fingerprint is None and old.captured_amount is None:
        return None  # nothing was recorded to compare (a journal of schema version 1)
    if old.captured_amount != item.captured_amount:
        name = "refunded_amount" if item.operation is Operation.REFUND else "captured_amount"
        return f"{name} is {item.captured_amount} now, {old.captured_amount} in the journal"

    if old.reference != item.reference:
        return f"reference is {item.reference!r} now, {old.reference!r} in the journal"
    if old.fingerprint is None:
        return None  # its order lines were not recorded
    return "its order lines differ from the journaled ones"


def _conflict(old: JournalEntry, item: ItemRecord) -> Claim | None:
    why = _changed(old, item)
    if why is None:
        return None
    if old.status is JournalStatus.CAPTURED:
        done = old.operation.done
        made = f" ({old.operation.value} {old.capture_id})" if old.capture_id else ""
        advice = (
            f"it was already {done}{made}; a further {old.operation.value} of the"
            " order needs its own reference"
        )
    else:
        advice = (
            f"its earlier send is {old.status.value} (outcome unknown, key"
            f" {old.idempotency_key}); reconcile the journal first (klarna-om reconcile)"
        )
    reason = f"item {item.item_key!r} changed since it was journaled: {why}; {advice}"
    return Claim(ClaimAction.CONFLICT, old, reason, outcome_unknown=old.status in _UNSETTLED)


def _decide(
    old: JournalEntry | None,
    item: ItemRecord,
    new_key: str,
    *,
    key_owner: str | None,
    sibling: JournalEntry | None,
    now: datetime,
    key_max_age: timedelta,
    run_id: str | None,
) -> Claim:
    """The claim for ``item``; a ``SEND`` claim's entry is what must be written.

    ``key_owner`` is the item that ever held ``new_key`` in the journal, if any. ``sibling``
    is another item of the same order, claimed by another run, whose outcome is unknown (or
    needs review), if any: an item that would take a new key next to it (new, or refused
    before) may be the same capture under a changed reference, or a release or cancel that
    would end the authorization that item may still need.
    """
    if old is not None and old.status in (JournalStatus.CAPTURED, JournalStatus.NEEDS_REVIEW):
        conflict = _conflict(old, item)
        if conflict is not None:
            return conflict
        action = ClaimAction.SKIP if old.status is JournalStatus.CAPTURED else ClaimAction.REVIEW
        return Claim(action, old)
    if old is not None and old.status in _UNKNOWN:
        conflict = _conflict(old, item)
        if conflict is not None:
            return conflict
        if _expired(old, now, key_max_age):
            return Claim(ClaimAction.RECONCILE, old)
        # Its key may have booked money: resend the same key, and remember the doubt.
        resend = attrs.evolve(
            old, status=JournalStatus.IN_FLIGHT, uncertain=True, updated_at=now, run_id=run_id
        )
        return _send(resend, now, key_max_age)
    if old is not None and old.order_id != item.order_id:
        return Claim(ClaimAction.CONFLICT, old, f"item {item.item_key!r}: {_changed(old, item)}")
    if (old is None or old.status is JournalStatus.REFUSED) and sibling is not None:
        return Claim(
            ClaimAction.CONFLICT,
            old or _new_entry(item, new_key, now, run_id),
            _held_back_by(old, item, sibling),
        )
    # New, or refused: nothing was booked, so the item may take a new key (and new content).
    if key_owner is not None and key_owner != item.item_key:
        return Claim(
            ClaimAction.CONFLICT,
            old or _new_entry(item, new_key, now, run_id),
            f"item {item.item_key!r}: idempotency key {new_key} already belongs to item"
            f" {key_owner!r} in this journal; give each capture its own key",
        )
    entry = _new_entry(item, new_key, now, run_id)
    if old is not None:
        entry = attrs.evolve(entry, attempts=old.attempts)
    return _send(entry, now, key_max_age)


def _send(entry: JournalEntry, now: datetime, key_max_age: timedelta) -> Claim:
    assert entry.key_sent_at is not None  # set by every claim that sends
    left = (entry.key_sent_at + key_max_age - now).total_seconds()
    return Claim(ClaimAction.SEND, entry, key_time_left=left)


def _held_back_by(old: JournalEntry | None, item: ItemRecord, sibling: JournalEntry) -> str:
    """Why ``item`` waits for ``sibling``, another run's unsettled item of its order."""
    state = "is new" if old is None else "was refused before"
    head = (
        f"item {item.item_key!r} {state}, but order {item.order_id} has a {_what(sibling)}"
        f" whose outcome is {sibling.status.value} under item {sibling.item_key!r} (key"
        f" {sibling.idempotency_key})"
    )
    if item.captured_amount is None:  # release, extend, cancel: no reference to change
        return (
            f"{head}; a {item.operation.value} of the order waits until that one is settled"
            " (rerun it, or klarna-om reconcile), then rerun"
        )
    return (
        f"{head}; if this line replaces it (a changed reference), settle that one first"
        f" (klarna-om reconcile); if it is a further {item.operation.value}, rerun once that"
        " one is settled"
    )


def _what(entry: JournalEntry) -> str:
    amount = "" if entry.captured_amount is None else f" of {entry.captured_amount}"
    return f"{entry.operation.value}{amount}"


def _expired(entry: JournalEntry, now: datetime, key_max_age: timedelta) -> bool:
    # (A key dated later than now is not taken as expired: two clocks each within
    # DEFAULT_CLOCK_SKEW of Klarna's can be twice that apart, and a new key would be sent
    # while the old one's request may still land: helper-86.)
    sent = entry.key_sent_at
    return sent is None or now - sent >= key_max_age


def _new_entry(item: ItemRecord, key: str, now: datetime, run_id: str | None) -> JournalEntry:
    return JournalEntry(
        item_key=item.item_key,
        order_id=item.order_id,
        idempotency_key=key,
        status=JournalStatus.IN_FLIGHT,
        capture_id=None,
        error=None,
        attempts=0,
        updated_at=now,
        fingerprint=item.fingerprint,
        captured_amount=item.captured_amount,
        reference=item.reference,
        key_sent_at=now,
        uncertain=False,
        run_id=run_id,
        operation=item.operation,
    )


def _finished(
    old: JournalEntry,
    status: JournalStatus,
    capture_id: str | None,
    error: str | None,
    attempts: int,
    reconciled: bool,
    now: datetime,
) -> JournalEntry:
    """``old`` after an outcome; what a later report may not undo stays."""
    total = _total_attempts(old.attempts, attempts)
    change = _finish_change(old.status, old.uncertain, status, reconciled)
    if change is None:
        return attrs.evolve(old, attempts=total, updated_at=now)  # never reopened
    status, uncertain = change
    return attrs.evolve(
        old,
        status=status,
        capture_id=capture_id,
        error=_one_line(error),
        attempts=total,
        uncertain=uncertain,
        updated_at=now,
    )


def _total_attempts(old_attempts: int, attempts: int) -> int:
    if attempts < 0:
        raise ValueError(f"attempts must be >= 0, not {attempts}")
    # Held at SQLite's largest integer, so that every journal records the same outcome.
    return min(old_attempts + attempts, _MAX_ATTEMPTS)


_MAX_ATTEMPTS = 2**63 - 1


def _finish_change(
    old_status: JournalStatus, old_uncertain: bool, status: JournalStatus, reconciled: bool
) -> tuple[JournalStatus, bool] | None:
    """The ``(status, uncertain)`` an outcome records over an item in ``old_status``.

    None when the item is never reopened (captured, or needing review and not reconciled):
    then only its attempts and ``updated_at`` change. Otherwise the outcome's status,
    ``capture_id`` and ``error`` replace the old ones (see :func:`_finished`).
    """
    status = JournalStatus(status)
    if old_status is JournalStatus.CAPTURED or (
        old_status is JournalStatus.NEEDS_REVIEW and not reconciled
    ):
        return None
    uncertain = old_uncertain
    if status is JournalStatus.REFUSED and uncertain and not reconciled:
        status = JournalStatus.FAILED  # a refusal now says nothing of the earlier send
    if status is JournalStatus.FAILED or status is JournalStatus.IN_FLIGHT:
        uncertain = True
    elif status is not JournalStatus.NEEDS_REVIEW:
        uncertain = False  # captured, or proven not booked
    return status, uncertain


def _one_line(error: str | None) -> str | None:
    return None if error is None else " ".join(error.splitlines())


def _not_begun(item_key: str) -> LookupError:
    return LookupError(f"finish() for item {item_key!r}, which this journal never claimed")


# The journal objects a batch or a reconciliation is using now, by id (a journal need not be
# hashable). The file lock keeps other processes and other journal objects out; this keeps
# out a second run on the same object, which would take the first one's items in flight for
# an earlier run's unknown ones and resend them.
_RUNNING: dict[int, asyncio.Event] = {}
# A batch left by ``break`` (or an exception in the loop over it) goes on until its
# generator is closed, which Python does a few loop turns later: the next run waits that
# long for it, not for a run that is still going.
_IN_USE_GRACE_S = 2.0


async def _start_run(journal: Journal) -> None:
    """Mark ``journal`` as used by a run; ``JournalInUseError`` if a run still uses it
    after a short grace."""
    try:
        async with asyncio.timeout(_IN_USE_GRACE_S):
            while (ended := _RUNNING.get(id(journal))) is not None:
                await ended.wait()
    except (TimeoutError, RuntimeError):  # (RuntimeError: it runs in another event loop)
        raise JournalInUseError(
            f"journal {journal!r} is in use by another batch or reconciliation in this"
            " process; one run at a time per journal: let the other finish, or close it first"
            " (await batch.aclose())"
        ) from None
    _RUNNING[id(journal)] = asyncio.Event()


def _end_run(journal: Journal) -> None:
    ended = _RUNNING.pop(id(journal), None)
    if ended is not None:
        ended.set()


def _not_open(name: str) -> RuntimeError:
    return RuntimeError(
        f"{name} is closed or was never opened; use 'async with {name}(...)' or 'await .open()'"
    )


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _selected(
    entries: Iterable[JournalEntry],
    statuses: Iterable[JournalStatus] | None,
    order_id: str | None,
) -> list[JournalEntry]:
    wanted = None if statuses is None else set(statuses)
    return sorted(
        (
            e
            for e in entries
            if (wanted is None or e.status in wanted)
            and (order_id is None or e.order_id == order_id)
        ),
        key=lambda e: e.item_key,
    )


class MemoryJournal:
    """Journal kept in memory: the same decisions as ``SQLiteJournal``, survives nothing.

    Usable at once, without ``open``; useful in tests and for one process's own retries.
    It stores each item's operation. ``key_max_age`` (default 23 hours) must be positive and
    at most Klarna's 24 hours (``ValueError`` otherwise).
    """

    def __init__(
        self,
        *,
        key_max_age: timedelta = DEFAULT_KEY_MAX_AGE,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        check_key_max_age(key_max_age)
        self._entries: dict[str, JournalEntry] = {}
        self._owners: dict[str, str] = {}  # every idempotency key handed out -> item key
        self._by_order: dict[str, set[str]] = {}  # order id -> item keys
        self._key_max_age = key_max_age
        #: The journal's clock (the current UTC time): it dates each key. A batch checks it
        #: against Klarna's before it claims an item to send (``ClockSkewError``).
        self.clock = clock
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

    async def claim(self, item: ItemRecord, new_key: str, *, run_id: str | None = None) -> Claim:
        """Decide what to do with ``item``; record a ``SEND`` as in flight."""
        self._check_open()
        old = self._entries.get(item.item_key)
        sibling = None
        if (old is None or old.status is JournalStatus.REFUSED) and run_id is not None:
            sibling = next(
                (
                    entry
                    for key in self._by_order.get(item.order_id, ())
                    if key != item.item_key
                    and (entry := self._entries[key]).status in _UNSETTLED
                    and entry.run_id != run_id
                ),
                None,
            )
        claim = _decide(
            old,
            item,
            new_key,
            key_owner=self._owners.get(new_key),
            sibling=sibling,
            now=in_utc(self.clock()),
            key_max_age=self._key_max_age,
            run_id=run_id,
        )
        if claim.action is ClaimAction.SEND:
            self._entries[item.item_key] = claim.entry
            self._owners[claim.entry.idempotency_key] = item.item_key
            self._by_order.setdefault(item.order_id, set()).add(item.item_key)
        return claim

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
        """Record an outcome; returns the status recorded (see :meth:`Journal.finish`)."""
        self._check_open()
        old = self._entries.get(item_key)
        if old is None:
            raise _not_begun(item_key)
        new = _finished(old, status, capture_id, error, attempts, reconciled, in_utc(self.clock()))
        self._entries[item_key] = new
        return new.status

    async def entries(
        self,
        *,
        statuses: Iterable[JournalStatus] | None = None,
        order_id: str | None = None,
        item_key: str | None = None,
    ) -> list[JournalEntry]:
        """The entries (optionally only these statuses, this order's, or this item's), by
        ``item_key``."""
        self._check_open()
        if item_key is not None:
            one = self._entries.get(item_key)
            return _selected(() if one is None else (one,), statuses, order_id)
        return _selected(self._entries.values(), statuses, order_id)

    def key_expired(self, entry: JournalEntry) -> bool:
        """True when Klarna may have forgotten ``entry``'s key (older than ``key_max_age``)."""
        return _expired(entry, in_utc(self.clock()), self._key_max_age)

    async def summary(self) -> dict[JournalStatus, int]:
        """How many items are in each status (zero included)."""
        self._check_open()
        counts = dict.fromkeys(JournalStatus, 0)
        for entry in self._entries.values():
            counts[entry.status] += 1
        return counts

    async def unknown_except(
        self, item_keys: Collection[str], *, listed: int = 10
    ) -> tuple[int, list[JournalEntry]]:
        """The items whose outcome is unknown (in flight, failed or needing review) whose
        ``item_key`` is not in ``item_keys``: how many, and the first ``listed`` of them by
        ``item_key``."""
        unknown = await self.entries(statuses=UNKNOWN_STATUSES)
        left = [entry for entry in unknown if entry.item_key not in item_keys]
        return len(left), left[:listed]

    async def done_by_operation(self) -> dict[Operation, int]:
        """How many items Klarna booked (status ``captured``), per operation (none: absent)."""
        self._check_open()
        counts: dict[Operation, int] = {}
        for entry in self._entries.values():
            if entry.status is JournalStatus.CAPTURED:
                counts[entry.operation] = counts.get(entry.operation, 0) + 1
        return {operation: counts[operation] for operation in Operation if operation in counts}

    async def close(self) -> None:
        """Refuse further calls until :meth:`open`; the entries are kept."""
        self._open = False
