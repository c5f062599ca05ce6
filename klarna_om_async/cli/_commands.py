"""The single-call commands: capture, get, list, ship, send-out, order, refund, refund-get."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click
from rich.console import Console

from .._keys import check_idempotency_key, new_idempotency_key
from ..errors import ValidationError
from ..models import (
    Capture,
    CaptureCreated,
    CaptureRequest,
    Order,
    Refund,
    RefundCreated,
    RefundRequest,
    ShippingInfo,
    ShippingMethod,
)
from ._options import Connection, InputError, connection_options, json_option, run_single
from ._render import _fields, echo_json, show_capture, show_captures, show_order, to_plain

__all__ = ("SINGLE_COMMANDS",)

_T = TypeVar("_T")


def _console() -> Console:
    # Made per call: click's test runner swaps sys.stdout between invocations.
    return Console(highlight=False)


_idempotency_option = click.option(
    "--idempotency-key",
    metavar="KEY",
    help="Klarna-Idempotency-Key to send (default: a new UUID4); printed before it is sent. "
    "Rerun with the key an error or an interruption reported to finish an unknown outcome "
    "exactly once.",
)


def _valid(build: Callable[[], _T]) -> _T:
    """A request model built from the options; a ValidationError exits 2 before anything."""
    try:
        return build()
    except ValidationError as error:
        raise InputError(str(error)) from None


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
    if json_output:
        echo_json({"type": "request", **request, "idempotency_key": key})
    else:
        click.echo(f"idempotency key: {key}", err=True)
    return key


@click.command()
@click.argument("order_id")
@click.option(
    "--amount",
    type=int,
    required=True,
    help="Amount to capture in minor units (1050 = 10.50): the order amount for a full "
    "capture, less for a partial one.",
)
@click.option("--reference", help="Your reference for the capture (settlement files show it).")
@click.option("--description", help="Description of the capture.")
@_idempotency_option
@connection_options
@json_option
def capture(
    order_id: str,
    amount: int,
    reference: str | None,
    description: str | None,
    idempotency_key: str | None,
    json_output: bool,
) -> None:
    """Capture all or part of ORDER_ID and print the new capture's id."""
    connection = Connection.from_context()
    connection.check()
    request = _valid(
        lambda: CaptureRequest(captured_amount=amount, reference=reference, description=description)
    )
    key = _announce_key(idempotency_key, json_output, command="capture", order_id=order_id)

    async def call() -> CaptureCreated:
        async with connection.client() as om:
            return await om.captures.create(order_id, request, idempotency_key=key)

    created = run_single(call, json_output=json_output, idempotency_key=key)
    if json_output:
        # Spelled out: the converter omits fields at their default, such as attempts=1.
        echo_json(
            {
                "order_id": order_id,
                "capture_id": created.capture_id,
                "location": created.location,
                "idempotency_key": created.idempotency_key,
                "attempts": created.attempts,
            }
        )
        return
    attempts = "1 attempt" if created.attempts == 1 else f"{created.attempts} attempts"
    click.echo(
        f"Captured {amount} on order {order_id}: capture_id {created.capture_id} "
        f"(idempotency key {created.idempotency_key}, {attempts})"
    )


@click.command()
@click.argument("order_id")
@click.argument("capture_id")
@connection_options
@json_option
def get(order_id: str, capture_id: str, json_output: bool) -> None:
    """Show one capture of ORDER_ID."""
    connection = Connection.from_context()

    async def call() -> Capture:
        async with connection.client() as om:
            return await om.captures.get(order_id, capture_id)

    found = run_single(call, json_output=json_output)
    if json_output:
        echo_json(to_plain(found))
    else:
        show_capture(_console(), found)


@click.command(name="list")
@click.argument("order_id")
@connection_options
@json_option
def list_captures(order_id: str, json_output: bool) -> None:
    """List the captures of ORDER_ID (--json: one capture object per line)."""
    connection = Connection.from_context()

    async def call() -> list[Capture]:
        async with connection.client() as om:
            return await om.captures.list(order_id)

    captures = run_single(call, json_output=json_output)
    if json_output:
        for found in captures:  # one object per line, as every --json output
            echo_json(to_plain(found))
    else:
        show_captures(_console(), order_id, captures)


@click.command()
@click.argument("order_id")
@click.argument("capture_id")
@click.option("--company", required=True, help="Shipping company, e.g. 'DHL'.")
@click.option("--tracking-number", required=True, help="The shipment's tracking number.")
@click.option(
    "--method",
    type=click.Choice([method.value for method in ShippingMethod]),
    default=ShippingMethod.HOME.value,
    show_default=True,
    help="Shipping method.",
)
@click.option("--tracking-uri", help="URL where the customer can track the shipment.")
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
    info = _valid(
        lambda: ShippingInfo(
            shipping_company=company,
            shipping_method=method,
            tracking_number=tracking_number,
            tracking_uri=tracking_uri,
        )
    )
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
    """Show ORDER_ID: status, amounts (what is left to capture) and captures."""
    connection = Connection.from_context()

    async def call() -> Order:
        async with connection.client() as om:
            return await om.orders.get(order_id)

    found = run_single(call, json_output=json_output)
    if json_output:
        echo_json(to_plain(found))
    else:
        show_order(_console(), found)


@click.command()
@click.argument("order_id")
@click.option(
    "--amount",
    type=int,
    required=True,
    help="Amount to refund in minor units (1050 = 10.50): at most what was captured and "
    "not yet refunded.",
)
@click.option("--reference", help="Your reference for the refund (settlement files show it).")
@click.option("--description", help="Description of the refund, shown to the customer.")
@_idempotency_option
@connection_options
@json_option
def refund(
    order_id: str,
    amount: int,
    reference: str | None,
    description: str | None,
    idempotency_key: str | None,
    json_output: bool,
) -> None:
    """Refund all or part of what ORDER_ID captured and print the new refund's id."""
    connection = Connection.from_context()
    connection.check()
    request = _valid(
        lambda: RefundRequest(refunded_amount=amount, reference=reference, description=description)
    )
    key = _announce_key(idempotency_key, json_output, command="refund", order_id=order_id)

    async def call() -> RefundCreated:
        async with connection.client() as om:
            return await om.refunds.create(order_id, request, idempotency_key=key)

    created = run_single(call, json_output=json_output, idempotency_key=key)
    if json_output:
        # Spelled out: the converter omits fields at their default, such as attempts=1.
        echo_json(
            {
                "order_id": order_id,
                "refund_id": created.refund_id,
                "location": created.location,
                "idempotency_key": created.idempotency_key,
                "attempts": created.attempts,
            }
        )
        return
    attempts = "1 attempt" if created.attempts == 1 else f"{created.attempts} attempts"
    click.echo(
        f"Refunded {amount} on order {order_id}: refund_id {created.refund_id} "
        f"(idempotency key {created.idempotency_key}, {attempts})"
    )


def _show_refund(console: Console, found: Refund) -> None:
    """One refund as a field/value table."""
    _fields(
        console,
        f"Refund {found.refund_id}",
        [
            ("refund_id", found.refund_id),
            ("refunded_amount", found.refunded_amount),
            ("refunded_at", found.refunded_at),
            ("reference", found.reference),
            ("description", found.description),
            ("order_lines", len(found.order_lines or ())),
        ],
    )


@click.command(name="refund-get")
@click.argument("order_id")
@click.argument("refund_id")
@connection_options
@json_option
def refund_get(order_id: str, refund_id: str, json_output: bool) -> None:
    """Show one refund of ORDER_ID."""
    connection = Connection.from_context()

    async def call() -> Refund:
        async with connection.client() as om:
            return await om.refunds.get(order_id, refund_id)

    found = run_single(call, json_output=json_output)
    if json_output:
        echo_json(to_plain(found))
    else:
        _show_refund(_console(), found)


#: Registered on the ``klarna-om`` group by ``_app``.
SINGLE_COMMANDS = (capture, get, list_captures, ship, send_out, order, refund, refund_get)
