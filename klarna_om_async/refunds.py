"""Endpoint coroutines for an order's refunds: create and read."""

from __future__ import annotations

from . import _routes
from ._convert import to_json
from .errors import NoSuchOrderError, NoSuchRefundError, NotFoundError
from .middleware import Handler, Response
from .models import Refund, RefundCreated, RefundRequest

__all__ = ("RefundsService",)


class RefundsService:
    """``om.refunds``: give captured money back to the customer, and read a refund.

    Methods: ``create`` (full or partial refund) and ``get``. Amounts are ``int`` minor units
    (6000 = 60.00). Ids are non-empty strings, URL-quoted into the path. Every call raises a
    ``KlarnaError`` subclass on failure (see each method's "Raises"), and each error carries
    ``method``, ``url``, ``idempotency_key``, ``attempts`` and ``outcome_unknown``.
    https://docs.klarna.com/api/ordermanagement/
    """

    def __init__(self, send: Handler) -> None:
        self._send = send

    async def create(
        self, order_id: str, request: RefundRequest, *, idempotency_key: str | None = None
    ) -> RefundCreated:
        """Refund all or part of what an order captured; returns the new refund's id.

        ``request.refunded_amount``: ``int`` minor units (6000 = 60.00), at most what was
        captured and not yet refunded (the order's ``captured_amount - refunded_amount``).
        ``order_id``: Klarna's order id.
        ``POST /ordermanagement/v1/orders/{order_id}/refunds``.
        https://docs.klarna.com/api/ordermanagement/#operation/refundOrder

        Returns ``RefundCreated``: ``refund_id`` (str, from the 201's ``Refund-Id`` header or
        its ``Location``), ``location`` (the refund's URL), ``idempotency_key`` (the key
        sent) and ``attempts`` (HTTP attempts the call took, >= 1). Klarna's 201 has no body;
        read the refund itself with ``get(order_id, refund_id)``.

        ``idempotency_key``: pass one made beforehand (``new_idempotency_key()``) and stored,
        so a call whose outcome is unknown (an error with ``outcome_unknown``, a cancellation
        or timeout, a crash) can be finished exactly once by calling again with the same key
        and the same request within 24 hours. Without it a fresh key is made per call; it is
        on the result, on every ``KlarnaError`` (``err.idempotency_key``) and, for any other
        exception (e.g. cancellation), in a note (``err.__notes__``; under
        ``asyncio.timeout`` on ``err.__cause__``).

        Raises ``ValidationError`` before sending for bad input, or for a key this client
        already sent with a different request; ``KlarnaAPIError`` subclasses for refusals
        (e.g. ``RefundNotAllowedError``); ``KlarnaConnectionError``/``KlarnaTimeoutError``
        when retries ran out; ``KlarnaResponseError`` (outcome unknown: booked, but the id is
        unreadable) when the 201 has neither a ``Refund-Id`` nor a ``Location`` ending in
        ``/refunds/{refund_id}``; ``IdempotencyKeyReusedError`` when Klarna replayed the
        answer of an earlier request made with this key. In detail:

        - ``RefundNotAllowedError`` (403 ``REFUND_NOT_ALLOWED``): the amount is above what
          was captured and not yet refunded (or nothing was captured); ``NoSuchOrderError``
          (404); ``AuthenticationError`` (401); ``BadRequestError`` (400) /
          ``UnprocessableEntityError`` (422): a body Klarna rejects. Not retried; nothing
          was refunded.
        - ``IdempotencyKeyReusedError``: the key was sent before with another request (for
          another order, or for a capture), and the 201 is that request's answer: its
          ``Location`` names another order's item or not a refund. Not retried; nothing was
          refunded for this call; send it again with a new key. A key reused for another
          amount on the same order cannot be told from the 201: read the refund back with
          ``get`` to compare amounts.
        - ``ServerError`` (5xx), ``RateLimitError`` (429), ``ConflictError`` (409),
          ``KlarnaConnectionError``, ``KlarnaTimeoutError``: retried with the same key, raised
          when the retry policy gives up; check ``err.outcome_unknown``.
        - ``TypeError`` when ``request`` is not a ``RefundRequest``.
        """
        if not isinstance(request, RefundRequest):
            raise TypeError(f"request must be a RefundRequest, got {type(request).__name__}")
        path = _routes.refunds_path(order_id)
        request_value = _routes.post(path, to_json(request), idempotency_key=idempotency_key)
        return _refund_created(await _routes.call(self._send, request_value, "refund"))

    async def get(self, order_id: str, refund_id: str) -> Refund:
        """One refund's details: a ``Refund`` (amounts in ``int`` minor units).

        ``GET …/orders/{order_id}/refunds/{refund_id}``; read-only, retried on connection
        errors, timeouts, 409/429/5xx. An order's refunds are also on ``om.orders.get``
        (``Order.refunds``).
        https://docs.klarna.com/api/ordermanagement/#operation/get

        Raises ``NoSuchOrderError`` (404 ``NO_SUCH_ORDER``), ``NoSuchRefundError`` (any other
        404: Klarna documents no code of its own for an unknown refund), ``AuthenticationError``
        (401), ``ValidationError`` (a bad id, nothing sent), ``ServerError``/
        ``KlarnaConnectionError``/``KlarnaTimeoutError`` after the retries, and
        ``KlarnaResponseError`` when the 200's body is not a refund.
        """
        path = _routes.refund_path(order_id, refund_id)
        try:
            response = await self._send(_routes.get(path))
        except NotFoundError as error:
            if isinstance(error, NoSuchOrderError | NoSuchRefundError):
                raise
            raise _no_such_refund(error) from None
        return _routes.read(response, Refund)


def _no_such_refund(error: NotFoundError) -> NoSuchRefundError:
    """``error`` as a ``NoSuchRefundError``: the same answer and request, a precise class."""
    refined = NoSuchRefundError(
        status=error.status,
        error_code=error.error_code,
        error_messages=error.error_messages,
        correlation_id=error.correlation_id,
        retry_after=error.retry_after,
        body=error.body,
    )
    # The request it belongs to, as the middleware chain bound it.
    refined.method, refined.url = error.method, error.url
    refined.idempotency_key, refined.attempts = error.idempotency_key, error.attempts
    refined.earlier_attempt_unknown = error.earlier_attempt_unknown
    return refined


def _refund_created(response: Response) -> RefundCreated:
    """Read the new refund's id from the 201's headers (its body is empty)."""
    refund_id, location, key = _routes.created(response, "Refund-Id", "refund")
    return RefundCreated(
        refund_id=refund_id, location=location, idempotency_key=key, attempts=response.attempts
    )
