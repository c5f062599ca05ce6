"""Typed models of Klarna Order Management (captures, refunds, orders): requests and answers.

Leaf models (``OrderLine``, ``ShippingInfo``, ``Address``) appear in requests and responses, so
they check only what both satisfy: types, ranges, lengths and required fields. Enum-typed leaf
fields keep a value Klarna added after this release as a plain ``str``; request models then
refuse such values before anything is sent. Every failure is a ``ValidationError`` naming the
field. Serialization rules live in ``_convert``, not here.
"""

from __future__ import annotations

import enum
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime
from typing import Any, TypeVar

import attrs

from .errors import ValidationError

__all__ = (
    "Address",
    "Capture",
    "CaptureCreated",
    "CaptureRequest",
    "Customer",
    "ExtendDueDateOption",
    "ExtendDueDateOptions",
    "ExtendDueDateRequest",
    "FraudStatus",
    "InitialPaymentMethod",
    "InitialPaymentMethodType",
    "Order",
    "OrderLine",
    "OrderLineType",
    "OrderStatus",
    "Refund",
    "RefundCreated",
    "RefundRequest",
    "ShippingInfo",
    "ShippingMethod",
    "UpdateAuthorizationRequest",
    "UpdateMerchantReferencesRequest",
    "UpdateShippingAddressRequest",
    "validate_address_request",
    "validate_shipping_info_request",
)

#: The largest amount (minor units) Klarna accepts in a capture or an order line.
_MAX_AMOUNT = 200_000_000
_MAX_ORDER_LINES = 1000
_MAX_SHIPPING_INFO = 500
#: Klarna's ``number_of_days`` is an int32.
_MAX_INT32 = 2**31 - 1
#: The spec's ``maxLength`` of each field of an address sent to Klarna (``country`` has none).
_ADDRESS_LIMITS = {
    "given_name": 100,
    "family_name": 100,
    "title": 20,
    "organization_name": 255,
    "attention": 255,
    "street_address": 100,
    "street_address2": 100,
    "postal_code": 10,
    "city": 200,
    "region": 200,
    "email": 100,
    "phone": 100,
}

#: An ISO 3166 alpha-2 country code, in either case (the spec's example is "us").
_COUNTRY_CODE = re.compile(r"[A-Za-z]{2}").fullmatch

_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.StrEnum)
# Any, not object: attrs infers a field's type from its validator's value parameter.
_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


class OrderLineType(enum.StrEnum):
    """Kind of an order line."""

    PHYSICAL = "physical"
    DISCOUNT = "discount"
    SHIPPING_FEE = "shipping_fee"
    SALES_TAX = "sales_tax"
    STORE_CREDIT = "store_credit"
    GIFT_CARD = "gift_card"
    DIGITAL = "digital"
    SURCHARGE = "surcharge"
    RETURN_FEE = "return_fee"


class ShippingMethod(enum.StrEnum):
    """How the goods of a capture are delivered."""

    PICK_UP_STORE = "PickUpStore"
    HOME = "Home"
    BOX_REG = "BoxReg"
    BOX_UNREG = "BoxUnreg"
    PICK_UP_POINT = "PickUpPoint"
    OWN = "Own"
    POSTAL = "Postal"
    DHL_PACKSTATION = "DHLPackstation"
    DIGITAL = "Digital"
    UNDEFINED = "Undefined"
    PICK_UP_WAREHOUSE = "PickUpWarehouse"
    CLICK_COLLECT = "ClickCollect"
    PALLET_DELIVERY = "PalletDelivery"


class OrderStatus(enum.StrEnum):
    """Where an order is in its life: authorized, (partly) captured, or over."""

    AUTHORIZED = "AUTHORIZED"
    PART_CAPTURED = "PART_CAPTURED"
    CAPTURED = "CAPTURED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"
    CLOSED = "CLOSED"


class FraudStatus(enum.StrEnum):
    """Klarna's fraud decision on an order."""

    ACCEPTED = "ACCEPTED"
    PENDING = "PENDING"
    REJECTED = "REJECTED"


class InitialPaymentMethodType(enum.StrEnum):
    """How the customer chose to pay when the order was placed."""

    ACCOUNT = "ACCOUNT"
    ALTERNATIVE_PAYMENT_METHOD = "ALTERNATIVE_PAYMENT_METHOD"
    BANK_TRANSFER = "BANK_TRANSFER"
    CARD = "CARD"
    DEFERRED_INTEREST = "DEFERRED_INTEREST"
    DIRECT_DEBIT = "DIRECT_DEBIT"
    FIXED_AMOUNT_BY_CARD = "FIXED_AMOUNT_BY_CARD"
    FIXED_AMOUNT = "FIXED_AMOUNT"
    FIXED_SUM_CREDIT = "FIXED_SUM_CREDIT"
    INVOICE_BUSINESS = "INVOICE_BUSINESS"
    INVOICE = "INVOICE"
    MOBILEPAY = "MOBILEPAY"
    PAY_BY_CARD = "PAY_BY_CARD"
    PAY_IN_X = "PAY_IN_X"
    PAY_LATER_BY_CARD = "PAY_LATER_BY_CARD"
    PAY_LATER_IN_PARTS = "PAY_LATER_IN_PARTS"
    SWISH = "SWISH"
    OTHER = "OTHER"


# --- validators: each raises ValidationError naming the attribute --------------------------


# Each field has ONE validator, whose first line accepts the common valid value: models are
# built per request (and per response line), so a chain of checks per field adds up.


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "an OrderLine", "a ShippingInfo"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


# Names a person reads, not Python's: "got nothing", never "got NoneType".
_KIND_NAMES = {
    type(None): "nothing (None)",
    bool: "a boolean",
    str: "a string",
    int: "a whole number",
    float: "a decimal number",
    list: "a list",
    tuple: "a list",
    dict: "a mapping",
}


def _kind(value: object) -> str:
    """What ``value`` is, for a message: "a decimal number (12.5)", "nothing (None)"."""
    name = _KIND_NAMES.get(type(value))
    if name is None:
        return _a(type(value).__name__)
    if isinstance(value, bool | int | float):
        return f"{name} ({value!r})"
    return name


def _text(max_len: int | None = None, *, required: bool = False) -> _Validator:
    """A string of at most ``max_len`` characters; ``None`` only if not ``required``."""
    limit = max_len if max_len is not None else sys.maxsize

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value.__class__ is str and len(value) <= limit:
            return
        if value is None:
            if required:
                raise ValidationError(attribute.name, "is required")
            return
        if not isinstance(value, str):
            raise ValidationError(attribute.name, f"must be a string, got {_kind(value)}")
        if len(value) > limit:
            raise ValidationError(
                attribute.name, f"must be at most {max_len} characters, got {len(value)}"
            )

    return check


def _int_range(lo: int | None, hi: int | None, *, required: bool = False) -> _Validator:
    """An int (never a bool or float) in ``lo..hi`` (None: unbounded); None unless required."""
    low = lo if lo is not None else -math.inf
    high = hi if hi is not None else math.inf

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        # __class__/type() rather than isinstance(): bool is an int subclass, and True is not money.
        if value.__class__ is int and low <= value <= high:
            return
        if value is None:
            if required:
                raise ValidationError(attribute.name, "is required")
            return
        if type(value) is not int:
            raise ValidationError(
                attribute.name, f"must be a whole number (int), got {_kind(value)}"
            )
        if value < low:
            raise ValidationError(attribute.name, f"must be at least {lo}, got {value}")
        raise ValidationError(attribute.name, f"must be at most {hi}, got {value}")

    return check


def _check_items(
    field: str,
    items: object,
    kind: type[object],
    *,
    max_items: int,
    min_items: int = 0,
    known: tuple[str, type[enum.StrEnum]],
) -> None:
    """Check a request list: its size, its items' class, and that an enum field is known."""
    name, members = known
    if not isinstance(items, tuple):
        raise ValidationError(field, f"must be a list of {_a(kind.__name__)}, got {_kind(items)}")
    if not min_items <= len(items) <= max_items:
        raise ValidationError(field, f"must hold {min_items}..{max_items} items, got {len(items)}")
    for index, item in enumerate(items):
        if not isinstance(item, kind):
            raise ValidationError(
                f"{field}[{index}]", f"must be {_a(kind.__name__)}, got {_kind(item)}"
            )
        value = getattr(item, name)
        # Responses may carry values Klarna added later; a request may only send known ones.
        if value is not None and not isinstance(value, members):
            raise ValidationError(
                f"{field}[{index}].{name}",
                f"unknown value {value!r}; expected one of {', '.join(members)}",
            )


def _items(kind: type[object], max_items: int, known: tuple[str, type[enum.StrEnum]]) -> _Validator:
    """An optional request list of ``kind`` items, see ``_check_items``."""

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None:
            _check_items(attribute.name, value, kind, max_items=max_items, known=known)

    return check


# --- converters: attrs runs them before validators, also on hand-built models --------------


def _as_tuple(value: Iterable[_T] | None) -> tuple[_T, ...] | None:
    # Exact classes first: the ABC checks below cost more than the rest of a model's init.
    if value is None or value.__class__ is tuple:
        return value
    if value.__class__ is list:
        return tuple(value)
    # A str or mapping is iterable but never a list of models: left for the validator to name.
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        return value  # type: ignore[return-value]
    return tuple(value)


def _as_enum(kind: type[_E], value: str | None) -> _E | str | None:
    # A value Klarna added after this release stays a plain str instead of failing the parse;
    # a non-str is left for the field's validator to reject with the field's name.
    if value.__class__ is str or (isinstance(value, str) and not isinstance(value, kind)):
        return kind._value2member_map_.get(value, value)  # type: ignore[return-value]
    return value


# mypy's attrs plugin types __init__ from named converters only, hence these one-liners.
def _order_lines(value: Iterable[OrderLine] | None) -> tuple[OrderLine, ...] | None:
    return _as_tuple(value)


def _shipping_infos(value: Iterable[ShippingInfo] | None) -> tuple[ShippingInfo, ...] | None:
    return _as_tuple(value)


def _captures(value: Iterable[Capture] | None) -> tuple[Capture, ...] | None:
    return _as_tuple(value)


def _refunds(value: Iterable[Refund] | None) -> tuple[Refund, ...] | None:
    return _as_tuple(value)


def _line_type(value: str | None) -> OrderLineType | str | None:
    return _as_enum(OrderLineType, value)


def _shipping_method(value: str | None) -> ShippingMethod | str | None:
    return _as_enum(ShippingMethod, value)


def _order_status(value: str | None) -> OrderStatus | str | None:
    return _as_enum(OrderStatus, value)


def _fraud_status(value: str | None) -> FraudStatus | str | None:
    return _as_enum(FraudStatus, value)


def _payment_method_type(value: str | None) -> InitialPaymentMethodType | str | None:
    return _as_enum(InitialPaymentMethodType, value)


def _due_date_options(
    value: Iterable[ExtendDueDateOption] | None,
) -> tuple[ExtendDueDateOption, ...] | None:
    return _as_tuple(value)


# --- shared leaf models ---------------------------------------------------------------------


@attrs.define(frozen=True, kw_only=True)
class OrderLine:
    """One line of a capture, refund or order; amounts are minor units including tax."""

    name: str = attrs.field(validator=_text(255, required=True))
    quantity: int = attrs.field(validator=_int_range(0, None, required=True))
    # Discount lines carry negative prices, so only the maximum is documented.
    unit_price: int = attrs.field(validator=_int_range(None, _MAX_AMOUNT, required=True))
    total_amount: int = attrs.field(validator=_int_range(None, _MAX_AMOUNT, required=True))
    type: OrderLineType | str | None = attrs.field(
        default=None, converter=_line_type, validator=_text()
    )
    reference: str | None = attrs.field(default=None, validator=_text(255))
    quantity_unit: str | None = attrs.field(default=None, validator=_text(10))
    tax_rate: int | None = attrs.field(default=None, validator=_int_range(0, None))
    total_discount_amount: int | None = attrs.field(
        default=None, validator=_int_range(0, _MAX_AMOUNT)
    )
    total_tax_amount: int | None = attrs.field(
        default=None, validator=_int_range(None, _MAX_AMOUNT)
    )
    merchant_data: str | None = attrs.field(default=None, validator=_text(1024))
    image_url: str | None = attrs.field(default=None, validator=_text(1024))
    product_url: str | None = attrs.field(default=None, validator=_text(1024))


@attrs.define(frozen=True, kw_only=True)
class ShippingInfo:
    """Tracking details of one shipment (or return shipment) of a capture."""

    shipping_company: str | None = attrs.field(default=None, validator=_text(100))
    shipping_method: ShippingMethod | str | None = attrs.field(
        default=None, converter=_shipping_method, validator=_text()
    )
    tracking_number: str | None = attrs.field(default=None, validator=_text(100))
    tracking_uri: str | None = attrs.field(default=None, validator=_text(1024))
    return_shipping_company: str | None = attrs.field(default=None, validator=_text(100))
    return_tracking_number: str | None = attrs.field(default=None, validator=_text(100))
    return_tracking_uri: str | None = attrs.field(default=None, validator=_text(1024))


@attrs.define(frozen=True, kw_only=True)
class Address:
    """A billing or shipping address: as Klarna returns it, or a new shipping address to send.

    Sent with ``om.orders.update_shipping_address``, which checks Klarna's length limits
    (``validate_address_request``) before sending.
    """

    # Read from responses too, so only types are checked here: a long value in an answer
    # must not break the read.
    given_name: str | None = attrs.field(default=None, validator=_text())
    family_name: str | None = attrs.field(default=None, validator=_text())
    title: str | None = attrs.field(default=None, validator=_text())
    organization_name: str | None = attrs.field(default=None, validator=_text())
    attention: str | None = attrs.field(default=None, validator=_text())
    street_address: str | None = attrs.field(default=None, validator=_text())
    street_address2: str | None = attrs.field(default=None, validator=_text())
    postal_code: str | None = attrs.field(default=None, validator=_text())
    city: str | None = attrs.field(default=None, validator=_text())
    region: str | None = attrs.field(default=None, validator=_text())
    country: str | None = attrs.field(default=None, validator=_text())
    email: str | None = attrs.field(default=None, validator=_text())
    phone: str | None = attrs.field(default=None, validator=_text())


# --- requests -------------------------------------------------------------------------------


@attrs.define(frozen=True, kw_only=True)
class CaptureRequest:
    """Body of a capture: the amount to capture (all of the order or part of it) and details.

    Fields (Klarna's ``CaptureObject``; checked when the value is built, ``ValidationError``
    naming the field otherwise):

    - ``captured_amount``: ``int`` minor units (6000 = 60.00), 0..200,000,000; at most the
      order's ``remaining_authorized_amount`` or Klarna refuses with
      ``CaptureNotAllowedError``. Required.
    - ``description``: text shown to the customer, at most 255 characters.
    - ``reference``: your reference for the capture, at most 255 characters; it appears in
      Klarna's settlement files.
    - ``order_lines``: what was shipped, up to 1000 ``OrderLine`` values (amounts in minor
      units).
    - ``shipping_info``: tracking details, up to 500 ``ShippingInfo`` values.
    - ``shipping_delay``: ``int`` >= 0, the delay before the order is shipped. Klarna's
      specification gives no unit for it; values above 0 must first be enabled for your
      merchant account by Klarna. Not returned when the order is read.

    https://docs.klarna.com/api/ordermanagement/#operation/captureOrder
    """

    captured_amount: int = attrs.field(validator=_int_range(0, _MAX_AMOUNT, required=True))
    description: str | None = attrs.field(default=None, validator=_text(255))
    reference: str | None = attrs.field(default=None, validator=_text(255))
    order_lines: tuple[OrderLine, ...] | None = attrs.field(
        default=None,
        converter=_order_lines,
        validator=_items(OrderLine, _MAX_ORDER_LINES, ("type", OrderLineType)),
    )
    shipping_info: tuple[ShippingInfo, ...] | None = attrs.field(
        default=None,
        converter=_shipping_infos,
        validator=_items(ShippingInfo, _MAX_SHIPPING_INFO, ("shipping_method", ShippingMethod)),
    )
    shipping_delay: int | None = attrs.field(default=None, validator=_int_range(0, None))


@attrs.define(frozen=True, kw_only=True)
class RefundRequest:
    """Body of a refund: the amount to give back to the customer, and details.

    Fields (Klarna's ``RefundObject``; checked when the value is built, ``ValidationError``
    naming the field otherwise):

    - ``refunded_amount``: ``int`` minor units (6000 = 60.00), 0..200,000,000; at most what
      was captured and not yet refunded (the order's ``captured_amount`` minus its
      ``refunded_amount``) or Klarna refuses with ``RefundNotAllowedError``. Required.
    - ``description``: text shown to the customer, at most 255 characters.
    - ``reference``: your reference for the refund, at most 255 characters; it appears in
      Klarna's settlement files.
    - ``order_lines``: what is refunded, up to 1000 ``OrderLine`` values (amounts in minor
      units); optional, shown to the customer.

    https://docs.klarna.com/api/ordermanagement/#operation/refundOrder
    """

    refunded_amount: int = attrs.field(validator=_int_range(0, _MAX_AMOUNT, required=True))
    description: str | None = attrs.field(default=None, validator=_text(255))
    reference: str | None = attrs.field(default=None, validator=_text(255))
    order_lines: tuple[OrderLine, ...] | None = attrs.field(
        default=None,
        converter=_order_lines,
        validator=_items(OrderLine, _MAX_ORDER_LINES, ("type", OrderLineType)),
    )


@attrs.define(frozen=True, kw_only=True)
class UpdateAuthorizationRequest:
    """Body of an update of the order's authorization: the new order amount, and its lines.

    Fields (Klarna's ``Update authorization``; checked when the value is built,
    ``ValidationError`` naming the field otherwise):

    - ``order_amount``: the new total of the order, ``int`` minor units (6000 = 60.00),
      0..200,000,000; not below what was already captured. Required.
    - ``description``: what changed, at most 255 characters.
    - ``order_lines``: the order's new set of lines, up to 1000 ``OrderLine`` values
      (amounts in minor units); they replace the old ones. Left out (``None``), Klarna
      removes the order's lines: send them again to keep them.

    https://docs.klarna.com/api/ordermanagement/#operation/updateAuthorization
    """

    order_amount: int = attrs.field(validator=_int_range(0, _MAX_AMOUNT, required=True))
    description: str | None = attrs.field(default=None, validator=_text(255))
    order_lines: tuple[OrderLine, ...] | None = attrs.field(
        default=None,
        converter=_order_lines,
        validator=_items(OrderLine, _MAX_ORDER_LINES, ("type", OrderLineType)),
    )


@attrs.define(frozen=True, kw_only=True)
class UpdateMerchantReferencesRequest:
    """Body of an update of the order's merchant references; a ``None`` one is left as is.

    ``merchant_reference1`` (your order number, shown to the customer) and
    ``merchant_reference2`` (your internal reference): at most 255 characters each; at least
    one must be given, or ``ValidationError`` (field ``merchant_reference1``). A field left at
    ``None`` is omitted from the body, so Klarna keeps its old value; ``""`` clears it.

    https://docs.klarna.com/api/ordermanagement/#operation/updateMerchantReferences
    """

    merchant_reference1: str | None = attrs.field(default=None, validator=_text(255))
    merchant_reference2: str | None = attrs.field(default=None, validator=_text(255))

    def __attrs_post_init__(self) -> None:
        if self.merchant_reference1 is None and self.merchant_reference2 is None:
            raise ValidationError(
                "merchant_reference1",
                "nothing to update: give merchant_reference1, merchant_reference2 or both",
            )


def validate_address_request(address: Address, field: str = "shipping_address") -> Address:
    """Check an address about to be sent against Klarna's limits; returns it unchanged.

    ``Address`` checks only types, since Klarna's answers may hold longer values; a request
    must keep the spec's lengths (``postal_code`` 10, ``title`` 20, names, street lines,
    ``email`` and ``phone`` 100, ``city`` and ``region`` 200, ``organization_name`` and
    ``attention`` 255 characters), give ``country`` as an ISO 3166 alpha-2 code (2 letters,
    either case, or ``""`` to clear it) and set at least one field. Raises
    ``ValidationError`` naming the field, e.g. ``shipping_address.postal_code``.
    """
    if not isinstance(address, Address):
        raise ValidationError(field, f"must be an Address, got {_kind(address)}")
    empty = True
    for name, limit in _ADDRESS_LIMITS.items():
        value = getattr(address, name)
        if value is None:
            continue
        empty = False
        if len(value) > limit:
            raise ValidationError(
                f"{field}.{name}", f"must be at most {limit} characters, got {len(value)}"
            )
    country = address.country
    if country is not None and country != "" and not _COUNTRY_CODE(country):
        # The spec's only format for an address field ("Country. ISO 3166 alpha-2.", its
        # example "us"): e-mail and postal code have none it states, so only their lengths.
        raise ValidationError(
            f"{field}.country",
            f"must be an ISO 3166 alpha-2 code of 2 letters (e.g. 'DE'), or '' to clear it,"
            f" got {country[:20]!r}{'...' if len(country) > 20 else ''}",
        )
    if empty and country is None:
        raise ValidationError(field, "must set at least one field, got an empty Address")
    return address


def _address_request(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        raise ValidationError(attribute.name, "is required")
    validate_address_request(value, attribute.name)


@attrs.define(frozen=True, kw_only=True)
class UpdateShippingAddressRequest:
    """Body of an update of the order's shipping address (Klarna's ``UpdateConsumer``).

    ``shipping_address``: an ``Address`` within Klarna's limits (see
    ``validate_address_request``). Required. Klarna no longer lets a billing address change.

    https://docs.klarna.com/api/ordermanagement/#operation/updateConsumerDetails
    """

    shipping_address: Address = attrs.field(validator=_address_request)


@attrs.define(frozen=True, kw_only=True)
class ExtendDueDateRequest:
    """Body of a due-date extension of a capture: ``number_of_days``.

    ``number_of_days``: ``int`` 1..2,147,483,647 (Klarna's int32; an extension by 0 days or
    fewer extends nothing). Pick one of ``get_extend_due_date_options``' choices.

    https://docs.klarna.com/api/ordermanagement/#operation/extendDueDate
    """

    number_of_days: int = attrs.field(validator=_int_range(1, _MAX_INT32, required=True))


def validate_shipping_info_request(
    shipping_info: Iterable[ShippingInfo],
) -> tuple[ShippingInfo, ...]:
    """Check the body of add-shipping-info, of a capture or of an order (1 to 500 items, known
    methods); returns a tuple."""
    items = _as_tuple(shipping_info) or ()
    _check_items(
        "shipping_info",
        items,
        ShippingInfo,
        min_items=1,
        max_items=_MAX_SHIPPING_INFO,
        known=("shipping_method", ShippingMethod),
    )
    return items


# --- responses: every field optional, nothing validated beyond the leaf models --------------


@attrs.define(frozen=True, kw_only=True)
class Capture:
    """A capture as Klarna returns it."""

    capture_id: str | None = None
    klarna_reference: str | None = None
    captured_amount: int | None = None
    captured_at: datetime | None = None
    description: str | None = None
    reference: str | None = None
    refunded_amount: int | None = None
    order_lines: tuple[OrderLine, ...] | None = attrs.field(default=None, converter=_order_lines)
    billing_address: Address | None = None
    shipping_address: Address | None = None
    shipping_info: tuple[ShippingInfo, ...] | None = attrs.field(
        default=None, converter=_shipping_infos
    )


@attrs.define(frozen=True, kw_only=True)
class Refund:
    """A refund as Klarna returns it."""

    refund_id: str | None = None
    refunded_amount: int | None = None
    refunded_at: datetime | None = None
    description: str | None = None
    reference: str | None = None
    order_lines: tuple[OrderLine, ...] | None = attrs.field(default=None, converter=_order_lines)
    #: B2B invoice orders only: the customer received the refund as a credit invoice.
    credit_invoice: bool | None = None


@attrs.define(frozen=True, kw_only=True)
class Order:
    """An order as Klarna returns it: amounts, status, and its captures and refunds."""

    order_id: str | None = None
    status: OrderStatus | str | None = attrs.field(
        default=None, converter=_order_status, validator=_text()
    )
    fraud_status: FraudStatus | str | None = attrs.field(
        default=None, converter=_fraud_status, validator=_text()
    )
    order_amount: int | None = None
    original_order_amount: int | None = None
    captured_amount: int | None = None
    refunded_amount: int | None = None
    #: What can still be captured, in minor units.
    remaining_authorized_amount: int | None = None
    purchase_currency: str | None = None
    locale: str | None = None
    merchant_reference1: str | None = None
    merchant_reference2: str | None = None
    klarna_reference: str | None = None
    purchase_country: str | None = None
    #: Your data about the order, set when the order was created.
    merchant_data: str | None = None
    order_lines: tuple[OrderLine, ...] | None = attrs.field(default=None, converter=_order_lines)
    billing_address: Address | None = None
    shipping_address: Address | None = None
    #: Tracking details added to the order itself (``om.orders.add_shipping_info``).
    shipping_info: tuple[ShippingInfo, ...] | None = attrs.field(
        default=None, converter=_shipping_infos
    )
    initial_payment_method: InitialPaymentMethod | None = None
    customer: Customer | None = None
    created_at: datetime | None = None
    #: Until when the order can be captured; ``om.orders.extend_authorization_time`` moves it.
    expires_at: datetime | None = None
    captures: tuple[Capture, ...] | None = attrs.field(default=None, converter=_captures)
    refunds: tuple[Refund, ...] | None = attrs.field(default=None, converter=_refunds)


@attrs.define(frozen=True, kw_only=True)
class Customer:
    """The customer who placed the order, where Klarna has it (some markets and methods).

    Personal data: both fields are left out of ``repr``, so logging an order never shows them.
    """

    date_of_birth: date | None = attrs.field(default=None, repr=False)
    national_identification_number: str | None = attrs.field(default=None, repr=False)


@attrs.define(frozen=True, kw_only=True)
class InitialPaymentMethod:
    """How the customer chose to pay when the order was placed."""

    type: InitialPaymentMethodType | str | None = attrs.field(
        default=None, converter=_payment_method_type, validator=_text()
    )
    #: Klarna's name for it, e.g. "Slice it (Fixed Payments)".
    description: str | None = None
    #: The number of installments, when the method has them.
    number_of_installments: int | None = None


@attrs.define(frozen=True, kw_only=True)
class ExtendDueDateOption:
    """One way to extend a capture's due date, and what it costs the merchant."""

    #: Days the due date moves by; send it to ``om.captures.extend_due_date``.
    number_of_days: int | None = None
    #: The merchant's fee for this extension, in minor units of ``currency``.
    amount: int | None = None


@attrs.define(frozen=True, kw_only=True)
class ExtendDueDateOptions:
    """The due-date extensions a capture allows, and their fees, as Klarna returns them."""

    #: ISO 4217 currency of the fees, e.g. "usd".
    currency: str | None = None
    options: tuple[ExtendDueDateOption, ...] | None = attrs.field(
        default=None, converter=_due_date_options
    )


@attrs.define(frozen=True, kw_only=True)
class CaptureCreated:
    """Result of creating a capture, read from the 201's headers (its body is empty)."""

    capture_id: str
    location: str
    #: The key the capture was made with; resending with it can never capture twice.
    idempotency_key: str
    #: How many HTTP attempts the call took (more than 1 when retries were needed).
    attempts: int = 1


@attrs.define(frozen=True, kw_only=True)
class RefundCreated:
    """Result of creating a refund, read from the 201's headers (its body is empty)."""

    refund_id: str
    location: str
    #: The key the refund was made with; resending with it can never refund twice.
    idempotency_key: str
    #: How many HTTP attempts the call took (more than 1 when retries were needed).
    attempts: int = 1
