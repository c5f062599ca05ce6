"""The Order Management endpoints the fake serves, one handler each, over a ``Ledger``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

from ._ledger import CaptureRefused, FakeCapture, FakeOrder, Ledger, NotAllowed, RefundRefused
from ._responses import error_response, json_response
from ._shapes import capture_json, due_date_options_json, order_json, refund_json
from ._validation import (
    BadValue,
    parse_capture,
    parse_customer_details,
    parse_extend_due_date,
    parse_merchant_references,
    parse_refund,
    parse_shipping_info,
    parse_update_authorization,
)

__all__ = ("IDEMPOTENCY_HEADER", "ORDERS_PATH", "OrderManagementApi")

_Body = TypeVar("_Body")
ORDERS_PATH = "/ordermanagement/v1/orders"
IDEMPOTENCY_HEADER = "Klarna-Idempotency-Key"
_ORDER = ORDERS_PATH + "/{order_id}"
_CAPTURE = _ORDER + "/captures/{capture_id}"
_REFUND = _ORDER + "/refunds/{refund_id}"


def _no_such_order(order_id: str) -> web.Response:
    return error_response(404, "NO_SUCH_ORDER", f"Order {order_id} cannot be found")


def _bad_value(error: BadValue) -> web.Response:
    return error_response(400, "BAD_VALUE", str(error))


def _no_content() -> web.Response:
    return web.Response(status=204)


def _created(request: web.Request, id_header: str, created_id: str) -> web.Response:
    """Klarna's 201 for a new capture or refund: no body, its id and its ``Location``."""
    location = f"{request.scheme}://{request.host}{request.rel_url.raw_path}/{created_id}"
    return web.Response(status=201, headers={id_header: created_id, "Location": location})


class OrderManagementApi:
    """Route handlers that read and change the ledger; no faults, auth or idempotency here."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Register every endpoint on ``router``."""
        router.add_get(_ORDER, self.get_order)
        router.add_post(_ORDER + "/captures", self.create_capture)
        router.add_get(_ORDER + "/captures", self.list_captures)
        router.add_get(_CAPTURE, self.get_capture)
        router.add_post(_CAPTURE + "/shipping-info", self.add_shipping_info)
        router.add_post(_CAPTURE + "/trigger-send-out", self.trigger_send_out)
        router.add_post(_ORDER + "/refunds", self.create_refund)
        router.add_get(_REFUND, self.get_refund)
        router.add_post(_ORDER + "/release-remaining-authorization", self.release)
        router.add_post(_ORDER + "/extend-authorization-time", self.extend_authorization)
        router.add_post(_ORDER + "/cancel", self.cancel)
        router.add_post(_ORDER + "/acknowledge", self.acknowledge)
        router.add_patch(_ORDER + "/authorization", self.update_authorization)
        router.add_patch(_ORDER + "/merchant-references", self.update_merchant_references)
        router.add_patch(_ORDER + "/customer-details", self.update_customer_details)
        router.add_post(_ORDER + "/shipping-info", self.add_order_shipping_info)
        router.add_patch(_CAPTURE + "/extend-due-date", self.extend_due_date)
        router.add_get(_CAPTURE + "/extend-due-date-options", self.due_date_options)

    def _order(self, request: web.Request) -> FakeOrder | None:
        return self._ledger.find(request.match_info["order_id"])

    def _update(self, request: web.Request, apply: Callable[[FakeOrder], None]) -> web.Response:
        """Apply a 204 operation to the request's order: 404, 403 from ``NotAllowed``, 204."""
        order = self._order(request)
        if order is None:
            return _no_such_order(request.match_info["order_id"])
        try:
            apply(order)
        except NotAllowed as refusal:
            return error_response(403, refusal.error_code, str(refusal))
        return _no_content()

    async def _update_with(
        self,
        request: web.Request,
        parse: Callable[[bytes], _Body],
        apply: Callable[[FakeOrder, _Body], None],
    ) -> web.Response:
        """Parse the body (400 ``BAD_VALUE``), then ``_update`` the order with it."""
        try:
            body = parse(await request.read())
        except BadValue as error:
            return _bad_value(error)
        return self._update(request, lambda order: apply(order, body))

    def _capture(self, request: web.Request) -> FakeCapture | web.Response:
        order_id = request.match_info["order_id"]
        order = self._ledger.find(order_id)
        if order is None:
            return _no_such_order(order_id)
        capture_id = request.match_info["capture_id"]
        capture = self._ledger.capture(order, capture_id)
        if capture is None:
            return error_response(
                404, "NO_SUCH_CAPTURE", f"Capture {capture_id} cannot be found on order {order_id}"
            )
        return capture

    async def get_order(self, request: web.Request) -> web.Response:
        """``GET /orders/{order_id}``: the order (Klarna's MerchantOrderDto)."""
        order = self._order(request)
        if order is None:
            return _no_such_order(request.match_info["order_id"])
        return json_response(order_json(order))

    async def create_capture(self, request: web.Request) -> web.Response:
        """``POST /orders/{order_id}/captures``: 201, no body, ``Capture-Id`` and ``Location``."""
        try:
            body = parse_capture(await request.read())
        except BadValue as error:
            return _bad_value(error)
        order = self._order(request)
        if order is None:
            return _no_such_order(request.match_info["order_id"])
        try:
            capture = self._ledger.book(order, body, request.headers.get(IDEMPOTENCY_HEADER))
        except CaptureRefused as refusal:
            return error_response(403, "CAPTURE_NOT_ALLOWED", str(refusal))
        return _created(request, "Capture-Id", capture.capture_id)

    async def list_captures(self, request: web.Request) -> web.Response:
        """``GET /orders/{order_id}/captures``: every capture of the order."""
        order = self._order(request)
        if order is None:
            return _no_such_order(request.match_info["order_id"])
        return json_response([capture_json(capture) for capture in order.captures])

    async def get_capture(self, request: web.Request) -> web.Response:
        """``GET /orders/{order_id}/captures/{capture_id}``: one capture."""
        found = self._capture(request)
        if isinstance(found, web.Response):
            return found
        return json_response(capture_json(found))

    async def add_shipping_info(self, request: web.Request) -> web.Response:
        """``POST .../captures/{capture_id}/shipping-info``: append tracking details, 204."""
        try:
            items = parse_shipping_info(await request.read())
        except BadValue as error:
            return _bad_value(error)
        found = self._capture(request)
        if isinstance(found, web.Response):
            return found
        found.shipping_info.extend(items)
        self._ledger.orders[found.order_id].operations.append("appendShippingInfo")
        return _no_content()

    async def trigger_send_out(self, request: web.Request) -> web.Response:
        """``POST .../captures/{capture_id}/trigger-send-out``: resend customer mails, 204."""
        found = self._capture(request)
        if isinstance(found, web.Response):
            return found
        found.send_outs += 1
        self._ledger.orders[found.order_id].operations.append("triggerSendOut")
        return _no_content()

    async def create_refund(self, request: web.Request) -> web.Response:
        """``POST /orders/{order_id}/refunds``: 201, no body, ``Refund-Id`` and ``Location``."""
        try:
            body = parse_refund(await request.read())
        except BadValue as error:
            return _bad_value(error)
        order = self._order(request)
        if order is None:
            return _no_such_order(request.match_info["order_id"])
        try:
            refund = self._ledger.refund(order, body, request.headers.get(IDEMPOTENCY_HEADER))
        except RefundRefused as refusal:
            return error_response(403, "REFUND_NOT_ALLOWED", str(refusal))
        return _created(request, "Refund-Id", refund.refund_id)

    async def get_refund(self, request: web.Request) -> web.Response:
        """``GET /orders/{order_id}/refunds/{refund_id}``: one refund.

        Klarna documents no ``NO_SUCH_REFUND`` code; an unknown refund is 404 ``NOT_FOUND``.
        """
        order_id = request.match_info["order_id"]
        order = self._ledger.find(order_id)
        if order is None:
            return _no_such_order(order_id)
        refund_id = request.match_info["refund_id"]
        refund = self._ledger.find_refund(order, refund_id)
        if refund is None:
            return error_response(
                404, "NOT_FOUND", f"Refund {refund_id} cannot be found on order {order_id}"
            )
        return json_response(refund_json(refund))

    async def release(self, request: web.Request) -> web.Response:
        """``POST .../release-remaining-authorization``: 204; 403 ``NOT_ALLOWED``."""
        return self._update(request, self._ledger.release)

    async def extend_authorization(self, request: web.Request) -> web.Response:
        """``POST .../extend-authorization-time``: 204; 403 ``NOT_ALLOWED``."""
        return self._update(request, self._ledger.extend_authorization)

    async def cancel(self, request: web.Request) -> web.Response:
        """``POST .../cancel``: 204; 403 ``CANCEL_NOT_ALLOWED``."""
        return self._update(request, self._ledger.cancel)

    async def acknowledge(self, request: web.Request) -> web.Response:
        """``POST .../acknowledge``: 204."""
        return self._update(request, self._ledger.acknowledge)

    async def update_authorization(self, request: web.Request) -> web.Response:
        """``PATCH .../authorization``: 204; 400 ``BAD_VALUE``; 403 ``NOT_ALLOWED``."""
        return await self._update_with(
            request, parse_update_authorization, self._ledger.update_authorization
        )

    async def update_merchant_references(self, request: web.Request) -> web.Response:
        """``PATCH .../merchant-references``: 204; 400 ``BAD_VALUE``; 403 ``NOT_ALLOWED``."""
        return await self._update_with(
            request, parse_merchant_references, self._ledger.update_merchant_references
        )

    async def update_customer_details(self, request: web.Request) -> web.Response:
        """``PATCH .../customer-details``: 204; 400 ``BAD_VALUE``; 403 ``NOT_ALLOWED``."""
        return await self._update_with(
            request, parse_customer_details, self._ledger.update_customer_details
        )

    async def add_order_shipping_info(self, request: web.Request) -> web.Response:
        """``POST .../shipping-info`` on the order: 204; 400 ``BAD_VALUE``."""
        return await self._update_with(request, parse_shipping_info, self._ledger.add_shipping_info)

    async def extend_due_date(self, request: web.Request) -> web.Response:
        """``PATCH .../captures/{capture_id}/extend-due-date``: 204; 400; 403 ``NOT_ALLOWED``."""
        try:
            days = parse_extend_due_date(await request.read())
        except BadValue as error:
            return _bad_value(error)
        found = self._capture(request)
        if isinstance(found, web.Response):
            return found
        order = self._ledger.orders[found.order_id]
        try:
            self._ledger.extend_due_date(order, found, days)
        except NotAllowed as refusal:
            return error_response(403, refusal.error_code, str(refusal))
        return _no_content()

    async def due_date_options(self, request: web.Request) -> web.Response:
        """``GET .../captures/{capture_id}/extend-due-date-options``: ExtendDueDateOptions."""
        found = self._capture(request)
        if isinstance(found, web.Response):
            return found
        order = self._ledger.orders[found.order_id]
        return json_response(due_date_options_json(order, self._ledger.due_date_options(order)))
