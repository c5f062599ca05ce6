"""The single-call commands: capture, get, list, ship, send-out, order, refund, refund-get."""

from __future__ import annotations

import re
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import attrs
import click
import yarl
from rich.console import Console

from .._keys import check_idempotency_key, fresh_key, new_idempotency_key
from .._routes import normalize_id
from ..batch import _reference
from ..client import KlarnaOM
from ..errors import IdempotencyKeyReusedError, KlarnaError, ValidationError
from ..models import (
    Capture,
    CaptureRequest,
    Order,
    Refund,
    RefundRequest,
    ShippingInfo,
    ShippingMethod,
)
from ._options import (
    EXIT_SOME_NOT_CAPTURED,
    Connection,
    InputError,
    connection_options,
    json_option,
    run_single,
)
from ._render import (
    cli_console,
    cli_error_text,
    echo_json,
    error_json,
    lose_stdout,
    show_capture,
    show_captures,
    show_order,
    show_refund,
    to_plain,
)

__all__ = ("SINGLE_COMMANDS",)

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])


_idempotency_option = click.option(
    "--idempotency-key",
    metavar="KEY",
    help="Klarna-Idempotency-Key to send (default: a new UUID4); printed before it is sent. "
    "Rerun with the key an error or an interruption reported to finish an unknown outcome "
    "exactly once. Never give a key to another call: Klarna would answer it with the first "
    "call's result and do nothing.",
)


def _valid(build: Callable[[], _T]) -> _T:
    """A request model built from the options; a ValidationError exits 2 before anything."""
    try:
        return build()
    except ValidationError as error:
        raise InputError(str(error)) from None


def _id(field: str, value: str) -> str:
    """An order, capture or refund id as every call sends it (trimmed); a blank one (or a
    dot segment) exits 2 before a key is said or anything is sent."""
    return _valid(lambda: normalize_id(field, value))


def _announce_key(given: str | None, json_output: bool, **request: str) -> str:
    """The idempotency key a money-moving call will send (``given``, or a new one), said
    before it is sent: on stderr, or with ``json_output`` as a request object on stdout.

    Whatever happens next (a crash, Ctrl-C, SIGTERM, a lost answer), rerunning the command
    with ``--idempotency-key`` and this key finishes the call exactly once.
    """
    try:
        key = new_idempotency_key() if given is None else check_idempotency_key(given)
    except ValidationError as error:
        raise InputError(str(error)) from None
    # A key made here was never sent before: a 429 or 401 under it says nothing happened (a
    # key given with --idempotency-key may have been sent by an earlier run: see
    # IdempotencyMiddleware). For this command only: code run in the same process after it
    # (click's CliRunner, a library call) must not vouch for a key it made (helper-91, -92).
    token = fresh_key.set(key if given is None else None)
    context = click.get_current_context(silent=True)
    if context is not None:
        context.call_on_close(lambda: fresh_key.reset(token))
    if json_output:
        try:
            echo_json({"type": "request", **request, "idempotency_key": key})
        except OSError as error:  # a closed pipe, a full disk: the key cannot be said
            lose_stdout()
            raise InputError(
                f"the output could not be written ({error.strerror}); nothing was sent"
            ) from None
    else:
        click.echo(f"idempotency key: {key}", err=True)
    return key


_AMOUNT = re.compile(r"[+-]?[0-9]+").fullmatch


class _Amount(click.types.IntParamType):
    """An amount in minor units: an optional sign and ASCII digits, nothing else.

    ``int()`` would also take ``1_000``, `` 100`` and other scripts' digits; a typo in an
    amount must stop the command, not move money. A negative amount passes here, so the
    request model refuses it in its own words.
    """

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        if not (isinstance(value, str) and _AMOUNT(value) and len(value) <= 100):
            self.fail(
                f"{value!r} is not a valid integer: an amount is digits only, in minor units"
                " (1050 = 10.50)",
                param,
                ctx,
            )
        return int(value)


_R = TypeVar("_R", CaptureRequest, RefundRequest)


@attrs.frozen
class _Created:
    """What a capture or refund call created, and the amount Klarna holds for it."""

    created_id: str
    location: str
    attempts: int
    #: The amount read back from Klarna; None when it could not be read (``unread``).
    booked: int | None
    unread: KlarnaError | None = None
    #: The reference read back with it.
    booked_reference: str | None = None


@attrs.frozen
class _Money(Generic[_R]):
    """What tells `klarna-om capture` and `klarna-om refund` apart; they share the rest."""

    noun: str  # "capture": the command, and ``{noun}_id`` in the output
    past: str  # "captured": the output's verb, and ``{past}_amount``
    show: str  # the command that shows one, e.g. "refund-get"
    help: str
    amount_help: str
    reference_help: str
    description_help: str
    build: Callable[[int, str | None, str | None], _R]
    create: Callable[[KlarnaOM, str, _R, str], Awaitable[tuple[str, str, int]]]
    #: The amount and reference Klarna holds for a created id.
    read: Callable[[KlarnaOM, str, str], Awaitable[tuple[int | None, str | None]]]


async def _create_capture(
    om: KlarnaOM, order_id: str, request: CaptureRequest, key: str
) -> tuple[str, str, int]:
    created = await om.captures.create(order_id, request, idempotency_key=key)
    return created.capture_id, created.location, created.attempts


async def _captured_amount(
    om: KlarnaOM, order_id: str, capture_id: str
) -> tuple[int | None, str | None]:
    capture = await om.captures.get(order_id, capture_id)
    return capture.captured_amount, capture.reference


async def _create_refund(
    om: KlarnaOM, order_id: str, request: RefundRequest, key: str
) -> tuple[str, str, int]:
    created = await om.refunds.create(order_id, request, idempotency_key=key)
    return created.refund_id, created.location, created.attempts


async def _refunded_amount(
    om: KlarnaOM, order_id: str, refund_id: str
) -> tuple[int | None, str | None]:
    refund = await om.refunds.get(order_id, refund_id)
    return refund.refunded_amount, refund.reference


_CAPTURE = _Money(
    noun="capture",
    past="captured",
    show="get",
    help="Capture all or part of ORDER_ID and print the new capture's id and amount, read "
    "back from Klarna.",
    amount_help="Amount to capture in minor units (1050 = 10.50): the order amount for a "
    "full capture, less for a partial one.",
    reference_help="Your reference for the capture (settlement files show it).",
    description_help="Description of the capture.",
    build=lambda amount, reference, description: CaptureRequest(
        captured_amount=amount, reference=reference, description=description
    ),
    create=_create_capture,
    read=_captured_amount,
)
_REFUND = _Money(
    noun="refund",
    past="refunded",
    show="refund-get",
    help="Refund all or part of what ORDER_ID captured and print the new refund's id and "
    "amount, read back from Klarna.",
    amount_help="Amount to refund in minor units (1050 = 10.50): at most what was captured "
    "and not yet refunded.",
    reference_help="Your reference for the refund (settlement files show it).",
    description_help="Description of the refund, shown to the customer.",
    build=lambda amount, reference, description: RefundRequest(
        refunded_amount=amount, reference=reference, description=description
    ),
    create=_create_refund,
    read=_refunded_amount,
)


def _money_command(kind: _Money[Any]) -> click.Command:
    """`klarna-om capture` or `klarna-om refund`: create it, then read it back.

    Klarna replays by key alone, so a key reused with another amount (or reference) gets
    the earlier request's 201: only the amount and reference read back tell. A mismatch
    exits 1 (nothing more was moved). When the read itself fails, the creation still
    stands: the command reports it and exits 0, saying the amount is not verified (exit 3
    would invite a rerun that only replays the same answer; exit 1 would say nothing was
    booked, and invite a second one).
    """

    @click.command(name=kind.noun, help=kind.help)
    @click.argument("order_id")
    @click.option("--amount", type=_Amount(), required=True, help=kind.amount_help)
    @click.option("--reference", help=kind.reference_help)
    @click.option("--description", help=kind.description_help)
    @_idempotency_option
    @connection_options
    @json_option
    def command(
        order_id: str,
        amount: int,
        reference: str | None,
        description: str | None,
        idempotency_key: str | None,
        json_output: bool,
    ) -> None:
        connection = Connection.from_context()
        connection.check()
        order_id = _id("order_id", order_id)
        request = _valid(lambda: kind.build(amount, reference, description))
        key = _announce_key(idempotency_key, json_output, command=kind.noun, order_id=order_id)

        async def call() -> _Created:
            async with connection.client() as om:
                created_id, location, attempts = await kind.create(om, order_id, request, key)
                try:
                    booked, booked_reference = await kind.read(om, order_id, created_id)
                except KlarnaError as error:
                    return _Created(created_id, location, attempts, None, error)
                return _Created(created_id, location, attempts, booked, None, booked_reference)

        created = run_single(call, json_output=json_output, idempotency_key=key)
        # As sent (the request may have trimmed it); compared as a batch names items: " A "
        # is "A", and a blank reference none.
        asked_reference: str | None = request.reference
        if created.booked is not None and (
            created.booked != amount
            or _reference(asked_reference) != _reference(created.booked_reference)
        ):
            _replayed(kind, order_id, amount, asked_reference, key, created, json_output)
        _report_created(kind, order_id, amount, key, created, json_output)

    return command


def _replayed(
    kind: _Money[Any],
    order_id: str,
    amount: int,
    reference: str | None,
    key: str,
    created: _Created,
    json_output: bool,
) -> None:
    """Klarna answered with an earlier request's result: say so, then exit 1."""
    held = created.booked_reference
    error = IdempotencyKeyReusedError(
        f"Klarna replayed an earlier request made with idempotency key {key!r}: {kind.noun}"
        f" {created.created_id} of {created.booked}"
        + ("" if held is None else f" with reference {held!r}")
        + f" on order {order_id}, not the {amount}"
        + ("" if reference is None else f" with reference {reference!r}")
        + f" asked, so nothing more was {kind.past}: if that {kind.noun} is this one before"
        " a change, it is done and must not be sent again; otherwise the key belongs to"
        " another request",
        status=201,
        location=created.location,
    )
    location = yarl.URL(created.location)
    posted_to = str(location.with_query(None).with_fragment(None).parent)
    error.bind(method="POST", url=posted_to, idempotency_key=key, attempts=created.attempts)
    if json_output:
        booked = {f"{kind.noun}_id": created.created_id, f"{kind.past}_amount": created.booked}
        echo_json({**error_json(error, exit_code=EXIT_SOME_NOT_CAPTURED), **booked})
    click.echo(f"Error: {cli_error_text(error)}", err=True)
    sys.exit(EXIT_SOME_NOT_CAPTURED)


def _report_created(
    kind: _Money[Any], order_id: str, amount: int, key: str, created: _Created, json_output: bool
) -> None:
    if created.unread is not None or created.booked is None:
        why = cli_error_text(created.unread) if created.unread else "Klarna sent no amount"
        click.echo(
            f"Warning: {kind.noun} {created.created_id} was created, but reading it back to"
            f" check its amount failed ({why}); check it with: klarna-om {kind.show}"
            f" {order_id} {created.created_id}",
            err=True,
        )
    if json_output:
        # Spelled out: the converter omits fields at their default, such as attempts=1.
        echo_json(
            {
                "order_id": order_id,
                f"{kind.noun}_id": created.created_id,
                "location": created.location,
                "idempotency_key": key,
                "attempts": created.attempts,
                f"{kind.past}_amount": created.booked,
                "amount_verified": created.booked is not None,
            }
        )
        return
    attempts = "1 attempt" if created.attempts == 1 else f"{created.attempts} attempts"
    what = amount if created.booked is not None else "(amount not verified)"
    click.echo(
        f"{kind.past.capitalize()} {what} on order {order_id}: {kind.noun}_id"
        f" {created.created_id} (idempotency key {key}, {attempts})"
    )


capture = _money_command(_CAPTURE)
refund = _money_command(_REFUND)


def show_one(
    call: Callable[[], Coroutine[Any, Any, _T]],
    json_output: bool,
    show: Callable[[Console, _T], None],
) -> None:
    """Run a read ``call`` and print what it found: a JSON object, or ``show``'s view."""
    found = run_single(call, json_output=json_output)
    if json_output:
        echo_json(to_plain(found))
    else:
        show(cli_console(), found)


@click.command()
@click.argument("order_id")
@click.argument("capture_id")
@connection_options
@json_option
def get(order_id: str, capture_id: str, json_output: bool) -> None:
    """Show one capture of ORDER_ID."""
    connection = Connection.from_context()
    order_id, capture_id = _id("order_id", order_id), _id("capture_id", capture_id)

    async def call() -> Capture:
        async with connection.client() as om:
            return await om.captures.get(order_id, capture_id)

    show_one(call, json_output, show_capture)


@click.command(name="list")
@click.argument("order_id")
@connection_options
@json_option
def list_captures(order_id: str, json_output: bool) -> None:
    """List the captures of ORDER_ID (--json: one capture object per line)."""
    connection = Connection.from_context()
    order_id = _id("order_id", order_id)

    async def call() -> list[Capture]:
        async with connection.client() as om:
            return await om.captures.list(order_id)

    captures = run_single(call, json_output=json_output)
    if json_output:
        for found in captures:  # one object per line, as every --json output
            echo_json(to_plain(found))
    else:
        show_captures(cli_console(), order_id, captures)


def _shipment_options(command: _F) -> _F:
    """Add ``--company --tracking-number --method --tracking-uri``: one shipment."""
    options = (
        click.option("--company", required=True, help="Shipping company, e.g. 'DHL'."),
        click.option("--tracking-number", required=True, help="The shipment's tracking number."),
        click.option(
            "--method",
            type=click.Choice([method.value for method in ShippingMethod]),
            default=ShippingMethod.HOME.value,
            show_default=True,
            help="Shipping method.",
        ),
        click.option("--tracking-uri", help="URL where the customer can track the shipment."),
    )
    for option in reversed(options):
        command = option(command)
    return command


def _shipment(
    company: str, tracking_number: str, method: str, tracking_uri: str | None
) -> ShippingInfo:
    """The shipment the options describe; a bad field exits 2 before anything is sent."""
    for option, value in (("--company", company), ("--tracking-number", tracking_number)):
        if not value.strip():  # required, so a blank one is a mistake, not "none"
            raise InputError(f"{option} must not be blank")
    return _valid(
        lambda: ShippingInfo(
            shipping_company=company,
            shipping_method=method,
            tracking_number=tracking_number,
            tracking_uri=tracking_uri,
        )
    )


@click.command()
@click.argument("order_id")
@click.argument("capture_id")
@_shipment_options
@_idempotency_option
@connection_options
@json_option
def ship(
    order_id: str,
    capture_id: str,
    company: str,
    tracking_number: str,
    method: str,
    tracking_uri: str | None,
    idempotency_key: str | None,
    json_output: bool,
) -> None:
    """Add tracking details to capture CAPTURE_ID of ORDER_ID."""
    connection = Connection.from_context()
    connection.check()
    order_id, capture_id = _id("order_id", order_id), _id("capture_id", capture_id)
    info = _shipment(company, tracking_number, method, tracking_uri)
    key = _announce_key(
        idempotency_key, json_output, command="ship", order_id=order_id, capture_id=capture_id
    )

    async def call() -> None:
        async with connection.client() as om:
            await om.captures.add_shipping_info(order_id, capture_id, [info], idempotency_key=key)

    run_single(call, json_output=json_output, idempotency_key=key)
    if json_output:
        echo_json(
            {"order_id": order_id, "capture_id": capture_id, "shipping_info": [to_plain(info)]}
        )
        return
    click.echo(
        f"Added shipping info to capture {capture_id} of order {order_id}: "
        f"{company} {method} {tracking_number}"
    )


@click.command(name="send-out")
@click.argument("order_id")
@click.argument("capture_id")
@_idempotency_option
@connection_options
@json_option
def send_out(
    order_id: str, capture_id: str, idempotency_key: str | None, json_output: bool
) -> None:
    """Send the customer the communication (e.g. invoice) of CAPTURE_ID again."""
    connection = Connection.from_context()
    connection.check()
    order_id, capture_id = _id("order_id", order_id), _id("capture_id", capture_id)
    key = _announce_key(
        idempotency_key, json_output, command="send-out", order_id=order_id, capture_id=capture_id
    )

    async def call() -> None:
        async with connection.client() as om:
            await om.captures.trigger_send_out(order_id, capture_id, idempotency_key=key)

    run_single(call, json_output=json_output, idempotency_key=key)
    if json_output:
        echo_json({"order_id": order_id, "capture_id": capture_id, "send_out": "triggered"})
    else:
        click.echo(f"Triggered send-out for capture {capture_id} of order {order_id}.")


@click.command()
@click.argument("order_id")
@connection_options
@json_option
def order(order_id: str, json_output: bool) -> None:
    """Show ORDER_ID: status, amounts (what is left to capture), captures and refunds."""
    connection = Connection.from_context()
    order_id = _id("order_id", order_id)

    async def call() -> Order:
        async with connection.client() as om:
            return await om.orders.get(order_id)

    show_one(call, json_output, show_order)


@click.command(name="refund-get")
@click.argument("order_id")
@click.argument("refund_id")
@connection_options
@json_option
def refund_get(order_id: str, refund_id: str, json_output: bool) -> None:
    """Show one refund of ORDER_ID."""
    connection = Connection.from_context()
    order_id, refund_id = _id("order_id", order_id), _id("refund_id", refund_id)

    async def call() -> Refund:
        async with connection.client() as om:
            return await om.refunds.get(order_id, refund_id)

    show_one(call, json_output, show_refund)


#: Registered on the ``klarna-om`` group by ``_app``.
SINGLE_COMMANDS = (capture, get, list_captures, ship, send_out, order, refund, refund_get)
