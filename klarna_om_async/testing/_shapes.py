"""Klarna's JSON shapes for orders, captures and refunds, as plain dicts from the fake's ledger."""

from __future__ import annotations

from ._ledger import PAYMENT_METHOD_DESCRIPTIONS, FakeCapture, FakeOrder, FakeRefund, JSONObject

__all__ = ("capture_json", "due_date_options_json", "order_json", "refund_json")

_LOCALES = {"EUR": "de-DE", "SEK": "sv-SE", "NOK": "nb-NO", "DKK": "da-DK", "GBP": "en-GB"}


def capture_json(capture: FakeCapture) -> JSONObject:
    """A capture as ``GET .../captures/{capture_id}`` returns it."""
    body: JSONObject = {
        "capture_id": capture.capture_id,
        "klarna_reference": capture.klarna_reference,
        "captured_amount": capture.captured_amount,
        "captured_at": capture.captured_at,
        "order_lines": capture.order_lines,
        "refunded_amount": capture.refunded_amount,
        "billing_address": capture.billing_address,
        "shipping_address": capture.shipping_address,
        "shipping_info": capture.shipping_info,
    }
    # The spec's strings are not nullable, so absent values are left out rather than null.
    if capture.description is not None:
        body["description"] = capture.description
    if capture.reference is not None:
        body["reference"] = capture.reference
    return body


def refund_json(refund: FakeRefund) -> JSONObject:
    """A refund as ``GET .../refunds/{refund_id}`` returns it."""
    body: JSONObject = {
        "refund_id": refund.refund_id,
        "refunded_amount": refund.refunded_amount,
        "refunded_at": refund.refunded_at,
        "order_lines": refund.order_lines,
    }
    # As for captures: the spec's strings are not nullable, so absent values are left out.
    if refund.description is not None:
        body["description"] = refund.description
    if refund.reference is not None:
        body["reference"] = refund.reference
    return body


def _order_line(amount: int) -> JSONObject:
    return {
        "type": "physical",
        "reference": "FAKE-1",
        "name": "Fake item",
        "quantity": 1,
        "unit_price": amount,
        "tax_rate": 0,
        "total_amount": amount,
        "total_discount_amount": 0,
        "total_tax_amount": 0,
    }


def order_json(order: FakeOrder) -> JSONObject:
    """An order as ``GET /ordermanagement/v1/orders/{order_id}`` returns it."""
    body: JSONObject = {
        "order_id": order.order_id,
        "status": order.status,
        "fraud_status": "ACCEPTED",
        "order_amount": order.order_amount,
        "original_order_amount": order.original_order_amount,
        "captured_amount": order.captured_amount,
        "refunded_amount": order.refunded_amount,
        "remaining_authorized_amount": order.remaining_authorized_amount,
        "purchase_currency": order.purchase_currency,
        "locale": _LOCALES.get(order.purchase_currency, "en-US"),
        "order_lines": (
            [_order_line(order.order_amount)] if order.order_lines is None else order.order_lines
        ),
        "klarna_reference": order.klarna_reference,
        "created_at": order.created_at,
        "expires_at": order.expires_at,
        "billing_address": order.billing_address,
        "shipping_address": order.shipping_address,
        "initial_payment_method": {
            "type": order.payment_method,
            "description": PAYMENT_METHOD_DESCRIPTIONS.get(order.payment_method, "Klarna"),
        },
        "shipping_info": order.shipping_info,
        "captures": [capture_json(capture) for capture in order.captures],
        "refunds": [refund_json(refund) for refund in order.refunds],
    }
    if order.merchant_reference1 is not None:
        body["merchant_reference1"] = order.merchant_reference1
    if order.merchant_reference2 is not None:
        body["merchant_reference2"] = order.merchant_reference2
    return body


def due_date_options_json(order: FakeOrder, options: list[tuple[int, int]]) -> JSONObject:
    """``GET .../extend-due-date-options``: Klarna's ExtendDueDateOptions."""
    return {
        "currency": order.purchase_currency,
        "options": [{"number_of_days": days, "amount": fee} for days, fee in options],
    }
