"""The money-moving operations a batch runs, and how each one is sent.

One batch engine (:mod:`klarna_om_async.batch`) runs every operation; what differs between
them is here, as data: the request type that names the operation, the service method that
sends it, the id its 201 returns (none for a 204), and the amount and reference the journal
keeps to recognise the item in a later run. How Klarna's order proves an operation done is
in :mod:`klarna_om_async.reconcile` (``judge``), next to the capture's rules it shares.

The three body-less operations take a marker request, so that a batch item always says what
it does by the type of its ``request``::

    BatchItem(order_id="o1", request=RefundRequest(refunded_amount=2500, reference="RMA-7"))
    BatchItem(order_id="o2", request=ReleaseRemainingAuthorization())
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias

import attrs

from .models import CaptureRequest, RefundRequest

if TYPE_CHECKING:
    from .captures import CapturesService
    from .orders import OrdersService
    from .refunds import RefundsService

__all__ = (
    "CancelOrder",
    "ExtendAuthorizationTime",
    "Operation",
    "OperationRequest",
    "ReleaseRemainingAuthorization",
    "Sent",
    "Services",
    "operation_of",
    "send",
)


class Operation(enum.StrEnum):
    """What a batch item does to its order; the journal records it with the item."""

    #: Capture (part of) the authorization: ``CaptureRequest``.
    CAPTURE = "capture"
    #: Give captured money back: ``RefundRequest``.
    REFUND = "refund"
    #: Release what remains authorized: ``ReleaseRemainingAuthorization()``.
    RELEASE = "release"
    #: Extend the authorization's expiry: ``ExtendAuthorizationTime()``.
    EXTEND = "extend"
    #: Cancel an order nothing was captured of: ``CancelOrder()``.
    CANCEL = "cancel"

    @property
    def done(self) -> str:
        """The past tense a person reads for a booked item: "captured", "refunded", ..."""
        return _DONE[self]


_DONE = {
    Operation.CAPTURE: "captured",
    Operation.REFUND: "refunded",
    Operation.RELEASE: "released",
    Operation.EXTEND: "extended",
    Operation.CANCEL: "cancelled",
}


@attrs.frozen
class ReleaseRemainingAuthorization:
    """Batch request: release the order's remaining authorization (after a final capture).

    ``om.orders.release_remaining_authorization``; Klarna answers 204, no id.
    https://docs.klarna.com/api/ordermanagement/#operation/releaseRemainingAuthorization
    """


@attrs.frozen
class ExtendAuthorizationTime:
    """Batch request: extend the order's authorization time (an order that ships late).

    ``om.orders.extend_authorization_time``; Klarna answers 204, no id. Repeating it the
    same day gives the same date, so an unknown outcome may be resent.
    https://docs.klarna.com/api/ordermanagement/#operation/extendAuthorizationTime
    """


@attrs.frozen
class CancelOrder:
    """Batch request: cancel the order (only when nothing was captured).

    ``om.orders.cancel``; Klarna answers 204, no id.
    https://docs.klarna.com/api/ordermanagement/#operation/cancelOrder
    """


#: What a ``BatchItem.request`` may be; its type names the operation.
OperationRequest: TypeAlias = (
    CaptureRequest
    | RefundRequest
    | ReleaseRemainingAuthorization
    | ExtendAuthorizationTime
    | CancelOrder
)

_BY_TYPE: dict[type[object], Operation] = {
    CaptureRequest: Operation.CAPTURE,
    RefundRequest: Operation.REFUND,
    ReleaseRemainingAuthorization: Operation.RELEASE,
    ExtendAuthorizationTime: Operation.EXTEND,
    CancelOrder: Operation.CANCEL,
}


def operation_or_none(request: object) -> Operation | None:
    """The operation ``request`` asks for, or None for anything else (no exception)."""
    return _BY_TYPE.get(type(request))


def operation_of(request: object) -> Operation:
    """The operation ``request`` asks for; ``TypeError`` for anything else."""
    try:
        return _BY_TYPE[type(request)]
    except KeyError:
        names = ", ".join(t.__name__ for t in _BY_TYPE)
        raise TypeError(
            f"a batch request must be one of {names}, got {type(request).__name__}"
        ) from None


def amount_of(request: object) -> int | None:
    """The money the request moves (minor units), for the journal; None when body-less."""
    if isinstance(request, CaptureRequest):
        return request.captured_amount
    if isinstance(request, RefundRequest):
        return request.refunded_amount
    operation_of(request)  # refuses an unknown request
    return None


def reference_of(request: object) -> str | None:
    """The request's ``reference`` (captures and refunds), else None."""
    if isinstance(request, CaptureRequest | RefundRequest):
        return request.reference
    return None


@attrs.frozen
class Services:
    """The services a batch sends through (``om.captures``, ``om.refunds``, ``om.orders``).

    ``orders`` also reads orders to reconcile; a batch without it cannot settle an expired
    key. A missing service makes its operation's items fail before anything is sent.
    """

    captures: CapturesService | None = None
    refunds: RefundsService | None = None
    orders: OrdersService | None = None
    #: How the batch waits for the client's pace (its retry policy's ``sleep``) and the
    #: client's clock (monotonic seconds): an item the throttle held back unsent waits
    #: its turn on them.
    sleep: Callable[[float], Awaitable[None]] = attrs.field(default=asyncio.sleep, eq=False)
    clock: Callable[[], float] = attrs.field(default=time.monotonic, eq=False)


@attrs.frozen
class Sent:
    """What a successful send returned: the created id (captures, refunds) and attempts."""

    created_id: str | None
    #: HTTP attempts it took.
    attempts: int = 1


def _missing(name: str, operation: Operation) -> TypeError:
    return TypeError(f"this batch has no {name} service to {operation.value} with")


async def send(
    services: Services, order_id: str, request: OperationRequest, idempotency_key: str
) -> Sent:
    """Send ``request`` for ``order_id`` with ``idempotency_key`` through its service.

    Raises what the service raises (``KlarnaError`` subclasses, ``ValidationError``), and
    ``TypeError`` for a request that is no operation or a service the batch was not given.
    """
    operation = operation_of(request)
    if isinstance(request, CaptureRequest):
        if services.captures is None:
            raise _missing("captures", operation)
        created = await services.captures.create(order_id, request, idempotency_key=idempotency_key)
        return Sent(created.capture_id, created.attempts)
    if isinstance(request, RefundRequest):
        if services.refunds is None:
            raise _missing("refunds", operation)
        refund = await services.refunds.create(order_id, request, idempotency_key=idempotency_key)
        return Sent(refund.refund_id, refund.attempts)
    orders = services.orders
    if orders is None:
        raise _missing("orders", operation)
    return Sent(None, await orders._act(operation, order_id, idempotency_key))
