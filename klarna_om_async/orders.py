"""Endpoint coroutines for the order itself: what was authorized, captured and what is left."""

from __future__ import annotations

from . import _routes
from .middleware import Handler
from .models import Order

__all__ = ("OrdersService",)


class OrdersService:
    """``om.orders``: read an order to know its status and what is left to capture.

    Amounts are ``int`` minor units. Raises a ``KlarnaError`` subclass on failure (see
    ``get``). https://docs.klarna.com/api/ordermanagement/
    """

    def __init__(self, send: Handler) -> None:
        self._send = send

    async def get(self, order_id: str) -> Order:
        """The order with its amounts, status and captures: an ``Order``.

        ``remaining_authorized_amount`` (``int`` minor units) is what can still be captured;
        ``status`` an ``OrderStatus`` (or Klarna's string for a status this client does not
        know); ``captures`` a tuple of ``Capture``. ``GET /ordermanagement/v1/orders/{order_id}``;
        retried on connection errors, timeouts, 409/429/5xx.
        https://docs.klarna.com/api/ordermanagement/#operation/getOrder

        Raises ``NoSuchOrderError`` (404), ``AuthenticationError`` (401), ``ValidationError``
        (a bad id, nothing sent), ``ServerError``/``KlarnaConnectionError``/
        ``KlarnaTimeoutError`` after the retries, and ``KlarnaResponseError`` when the 200's
        body is not an order.
        """
        response = await self._send(_routes.get(_routes.order_path(order_id)))
        return _routes.read(response, Order)
