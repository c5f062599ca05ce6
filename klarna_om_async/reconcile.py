"""Reconciliation: settle an item whose outcome is unknown by reading Klarna's order.

When a capture's answer was lost, resending it with the same idempotency key is the exact way
to learn its outcome, but only while Klarna remembers the key (24 hours). After that, or when
asked, the order itself is read (``GET /ordermanagement/v1/orders/{order_id}``) and its
captures are compared with what the journal says the item asked for:

- one capture with the item's ``reference`` and amount, booked after the key was first sent
  (less ``clock_skew``) and not already recorded for another item: **captured**;
- no capture that could be the item's: **not captured**; the item may be sent with a new key;
- anything else (no reference and a capture of the same amount, several candidates, a capture
  with the reference but another amount): **needs review**. It is never sent again; the
  evidence is reported, and a person decides.

A per-capture ``reference`` makes this exact: Klarna stores it on the capture, so the item's
capture is found by name, not guessed from amounts and times.

The other operations (the journal records each item's):

- a **refund** is judged against the order's refunds exactly as a capture is against its
  captures (reference, ``refunded_amount``, ``refunded_at``);
- a **release** is done only when nothing is left authorized *and* the order was released:
  ``remaining_authorized_amount`` 0, ``captured_amount`` below ``order_amount`` and status
  ``CAPTURED`` or ``CLOSED``. An expired or cancelled order also has nothing left
  authorized, and a fully captured one nothing to release: neither proves a release, so it
  is judged not done (a resend is then refused by Klarna, never booked);
- a **cancel** is done only when the order's status is ``CANCELLED``; otherwise it was not
  done and may be sent with a new key;
- an **extend** cannot be told from the order; repeating it is harmless (the same day gives
  the same date), so it is judged not done and sent again.

``Verdict.CAPTURED`` means "Klarna booked it" for every operation, ``NOT_CAPTURED`` "never
booked" (the values stay as journals and scripts know them).

The operation judged is the one the journal records with the item. A journal that keeps
no operation (written to the ``Journal`` protocol before operations were recorded) reads
every entry back as a capture, and ``reconcile`` judges it as one; a batch that knows the
item's operation refuses to reconcile such an entry (see ``klarna_om_async.batch``).
https://docs.klarna.com/api/ordermanagement/#operation/getOrder
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Collection, Iterable
from datetime import datetime, timedelta
from typing import Protocol, TypeAlias

import attrs

from ._klarna_clock import KlarnaClock, clock_skew
from .config import check_count
from .errors import ClockSkewError, KlarnaError, NoSuchOrderError
from .journal import (
    DEFAULT_CLOCK_SKEW,
    Journal,
    JournalEntry,
    JournalStatus,
    _end_run,
    _start_run,
)
from .models import Order, OrderStatus
from .operations import Operation
from .orders import OrdersService

__all__ = (
    "DEFAULT_CLOCK_SKEW",
    "ReconcileListener",
    "ReconcileWatch",
    "Reconciliation",
    "Verdict",
    "judge",
    "order_shows",
    "reconcile",
    "reconcile_entry",
    "reconcile_listeners",
)


class Verdict(enum.StrEnum):
    """What Klarna's order says about an item whose outcome was unknown."""

    #: Booked (captured, refunded, released, ...): the journal records the created id.
    CAPTURED = "captured"
    #: Never booked (the key has expired): the next run sends it with a new key.
    NOT_CAPTURED = "not_captured"
    #: Ambiguous (the key has expired): never sent again until a person settles it.
    NEEDS_REVIEW = "needs_review"
    #: Not found, but Klarna still knows the key: the next run resends the same key, which
    #: settles it exactly (a new key could double-capture if the first send lands late).
    RESEND = "resend"


@attrs.frozen(kw_only=True)
class Reconciliation:
    """The verdict on one journal item, with the evidence it rests on."""

    item_key: str
    order_id: str
    #: The key the unknown send used.
    idempotency_key: str
    #: ``None`` when the order could not be read: the item stays unknown (see ``error``).
    verdict: Verdict | None
    #: The id the item created (its capture's or refund's), when the verdict is ``captured``.
    capture_id: str | None = None
    #: What the order shows, in one line.
    evidence: str
    error: KlarnaError | None = None
    #: The item's operation, as the journal records it.
    operation: Operation = Operation.CAPTURE


@attrs.frozen
class _Booked:
    """A capture or a refund of the order, as the judge compares it."""

    id: str | None
    amount: int | None
    at: datetime | None
    reference: str | None


def _ids(booked: Iterable[_Booked]) -> str:
    return ", ".join(f"{b.id} ({b.amount}, {b.reference!r})" for b in booked)


def _booked(entry: JournalEntry, order: Order) -> list[_Booked]:
    if entry.operation is Operation.REFUND:
        return [
            _Booked(r.refund_id, r.refunded_amount, r.refunded_at, r.reference)
            for r in order.refunds or ()
        ]
    return [
        _Booked(c.capture_id, c.captured_amount, c.captured_at, c.reference)
        for c in order.captures or ()
    ]


def judge(
    entry: JournalEntry,
    order: Order,
    *,
    claimed: Collection[str] = (),
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
) -> tuple[Verdict, str | None, str]:
    """Decide ``entry`` from ``order``: (verdict, created id if booked, evidence).

    A pure function. ``claimed`` holds the ids (captures or refunds, as ``entry``'s
    operation makes) the journal already gives to other items.
    """
    match entry.operation:
        case Operation.RELEASE | Operation.CANCEL:
            done, evidence = order_shows(entry.operation, order)
            return (Verdict.CAPTURED if done else Verdict.NOT_CAPTURED), None, evidence
        case Operation.EXTEND:
            return (
                Verdict.NOT_CAPTURED,
                None,
                f"an extension cannot be seen on the order (expires_at {order.expires_at});"
                " repeating it is harmless",
            )
        case _:
            return _judge_booked(entry, order, claimed, clock_skew)


#: The statuses of an order whose remaining authorization was released (``CLOSED`` once
#: everything captured was also refunded).
_RELEASED = frozenset({OrderStatus.CAPTURED, OrderStatus.CLOSED})


def order_shows(operation: Operation, order: Order) -> tuple[bool, str]:
    """Whether ``order`` proves a release or a cancel done: (done, evidence in one line).

    A release: nothing left authorized, less captured than the order amount (a fully
    captured order has nothing to release), and the status ``CAPTURED`` or ``CLOSED`` (an
    ``EXPIRED`` or ``CANCELLED`` order has nothing left authorized without any release). A
    cancel: the status ``CANCELLED``. ``ValueError`` for another operation (the order
    cannot show it).
    """
    status = order.status
    if operation is Operation.CANCEL:
        if status == OrderStatus.CANCELLED:
            return True, "the order is cancelled"
        return False, f"the order is {status}, not cancelled"
    if operation is not Operation.RELEASE:
        raise ValueError(f"the order cannot show whether a {operation.value} was done")
    remaining, captured = order.remaining_authorized_amount, order.captured_amount
    amounts = (
        f"remaining_authorized_amount {remaining}, captured {captured} of {order.order_amount}"
    )
    if remaining:
        return False, f"the order still has {remaining} authorized (status {status})"
    if status not in _RELEASED:
        return False, f"the order is {status} ({amounts}): that is no release"
    if remaining is None or captured is None or order.order_amount is None:
        return False, f"the order does not show its amounts ({amounts})"
    if captured >= order.order_amount:
        return False, f"the order is fully captured ({amounts}): there was nothing to release"
    return True, f"the order was released ({status}, {amounts})"


def _judge_booked(
    entry: JournalEntry, order: Order, claimed: Collection[str], clock_skew: timedelta
) -> tuple[Verdict, str | None, str]:
    noun = "refund" if entry.operation is Operation.REFUND else "capture"
    since: datetime | None = None if entry.key_sent_at is None else entry.key_sent_at - clock_skew
    pool = [
        b
        for b in _booked(entry, order)
        if b.id not in claimed and (since is None or b.at is None or b.at >= since)
    ]
    after = "" if since is None else f" since {since.isoformat(timespec='seconds')}"
    if entry.operation is Operation.REFUND:
        totals = f"order refunded {order.refunded_amount}, captured {order.captured_amount}"
    else:
        totals = (
            f"order captured {order.captured_amount}, remaining {order.remaining_authorized_amount}"
        )
    amount = entry.captured_amount
    if entry.reference:
        named = [b for b in pool if b.reference == entry.reference]
        exact = [b for b in named if amount is None or b.amount == amount]
        if len(exact) == 1 and len(named) == 1:
            found = exact[0]
            return (
                Verdict.CAPTURED,
                found.id,
                f"{noun} {found.id} of {found.amount} with reference {entry.reference!r}",
            )
        if named:
            return (
                Verdict.NEEDS_REVIEW,
                None,
                f"{noun}s with reference {entry.reference!r}{after} do not match one {noun}"
                f" of {amount}: {_ids(named)}",
            )
        return (
            Verdict.NOT_CAPTURED,
            None,
            f"no {noun} with reference {entry.reference!r}{after} ({totals})",
        )
    same = [b for b in pool if amount is None or b.amount == amount]
    if not same:
        what = "any amount" if amount is None else str(amount)
        return Verdict.NOT_CAPTURED, None, f"no {noun} of {what}{after} ({totals})"
    return (
        Verdict.NEEDS_REVIEW,
        None,
        f"the item has no reference, and {len(same)} {noun}(s){after} could be it: {_ids(same)}",
    )


_STATUS: dict[Verdict, JournalStatus] = {
    Verdict.CAPTURED: JournalStatus.CAPTURED,
    Verdict.NOT_CAPTURED: JournalStatus.REFUSED,
    Verdict.NEEDS_REVIEW: JournalStatus.NEEDS_REVIEW,
}


def _result(
    entry: JournalEntry,
    verdict: Verdict | None,
    evidence: str,
    *,
    capture_id: str | None = None,
    error: KlarnaError | None = None,
) -> Reconciliation:
    return Reconciliation(
        item_key=entry.item_key,
        order_id=entry.order_id,
        idempotency_key=entry.idempotency_key,
        verdict=verdict,
        capture_id=capture_id,
        evidence=evidence,
        error=error,
        operation=entry.operation,
    )


class ReconcileWatch(Protocol):
    """What a reconcile listener watches one reconciliation with (see
    :data:`reconcile_listeners`)."""

    def ended(self, result: Reconciliation | None, error: BaseException | None) -> None:
        """Called once, in the task that reconciled: with the result, or with the error
        ``reconcile_entry`` raises (then ``result`` is None)."""


#: Called with the orders service and the entry as its order is about to be read; returns
#: a ``ReconcileWatch`` (or None to leave this one alone).
ReconcileListener: TypeAlias = Callable[[OrdersService, JournalEntry], ReconcileWatch | None]

#: Hooks for observers of reconciliations (``klarna_om_async.telemetry.instrument`` adds
#: one). Empty by default, and then ``reconcile_entry`` does no work for them. A listener
#: runs in the task that reconciles, around the order read and the journal write (e.g. to
#: make a span the current one); it must not raise.
reconcile_listeners: list[ReconcileListener] = []


async def reconcile_entry(
    orders: OrdersService,
    journal: Journal,
    entry: JournalEntry,
    *,
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
) -> Reconciliation:
    """Read ``entry``'s order, judge it, and record the verdict in ``journal``.

    Reconcile one order's items one at a time (``reconcile`` does): each must see the
    captures the previous ones were given.

    ``not captured`` is recorded as ``refused`` (nothing booked: the next claim gets a new
    key). When the order cannot be read, nothing is recorded and ``verdict`` is ``None``.
    While the item's key is still within the journal's ``key_max_age`` only a capture found
    is recorded; otherwise the verdict is ``resend`` and the item stays as it is.

    Raises only what the journal raises: a ``KlarnaError`` from reading the order is on the
    returned ``Reconciliation`` (``error``, ``verdict=None``).
    https://docs.klarna.com/api/ordermanagement/#operation/getOrder
    """
    if not reconcile_listeners:
        return await _reconcile_entry(orders, journal, entry, clock_skew)
    watches = [
        watch
        for listener in tuple(reconcile_listeners)
        if (watch := listener(orders, entry)) is not None
    ]
    try:
        result = await _reconcile_entry(orders, journal, entry, clock_skew)
    except BaseException as error:
        for watch in reversed(watches):
            watch.ended(None, error)
        raise
    for watch in reversed(watches):
        watch.ended(result, None)
    return result


async def _reconcile_entry(
    orders: OrdersService, journal: Journal, entry: JournalEntry, clock_skew: timedelta
) -> Reconciliation:
    try:
        order = await orders.get(entry.order_id)
    except KlarnaError as error:
        # Even a 404 proves nothing: these may be another account's, region's or
        # environment's credentials, under which the order (and its capture) is invisible.
        why = (
            "Klarna shows no such order to these credentials (another account, region or"
            " playground?)"
            if isinstance(error, NoSuchOrderError)
            else "could not read the order"
        )
        return _result(entry, None, f"{why}: {error}", error=error)
    off = _clock_off(orders, journal, entry, clock_skew)
    if off is not None:  # the verdict would rest on the journal's clock: none is recorded
        return _result(entry, None, str(off), error=off)
    others = await journal.entries(order_id=entry.order_id)
    claimed = {
        e.capture_id
        for e in others
        if e.capture_id is not None
        and e.item_key != entry.item_key
        and e.operation is entry.operation
    }
    verdict, capture_id, evidence = judge(entry, order, claimed=claimed, clock_skew=clock_skew)
    if verdict is not Verdict.CAPTURED and not journal.key_expired(entry):
        evidence = f"{evidence}; the key is still valid, so a rerun resends it"
        return _result(entry, Verdict.RESEND, evidence)
    await journal.finish(
        entry.item_key,
        _STATUS[verdict],
        capture_id=capture_id,
        error=None if verdict is Verdict.CAPTURED else f"reconciled: {evidence}",
        reconciled=True,
    )
    return _result(entry, verdict, evidence, capture_id=capture_id)


def _clock_off(
    orders: OrdersService, journal: Journal, entry: JournalEntry, allowed: timedelta
) -> ClockSkewError | None:
    """Why ``journal``'s clock cannot judge ``entry``: more than ``allowed`` (``clock_skew``,
    at most the batch's 5 minutes) from Klarna's time, as the order's answer just told it,
    or no answer told Klarna's time (no ``Date``: a proxy that drops it). Whether Klarna
    still remembers the key, and which captures came after it (from ``key_sent_at`` less
    ``clock_skew``), are judged by that clock."""
    journal_clock = getattr(journal, "clock", None)
    klarna_clock: KlarnaClock | None = getattr(orders, "klarna_clock", None)
    if journal_clock is None or klarna_clock is None:
        return None
    klarna_now = klarna_clock.now()
    off = clock_skew(journal_clock(), klarna_now)
    if off is not None and abs(off) <= min(allowed, DEFAULT_CLOCK_SKEW):
        return None
    error = ClockSkewError(skew=off, klarna_time=klarna_now, idempotency_key=entry.idempotency_key)
    error.earlier_attempt_unknown = True
    return error


async def reconcile(
    orders: OrdersService,
    journal: Journal,
    *,
    concurrency: int = 8,
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
) -> list[Reconciliation]:
    """Reconcile every item of ``journal`` whose outcome is unknown (in flight or failed).

    Reads each item's order (at most ``concurrency`` at once) and records the verdicts; see
    :func:`reconcile_entry`. Items that need review are left alone. Use ``om.reconcile``.
    Each item is judged by the operation its entry records (see :func:`judge`): a release
    only by an order that was released, a cancel only by a cancelled one. A journal that
    keeps no operation reads every entry back as a capture, and it is judged as one.

    ``clock_skew``: how far the journal's clock may be from Klarna's; a capture booked
    earlier than the key's date less this is not the item's. An item whose order's answer
    shows the journal's clock further off than ``clock_skew`` (or 5 minutes, if less), or
    shows no time at all (no ``Date``), gets no verdict: ``verdict=None`` with a
    ``ClockSkewError``.

    Returns one ``Reconciliation`` per unknown item. Raises ``ValidationError`` (a
    ``ValueError``) unless ``concurrency`` is a whole number from 1 to 10,000, and what the
    journal raises; an order that cannot be read is reported on its items'
    ``Reconciliation`` (``verdict=None``), not raised.
    https://docs.klarna.com/api/ordermanagement/#operation/getOrder
    """
    check_count("concurrency", concurrency)
    await _start_run(journal)
    try:
        return await _reconcile_all(orders, journal, concurrency, clock_skew)
    finally:
        _end_run(journal)


async def _reconcile_all(
    orders: OrdersService, journal: Journal, concurrency: int, clock_skew: timedelta
) -> list[Reconciliation]:
    unknown = await journal.entries(statuses=(JournalStatus.IN_FLIGHT, JournalStatus.FAILED))
    by_order: dict[str, list[JournalEntry]] = {}
    for entry in unknown:
        by_order.setdefault(entry.order_id, []).append(entry)
    per_order: list[list[Reconciliation]] = [[] for _ in by_order]
    # ``concurrency`` workers take orders in turn: a task per order, started at once, cost
    # a journal of a million unknown items a million tasks.
    pending = iter(zip(per_order, by_order.values(), strict=True))

    async def worker() -> None:
        for results, entries in pending:
            # One order's items in turn: each must see the captures the previous ones claimed.
            for entry in entries:
                results.append(await reconcile_entry(orders, journal, entry, clock_skew=clock_skew))

    workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(by_order)))]
    try:
        await asyncio.gather(*workers)
    finally:
        # After a failure (the journal's), the other workers stop taking orders.
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return [result for results in per_order for result in results]
