"""Endpoint coroutines for the order itself: read it, and manage its authorization, references,
shipping address and shipping info."""

from __future__ import annotations

from collections.abc import Iterable

from . import _routes
from ._convert import to_json
from ._klarna_clock import KlarnaClock
from .middleware import Handler
from .models import (
    Address,
    Order,
    ShippingInfo,
    UpdateAuthorizationRequest,
    UpdateMerchantReferencesRequest,
    UpdateShippingAddressRequest,
    validate_shipping_info_request,
)
from .operations import Operation

__all__ = ("OrdersService",)

# The body-less operations a batch runs: the path under the order, and the call's name in
# an error about its answer.
_ACTIONS = {
    Operation.RELEASE: ("release-remaining-authorization", "release"),
    Operation.EXTEND: ("extend-authorization-time", "extension"),
    Operation.CANCEL: ("cancel", "cancel"),
}


class OrdersService:
    """``om.orders``: read an order, and change it before and after delivery.

    Methods: ``get``; ``release_remaining_authorization``, ``extend_authorization_time``,
    ``cancel``, ``acknowledge`` (POST, no body); ``update_authorization``,
    ``update_merchant_references``, ``update_shipping_address`` (PATCH); and
    ``add_shipping_info`` (order-level tracking). Amounts are ``int`` minor units (6000 =
    60.00). Ids are non-empty strings, URL-quoted into the path.

    Every POST and PATCH carries a ``Klarna-Idempotency-Key`` (yours, via
    ``idempotency_key=``, or a fresh UUID4), the same on every retry, so Klarna executes the
    call at most once; it is on every error as ``err.idempotency_key``. Every call raises a
    ``KlarnaError`` subclass on failure (see each method's "Raises"); refusals (400, 401, 403,
    404, 422) are never retried, while 409, 429, 5xx, connection errors and timeouts are,
    with the same key, until the retry policy gives up (then check ``err.outcome_unknown``).

    Klarna replays by key alone. Every call here creates nothing and succeeds with 204, so
    any other 2xx (e.g. a capture's 201) or another operation's refusal
    (``CAPTURE_NOT_ALLOWED``, ``REFUND_NOT_ALLOWED``, ``CANCEL_NOT_ALLOWED`` for a call other
    than ``cancel``) is the replayed answer of an earlier request made with the same key:
    ``IdempotencyKeyReusedError`` (Klarna did nothing for this call; send it again with a
    new key). A key reused across two calls that create nothing cannot be detected from
    Klarna's answer (both are a 204): give each call its own key, and read the order back
    (``get``) when the effect matters.
    https://docs.klarna.com/api/ordermanagement/
    """

    def __init__(self, send: Handler, klarna_clock: KlarnaClock | None = None) -> None:
        self._send = send
        #: Klarna's time as its answers to this client tell it (a journaled batch checks its
        #: journal's clock against it); None: not known to this service.
        self.klarna_clock = klarna_clock

    async def get(self, order_id: str) -> Order:
        """The order with its amounts, status and captures: an ``Order``.

        ``remaining_authorized_amount`` (``int`` minor units) is what can still be captured;
        ``status`` an ``OrderStatus`` (or Klarna's string for a status this client does not
        know); ``captures`` a tuple of ``Capture``; ``expires_at`` until when it can be
        captured. ``GET /ordermanagement/v1/orders/{order_id}``; retried on connection
        errors, timeouts, 409/429/5xx.
        https://docs.klarna.com/api/ordermanagement/#operation/getOrder

        Raises ``NoSuchOrderError`` (404), ``AuthenticationError`` (401), ``ValidationError``
        (a bad id, nothing sent), ``ServerError``/``KlarnaConnectionError``/
        ``KlarnaTimeoutError`` after the retries, and ``KlarnaResponseError`` when the 200's
        body is not an order.
        """
        response = await self._send(_routes.get(_routes.order_path(order_id)))
        return _routes.read(response, Order)

    async def release_remaining_authorization(
        self, order_id: str, *, idempotency_key: str | None = None
    ) -> None:
        """Give up what is left of the authorization after the last capture; ``None`` (204).

        The order's ``remaining_authorized_amount`` drops to 0 and it can no longer be
        captured (a key used before with another call that creates nothing gets that call's
        204 back, indistinguishable from this one's: check with ``get``).
        ``POST …/orders/{order_id}/release-remaining-authorization``, no body.
        https://docs.klarna.com/api/ordermanagement/#operation/releaseRemainingAuthorization

        Raises ``NotAllowedError`` (403 ``NOT_ALLOWED``: the order is cancelled, fully
        captured, or has no captures; use ``cancel`` then), ``NoSuchOrderError`` (404),
        ``AuthenticationError`` (401), ``ValidationError`` (a bad id or key, nothing sent),
        ``ServerError``/``RateLimitError``/``ConflictError``/``KlarnaConnectionError``/
        ``KlarnaTimeoutError`` after the retries (check ``err.outcome_unknown``).
        """
        await self._act(Operation.RELEASE, order_id, idempotency_key)

    async def extend_authorization_time(
        self, order_id: str, *, idempotency_key: str | None = None
    ) -> None:
        """Push the order's ``expires_at`` further out; ``None`` (204).

        Klarna extends by the merchant's expiry period (28 days by default) from today, never
        beyond 180 days after the order was created: at that limit, as on a repeat the same
        day, Klarna still answers 204 and ``expires_at`` does not move (Klarna documents no
        refusal for it). Read the new date with ``get`` (``Order.expires_at``).
        ``POST …/orders/{order_id}/extend-authorization-time``, no body.
        https://docs.klarna.com/api/ordermanagement/#operation/extendAuthorizationTime

        Raises ``NotAllowedError`` (403 ``NOT_ALLOWED``: the order is expired, cancelled or
        closed), ``NoSuchOrderError`` (404), ``AuthenticationError`` (401),
        ``ValidationError`` (a bad id or key, nothing sent), ``ServerError``/
        ``RateLimitError``/``ConflictError``/``KlarnaConnectionError``/``KlarnaTimeoutError``
        after the retries (check ``err.outcome_unknown``).
        """
        await self._act(Operation.EXTEND, order_id, idempotency_key)

    async def cancel(self, order_id: str, *, idempotency_key: str | None = None) -> None:
        """Cancel an order that has no captures yet; ``None`` (204).

        The whole authorization is released and the order's ``status`` becomes
        ``CANCELLED`` (a key used before with another call that creates nothing gets that
        call's 204 back, indistinguishable from this one's: check with ``get``). After a
        capture, use ``release_remaining_authorization`` (and refunds) instead.
        ``POST …/orders/{order_id}/cancel``, no body.
        https://docs.klarna.com/api/ordermanagement/#operation/cancelOrder

        Raises ``CancelNotAllowedError`` (403 ``CANCEL_NOT_ALLOWED``: the order has captures,
        or is closed or already cancelled), ``NotAllowedError`` (other 403s),
        ``NoSuchOrderError`` (404), ``AuthenticationError`` (401), ``ValidationError`` (a bad
        id or key, nothing sent), ``ServerError``/``RateLimitError``/``ConflictError``/
        ``KlarnaConnectionError``/``KlarnaTimeoutError`` after the retries (check
        ``err.outcome_unknown``).
        """
        await self._act(Operation.CANCEL, order_id, idempotency_key)

    async def acknowledge(self, order_id: str, *, idempotency_key: str | None = None) -> None:
        """Tell Klarna a Klarna Checkout order reached your system; ``None`` (204).

        ``POST …/orders/{order_id}/acknowledge``, no body.
        https://docs.klarna.com/api/ordermanagement/#operation/acknowledgeOrder

        Raises ``NotAllowedError`` (403 ``NOT_ALLOWED``), ``NoSuchOrderError`` (404),
        ``AuthenticationError`` (401), ``ValidationError`` (a bad id or key, nothing sent),
        ``ServerError``/``RateLimitError``/``ConflictError``/``KlarnaConnectionError``/
        ``KlarnaTimeoutError`` after the retries (check ``err.outcome_unknown``).
        """
        await self._post_no_body(order_id, "acknowledge", idempotency_key, "acknowledgement")

    async def update_authorization(
        self,
        order_id: str,
        request: UpdateAuthorizationRequest,
        *,
        idempotency_key: str | None = None,
    ) -> None:
        """Set a new order amount (and order lines) before capture; ``None`` (204).

        ``request.order_amount``: the new total, ``int`` minor units (6000 = 60.00);
        ``request.order_lines`` replace the order's lines (left out, Klarna removes them);
        ``request.description`` says what changed.
        ``PATCH …/orders/{order_id}/authorization`` with body
        ``{"order_amount": int, "description"?: str, "order_lines"?: [...]}``.
        https://docs.klarna.com/api/ordermanagement/#operation/updateAuthorization

        Raises ``NotAllowedError`` (403 ``NOT_ALLOWED``: the amount is below what was
        captured, the payment method allows no increase, the risk check refused it, or the
        order is cancelled or captured), ``NoSuchOrderError`` (404), ``BadRequestError``
        (400) / ``UnprocessableEntityError`` (422): a body Klarna rejects;
        ``AuthenticationError`` (401), ``ValidationError`` (a bad id or key, nothing sent),
        ``ServerError``/``RateLimitError``/``ConflictError``/``KlarnaConnectionError``/
        ``KlarnaTimeoutError`` after the retries (check ``err.outcome_unknown``);
        ``TypeError`` when ``request`` is not an ``UpdateAuthorizationRequest``.
        """
        if not isinstance(request, UpdateAuthorizationRequest):
            raise TypeError(
                f"request must be an UpdateAuthorizationRequest, got {type(request).__name__}"
            )
        await self._patch(
            order_id, "authorization", to_json(request), idempotency_key, "authorization update"
        )

    async def update_merchant_references(
        self,
        order_id: str,
        merchant_reference1: str | None = None,
        merchant_reference2: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> None:
        """Replace the order's merchant references; ``None`` (204).

        ``merchant_reference1`` (your order number, shown to the customer) and
        ``merchant_reference2`` (your internal reference): at most 255 characters each; one
        left at ``None`` is not sent, so Klarna keeps it. ``PATCH
        …/orders/{order_id}/merchant-references`` with body ``{"merchant_reference1"?: str,
        "merchant_reference2"?: str}``.
        https://docs.klarna.com/api/ordermanagement/#operation/updateMerchantReferences

        Raises ``ValidationError`` before sending when both are ``None``, one is longer than
        255 characters or not a string, or the id or key is bad; ``NotAllowedError`` (403
        ``NOT_ALLOWED``: e.g. the order is cancelled), ``NoSuchOrderError`` (404),
        ``BadRequestError`` (400), ``AuthenticationError`` (401), ``ServerError``/
        ``RateLimitError``/``ConflictError``/``KlarnaConnectionError``/``KlarnaTimeoutError``
        after the retries (check ``err.outcome_unknown``).
        """
        body = UpdateMerchantReferencesRequest(
            merchant_reference1=merchant_reference1, merchant_reference2=merchant_reference2
        )
        await self._patch(
            order_id, "merchant-references", to_json(body), idempotency_key, "references update"
        )

    async def update_shipping_address(
        self, order_id: str, shipping_address: Address, *, idempotency_key: str | None = None
    ) -> None:
        """Replace the order's shipping address; ``None`` (204).

        ``shipping_address``: an ``Address`` within Klarna's limits (``postal_code`` at most
        10 characters, ``title`` 20, names, street lines, ``email`` and ``phone`` 100,
        ``city`` and ``region`` 200, ``organization_name`` and ``attention`` 255), at least
        one field set. Klarna lets no billing address change. ``PATCH
        …/orders/{order_id}/customer-details`` with body ``{"shipping_address": {...}}``
        (unset fields omitted).
        https://docs.klarna.com/api/ordermanagement/#operation/updateConsumerDetails

        Raises ``ValidationError`` before sending for a value over a limit (naming it, e.g.
        ``shipping_address.postal_code``), an empty ``Address`` or not an ``Address``, or a
        bad id or key; ``NotAllowedError`` (403 ``NOT_ALLOWED``: the order's state or the
        risk check refuses it), ``UnprocessableEntityError`` (422, e.g. ``INVALID_ADDRESS``),
        ``BadRequestError`` (400), ``NoSuchOrderError`` (404), ``AuthenticationError`` (401),
        ``ServerError``/``RateLimitError``/``ConflictError``/``KlarnaConnectionError``/
        ``KlarnaTimeoutError`` after the retries (check ``err.outcome_unknown``).
        """
        body = UpdateShippingAddressRequest(shipping_address=shipping_address)
        await self._patch(
            order_id, "customer-details", to_json(body), idempotency_key, "address update"
        )

    async def add_shipping_info(
        self,
        order_id: str,
        shipping_info: Iterable[ShippingInfo],
        *,
        idempotency_key: str | None = None,
    ) -> None:
        """Add tracking details (1 to 500 shipments) to the order itself; ``None`` (204).

        ``shipping_info``: ``ShippingInfo`` values (company, method, tracking number and
        URI); they show on ``Order.shipping_info``. For a capture's shipments use
        ``om.captures.add_shipping_info``. ``POST …/orders/{order_id}/shipping-info`` with
        body ``{"shipping_info": [...]}``.
        https://docs.klarna.com/api/ordermanagement/#operation/appendOrderShippingInfo

        Raises ``ValidationError`` (no entries, more than 500, a bad field or an unknown
        ``shipping_method``, a bad id or key; nothing sent), ``NoSuchOrderError`` (404),
        ``NotAllowedError`` (403), ``BadRequestError`` (400), ``AuthenticationError`` (401),
        ``ServerError``/``RateLimitError``/``ConflictError``/``KlarnaConnectionError``/
        ``KlarnaTimeoutError`` after the retries (check ``err.outcome_unknown``).
        """
        body = to_json({"shipping_info": validate_shipping_info_request(shipping_info)})
        path = f"{_routes.order_path(order_id)}/shipping-info"
        request = _routes.post(path, body, idempotency_key=idempotency_key)
        await _routes.call_no_content(self._send, request, "shipping info")

    async def _act(self, operation: Operation, order_id: str, key: str | None) -> int:
        """Release, extend or cancel (a batch sends them so): the HTTP attempts it took."""
        action, noun = _ACTIONS[operation]
        return await self._post_no_body(order_id, action, key, noun)

    async def _post_no_body(
        self, order_id: str, action: str, key: str | None, operation: str
    ) -> int:
        path = f"{_routes.order_path(order_id)}/{action}"
        return await _routes.call_no_content(
            self._send, _routes.post(path, idempotency_key=key), operation
        )

    async def _patch(
        self, order_id: str, what: str, body: bytes, key: str | None, operation: str
    ) -> None:
        path = f"{_routes.order_path(order_id)}/{what}"
        await _routes.call_no_content(
            self._send, _routes.patch(path, body, idempotency_key=key), operation
        )
