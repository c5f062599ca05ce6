"""The fake's bookkeeping: orders, the captures and refunds booked on them, and their rules."""

from __future__ import annotations

import datetime
import time
import uuid

import attrs

__all__ = (
    "ORDER_STATUSES",
    "CaptureBody",
    "CaptureRefused",
    "FakeCapture",
    "FakeClock",
    "FakeOrder",
    "FakeRefund",
    "JSONObject",
    "Ledger",
    "RefundBody",
    "RefundRefused",
    "check_status",
    "iso_now",
)

ORDER_STATUSES = frozenset(
    {"AUTHORIZED", "PART_CAPTURED", "CAPTURED", "CANCELLED", "EXPIRED", "CLOSED"}
)
_FINAL_STATUSES = {"CANCELLED": "cancelled", "EXPIRED": "expired", "CLOSED": "closed"}
_AUTHORIZATION_DAYS = 28

JSONObject = dict[str, object]


class FakeClock:
    """The fake's time: the real clock moved forward by ``advance`` (tests drive it)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def advance(self, seconds: float) -> None:
        """Move the fake's time forward by ``seconds``."""
        if not seconds >= 0:
            raise ValueError(f"the fake's clock only moves forward, not by {seconds!r}")
        self.offset += seconds

    def monotonic(self) -> float:
        """``time.monotonic()`` moved forward."""
        return time.monotonic() + self.offset

    def now(self) -> datetime.datetime:
        """The current UTC time, moved forward."""
        return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.offset)


def iso_now(clock: FakeClock, offset: datetime.timedelta = datetime.timedelta(0)) -> str:
    """The fake's current UTC time (plus ``offset``) as Klarna writes it: ISO 8601 with ``Z``."""
    now = clock.now() + offset
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _klarna_reference() -> str:
    return uuid.uuid4().hex[:8].upper()


@attrs.define(eq=False)
class FakeCapture:
    """A capture the fake booked, as Klarna would store it."""

    order_id: str
    capture_id: str
    klarna_reference: str
    captured_amount: int
    captured_at: str
    description: str | None
    reference: str | None
    order_lines: list[JSONObject]
    #: Grows with every accepted ``POST .../shipping-info``.
    shipping_info: list[JSONObject]
    #: The ``Klarna-Idempotency-Key`` of the request that booked it.
    idempotency_key: str | None
    #: How many ``POST .../trigger-send-out`` calls were accepted for this capture.
    send_outs: int = 0
    #: The part of this capture given back by refunds (allocated oldest capture first).
    refunded_amount: int = 0


@attrs.define(eq=False)
class FakeRefund:
    """A refund the fake booked, as Klarna would store it."""

    order_id: str
    refund_id: str
    refunded_amount: int
    refunded_at: str
    description: str | None
    reference: str | None
    order_lines: list[JSONObject]
    #: The ``Klarna-Idempotency-Key`` of the request that booked it.
    idempotency_key: str | None


@attrs.define(eq=False)
class FakeOrder:
    """An order as the fake sees it; live, so it reflects later captures."""

    order_id: str
    order_amount: int
    status: str
    purchase_currency: str
    merchant_reference1: str | None
    klarna_reference: str
    created_at: str
    expires_at: str
    captured_amount: int = 0
    #: Captures in booking order.
    captures: list[FakeCapture] = attrs.field(factory=list)
    refunded_amount: int = 0
    #: Refunds in booking order.
    refunds: list[FakeRefund] = attrs.field(factory=list)

    @property
    def original_order_amount(self) -> int:
        """The amount first authorized (the fake never changes the order amount)."""
        return self.order_amount

    @property
    def remaining_authorized_amount(self) -> int:
        """What can still be captured: nothing once cancelled, expired or closed."""
        if self.status in _FINAL_STATUSES:
            return 0
        return self.order_amount - self.captured_amount

    @property
    def refundable_amount(self) -> int:
        """What can still be refunded: captured and not yet refunded."""
        return self.captured_amount - self.refunded_amount


class CaptureRefused(Exception):
    """Klarna's ``CAPTURE_NOT_ALLOWED``: the order cannot take this capture."""


class RefundRefused(Exception):
    """Klarna's ``REFUND_NOT_ALLOWED``: the order cannot take this refund."""


@attrs.frozen
class CaptureBody:
    """A validated capture body."""

    captured_amount: int
    description: str | None = None
    reference: str | None = None
    order_lines: list[JSONObject] = attrs.field(factory=list)
    shipping_info: list[JSONObject] = attrs.field(factory=list)


@attrs.frozen
class RefundBody:
    """A validated refund body."""

    refunded_amount: int
    description: str | None = None
    reference: str | None = None
    order_lines: list[JSONObject] = attrs.field(factory=list)


class Ledger:
    """Every order, capture and refund the fake knows, indexed so each request costs O(1)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.orders: dict[str, FakeOrder] = {}
        self.booked: list[FakeCapture] = []
        self.booked_refunds: list[FakeRefund] = []
        self._captures: dict[tuple[str, str], FakeCapture] = {}
        self._refunds: dict[tuple[str, str], FakeRefund] = {}

    def add_order(
        self,
        order_id: str | None,
        *,
        amount: int,
        status: str,
        currency: str,
        reference: str | None,
    ) -> str:
        """Create an authorized order and return its id."""
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise ValueError(f"amount must be a non-negative int (minor units), got {amount!r}")
        check_status(status)
        order_id = str(uuid.uuid4()) if order_id is None else order_id
        if not order_id or "/" in order_id:
            raise ValueError(f"order_id must be a non-empty path segment, got {order_id!r}")
        if order_id in self.orders:
            raise ValueError(f"order {order_id!r} already exists")
        self.orders[order_id] = FakeOrder(
            order_id=order_id,
            order_amount=amount,
            status=status,
            purchase_currency=currency,
            merchant_reference1=reference,
            klarna_reference=_klarna_reference(),
            created_at=iso_now(self.clock),
            expires_at=iso_now(self.clock, datetime.timedelta(days=_AUTHORIZATION_DAYS)),
        )
        return order_id

    def order(self, order_id: str) -> FakeOrder:
        """The order with this id; ``KeyError`` if the fake has none."""
        try:
            return self.orders[order_id]
        except KeyError:
            raise KeyError(f"the fake has no order {order_id!r}") from None

    def book(
        self, order: FakeOrder, request: CaptureBody, idempotency_key: str | None
    ) -> FakeCapture:
        """Apply Klarna's capture rules and book the capture, or raise ``CaptureRefused``."""
        final = _FINAL_STATUSES.get(order.status)
        if final is not None:
            raise CaptureRefused(f"Order {order.order_id} is {final}. Capture not possible.")
        remaining = order.remaining_authorized_amount
        if request.captured_amount > remaining:
            raise CaptureRefused(
                f"Captured amount {request.captured_amount} is higher than the remaining"
                f" authorized amount {remaining} of order {order.order_id}."
            )
        capture = FakeCapture(
            order_id=order.order_id,
            capture_id=str(uuid.uuid4()),
            klarna_reference=f"{order.klarna_reference}-{len(order.captures) + 1}",
            captured_amount=request.captured_amount,
            captured_at=iso_now(self.clock),
            description=request.description,
            reference=request.reference,
            order_lines=request.order_lines,
            shipping_info=list(request.shipping_info),
            idempotency_key=idempotency_key,
        )
        order.captured_amount += request.captured_amount
        if order.captured_amount:  # a capture of 0 books a capture but moves no money
            order.status = "CAPTURED" if order.remaining_authorized_amount == 0 else "PART_CAPTURED"
        order.captures.append(capture)
        self._captures[order.order_id, capture.capture_id] = capture
        self.booked.append(capture)
        return capture

    def capture(self, order: FakeOrder, capture_id: str) -> FakeCapture | None:
        """The capture with this id on this order, if any."""
        return self._captures.get((order.order_id, capture_id))

    def refund(
        self, order: FakeOrder, request: RefundBody, idempotency_key: str | None
    ) -> FakeRefund:
        """Apply Klarna's refund rules and book the refund, or raise ``RefundRefused``.

        At most what was captured and not yet refunded can be refunded, whatever the order's
        status; nothing on an order with nothing captured. The refund is spread over the
        order's captures, oldest first (their ``refunded_amount``). The order is ``CLOSED``
        once everything captured is refunded and nothing is left to capture.
        """
        if order.captured_amount == 0:
            raise RefundRefused(f"Order {order.order_id} has no captures. Refund not possible.")
        refundable = order.refundable_amount
        if request.refunded_amount > refundable:
            raise RefundRefused(
                f"Refunded amount {request.refunded_amount} is higher than the captured"
                f" amount not yet refunded {refundable} of order {order.order_id}."
            )
        refund = FakeRefund(
            order_id=order.order_id,
            refund_id=str(uuid.uuid4()),
            refunded_amount=request.refunded_amount,
            refunded_at=iso_now(self.clock),
            description=request.description,
            reference=request.reference,
            order_lines=request.order_lines,
            idempotency_key=idempotency_key,
        )
        left = request.refunded_amount
        for capture in order.captures:
            share = min(left, capture.captured_amount - capture.refunded_amount)
            capture.refunded_amount += share
            left -= share
        order.refunded_amount += request.refunded_amount
        if order.refundable_amount == 0 and order.remaining_authorized_amount == 0:
            order.status = "CLOSED"
        order.refunds.append(refund)
        self._refunds[order.order_id, refund.refund_id] = refund
        self.booked_refunds.append(refund)
        return refund

    def find_refund(self, order: FakeOrder, refund_id: str) -> FakeRefund | None:
        """The refund with this id on this order, if any."""
        return self._refunds.get((order.order_id, refund_id))


def check_status(status: str) -> None:
    """Refuse a status Klarna does not have."""
    if status not in ORDER_STATUSES:
        raise ValueError(
            f"unknown order status {status!r}; expected one of {sorted(ORDER_STATUSES)}"
        )
