"""The commands for the rest of an order's life: release, extend, cancel, acknowledge,
update-authorization, references, ship-order, extend-due-date and due-date-options."""

from __future__ import annotations

import datetime
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..client import KlarnaOM
from ..errors import IdempotencyKeyReusedError, KlarnaError
from ..models import (
    ExtendDueDateOptions,
    ExtendDueDateRequest,
    Order,
    OrderStatus,
    UpdateAuthorizationRequest,
    UpdateMerchantReferencesRequest,
)
from ._commands import (
    _Amount,
    _announce_key,
    _id,
    _idempotency_option,
    _shipment,
    _shipment_options,
    _valid,
    show_one,
)
from ._options import (
    EXIT_INTERRUPTED,
    EXIT_SOME_NOT_CAPTURED,
    Connection,
    InputError,
    connection_options,
    json_option,
    run_single,
)
from ._render import cli_error_text, echo_json, to_plain

__all__ = ("LIFECYCLE_COMMANDS", "Declined")

_F = TypeVar("_F", bound=Callable[..., Any])

#: The order's fields a command reads back after it succeeded, in the order shown.
_READ_BACK = ("status", "order_amount", "remaining_authorized_amount", "expires_at")


class Declined(click.ClickException):
    """The person at the terminal did not confirm: nothing was sent; exits with 1."""

    exit_code = EXIT_SOME_NOT_CAPTURED


def _on_terminal() -> bool:
    """Whether someone can answer a question: stdin is a terminal (tests replace this)."""
    return sys.stdin.isatty()


def _yes_option(what: str) -> Callable[[_F], _F]:
    return click.option(
        "--yes",
        "-y",
        is_flag=True,
        help=f"Do not ask before {what}; required when stdin is not a terminal.",
    )


def _confirm(yes: bool, command: str, question: str, unchanged: str) -> None:
    """Ask ``question`` unless ``--yes``; without a terminal, ``--yes`` is required.

    Either way, a "no" stops the command before a key is said or anything is sent.
    """
    if yes:
        return
    if not _on_terminal():
        raise InputError(
            f"{command} asks for confirmation, and stdin is not a terminal: "
            f"pass --yes to {command} without asking"
        )
    try:
        confirmed = click.confirm(question, default=False, err=True)
    except click.Abort as abort:  # end of input, or Ctrl-C at the question
        if isinstance(abort.__context__, KeyboardInterrupt):  # click raises it "from None"
            click.echo(f"\nInterrupted: nothing was sent; {unchanged}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        confirmed = False
    if not confirmed:
        raise Declined(f"not confirmed: nothing was sent; {unchanged}")


@attrs.frozen
class _After:
    """The order read back after a call that succeeded: ``unread`` when that failed;
    ``before``: the order read just before the call, when the command asked for it (None
    also when that read failed)."""

    order: Order | None = None
    unread: KlarnaError | None = None
    before: Order | None = None


def _send(
    key: str,
    json_output: bool,
    act: Callable[[KlarnaOM], Awaitable[None]],
    *,
    read_back: str | None = None,
    read_first: bool = False,
) -> _After:
    """Run ``act`` as the command's one call (errors exit as every command's do); then,
    given ``read_back`` (an order id), read that order back (with ``read_first``, also just
    before the call). A failed read is kept, not raised: the call succeeded, and a rerun
    would only replay it."""
    connection = Connection.from_context()

    async def call() -> _After:
        async with connection.client() as om:
            before = None
            if read_back is not None and read_first:
                try:
                    before = await om.orders.get(read_back)
                except KlarnaError:
                    before = None  # the check it serves is skipped; the call still runs
            await act(om)
            if read_back is None:
                return _After()
            try:
                return _After(order=await om.orders.get(read_back), before=before)
            except KlarnaError as error:
                return _After(unread=error, before=before)

    return run_single(call, json_output=json_output, idempotency_key=key)


def _not_done(order_id: str, what: str, key: str, json_output: bool) -> None:
    """A call that creates nothing was answered 204, but the order read back shows its
    effect did not happen (``what``): Klarna may have replayed the 204 of another call made
    with the same key, which no answer can tell. Exit 1 without claiming success."""
    _fail(
        f"{what}: Klarna may have replayed an earlier request made with idempotency key {key},"
        f" and nothing may have happened for this one. Check the order with: klarna-om order"
        f" {order_id}; if it still needs doing, send it again with a new key.",
        key,
        json_output,
        IdempotencyKeyReusedError.__name__,
    )


def _fail(message: str, key: str, json_output: bool, error: str) -> None:
    """Exit 1 with ``message`` (one line; with ``json_output``, also an error object)."""
    if json_output:
        echo_json(
            {
                "type": "error",
                "error": error,
                "message": message,
                "outcome_unknown": False,
                "idempotency_key": key,
                "correlation_id": None,
                "status": None,
                "error_code": None,
                "exit_code": EXIT_SOME_NOT_CAPTURED,
            }
        )
    click.echo(f"Error: {message}", err=True)
    sys.exit(EXIT_SOME_NOT_CAPTURED)


#: Klarna's default expiry period, less a day of slack for clocks and time zones: an
#: extension from today reaches at least this far, unless the 180-day limit stops it.
_SURE_EXTENSION = datetime.timedelta(days=27)
_MAX_AUTHORIZATION = datetime.timedelta(days=180)


def _extension_missing(after: _After) -> str | None:
    """Why the read-back shows an extension that should have moved ``expires_at`` and did
    not, or None (moved, could not move, or unknown).

    It could not move when it already reaches the 180-day limit or the date an extension
    from today gives (a repeat the same day); this check assumes Klarna's default 28-day
    period (a longer one is never flagged; a shorter one may be, which only costs a check).
    """
    before, order = after.before, after.order
    if before is None or order is None:
        return None
    old, new, created = before.expires_at, order.expires_at, order.created_at
    if old is None or new is None or created is None:
        return None
    if old.tzinfo is None or new.tzinfo is None or created.tzinfo is None or new != old:
        return None
    today = datetime.datetime.now(datetime.UTC).date()
    reachable = min(
        (created + _MAX_AUTHORIZATION).astimezone(datetime.UTC).date(), today + _SURE_EXTENSION
    )
    if old.astimezone(datetime.UTC).date() >= reachable:
        return None
    return f"the expires_at of the order is still {to_plain(old)} after the extension"


def _order_json(order: Order | None) -> dict[str, object] | None:
    if order is None:
        return None
    return {name: to_plain(getattr(order, name)) for name in _READ_BACK}


def _order_text(order: Order, fields: tuple[str, ...]) -> str:
    shown = []
    for name in fields:
        value = getattr(order, name)
        if value is not None:
            shown.append(f"{name} {to_plain(value)}")
    return f"; now {', '.join(shown)}" if shown else ""


def _report(
    done: str,
    result: dict[str, object],
    key: str,
    json_output: bool,
    after: _After | None = None,
    shows: tuple[str, ...] = (),
) -> None:
    """Say what happened (``done``, one line; with ``json_output``, ``result`` with the
    key and, after a read-back, the order's state as ``order``)."""
    if after is not None and after.unread is not None:
        order_id = result["order_id"]
        click.echo(
            f"Warning: {done}, but reading the order back failed"
            f" ({cli_error_text(after.unread)}); check it with: klarna-om order {order_id}",
            err=True,
        )
    if json_output:
        payload = {**result, "idempotency_key": key}
        if after is not None:
            payload["order"] = _order_json(after.order)
        echo_json(payload)
        return
    state = _order_text(after.order, shows) if after is not None and after.order else ""
    click.echo(f"{done} (idempotency key {key}){state}.")


def _begin(order_id: str) -> str:
    """Check the credentials and the order id: both exit 2 before anything is sent."""
    Connection.from_context().check()
    return _id("order_id", order_id)


def _order_command(name: str, help_text: str) -> Callable[[Callable[..., None]], click.Command]:
    """The command ``name`` on one ORDER_ID, with the options every such command takes."""

    def decorate(function: Callable[..., None]) -> click.Command:
        for add in (json_option, connection_options, _idempotency_option):
            function = add(function)
        function = click.argument("order_id")(function)
        return click.command(name=name, help=help_text)(function)

    return decorate


@_order_command(
    "release",
    "Release what ORDER_ID has authorized and not captured, after a capture (an order "
    "with none: use cancel); asks first (--yes skips). Prints the order's new status.",
)
@_yes_option("releasing")
def release(order_id: str, yes: bool, idempotency_key: str | None, json_output: bool) -> None:
    order_id = _begin(order_id)
    _confirm(
        yes,
        "release",
        f"Release the remaining authorization of order {order_id}? What is not captured yet "
        "can then never be captured.",
        f"order {order_id} is unchanged",
    )
    key = _announce_key(idempotency_key, json_output, command="release", order_id=order_id)
    after = _send(
        key,
        json_output,
        lambda om: om.orders.release_remaining_authorization(order_id, idempotency_key=key),
        read_back=order_id,
    )
    left = after.order.remaining_authorized_amount if after.order is not None else None
    if left:  # None when unread or unreported, 0 when released
        _not_done(
            order_id,
            f"order {order_id}'s remaining_authorized_amount is {left} after the release",
            key,
            json_output,
        )
    _report(
        f"Released the remaining authorization of order {order_id}",
        {"order_id": order_id, "released": True},
        key,
        json_output,
        after,
        ("status", "remaining_authorized_amount"),
    )


@_order_command(
    "extend",
    "Extend the time ORDER_ID's authorization stays valid (Klarna's expiry period from "
    "today); prints when it now expires.",
)
def extend(order_id: str, idempotency_key: str | None, json_output: bool) -> None:
    order_id = _begin(order_id)
    key = _announce_key(idempotency_key, json_output, command="extend", order_id=order_id)
    after = _send(
        key,
        json_output,
        lambda om: om.orders.extend_authorization_time(order_id, idempotency_key=key),
        read_back=order_id,
        read_first=True,
    )
    missing = _extension_missing(after)
    if missing is not None:
        _not_done(order_id, f"order {order_id}: {missing}", key, json_output)
    _report(
        f"Extended the authorization of order {order_id}",
        {"order_id": order_id, "extended": True},
        key,
        json_output,
        after,
        ("expires_at",),
    )


@_order_command(
    "cancel",
    "Cancel ORDER_ID (only one with no captures): its whole authorization is released; "
    "asks first (--yes skips). Prints the order's new status.",
)
@_yes_option("cancelling")
def cancel(order_id: str, yes: bool, idempotency_key: str | None, json_output: bool) -> None:
    order_id = _begin(order_id)
    _confirm(
        yes,
        "cancel",
        f"Cancel order {order_id}? Its authorization is released and it can never be captured.",
        f"order {order_id} is not cancelled",
    )
    key = _announce_key(idempotency_key, json_output, command="cancel", order_id=order_id)
    after = _send(
        key,
        json_output,
        lambda om: om.orders.cancel(order_id, idempotency_key=key),
        read_back=order_id,
    )
    status = after.order.status if after.order is not None else None
    if status is not None and status != OrderStatus.CANCELLED:
        _not_done(
            order_id, f"order {order_id}'s status is {status} after the cancel", key, json_output
        )
    _report(
        f"Cancelled order {order_id}",
        {"order_id": order_id, "cancelled": True},
        key,
        json_output,
        after,
        ("status", "remaining_authorized_amount"),
    )


@_order_command(
    "acknowledge",
    "Acknowledge ORDER_ID: tell Klarna your system has received it (needed by some "
    "integrations, e.g. Klarna Checkout).",
)
def acknowledge(order_id: str, idempotency_key: str | None, json_output: bool) -> None:
    order_id = _begin(order_id)
    key = _announce_key(idempotency_key, json_output, command="acknowledge", order_id=order_id)
    _send(key, json_output, lambda om: om.orders.acknowledge(order_id, idempotency_key=key))
    _report(
        f"Acknowledged order {order_id}",
        {"order_id": order_id, "acknowledged": True},
        key,
        json_output,
    )


@_order_command(
    "update-authorization",
    "Set ORDER_ID's authorized amount to --amount (e.g. after a change to the cart); "
    "prints the order's amounts read back from Klarna.",
)
@click.option(
    "--amount",
    type=_Amount(),
    required=True,
    help="The new order amount in minor units (1050 = 10.50): the whole order, not a change.",
)
@click.option("--description", help="Why the amount changed.")
def update_authorization(
    order_id: str,
    amount: int,
    description: str | None,
    idempotency_key: str | None,
    json_output: bool,
) -> None:
    order_id = _begin(order_id)
    request = _valid(
        lambda: UpdateAuthorizationRequest(order_amount=amount, description=description)
    )
    key = _announce_key(
        idempotency_key, json_output, command="update-authorization", order_id=order_id
    )
    after = _send(
        key,
        json_output,
        lambda om: om.orders.update_authorization(order_id, request, idempotency_key=key),
        read_back=order_id,
    )
    # Klarna replays by key alone: with a key given again, the amount read back tells.
    # (With a new key, another amount can only be a later change: the output shows it.)
    read_amount = after.order.order_amount if after.order is not None else None
    if idempotency_key is not None and read_amount not in (None, amount):
        _replayed(order_id, amount, read_amount, key, json_output)
    _report(
        f"Updated the authorization of order {order_id} to {amount}",
        {"order_id": order_id, "order_amount": amount, "description": description},
        key,
        json_output,
        after,
        ("status", "order_amount", "remaining_authorized_amount"),
    )


def _replayed(order_id: str, amount: int, read: int | None, key: str, json_output: bool) -> None:
    """The amount read back is not the one asked, with a key given again: exit 1.

    The read-back cannot tell which happened: Klarna replayed another request made with
    this key (nothing done for this one), or this very request was done before and the
    amount changed since (a rerun after an unknown outcome). Resending blindly with a new
    key would undo that later change, so the message says to read the order first.
    """
    _fail(
        f"order {order_id}'s amount read back is {read}, not the {amount} asked: either"
        f" another request used idempotency key {key} (Klarna then replayed its answer and"
        f" did nothing for this call), or the amount was changed since this request was"
        f" done. Read the order (klarna-om order {order_id}) before sending anything again;"
        f" only if it still needs {amount}, send it with a new key.",
        key,
        json_output,
        IdempotencyKeyReusedError.__name__,
    )


@_order_command(
    "references",
    "Replace ORDER_ID's merchant references (--ref1, --ref2, at least one); a reference "
    "not given is left as it is.",
)
@click.option("--ref1", "--merchant-reference1", "ref1", help="New merchant_reference1.")
@click.option("--ref2", "--merchant-reference2", "ref2", help="New merchant_reference2.")
def references(
    order_id: str,
    ref1: str | None,
    ref2: str | None,
    idempotency_key: str | None,
    json_output: bool,
) -> None:
    order_id = _begin(order_id)
    if ref1 is None and ref2 is None:
        raise InputError("give --ref1, --ref2 or both: the merchant references to set")
    _valid(
        lambda: UpdateMerchantReferencesRequest(merchant_reference1=ref1, merchant_reference2=ref2)
    )
    key = _announce_key(idempotency_key, json_output, command="references", order_id=order_id)
    _send(
        key,
        json_output,
        lambda om: om.orders.update_merchant_references(
            order_id, merchant_reference1=ref1, merchant_reference2=ref2, idempotency_key=key
        ),
    )
    given = {"merchant_reference1": ref1, "merchant_reference2": ref2}
    _report(
        f"Updated the merchant references of order {order_id}: "
        + ", ".join(f"{name}={value!r}" for name, value in given.items() if value is not None),
        {"order_id": order_id, **given},
        key,
        json_output,
    )


@_order_command(
    "ship-order",
    "Add tracking details to ORDER_ID itself (`ship` adds them to one capture).",
)
@_shipment_options
def ship_order(
    order_id: str,
    company: str,
    tracking_number: str,
    method: str,
    tracking_uri: str | None,
    idempotency_key: str | None,
    json_output: bool,
) -> None:
    order_id = _begin(order_id)
    info = _shipment(company, tracking_number, method, tracking_uri)
    key = _announce_key(idempotency_key, json_output, command="ship-order", order_id=order_id)
    _send(
        key,
        json_output,
        lambda om: om.orders.add_shipping_info(order_id, [info], idempotency_key=key),
    )
    _report(
        f"Added shipping info to order {order_id}: {company} {method} {tracking_number}",
        {"order_id": order_id, "shipping_info": [to_plain(info)]},
        key,
        json_output,
    )


_DAYS = re.compile(r"[0-9]{1,100}").fullmatch


class _Days(click.types.IntParamType):
    """A number of days: ASCII digits only (``int()`` would take `` 1_4``); the request
    model checks the range."""

    name = "days"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if not (isinstance(value, str) and _DAYS(value)):
            self.fail(f"{value!r} is not a number of days: digits only", param, ctx)
        return int(value)


@click.command(name="extend-due-date")
@click.argument("order_id")
@click.argument("capture_id")
@click.option(
    "--days",
    type=_Days(),
    required=True,
    help="Days to add to the capture's payment due date: one of `due-date-options`.",
)
@_idempotency_option
@connection_options
@json_option
def extend_due_date(
    order_id: str, capture_id: str, days: int, idempotency_key: str | None, json_output: bool
) -> None:
    """Extend the payment due date of capture CAPTURE_ID of ORDER_ID by --days (Klarna may
    charge a fee: see `due-date-options`)."""
    order_id, capture_id = _begin(order_id), _id("capture_id", capture_id)
    _valid(lambda: ExtendDueDateRequest(number_of_days=days))
    key = _announce_key(
        idempotency_key,
        json_output,
        command="extend-due-date",
        order_id=order_id,
        capture_id=capture_id,
    )
    _send(
        key,
        json_output,
        lambda om: om.captures.extend_due_date(order_id, capture_id, days, idempotency_key=key),
    )
    _report(
        f"Extended the due date of capture {capture_id} of order {order_id} by {days} days",
        {"order_id": order_id, "capture_id": capture_id, "number_of_days": days},
        key,
        json_output,
    )


@click.command(name="due-date-options")
@click.argument("order_id")
@click.argument("capture_id")
@connection_options
@json_option
def due_date_options(order_id: str, capture_id: str, json_output: bool) -> None:
    """Show by how many days the due date of capture CAPTURE_ID of ORDER_ID can be
    extended, and at what fee."""
    connection = Connection.from_context()
    order_id, capture_id = _id("order_id", order_id), _id("capture_id", capture_id)

    async def call() -> ExtendDueDateOptions:
        async with connection.client() as om:
            return await om.captures.get_extend_due_date_options(order_id, capture_id)

    def show(console: Console, found: ExtendDueDateOptions) -> None:
        if not found.options:
            click.echo(f"Capture {capture_id} of order {order_id} has no due date options.")
            return
        # A plain line, so the ids are never wrapped.
        currency = f" of {found.currency}" if found.currency else ""
        click.echo(
            f"Due date options of capture {capture_id} of order {order_id}"
            f" (fees in minor units{currency}):"
        )
        table = Table()
        table.add_column("days", justify="right", no_wrap=True)
        table.add_column("fee", justify="right", no_wrap=True)
        for option in found.options:
            table.add_row(Text(str(option.number_of_days)), Text(str(option.amount)))
        console.print(table)

    show_one(call, json_output, show)


#: Registered on the ``klarna-om`` group by ``_app``.
LIFECYCLE_COMMANDS = (
    release,
    extend,
    cancel,
    acknowledge,
    update_authorization,
    references,
    ship_order,
    extend_due_date,
    due_date_options,
)
