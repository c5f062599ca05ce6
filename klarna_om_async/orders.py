"""Endpoint coroutines for the order itself: what was authorized, captured and what is left."""

from __future__ import annotations

from . import _routes
from .middleware import Handler
from .models import Order

__all__ = ("OrdersService",)


class OrdersService:
    """``om.orders``: read an order to know its status and what is left to capture."""

    def __init__(self, send: Handler) -> None:
        self._send = send

    async def get(self, order_id: str) -> Order:
        """The order with its amounts, status and captures.

        ``remaining_authorized_amount`` is what can still be captured.
        https://docs.klarna.com/api/ordermanagement/#operation/getOrder
        """
        response = await self._send(_routes.get(_routes.order_path(order_id)))
        return _routes.read(response, Order)
