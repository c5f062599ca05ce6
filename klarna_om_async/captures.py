"""Endpoint coroutines for an order's captures: create, read, list, ship, send out."""

from __future__ import annotations

from collections.abc import Iterable

from . import _routes
from ._convert import to_json
from .middleware import Handler, Response
from .models import (
    Capture,
    CaptureCreated,
    CaptureRequest,
    ShippingInfo,
    validate_shipping_info_request,
)

__all__ = ("CapturesService",)


class CapturesService:
    """``om.captures``: the capture-and-track calls of Klarna Order Management."""

    def __init__(self, send: Handler) -> None:
        self._send = send

    async def create(
        self, order_id: str, request: CaptureRequest, *, idempotency_key: str | None = None
    ) -> CaptureCreated:
        """Capture all of an order's amount or part of it; returns the new capture's id.

        Full and partial captures are the same call: send the order amount, or the amount of
        what was shipped. https://docs.klarna.com/api/ordermanagement/#operation/captureOrder
        """
        if not isinstance(request, CaptureRequest):
            raise TypeError(f"request must be a CaptureRequest, got {type(request).__name__}")
        path = _routes.captures_path(order_id)
        request_value = _routes.post(path, to_json(request), idempotency_key=idempotency_key)
        return _capture_created(await self._send(request_value))

    async def get(self, order_id: str, capture_id: str) -> Capture:
        """One capture's details.

        https://docs.klarna.com/api/ordermanagement/#operation/getCapture
        """
        response = await self._send(_routes.get(_routes.capture_path(order_id, capture_id)))
        return _routes.read(response, Capture)

    async def list(self, order_id: str) -> list[Capture]:
        """All captures of an order.

        https://docs.klarna.com/api/ordermanagement/#operation/getCaptures
        """
        response = await self._send(_routes.get(_routes.captures_path(order_id)))
        return _routes.read(response, list[Capture])

    async def add_shipping_info(
        self,
        order_id: str,
        capture_id: str,
        shipping_info: Iterable[ShippingInfo],
        *,
        idempotency_key: str | None = None,
    ) -> None:
        """Add tracking details (1 to 500 shipments) to a capture.

        https://docs.klarna.com/api/ordermanagement/#operation/appendShippingInfo
        """
        body = to_json({"shipping_info": validate_shipping_info_request(shipping_info)})
        path = f"{_routes.capture_path(order_id, capture_id)}/shipping-info"
        await self._send(_routes.post(path, body, idempotency_key=idempotency_key))

    async def trigger_send_out(
        self, order_id: str, capture_id: str, *, idempotency_key: str | None = None
    ) -> None:
        """Send the customer the capture's communication (e.g. invoice) again.

        https://docs.klarna.com/api/ordermanagement/#operation/triggerSendOut
        """
        path = f"{_routes.capture_path(order_id, capture_id)}/trigger-send-out"
        await self._send(_routes.post(path, idempotency_key=idempotency_key))


def _capture_created(response: Response) -> CaptureCreated:
    """Read the new capture's id from the 201's headers (its body is empty)."""
    location = response.headers.get("Location")
    capture_id = response.headers.get("Capture-Id")
    if not capture_id and location:
        capture_id = location.rstrip("/").rsplit("/", 1)[-1]
    key = response.request.idempotency_key
    if not capture_id or key is None:
        raise _routes.unreadable(
            response, "Klarna booked the capture but sent neither Capture-Id nor Location"
        )
    return CaptureCreated(
        capture_id=capture_id,
        location=location or f"{response.url}/{capture_id}",
        idempotency_key=key,
        attempts=response.attempts,
    )
