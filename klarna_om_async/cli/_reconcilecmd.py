"""``klarna-om reconcile JOURNAL``: settle every unknown item of a batch journal from Klarna."""

from __future__ import annotations

import collections
import os
import sqlite3
import sys

import attrs
import click

from .._routes import normalize_id
from ..client import KlarnaOM
from ..errors import KlarnaError, NotFoundError, ValidationError
from ..journal import JournalEntry, JournalStatus
from ..operations import Operation
from ..orders import OrdersService
from ..reconcile import Reconciliation, Verdict, reconcile_listeners
from ..sqlite_journal import SQLiteJournal
from ._options import (
    EXIT_OK,
    EXIT_SOME_NOT_CAPTURED,
    Connection,
    InputError,
    Interrupted,
    connection_options,
    damaged,
    journal_fault,
    json_option,
    open_journal,
    run_interruptible,
)
from ._render import echo_json

__all__ = ("reconcile",)

_SAYS = {
    Verdict.CAPTURED: "captured",
    Verdict.NOT_CAPTURED: "not captured: the next batch run sends it with a new key",
    Verdict.NEEDS_REVIEW: "needs review: never sent again",
    Verdict.RESEND: "not found yet: its key is still valid, the next batch run resends it",
    None: "still unknown",
}


@click.command()
@click.argument("journal", type=click.Path(dir_okay=False))
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=64),
    default=8,
    show_default=True,
    help="Orders read at once.",
)
@click.option(
    "--captured",
    "mark_captured",
    nargs=2,
    multiple=True,
    metavar="ITEM_KEY ID",
    help="Settle an item by hand: it was booked as ID, a capture id (or a refund id for a"
    " refund item) (repeatable).",
)
@click.option(
    "--not-captured",
    "mark_not_captured",
    multiple=True,
    metavar="ITEM_KEY",
    help="Settle an item by hand: it was never booked; a rerun sends it with a new key "
    "(repeatable).",
)
@connection_options
@json_option
def reconcile(
    journal: str,
    concurrency: int,
    mark_captured: tuple[tuple[str, str], ...],
    mark_not_captured: tuple[str, ...],
    json_output: bool,
) -> None:
    """Settle every item of JOURNAL whose outcome is unknown, by reading its order.

    \b
    For each item in flight or failed, the order is read from Klarna and its captures (its
    refunds, for a refund item) are compared with what the item asked for:
      captured       a capture with the item's reference and amount, booked after the
                     item's key was first sent: recorded, a rerun skips it
      not captured   no capture can be the item's: a rerun sends it with a new key
      needs review   ambiguous (no reference, several candidates): never sent again;
                     check the order in the Klarna merchant portal
      resend         not found, but Klarna still knows the key (under 23 h old): a rerun
                     resends the same key, which settles it exactly
    A reference per capture (the batch file's `reference` column) makes this exact.
    A release is done when nothing remains authorized, a cancel when the order is
    cancelled; an extend cannot be seen on the order and is sent again (harmless).

    \b
    After checking an item that needs review in the Klarna merchant portal, settle it:
      klarna-om reconcile JOURNAL --captured ITEM_KEY CAPTURE_OR_REFUND_ID
      klarna-om reconcile JOURNAL --not-captured ITEM_KEY
    (ITEM_KEY is ORDER_ID, or ORDER_ID:REFERENCE, or refund:ORDER_ID[:REFERENCE]; the
    batch output shows it.) Only the given id is read from Klarna then.

    \b
    Exit status: 0 nothing left to review; 1 some items need review or could not be
    read; 2 usage errors or a journal that cannot be used; 130 interrupted (Ctrl-C);
    143 terminated (SIGTERM).
    """
    if not os.path.exists(journal):
        raise InputError(f"no journal at {journal}")
    if os.path.isfile(journal) and os.path.getsize(journal) == 0:
        # SQLite would make it a new, empty journal: reconcile reads journals, never makes one.
        raise InputError(f"{journal} is empty: it is no journal (a batch writes one)")
    if mark_captured or mark_not_captured:
        try:
            # The id as Klarna reads it (and as it is recorded): " X" is X, which a recorded
            # X must then refuse for another item.
            marks: list[tuple[str, str | None]] = [
                (key, normalize_id("capture_id", cid)) for key, cid in mark_captured
            ]
        except ValidationError as error:
            raise InputError(str(error)) from None
        marks += [(key, None) for key in mark_not_captured]
        twice = sorted({key for key, _ in marks if [k for k, _ in marks].count(key) > 1})
        if twice:
            raise InputError(f"item(s) {', '.join(map(repr, twice))} marked more than once")
        connection = Connection.from_context()
        connection.check()
        try:
            run_interruptible(lambda: _settle(journal, marks, connection))
        except Interrupted as interrupted:
            click.echo("Interrupted: nothing was settled.", err=True)
            sys.exit(interrupted.exit_code)
        except KlarnaError as error:  # the capture could not be checked: nothing settled
            raise click.ClickException(f"nothing was settled: {error}") from None
        except sqlite3.Error as error:  # the journal cannot be written (disk full)
            if not journal_fault(error):
                raise  # a bug, not the journal's state: shown as one
            raise _unwritable(journal, error) from None
        for key, capture_id in marks:
            told = f"captured as {capture_id}" if capture_id else "not captured"
            click.echo(f"Settled {key}: {told}.")
        sys.exit(EXIT_OK)
    connection = Connection.from_context()
    connection.check()
    judged: list[Reconciliation] = []
    try:
        results, review = run_interruptible(lambda: _run(journal, connection, concurrency, judged))
    except Interrupted as interrupted:
        for result in judged:  # recorded in the journal: say what they were judged
            _show(result, json_output)
        click.echo("Interrupted: items not yet reconciled are left as they were.", err=True)
        sys.exit(interrupted.exit_code)
    except sqlite3.Error as error:  # the journal cannot be written (disk full)
        if not journal_fault(error):
            raise  # a bug, not the journal's state: shown as one
        raise _unwritable(journal, error) from None
    for result in results:
        _show(result, json_output)
    counts = collections.Counter(r.verdict for r in results)
    # Those judged by an earlier run wait too: "nothing left to review" must be true.
    judged_now = {r.item_key for r in results}
    earlier = [e for e in review if e.item_key not in judged_now]
    if json_output:
        for entry in earlier[:_EARLIER_LISTED]:
            echo_json(
                {
                    "type": "needs_review",
                    "item_key": entry.item_key,
                    "order_id": entry.order_id,
                    "operation": entry.operation.value,
                    "idempotency_key": entry.idempotency_key,
                    "evidence": entry.error,
                }
            )
        echo_json(
            {
                "type": "summary",
                "journal": journal,
                "items": len(results),
                **{str(v.value if v else "unknown"): counts[v] for v in _SAYS},
                "needs_review_in_journal": len(review),
            }
        )
    else:
        for entry in earlier[:_EARLIER_LISTED]:
            click.echo(f"{entry.item_key}: needs review (earlier): {entry.error or ''}".rstrip())
        told = ", ".join(f"{counts[v]} {v.value if v else 'unknown'}" for v in _SAYS if counts[v])
        click.echo(f"Reconciled {len(results)} unknown item(s) of {journal}: {told or 'none'}.")
        if review:
            click.echo(
                f"{len(review)} item(s) of the journal need review: check each in the Klarna"
                " merchant portal, then settle it with --captured ITEM_KEY ID or"
                " --not-captured ITEM_KEY."
            )
    troubled = len(review) + counts[None]
    sys.exit(EXIT_SOME_NOT_CAPTURED if troubled else EXIT_OK)


#: How many items an earlier run left for review are listed.
_EARLIER_LISTED = 20


def _unwritable(journal: str, error: sqlite3.Error) -> InputError:
    if why := damaged(journal, error):
        return InputError(why)
    return InputError(
        f"the journal {journal} could not be written ({error}); what was recorded before"
        " stands: run the same command again once it can be written (a full disk, another"
        " program holding it)"
    )


async def _settle(path: str, marks: list[tuple[str, str | None]], connection: Connection) -> None:
    """Settle reviewed items by hand; a capture id given is checked against Klarna first."""
    journal = await open_journal(SQLiteJournal(path))
    try:
        # Only the marked items and their orders are read: a journal may hold millions.
        known: dict[str, JournalEntry] = {}
        for key, _ in marks:
            found = await journal.entries(item_key=key)
            if not found:
                raise InputError(f"{path} has no item {key!r}")
            entry = known[key] = found[0]
            if entry.status is not JournalStatus.NEEDS_REVIEW:
                # An unknown item is settled exactly by its key (a rerun) or by reading the
                # order (reconcile without marks); a hand-made verdict could double-capture.
                raise InputError(
                    f"item {key!r} is {entry.status.value}, not needs_review; only an item that"
                    " needs review is settled by hand (rerun the batch, or reconcile)"
                )
        # A capture (refund) id is its order's: an item of another order cannot hold it, and
        # _check_created refuses one that Klarna does not show under the item's order.
        taken: dict[tuple[Operation, str], str] = {}
        for order_id in {entry.order_id for entry in known.values()}:
            for other in await journal.entries(order_id=order_id):
                if other.capture_id:
                    taken[other.operation, other.capture_id] = other.item_key
        async with connection.client() as om:
            for key, capture_id in marks:
                if capture_id is not None:
                    entry = known[key]
                    owner = taken.setdefault((entry.operation, capture_id), key)
                    if owner != key:  # recorded, or marked for an earlier item of this call
                        noun = _noun(entry.operation)
                        raise InputError(f"{noun} {capture_id} is already item {owner!r}'s")
                    await _check_created(om, entry, capture_id)
        for key, capture_id in marks:
            status = JournalStatus.CAPTURED if capture_id else JournalStatus.REFUSED
            await journal.finish(
                key,
                status,
                capture_id=capture_id,
                error=None if capture_id else "settled by hand: not captured",
                reconciled=True,
            )
    finally:
        await journal.close()


def _noun(operation: Operation) -> str:
    return "refund" if operation is Operation.REFUND else "capture"


async def _check_created(om: KlarnaOM, entry: JournalEntry, created_id: str) -> None:
    """Refuse an id that is not a capture (refund) of the item's order and amount."""
    noun = _noun(entry.operation)
    try:
        if entry.operation is Operation.REFUND:
            refund = await om.refunds.get(entry.order_id, created_id)
            amount, reference = refund.refunded_amount, refund.reference
        elif entry.operation is Operation.CAPTURE:
            capture = await om.captures.get(entry.order_id, created_id)
            amount, reference = capture.captured_amount, capture.reference
        else:
            raise InputError(
                f"item {entry.item_key!r} is a {entry.operation.value}, which creates no id;"
                " use --not-captured, or rerun the batch"
            )
    except NotFoundError:
        raise InputError(f"order {entry.order_id} has no {noun} {created_id!r}") from None
    wanted = entry.captured_amount
    if wanted is not None and amount != wanted:
        raise InputError(
            f"{noun} {created_id} is of {amount}, but item {entry.item_key!r} asked for {wanted}"
        )
    if entry.reference and reference != entry.reference:
        raise InputError(
            f"{noun} {created_id} has reference {reference!r}, but item"
            f" {entry.item_key!r} asked for {entry.reference!r}"
        )


async def _run(
    path: str, connection: Connection, concurrency: int, judged: list[Reconciliation]
) -> tuple[list[Reconciliation], list[JournalEntry]]:
    """The verdicts, and every item that needs review afterwards (earlier ones too); each
    verdict also goes to ``judged`` as it is made, for an interrupted run to show."""
    journal = await open_journal(SQLiteJournal(path))
    try:
        async with connection.client() as om:

            def collect(orders: OrdersService, _entry: JournalEntry) -> _Judged | None:
                return _Judged(judged) if orders is om.orders else None

            reconcile_listeners.append(collect)
            try:
                results = await om.reconcile(journal, concurrency=concurrency)
            finally:
                reconcile_listeners.remove(collect)
        return results, await journal.entries(statuses=[JournalStatus.NEEDS_REVIEW])
    finally:
        await journal.close()


@attrs.frozen
class _Judged:
    """Adds a reconciliation's result, as it ends, to a list."""

    into: list[Reconciliation]

    def ended(self, result: Reconciliation | None, error: BaseException | None) -> None:
        if result is not None:
            self.into.append(result)


def _show(result: Reconciliation, json_output: bool) -> None:
    if json_output:
        echo_json(
            {
                "type": "reconciliation",
                "item_key": result.item_key,
                "order_id": result.order_id,
                "operation": result.operation.value,
                "idempotency_key": result.idempotency_key,
                "verdict": result.verdict.value if result.verdict else None,
                "capture_id": result.capture_id,
                "evidence": result.evidence,
            }
        )
        return
    made = f" ({_noun(result.operation)} {result.capture_id})" if result.capture_id else ""
    says = _SAYS[result.verdict]
    if result.verdict is Verdict.CAPTURED:
        says = result.operation.done
    click.echo(f"{result.item_key} (order {result.order_id}): {says}{made}; {result.evidence}")
