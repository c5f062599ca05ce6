"""The fake's bookkeeping: orders, the captures and refunds booked on them, and their rules."""

from __future__ import annotations

import datetime
import time
import uuid

import attrs

__all__ = (
    "DEFAULT_ADDRESS",
    "DUE_DATE_OPTIONS",
    "ORDER_STATUSES",
    "PAYMENT_METHODS",
    "PAYMENT_METHOD_DESCRIPTIONS",
    "AuthorizationBody",
    "CaptureBody",
    "CaptureRefused",
    "CustomerDetailsBody",
    "FakeCapture",
    "FakeClock",
    "FakeOrder",
    "FakeRefund",
    "JSONObject",
    "Ledger",
    "NotAllowed",
    "RefundBody",
    "RefundRefused",
    "check_payment_method",
    "check_status",
    "iso_now",
)

ORDER_STATUSES = frozenset(
    {"AUTHORIZED", "PART_CAPTURED", "CAPTURED", "CANCELLED", "EXPIRED", "CLOSED"}
)
_FINAL_STATUSES = {"CANCELLED": "cancelled", "EXPIRED": "expired", "CLOSED": "closed"}
# Only these can expire: a CAPTURED order has nothing left authorized.
_EXPIRING_STATUSES = frozenset({"AUTHORIZED", "PART_CAPTURED"})
# docs.klarna.com, "extend order authorization": the merchant's expiry days (28 by default)
# from the day of the call, never beyond 180 days after the order was created.
_AUTHORIZATION_DAYS = 28
_MAX_AUTHORIZATION_DAYS = 180

JSONObject = dict[str, object]

#: The ``initial_payment_method.type`` values of Klarna's spec (InitialPaymentMethodDto).
PAYMENT_METHODS = frozenset(
    {
        "ACCOUNT",
        "ALTERNATIVE_PAYMENT_METHOD",
        "BANK_TRANSFER",
        "CARD",
        "DEFERRED_INTEREST",
        "DIRECT_DEBIT",
        "FIXED_AMOUNT_BY_CARD",
        "FIXED_AMOUNT",
        "FIXED_SUM_CREDIT",
        "INVOICE_BUSINESS",
        "INVOICE",
        "MOBILEPAY",
        "PAY_BY_CARD",
        "PAY_IN_X",
        "PAY_LATER_BY_CARD",
        "PAY_LATER_IN_PARTS",
        "SWISH",
        "OTHER",
    }
)
# docs.klarna.com, "update order amount": only these payment methods allow an increase.
_INCREASE_METHODS = frozenset(
    {"INVOICE", "INVOICE_BUSINESS", "ACCOUNT", "FIXED_AMOUNT", "DIRECT_DEBIT", "DEFERRED_INTEREST"}
)
# docs.klarna.com, "extend payment date": only for pay-later methods (Pay in 30 days, Pay in 4).
_PAY_LATER_METHODS = frozenset(
    {"INVOICE", "INVOICE_BUSINESS", "PAY_LATER_IN_PARTS", "PAY_LATER_BY_CARD", "PAY_IN_X"}
)
#: ``initial_payment_method.description`` for the common types.
PAYMENT_METHOD_DESCRIPTIONS = {
    "INVOICE": "Pay later",
    "INVOICE_BUSINESS": "Pay later (business)",
    "PAY_LATER_IN_PARTS": "Pay in 4",
    "FIXED_AMOUNT": "Slice it (Fixed Payments)",
    "DIRECT_DEBIT": "Pay now",
    "CARD": "Card",
}

#: The fake's extend-due-date choices for every pay-later capture: ``(number_of_days, fee)``,
#: the fee in minor units of the order's currency (Klarna's own are per merchant).
DUE_DATE_OPTIONS: tuple[tuple[int, int], ...] = ((7, 195), (14, 295), (28, 495))

#: The address every new order starts with, billing and shipping alike (the addresses of
#: Klarna's own capture sample, docs.klarna.com "Capture and track orders").
DEFAULT_ADDRESS: JSONObject = {
    "given_name": "John",
    "family_name": "Doe",
    "title": "Mr",
    "street_address": "123 Fake St",
    "postal_code": "12345",
    "city": "New York",
    "region": "NY",
    "country": "US",
    "email": "john@doe.com",
    "phone": "123456",
}


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


def iso_now(clock: FakeClock) -> str:
    """The fake's current UTC time as Klarna writes it: ISO 8601 with ``Z``."""
    return _iso(clock.now())


def _iso(moment: datetime.datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    #: The order's addresses when the capture was booked (Klarna's Capture carries both).
    billing_address: JSONObject = attrs.field(factory=lambda: dict(DEFAULT_ADDRESS))
    shipping_address: JSONObject = attrs.field(factory=lambda: dict(DEFAULT_ADDRESS))
    #: ``number_of_days`` of every accepted ``PATCH .../extend-due-date``, in order.
    due_date_extensions: list[int] = attrs.field(factory=list)
    #: The fees of those extensions, in minor units (from ``DUE_DATE_OPTIONS``).
    due_date_fees: int = 0

    @property
    def due_date_extended_by(self) -> int:
        """How many days the customer's payment due date was extended in total."""
        return sum(self.due_date_extensions)


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
    """An order as the fake sees it; live, so it reflects later operations."""

    order_id: str
    #: The amount authorized now; ``PATCH .../authorization`` changes it.
    order_amount: int
    #: Read it through ``FakeKlarna.order()`` or after ``advance_clock``: an order past
    #: ``expires_at`` turns ``EXPIRED`` when the fake next looks at it.
    status: str
    purchase_currency: str
    merchant_reference1: str | None
    klarna_reference: str
    created_at: str
    #: ISO 8601 with ``Z``; ``POST .../extend-authorization-time`` moves it.
    expires_at: str
    captured_amount: int = 0
    #: Captures in booking order.
    captures: list[FakeCapture] = attrs.field(factory=list)
    refunded_amount: int = 0
    #: Refunds in booking order.
    refunds: list[FakeRefund] = attrs.field(factory=list)
    #: The amount first authorized; never changes.
    original_order_amount: int = attrs.field(
        default=attrs.Factory(lambda order: order.order_amount, takes_self=True)
    )
    merchant_reference2: str | None = None
    #: ``initial_payment_method.type`` (one of ``PAYMENT_METHODS``); decides whether the
    #: amount may be increased and whether due dates may be extended.
    payment_method: str = "INVOICE"
    billing_address: JSONObject = attrs.field(factory=lambda: dict(DEFAULT_ADDRESS))
    #: Replaced (fields merged) by ``PATCH .../customer-details``.
    shipping_address: JSONObject = attrs.field(factory=lambda: dict(DEFAULT_ADDRESS))
    #: The order lines sent by the last ``PATCH .../authorization``; ``None`` until then
    #: (the order then reads back with one line of the whole amount).
    order_lines: list[JSONObject] | None = None
    #: Order-level shipping info, grows with every ``POST .../shipping-info`` on the order.
    shipping_info: list[JSONObject] = attrs.field(factory=list)
    #: When the order was first acknowledged (``POST .../acknowledge``), else ``None``.
    acknowledged_at: str | None = None
    #: When the remaining authorization was released, else ``None``.
    released_at: str | None = None
    #: When the order was cancelled through the API, else ``None``.
    cancelled_at: str | None = None
    #: The spec's operationId of every accepted update on this order or its captures, in
    #: order (``"releaseRemainingAuthorization"``, ``"cancelOrder"``, ``"extendDueDate"``,
    #: ...): counts prove an operation was applied exactly once. Captures and refunds are
    #: in ``captures`` and ``refunds``.
    operations: list[str] = attrs.field(factory=list)

    @property
    def remaining_authorized_amount(self) -> int:
        """What can still be captured: nothing once released, cancelled, expired or closed."""
        if self.status in _FINAL_STATUSES or self.released_at is not None:
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


class NotAllowed(Exception):
    """A 403 refusal of another operation, with Klarna's error code (``NOT_ALLOWED`` unless
    the operation documents its own, like ``CANCEL_NOT_ALLOWED``)."""

    def __init__(self, message: str, error_code: str = "NOT_ALLOWED") -> None:
        super().__init__(message)
        self.error_code = error_code


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


@attrs.frozen
class AuthorizationBody:
    """A validated ``PATCH .../authorization`` body."""

    order_amount: int
    description: str | None = None
    #: ``None`` when the body had none (Klarna then deletes the order's lines).
    order_lines: list[JSONObject] | None = None


@attrs.frozen
class CustomerDetailsBody:
    """A validated ``PATCH .../customer-details`` body (Klarna's UpdateConsumer)."""

    #: The fields sent; ``""`` clears a field. ``None`` when no address was sent.
    shipping_address: JSONObject | None = None
    #: Sent although Klarna no longer lets it be updated: refused with 403.
    billing_address_sent: bool = False


def _final_word(order: FakeOrder) -> str | None:
    return _FINAL_STATUSES.get(order.status)


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
        payment_method: str = "INVOICE",
    ) -> str:
        """Create an authorized order and return its id."""
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise ValueError(f"amount must be a non-negative int (minor units), got {amount!r}")
        check_status(status)
        check_payment_method(payment_method)
        order_id = str(uuid.uuid4()) if order_id is None else order_id
        if not order_id or "/" in order_id:
            raise ValueError(f"order_id must be a non-empty path segment, got {order_id!r}")
        if order_id in self.orders:
            raise ValueError(f"order {order_id!r} already exists")
        # One reading of the clock: read twice, expires_at could fall a millisecond past
        # 28 days after created_at.
        now = self.clock.now()
        self.orders[order_id] = FakeOrder(
            order_id=order_id,
            order_amount=amount,
            status=status,
            purchase_currency=currency,
            merchant_reference1=reference,
            klarna_reference=_klarna_reference(),
            created_at=_iso(now),
            expires_at=_iso(now + datetime.timedelta(days=_AUTHORIZATION_DAYS)),
            payment_method=payment_method,
        )
        return order_id

    def order(self, order_id: str) -> FakeOrder:
        """The order with this id, expired if its time is up; ``KeyError`` if none."""
        order = self.find(order_id)
        if order is None:
            raise KeyError(f"the fake has no order {order_id!r}")
        return order

    def find(self, order_id: str) -> FakeOrder | None:
        """The order with this id, expired if its time is up; ``None`` if none."""
        order = self.orders.get(order_id)
        if order is not None:
            self._expire(order, self.clock.now())
        return order

    def expire_due(self) -> None:
        """Expire every order whose ``expires_at`` has passed (after the clock moved)."""
        now = self.clock.now()
        for order in self.orders.values():
            self._expire(order, now)

    @staticmethod
    def _expire(order: FakeOrder, now: datetime.datetime) -> None:
        if (
            order.status in _EXPIRING_STATUSES
            and order.released_at is None
            and datetime.datetime.fromisoformat(order.expires_at) <= now
        ):
            order.status = "EXPIRED"

    def book(
        self, order: FakeOrder, request: CaptureBody, idempotency_key: str | None
    ) -> FakeCapture:
        """Apply Klarna's capture rules and book the capture, or raise ``CaptureRefused``."""
        final = _FINAL_STATUSES.get(order.status)
        if final is not None:
            raise CaptureRefused(f"Order {order.order_id} is {final}. Capture not possible.")
        if order.released_at is not None:
            raise CaptureRefused(
                f"The remaining authorization of order {order.order_id} was released."
                " Capture not possible."
            )
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
            # Shared, not copied: an address update replaces the order's dict.
            billing_address=order.billing_address,
            shipping_address=order.shipping_address,
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

    # -- the order's other operations (each a 204 on success; refusals raise NotAllowed) ----

    def release(self, order: FakeOrder) -> None:
        """``releaseRemainingAuthorization``: nothing more can be captured.

        Refused (403 ``NOT_ALLOWED``) on a fully captured order (docs.klarna.com, "release
        order authorization"), and on a cancelled order or one without captures (spec:
        "Can not release when order is cancelled or has no captures"; an uncaptured order is
        cancelled instead). "Captures" are counted as cancel counts them (docs.klarna.com,
        "cancel an order": only before any capture), so an order whose only capture is of 0
        cannot be cancelled but can be released. Afterwards the order is ``CAPTURED``, or
        ``CLOSED`` when everything captured was also refunded.
        """
        final = _final_word(order)
        if final is not None:
            raise NotAllowed(
                f"Order {order.order_id} is {final}. Remaining authorization cannot be released."
            )
        if order.status == "CAPTURED":
            raise NotAllowed("Order is fully captured. Remaining authorization cannot be released.")
        if not order.captures:  # the rule cancel uses: a capture of 0 counts too
            raise NotAllowed(
                f"Order {order.order_id} has no captures. Remaining authorization cannot be"
                " released; cancel the order instead."
            )
        order.released_at = iso_now(self.clock)
        order.status = "CLOSED" if order.refundable_amount == 0 else "CAPTURED"
        order.operations.append("releaseRemainingAuthorization")

    def extend_authorization(self, order: FakeOrder) -> None:
        """``extendAuthorizationTime``: ``expires_at`` becomes 28 days after today.

        The new date keeps the time of day of ``created_at``, so every extension on the same
        day gives the same date, and never passes 180 days after creation (docs.klarna.com,
        "extend order authorization"). Refused (403 ``NOT_ALLOWED``) once the order has
        expired or is cancelled or closed (spec).
        """
        final = _final_word(order)
        if final is not None:
            raise NotAllowed(
                f"Order {order.order_id} is {final}. Authorization time cannot be extended."
            )
        created = datetime.datetime.fromisoformat(order.created_at)
        days = (self.clock.now().date() - created.date()).days + _AUTHORIZATION_DAYS
        extended = created + datetime.timedelta(days=min(days, _MAX_AUTHORIZATION_DAYS))
        if extended > datetime.datetime.fromisoformat(order.expires_at):
            order.expires_at = _iso(extended)
        order.operations.append("extendAuthorizationTime")

    def cancel(self, order: FakeOrder) -> None:
        """``cancelOrder``: only before any capture, else 403 ``CANCEL_NOT_ALLOWED``.

        docs.klarna.com, "cancel an order": refused when the order has captures or is
        closed; the fake also refuses an order already cancelled or expired.
        """
        if order.captures:
            raise NotAllowed(
                "Order has previous captures. Cancel not possible.", "CANCEL_NOT_ALLOWED"
            )
        final = _final_word(order)
        if final is not None:
            raise NotAllowed(
                f"Order {order.order_id} is {final}. Cancel not possible.", "CANCEL_NOT_ALLOWED"
            )
        order.status = "CANCELLED"
        order.cancelled_at = iso_now(self.clock)
        order.operations.append("cancelOrder")

    def acknowledge(self, order: FakeOrder) -> None:
        """``acknowledgeOrder``: mark the order acknowledged (the first time is kept)."""
        if order.acknowledged_at is None:
            order.acknowledged_at = iso_now(self.clock)
        order.operations.append("acknowledgeOrder")

    def update_authorization(self, order: FakeOrder, body: AuthorizationBody) -> None:
        """``updateAuthorization``: a new ``order_amount`` and order lines.

        docs.klarna.com, "update order amount": refused (403 ``NOT_ALLOWED``) on an order
        fully captured (or released), cancelled, expired or closed; below what is captured;
        or an increase with a payment method that does not allow one. The new lines replace
        the old ones (none sent: the old ones are deleted). ``original_order_amount`` stays.
        """
        word = _final_word(order) or ("fully captured" if order.status == "CAPTURED" else None)
        if word is not None:
            raise NotAllowed(f"Order {order.order_id} is {word}. Authorization cannot be updated.")
        if body.order_amount < order.captured_amount:
            raise NotAllowed(
                f"Order amount {body.order_amount} is lower than the captured amount"
                f" {order.captured_amount} of order {order.order_id}."
            )
        if body.order_amount > order.order_amount and order.payment_method not in _INCREASE_METHODS:
            raise NotAllowed(
                f"The payment method {order.payment_method} of order {order.order_id} does not"
                " allow the order amount to be increased."
            )
        order.order_amount = body.order_amount
        order.order_lines = list(body.order_lines or ())
        if order.captured_amount:
            order.status = "CAPTURED" if order.remaining_authorized_amount == 0 else "PART_CAPTURED"
            if order.status == "CAPTURED" and order.refundable_amount == 0:
                order.status = "CLOSED"  # nothing left to capture or refund, as after release
        order.operations.append("updateAuthorization")

    def update_merchant_references(self, order: FakeOrder, references: dict[str, str]) -> None:
        """``updateMerchantReferences``: each field sent overwrites, the others stay.

        Refused (403 ``NOT_ALLOWED``) on a cancelled order (spec).
        """
        if order.status == "CANCELLED":
            raise NotAllowed(
                f"Order {order.order_id} is cancelled. Can not update a cancelled order."
            )
        if "merchant_reference1" in references:
            order.merchant_reference1 = references["merchant_reference1"]
        if "merchant_reference2" in references:
            order.merchant_reference2 = references["merchant_reference2"]
        order.operations.append("updateMerchantReferences")

    def update_customer_details(self, order: FakeOrder, body: CustomerDetailsBody) -> None:
        """``updateConsumerDetails``: merge the shipping address fields sent (``""`` clears).

        Refused (403 ``NOT_ALLOWED``) when a billing address is sent (docs.klarna.com,
        "update customer address": it can no longer be updated) and on a cancelled, expired
        or closed order (spec: "Decision is based on order state").
        """
        if body.billing_address_sent:
            raise NotAllowed("Billing address cannot be updated.")
        final = _final_word(order)
        if final is not None:
            raise NotAllowed(
                f"Order {order.order_id} is {final}. Customer details cannot be updated."
            )
        if body.shipping_address is not None:
            merged = {**order.shipping_address, **body.shipping_address}
            order.shipping_address = {k: v for k, v in merged.items() if v != ""}
        order.operations.append("updateConsumerDetails")

    def add_shipping_info(self, order: FakeOrder, items: list[JSONObject]) -> None:
        """``appendOrderShippingInfo``: append order-level shipping info (no refusal)."""
        order.shipping_info.extend(items)
        order.operations.append("appendOrderShippingInfo")

    def due_date_options(self, order: FakeOrder) -> list[tuple[int, int]]:
        """``(number_of_days, fee)`` choices for a capture's due date: ``DUE_DATE_OPTIONS``
        for a pay-later payment method, none otherwise (docs.klarna.com "extend payment
        date": only possible for pay-later methods)."""
        if order.payment_method not in _PAY_LATER_METHODS:
            return []
        return list(DUE_DATE_OPTIONS)

    def extend_due_date(self, order: FakeOrder, capture: FakeCapture, number_of_days: int) -> None:
        """``extendDueDate``: 403 ``NOT_ALLOWED`` unless ``number_of_days`` is an option."""
        fees = dict(self.due_date_options(order))
        if number_of_days not in fees:
            raise NotAllowed(
                f"Due date of capture {capture.capture_id} cannot be extended by"
                f" {number_of_days} days; options: {sorted(fees)}."
            )
        capture.due_date_extensions.append(number_of_days)
        capture.due_date_fees += fees[number_of_days]
        order.operations.append("extendDueDate")


def check_payment_method(method: str) -> None:
    """Refuse a payment method type Klarna's spec does not list."""
    if method not in PAYMENT_METHODS:
        raise ValueError(
            f"unknown payment method {method!r}; expected one of {sorted(PAYMENT_METHODS)}"
        )


def check_status(status: str) -> None:
    """Refuse a status Klarna does not have."""
    if status not in ORDER_STATUSES:
        raise ValueError(
            f"unknown order status {status!r}; expected one of {sorted(ORDER_STATUSES)}"
        )
