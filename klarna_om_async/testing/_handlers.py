"""The Order Management endpoints the fake serves, one handler each, over a ``Ledger``."""

from __future__ import annotations

from aiohttp import web

from ._ledger import CaptureRefused, FakeCapture, FakeOrder, Ledger, RefundRefused
from ._responses import error_response, json_response
from ._shapes import capture_json, order_json, refund_json
from ._validation import BadValue, parse_capture, parse_refund, parse_shipping_info

__all__ = ("IDEMPOTENCY_HEADER", "ORDERS_PATH", "OrderManagementApi")

ORDERS_PATH = "/ordermanagement/v1/orders"
IDEMPOTENCY_HEADER = "Klarna-Idempotency-Key"
_ORDER = ORDERS_PATH + "/{order_id}"
_CAPTURE = _ORDER + "/captures/{capture_id}"
_REFUND = _ORDER + "/refunds/{refund_id}"


def _no_such_order(order_id: str) -> web.Response:
    return error_response(404, "NO_SUCH_ORDER", f"Order {order_id} cannot be found")


def _bad_value(error: BadValue) -> web.Response:
    return error_response(400, "BAD_VALUE", str(error))


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

    def _order(self, request: web.Request) -> FakeOrder | None:
        return self._ledger.orders.get(request.match_info["order_id"])

    def _capture(self, request: web.Request) -> FakeCapture | web.Response:
        order_id = request.match_info["order_id"]
        order = self._ledger.orders.get(order_id)
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
        return web.Response(status=204)

    async def trigger_send_out(self, request: web.Request) -> web.Response:
        """``POST .../captures/{capture_id}/trigger-send-out``: resend customer mails, 204."""
        found = self._capture(request)
        if isinstance(found, web.Response):
            return found
        found.send_outs += 1
        return web.Response(status=204)

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
        order = self._ledger.orders.get(order_id)
        if order is None:
            return _no_such_order(order_id)
        refund_id = request.match_info["refund_id"]
        refund = self._ledger.find_refund(order, refund_id)
        if refund is None:
            return error_response(
                404, "NOT_FOUND", f"Refund {refund_id} cannot be found on order {order_id}"
            )
        return json_response(refund_json(refund))
