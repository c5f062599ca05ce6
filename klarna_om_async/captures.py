"""Endpoint coroutines for an order's captures: create, read, list, ship, send out."""

from __future__ import annotations

from collections.abc import Iterable

import yarl

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
        what was shipped (``captured_amount`` in minor units).
        https://docs.klarna.com/api/ordermanagement/#operation/captureOrder

        ``idempotency_key``: pass one made beforehand (``new_idempotency_key()``) and stored,
        so a call whose outcome is unknown (an error with ``outcome_unknown``, a cancellation
        or timeout, a crash) can be finished exactly once by calling again with the same key
        and the same request within 24 hours. Without it a fresh key is made per call; it is
        on the result, on every ``KlarnaError`` (``err.idempotency_key``) and, for any other
        exception (e.g. cancellation), in a note (``err.__notes__``; under
        ``asyncio.timeout`` on ``err.__cause__``).

        Raises ``ValidationError`` before sending for bad input, or for a key this client
        already sent with a different request; ``KlarnaAPIError`` subclasses for refusals
        (e.g. ``CaptureNotAllowedError``); ``KlarnaConnectionError``/``KlarnaTimeoutError``
        when retries ran out; ``KlarnaResponseError`` (outcome unknown: booked, but the id is
        unreadable) when the 201 has neither a ``Capture-Id`` nor a ``Location`` ending in
        ``/captures/{capture_id}``.
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


def _capture_id_in(location: str) -> str:
    """The id in a ``.../captures/{capture_id}`` URL (query and fragment ignored), else ``""``."""
    try:
        parts = yarl.URL(location).parts  # decoded segments: "a%2Fb" stays one segment
    except ValueError:
        return ""
    if len(parts) >= 2 and parts[-2] == "captures" and parts[-1].strip():
        return parts[-1]
    return ""


def _capture_created(response: Response) -> CaptureCreated:
    """Read the new capture's id from the 201's headers (its body is empty).

    A non-blank ``Capture-Id`` header wins; otherwise ``Location`` must name a capture
    (``.../captures/{capture_id}``). Anything else raises ``KlarnaResponseError``: the
    capture was booked, but which one is unknown, so its ``outcome_unknown`` is true.
    """
    location = response.headers.get("Location")
    capture_id = (response.headers.get("Capture-Id") or "").strip()
    if not capture_id and location:
        capture_id = _capture_id_in(location)
    key = response.request.idempotency_key
    if not capture_id or key is None:
        raise _routes.unreadable(
            response,
            "Klarna booked the capture but sent no Capture-Id and no Location naming a"
            f" capture (Location: {location!r})",
        )
    return CaptureCreated(
        capture_id=capture_id,
        location=location or f"{response.url}/{capture_id}",
        idempotency_key=key,
        attempts=response.attempts,
    )
