"""Request-body checks with Klarna's limits; a failure becomes 400 ``BAD_VALUE``.

The checks are deliberately strict about types and sizes so that a client bug (a misspelled
required field, a string amount, a bool) fails against the fake as it would against Klarna.
"""

from __future__ import annotations

import re
from typing import TypeGuard

import orjson

from ._ledger import AuthorizationBody, CaptureBody, CustomerDetailsBody, JSONObject, RefundBody

__all__ = (
    "BadValue",
    "parse_capture",
    "parse_customer_details",
    "parse_extend_due_date",
    "parse_merchant_references",
    "parse_refund",
    "parse_shipping_info",
    "parse_update_authorization",
)

MAX_AMOUNT = 200_000_000
_MAX_ORDER_LINES = 1000
_MAX_SHIPPING_INFO = 500

_SHIPPING_INFO_LENGTHS = {
    "shipping_company": 100,
    "return_shipping_company": 100,
    "tracking_number": 100,
    "return_tracking_number": 100,
    "tracking_uri": 1024,
    "return_tracking_uri": 1024,
}
_SHIPPING_METHODS = frozenset(
    {
        "PickUpStore",
        "Home",
        "BoxReg",
        "BoxUnreg",
        "PickUpPoint",
        "Own",
        "Postal",
        "DHLPackstation",
        "Digital",
        "Undefined",
        "PickUpWarehouse",
        "ClickCollect",
        "PalletDelivery",
    }
)
_ORDER_LINE_LENGTHS = {
    "name": 255,
    "reference": 255,
    "quantity_unit": 10,
    "merchant_data": 1024,
    "image_url": 1024,
    "product_url": 1024,
    "type": 32,
}
# The spec's ``address`` schema: every field a string, these its maximum lengths.
_ADDRESS_LENGTHS = {
    "attention": 255,
    "city": 200,
    "email": 100,
    "family_name": 100,
    "given_name": 100,
    "organization_name": 255,
    "phone": 100,
    "postal_code": 10,
    "region": 200,
    "street_address": 100,
    "street_address2": 100,
    "title": 20,
}
# The spec's ``address.country``: "ISO 3166 alpha-2" (its example is "us").
_COUNTRY_CODE = re.compile(r"[A-Za-z]{2}").fullmatch
_MAX_INT32 = 2**31 - 1
_ORDER_LINE_REQUIRED_INTS = ("quantity", "unit_price", "total_amount")
_ORDER_LINE_OPTIONAL_INTS = ("tax_rate", "total_discount_amount", "total_tax_amount")


class BadValue(Exception):
    """A request body Klarna would refuse with 400 ``BAD_VALUE``."""


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(body: bytes) -> JSONObject:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadValue("Request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadValue("Request body must be a JSON object")
    return data


def _optional_string(data: JSONObject, field: str, max_length: int, where: str) -> str | None:
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_length:
        raise BadValue(f"Bad value: {where}{field} (a string of at most {max_length} characters)")
    return value


def _object_list(data: JSONObject, field: str, low: int, high: int) -> list[JSONObject]:
    value = data.get(field)
    if value is None and low == 0:
        return []
    if not isinstance(value, list) or not low <= len(value) <= high:
        raise BadValue(f"Bad value: {field} (a list of {low} to {high} objects)")
    for item in value:
        if not isinstance(item, dict):
            raise BadValue(f"Bad value: {field} (a list of {low} to {high} objects)")
    return value


def _check_shipping_info(items: list[JSONObject]) -> None:
    for index, item in enumerate(items):
        where = f"shipping_info[{index}]."
        for field, max_length in _SHIPPING_INFO_LENGTHS.items():
            _optional_string(item, field, max_length, where)
        method = item.get("shipping_method")
        if method is not None and method not in _SHIPPING_METHODS:
            raise BadValue(f"Bad value: {where}shipping_method")


def _check_order_lines(lines: list[JSONObject]) -> None:
    for index, line in enumerate(lines):
        where = f"order_lines[{index}]."
        if not isinstance(line.get("name"), str):
            raise BadValue(f"Bad value: {where}name (required)")
        for field, max_length in _ORDER_LINE_LENGTHS.items():
            _optional_string(line, field, max_length, where)
        for field in _ORDER_LINE_REQUIRED_INTS:
            if not _is_int(line.get(field)):
                raise BadValue(f"Bad value: {where}{field} (a required integer)")
        for field in _ORDER_LINE_OPTIONAL_INTS:
            value = line.get(field)
            if value is not None and not _is_int(value):
                raise BadValue(f"Bad value: {where}{field} (an integer)")


def _captured_amount(data: JSONObject) -> int:
    amount = data.get("captured_amount")
    # Klarna's CaptureObject allows 0..200000000 (minimum: 0), as the client's model does.
    if _is_int(amount) and 0 <= amount <= MAX_AMOUNT:
        return amount
    raise BadValue(f"Bad value: captured_amount (an integer from 0 to {MAX_AMOUNT})")


def parse_capture(body: bytes) -> CaptureBody:
    """Validate a ``POST .../captures`` body (Klarna's CaptureObject)."""
    data = _object(body)
    amount = _captured_amount(data)
    description = _optional_string(data, "description", 255, "")
    reference = _optional_string(data, "reference", 255, "")
    order_lines = _object_list(data, "order_lines", 0, _MAX_ORDER_LINES)
    _check_order_lines(order_lines)
    shipping_info = _object_list(data, "shipping_info", 0, _MAX_SHIPPING_INFO)
    _check_shipping_info(shipping_info)
    delay = data.get("shipping_delay")
    if delay is not None and not (_is_int(delay) and delay >= 0):
        raise BadValue("Bad value: shipping_delay (a non-negative integer)")
    return CaptureBody(
        captured_amount=amount,
        description=description,
        reference=reference,
        order_lines=order_lines,
        shipping_info=shipping_info,
    )


def parse_refund(body: bytes) -> RefundBody:
    """Validate a ``POST .../refunds`` body (Klarna's RefundObject)."""
    data = _object(body)
    amount = data.get("refunded_amount")
    # Klarna's RefundObject allows 0..200000000 (minimum: 0), as the client's model does.
    if not (_is_int(amount) and 0 <= amount <= MAX_AMOUNT):
        raise BadValue(f"Bad value: refunded_amount (an integer from 0 to {MAX_AMOUNT})")
    description = _optional_string(data, "description", 255, "")
    reference = _optional_string(data, "reference", 255, "")
    order_lines = _object_list(data, "order_lines", 0, _MAX_ORDER_LINES)
    _check_order_lines(order_lines)
    return RefundBody(
        refunded_amount=amount,
        description=description,
        reference=reference,
        order_lines=order_lines,
    )


def parse_shipping_info(body: bytes) -> list[JSONObject]:
    """Validate a ``POST .../shipping-info`` body: ``{"shipping_info": [1..500 objects]}``."""
    items = _object_list(_object(body), "shipping_info", 1, _MAX_SHIPPING_INFO)
    _check_shipping_info(items)
    return items


def parse_update_authorization(body: bytes) -> AuthorizationBody:
    """Validate a ``PATCH .../authorization`` body (the spec's "Update authorization")."""
    data = _object(body)
    amount = data.get("order_amount")
    if not (_is_int(amount) and 0 <= amount <= MAX_AMOUNT):
        raise BadValue(f"Bad value: order_amount (an integer from 0 to {MAX_AMOUNT})")
    description = _optional_string(data, "description", 255, "")
    order_lines = None
    if data.get("order_lines") is not None:
        order_lines = _object_list(data, "order_lines", 0, _MAX_ORDER_LINES)
        _check_order_lines(order_lines)
    return AuthorizationBody(order_amount=amount, description=description, order_lines=order_lines)


def parse_merchant_references(body: bytes) -> dict[str, str]:
    """Validate a ``PATCH .../merchant-references`` body: the references sent (<= 255 chars)."""
    data = _object(body)
    references = {}
    for field in ("merchant_reference1", "merchant_reference2"):
        value = _optional_string(data, field, 255, "")
        if value is not None:
            references[field] = value
    return references


def _address(data: JSONObject, field: str) -> JSONObject | None:
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadValue(f"Bad value: {field} (an object)")
    address: JSONObject = {}
    for name, max_length in _ADDRESS_LENGTHS.items():
        text = _optional_string(value, name, max_length, f"{field}.")
        if text is not None:
            address[name] = text
    country = value.get("country")
    if country is not None:
        if not (isinstance(country, str) and (country == "" or _COUNTRY_CODE(country))):
            raise BadValue(f"Bad value: {field}.country (ISO 3166 alpha-2)")
        address["country"] = country
    return address


def parse_customer_details(body: bytes) -> CustomerDetailsBody:
    """Validate a ``PATCH .../customer-details`` body (the spec's UpdateConsumer).

    Only the address fields the spec names are kept; others are ignored.
    """
    data = _object(body)
    shipping = _address(data, "shipping_address")
    billing_sent = data.get("billing_address") is not None
    return CustomerDetailsBody(shipping_address=shipping, billing_address_sent=billing_sent)


def parse_extend_due_date(body: bytes) -> int:
    """Validate a ``PATCH .../extend-due-date`` body: ``number_of_days`` (required, int32)."""
    days = _object(body).get("number_of_days")
    if not (_is_int(days) and 0 <= days <= _MAX_INT32):
        raise BadValue("Bad value: number_of_days (a required non-negative integer)")
    return days
