"""Endpoint coroutines for an order's captures: create, read, list, ship, send out, and
extend the customer's due date."""

from __future__ import annotations

from collections.abc import Iterable

from . import _routes
from ._convert import to_json
from .middleware import Handler, Response
from .models import (
    Capture,
    CaptureCreated,
    CaptureRequest,
    ExtendDueDateOptions,
    ExtendDueDateRequest,
    ShippingInfo,
    validate_shipping_info_request,
)

__all__ = ("CapturesService",)


class CapturesService:
    """``om.captures``: the capture-and-track calls of Klarna Order Management.

    Methods: ``create`` (full or partial capture), ``get``, ``list``, ``add_shipping_info``,
    ``trigger_send_out``, ``get_extend_due_date_options`` and ``extend_due_date``. Amounts
    are ``int`` minor units (6000 = 60.00). Ids are non-empty strings, URL-quoted into the
    path. Every call raises a ``KlarnaError`` subclass on failure (see each method's
    "Raises"), and each error carries ``method``, ``url``, ``idempotency_key``, ``attempts``
    and ``outcome_unknown``.

    Klarna replays by key alone: an answer that belongs to another operation (a 201 or any
    2xx but 204 for ``add_shipping_info``, ``trigger_send_out`` and ``extend_due_date``; a
    ``REFUND_NOT_ALLOWED`` or ``CANCEL_NOT_ALLOWED`` refusal for ``create``, or a
    ``CAPTURE_NOT_ALLOWED`` one for any call but ``create``) raises
    ``IdempotencyKeyReusedError``: Klarna did nothing for this call; send it again with a
    new key. A key reused across two calls that create nothing cannot be detected from
    Klarna's answer (both are a 204).
    https://docs.klarna.com/api/ordermanagement/
    """

    def __init__(self, send: Handler) -> None:
        self._send = send

    async def create(
        self, order_id: str, request: CaptureRequest, *, idempotency_key: str | None = None
    ) -> CaptureCreated:
        """Capture all of an order's amount or part of it; returns the new capture's id.

        Full and partial captures are the same call: send the order amount, or the amount of
        what was shipped (``request.captured_amount``: ``int`` minor units, 6000 = 60.00; at
        most the order's ``remaining_authorized_amount``). ``order_id``: Klarna's order id.
        ``POST /ordermanagement/v1/orders/{order_id}/captures``.
        https://docs.klarna.com/api/ordermanagement/#operation/captureOrder

        Returns ``CaptureCreated``: ``capture_id`` (str, from the 201's ``Capture-Id`` header
        or its ``Location``), ``location`` (the capture's URL), ``idempotency_key`` (the key
        sent) and ``attempts`` (HTTP attempts the call took, >= 1). Klarna's 201 has no body;
        read the capture itself with ``get(order_id, capture_id)``.

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
        ``/captures/{capture_id}``; ``IdempotencyKeyReusedError`` when Klarna replayed the
        answer of an earlier request made with this key. In detail:

        - ``CaptureNotAllowedError`` (403 ``CAPTURE_NOT_ALLOWED``): over-capture, or the
          order is cancelled or expired; ``NoSuchOrderError`` (404); ``AuthenticationError``
          (401); ``BadRequestError`` (400) / ``UnprocessableEntityError`` (422): a body
          Klarna rejects. Not retried; nothing was captured.
        - ``IdempotencyKeyReusedError``: the key was sent before with another request (for
          another order, or for a refund), and the 201 is that request's answer: its
          ``Location`` names another order's item or not a capture. Not retried; nothing was
          captured for this call; send it again with a new key. A key reused for another
          amount on the same order cannot be told from the 201: read the capture back with
          ``get`` to compare amounts.
        - ``ServerError`` (5xx), ``RateLimitError`` (429), ``ConflictError`` (409),
          ``KlarnaConnectionError``, ``KlarnaTimeoutError``: retried with the same key, raised
          when the retry policy gives up; check ``err.outcome_unknown``.
        - ``TypeError`` when ``request`` is not a ``CaptureRequest``.
        """
        if not isinstance(request, CaptureRequest):
            raise TypeError(f"request must be a CaptureRequest, got {type(request).__name__}")
        path = _routes.captures_path(order_id)
        request_value = _routes.post(path, to_json(request), idempotency_key=idempotency_key)
        return _capture_created(await _routes.call(self._send, request_value, "capture"))

    async def get(self, order_id: str, capture_id: str) -> Capture:
        """One capture's details: a ``Capture`` (amounts in ``int`` minor units).

        ``GET …/orders/{order_id}/captures/{capture_id}``; read-only, retried on connection
        errors, timeouts, 409/429/5xx.
        https://docs.klarna.com/api/ordermanagement/#operation/getCapture

        Raises ``NoSuchCaptureError``/``NoSuchOrderError`` (404), ``AuthenticationError``
        (401), ``ValidationError`` (a bad id, nothing sent), ``ServerError``/
        ``KlarnaConnectionError``/``KlarnaTimeoutError`` after the retries, and
        ``KlarnaResponseError`` when the 200's body is not a capture.
        """
        response = await self._send(_routes.get(_routes.capture_path(order_id, capture_id)))
        return _routes.read(response, Capture)

    async def list(self, order_id: str) -> list[Capture]:
        """All captures of an order: ``list[Capture]``, as Klarna lists them.

        ``GET …/orders/{order_id}/captures``; amounts in ``int`` minor units.
        https://docs.klarna.com/api/ordermanagement/#operation/getCaptures

        Raises ``NoSuchOrderError`` (404), ``AuthenticationError`` (401), ``ValidationError``
        (a bad id, nothing sent), ``ServerError``/``KlarnaConnectionError``/
        ``KlarnaTimeoutError`` after the retries, and ``KlarnaResponseError`` when the 200's
        body is not a list of captures.
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
        """Add tracking details (1 to 500 shipments) to a capture; returns ``None`` (204).

        ``shipping_info``: ``ShippingInfo`` values (company, method, tracking number and
        URI). ``POST …/captures/{capture_id}/shipping-info`` with an idempotency key (yours
        or a fresh one), retried with the same key.
        https://docs.klarna.com/api/ordermanagement/#operation/appendShippingInfo

        Raises ``ValidationError`` (no entries, more than 500, or a bad field; nothing sent),
        ``NoSuchCaptureError``/``NoSuchOrderError`` (404), ``AuthenticationError`` (401),
        ``BadRequestError`` (400), ``ServerError``/``KlarnaConnectionError``/
        ``KlarnaTimeoutError`` after the retries (check ``err.outcome_unknown``).
        """
        body = to_json({"shipping_info": validate_shipping_info_request(shipping_info)})
        path = f"{_routes.capture_path(order_id, capture_id)}/shipping-info"
        request = _routes.post(path, body, idempotency_key=idempotency_key)
        await _routes.call_no_content(self._send, request, "shipping info")

    async def trigger_send_out(
        self, order_id: str, capture_id: str, *, idempotency_key: str | None = None
    ) -> None:
        """Send the customer the capture's communication (e.g. invoice) again; ``None`` (204).

        ``POST …/captures/{capture_id}/trigger-send-out`` with an idempotency key (yours or a
        fresh one), retried with the same key.
        https://docs.klarna.com/api/ordermanagement/#operation/triggerSendOut

        Raises ``NoSuchCaptureError``/``NoSuchOrderError`` (404), ``AuthenticationError``
        (401), ``NotAllowedError`` (403), ``ValidationError`` (a bad id or key, nothing
        sent), ``ServerError``/``KlarnaConnectionError``/``KlarnaTimeoutError`` after the
        retries (check ``err.outcome_unknown``).
        """
        path = f"{_routes.capture_path(order_id, capture_id)}/trigger-send-out"
        request = _routes.post(path, idempotency_key=idempotency_key)
        await _routes.call_no_content(self._send, request, "send-out")

    async def get_extend_due_date_options(
        self, order_id: str, capture_id: str
    ) -> ExtendDueDateOptions:
        """The ways the customer's due date of a capture can be extended, and their fees.

        Returns ``ExtendDueDateOptions``: ``currency`` (ISO 4217) and ``options``, a tuple of
        ``ExtendDueDateOption`` (``number_of_days``, and ``amount``: the merchant's fee in
        ``int`` minor units). ``GET …/captures/{capture_id}/extend-due-date-options``;
        read-only, retried on connection errors, timeouts, 409/429/5xx.
        https://docs.klarna.com/api/ordermanagement/#operation/getOptionsForExtendDueDate

        Raises ``NoSuchCaptureError``/``NoSuchOrderError`` (404), ``AuthenticationError``
        (401), ``ValidationError`` (a bad id, nothing sent), ``ServerError``/
        ``KlarnaConnectionError``/``KlarnaTimeoutError`` after the retries, and
        ``KlarnaResponseError`` when the 200's body is not a set of options.
        """
        path = f"{_routes.capture_path(order_id, capture_id)}/extend-due-date-options"
        return _routes.read(await self._send(_routes.get(path)), ExtendDueDateOptions)

    async def extend_due_date(
        self,
        order_id: str,
        capture_id: str,
        number_of_days: int,
        *,
        idempotency_key: str | None = None,
    ) -> None:
        """Give the customer more days to pay a capture; ``None`` (204).

        ``number_of_days``: ``int`` >= 1, one of the choices of
        ``get_extend_due_date_options`` (each has a fee, charged to the merchant).
        ``PATCH …/captures/{capture_id}/extend-due-date`` with body
        ``{"number_of_days": int}``, with an idempotency key (yours or a fresh one), retried
        with the same key.
        https://docs.klarna.com/api/ordermanagement/#operation/extendDueDate

        Raises ``ValidationError`` before sending (``number_of_days`` not an ``int`` in
        1..2,147,483,647, a bad id or key); ``NotAllowedError`` (403: no extension possible
        for this capture, or not that many days), ``NoSuchCaptureError``/``NoSuchOrderError``
        (404), ``BadRequestError`` (400), ``AuthenticationError`` (401), ``ServerError``/
        ``RateLimitError``/``ConflictError``/``KlarnaConnectionError``/``KlarnaTimeoutError``
        after the retries (check ``err.outcome_unknown``).
        """
        body = to_json(ExtendDueDateRequest(number_of_days=number_of_days))
        path = f"{_routes.capture_path(order_id, capture_id)}/extend-due-date"
        request = _routes.patch(path, body, idempotency_key=idempotency_key)
        await _routes.call_no_content(self._send, request, "due date extension")


def _capture_created(response: Response) -> CaptureCreated:
    """Read the new capture's id from the 201's headers (its body is empty)."""
    capture_id, location, key = _routes.created(response, "Capture-Id", "capture")
    return CaptureCreated(
        capture_id=capture_id, location=location, idempotency_key=key, attempts=response.attempts
    )
