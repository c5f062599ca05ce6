"""The exceptions this library raises, and the one function that turns an HTTP answer into one.

Every error that happens while talking to Klarna carries the request it belongs to (method, URL,
idempotency key, attempts made) and says whether the operation may have happened anyway, so a
caller never loses track of money: ``err.outcome_unknown`` is true when a capture may have been
booked, and ``err.idempotency_key`` is the key that makes a later retry safe.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import ClassVar

import orjson

__all__ = (
    "AuthenticationError",
    "BadRequestError",
    "CancelNotAllowedError",
    "CaptureNotAllowedError",
    "ClockSkewError",
    "ConflictError",
    "IdempotencyKeyReusedError",
    "ItemConflictError",
    "KlarnaAPIError",
    "KlarnaConnectionError",
    "KlarnaError",
    "KlarnaResponseError",
    "KlarnaTimeoutError",
    "NeedsReviewError",
    "NoSuchCaptureError",
    "NoSuchOrderError",
    "NoSuchRefundError",
    "NotAllowedError",
    "NotFoundError",
    "RateLimitError",
    "RefundNotAllowedError",
    "RequestTooLargeError",
    "ServerError",
    "UnprocessableEntityError",
    "ValidationError",
    "decode_error",
    "parse_retry_after",
    "reset_after",
)

_MUTATING_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})


class KlarnaError(Exception):
    """Base class of every error raised by klarna-om-async."""

    #: HTTP method of the failed call, e.g. ``"POST"`` (``None`` when nothing was sent).
    method: str | None = None
    #: Full URL of the failed call (``None`` when nothing was sent).
    url: str | None = None
    #: The ``Klarna-Idempotency-Key`` the call used: resend with it to retry safely.
    idempotency_key: str | None = None
    #: How many HTTP attempts were made before giving up.
    attempts: int = 0
    #: Set when an earlier attempt of the same call may have taken effect (its answer was
    #: lost): then a 429 or 409 on the last attempt proves nothing about the call. Also set
    #: for a call under a key the caller gave (an earlier call may have sent it) that ends
    #: in an error saying nothing of that send: a 429, 401 or 409, a 5xx, no answer.
    earlier_attempt_unknown: bool = False

    def bind(
        self, *, method: str, url: str, idempotency_key: str | None, attempts: int | None = None
    ) -> None:
        """Attach the request this error belongs to (called by the middleware chain)."""
        self.method = method
        self.url = url
        self.idempotency_key = idempotency_key
        if attempts is not None:
            self.attempts = attempts

    @property
    def outcome_unknown(self) -> bool:
        """True when the operation may have taken effect at Klarna despite this error."""
        return self.earlier_attempt_unknown

    def _retry_hint(self) -> str:
        if self.outcome_unknown and self.idempotency_key:
            return (
                f" The outcome is unknown: it may have taken effect. Retry with"
                f" idempotency_key={self.idempotency_key!r} (within 24 hours) to finish it"
                f" exactly once."
            )
        return ""


class ValidationError(KlarnaError, ValueError):
    """A request value breaks a documented Klarna limit; raised before anything is sent."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        #: Dotted path of the offending field, e.g. ``"order_lines[2].name"``.
        self.field = field
        #: What is wrong with it.
        self.reason = message


class KlarnaConnectionError(KlarnaError):
    """Klarna could not be reached, or the connection broke, and retries ran out.

    ``request_sent`` is False when no connection was ever made (DNS failure, connection
    refused, TLS handshake or proxy failure): then nothing reached Klarna, and the error is
    not an unknown outcome unless an earlier attempt of the call was.
    """

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        super().__init__(message)
        self.message = message
        #: False when the request never left this machine (no connection could be made).
        self.request_sent = request_sent

    @property
    def outcome_unknown(self) -> bool:
        """A POST or PATCH whose answer was lost may have been processed."""
        if self.earlier_attempt_unknown:
            return True
        return self.request_sent and self.method in _MUTATING_METHODS

    def __str__(self) -> str:
        where = ""
        if self.method:
            where = f" ({self.method} {self.url}, {_attempts(self.attempts)})"
        sent = ""
        if not self.request_sent:
            sent = (
                "; this attempt sent nothing, but an earlier one may have been booked"
                if self.earlier_attempt_unknown
                else "; nothing was sent"
            )
        return f"{self.message}{sent}{where}.{self._retry_hint()}"


def _attempts(n: int) -> str:
    return "1 attempt" if n == 1 else f"{n} attempts"


class KlarnaTimeoutError(KlarnaConnectionError, TimeoutError):
    """Klarna did not answer within the per-attempt timeout, and retries ran out."""


class KlarnaResponseError(KlarnaError):
    """Klarna answered with success but the answer could not be understood."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.message = message
        #: The HTTP status Klarna answered with.
        self.status = status

    @property
    def outcome_unknown(self) -> bool:
        """Klarna said yes, so a mutating call did take effect; its details are unknown."""
        return self.earlier_attempt_unknown or self.method in _MUTATING_METHODS

    def __str__(self) -> str:
        return f"{self.message} ({self.status} on {self.method} {self.url}).{self._retry_hint()}"


class IdempotencyKeyReusedError(KlarnaError):
    """Klarna answered with the result of an earlier request made with the same idempotency
    key, so it did nothing for this call.

    Klarna replays by key alone ("input values of the operation are disregarded ..., only
    the key matters"): a key sent before with another request (another order, or a capture's
    key sent with a refund) gets that request's 201 back. The client tells by the answer's
    ``Location``, which names the earlier request's capture or refund (``location``), not an
    item of the collection this call posted to; by a 204 answering a create, or any other
    2xx answering a call that creates nothing (a cancel, a release, an update, shipping
    info, ...); or by a refusal whose code belongs to another operation
    (``CAPTURE_NOT_ALLOWED`` answering anything but a capture, ``REFUND_NOT_ALLOWED`` anything
    but a refund, ``CANCEL_NOT_ALLOWED`` anything but a cancel). A key reused between two
    calls that create nothing cannot be told (both answer 204). Nothing was booked for this
    call, whatever its earlier attempts met (each was answered from the same record), so
    ``outcome_unknown`` is False: a key belongs to one request; send this one again with a new key.
    """

    def __init__(self, message: str, *, status: int, location: str) -> None:
        super().__init__(message)
        self.message = message
        #: The HTTP status of the replayed answer (201, or 204 for the key of a call that
        #: creates nothing, such as shipping info or a cancel; 403 for a replayed refusal).
        self.status = status
        #: The ``Location`` Klarna answered with: what the earlier request created ("" when
        #: the answer had none).
        self.location = location

    @property
    def outcome_unknown(self) -> bool:
        """Never: Klarna replayed another request's answer and did nothing for this one."""
        return False

    def __str__(self) -> str:
        return (
            f"{self.message} ({self.status} on {self.method} {self.url}). A key belongs to"
            " one request: send this one again with a new key."
        )


class KlarnaAPIError(KlarnaError):
    """Klarna (or a proxy in front of it) answered with a non-2xx status."""

    #: Whether resending the same request with the same key can succeed.
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        *,
        status: int,
        error_code: str | None = None,
        error_messages: tuple[str, ...] = (),
        correlation_id: str | None = None,
        retry_after: float | None = None,
        body: str = "",
    ) -> None:
        super().__init__(status, error_code)
        #: HTTP status code.
        self.status = status
        #: Klarna's machine-readable code, e.g. ``"CAPTURE_NOT_ALLOWED"``.
        self.error_code = error_code
        #: Klarna's human-readable explanations.
        self.error_messages = error_messages
        #: Quote this to Klarna support; it finds the call in the merchant portal logs.
        self.correlation_id = correlation_id
        #: Seconds the server asked us to wait (``Retry-After``), if it said.
        self.retry_after = retry_after
        #: The start of a body that was not Klarna's JSON error shape (e.g. a proxy's HTML).
        self.body = body

    @property
    def outcome_unknown(self) -> bool:
        """A 5xx or 409 on a mutating call may hide a request that was processed."""
        if self.earlier_attempt_unknown:
            return True
        return self.method in _MUTATING_METHODS and (self.status >= 500 or self.status == 409)

    def __str__(self) -> str:
        code = f" {self.error_code}" if self.error_code else ""
        where = f" on {self.method} {self.url}" if self.method else ""
        detail = "; ".join(self.error_messages) or self.body[:200]
        detail = f": {detail}" if detail else ""
        correlation = f" (correlation_id={self.correlation_id})" if self.correlation_id else ""
        return f"{self.status}{code}{where}{detail}{correlation}.{self._retry_hint()}"


class BadRequestError(KlarnaAPIError):
    """400: the request is malformed; fix it before sending again."""


class AuthenticationError(KlarnaAPIError):
    """401: missing or wrong API credentials, or credentials for another region."""


class NotAllowedError(KlarnaAPIError):
    """403: the operation is not allowed for this order or capture in its current state."""


class CaptureNotAllowedError(NotAllowedError):
    """403 CAPTURE_NOT_ALLOWED: order cancelled or expired, or amount above what is left."""


class RefundNotAllowedError(NotAllowedError):
    """403 REFUND_NOT_ALLOWED: amount above what was captured and not yet refunded."""


class CancelNotAllowedError(NotAllowedError):
    """403 CANCEL_NOT_ALLOWED: the order has captures, or is already closed or cancelled."""


class NotFoundError(KlarnaAPIError):
    """404: the order, capture or refund does not exist (check the id and the region)."""


class NoSuchOrderError(NotFoundError):
    """404 NO_SUCH_ORDER: no order with this id for these credentials."""


class NoSuchCaptureError(NotFoundError):
    """404 NO_SUCH_CAPTURE: the order has no capture with this id."""


class NoSuchRefundError(NotFoundError):
    """404 on reading a refund: the order has no refund with this id.

    Klarna documents no ``NO_SUCH_REFUND`` code (its example is ``NOT_FOUND``), so every 404
    of a refund read other than ``NO_SUCH_ORDER`` is this error; ``error_code`` keeps
    Klarna's own code.
    """


class ConflictError(KlarnaAPIError):
    """409: a request with the same idempotency key is still in flight; retried by default."""

    retryable = True


class RequestTooLargeError(KlarnaAPIError):
    """413: the request body is too large (e.g. too many order lines)."""


class UnprocessableEntityError(KlarnaAPIError):
    """422: Klarna understood the request but refuses its content (e.g. INVALID_ADDRESS)."""


class RateLimitError(KlarnaAPIError):
    """429: too many requests for this merchant; retried with backoff by default."""

    retryable = True
    #: The merchant's limit in requests per second, if the 429 stated it
    #: (``X-Ratelimit-Limit``); the client then paces under it.
    stated_limit: float | None = None


class ServerError(KlarnaAPIError):
    """5xx: Klarna or a proxy failed; retried with the same idempotency key by default."""

    retryable = True


_BY_STATUS: Mapping[int, type[KlarnaAPIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: NotAllowedError,
    404: NotFoundError,
    409: ConflictError,
    413: RequestTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}
_BY_CODE: Mapping[str, type[KlarnaAPIError]] = {
    "CANCEL_NOT_ALLOWED": CancelNotAllowedError,
    "CAPTURE_NOT_ALLOWED": CaptureNotAllowedError,
    "NO_SUCH_ORDER": NoSuchOrderError,
    "NO_SUCH_CAPTURE": NoSuchCaptureError,
    "REFUND_NOT_ALLOWED": RefundNotAllowedError,
}


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None.

    A number that is negative or not finite (``inf``, ``nan``, ``1e999``) is no usable wait
    and counts as absent (None); an HTTP date in the past is 0.0. ``now`` (Unix seconds,
    default ``time.time()``) is what a date is measured from.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # The comparison is false for nan too: a nan or infinite wait would stall forever.
        return seconds if 0.0 <= seconds < float("inf") else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def header_number(value: str | None) -> float | None:
    """A header's finite number, or None (absent, empty, not a number, inf or nan)."""
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def reset_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds until the rate-limit window resets (``X-Ratelimit-Reset``), or None.

    Seconds from now, or a Unix time (a number above 10**9); negative or non-finite values
    are absent, like ``Retry-After``'s.
    """
    value = headers.get("X-Ratelimit-Reset")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if seconds > 1e9:  # a Unix time
        seconds -= time.time() if now is None else now
        seconds = max(seconds, 0.0)
    return seconds if 0.0 <= seconds < float("inf") else None


def _error_class(status: int, error_code: str | None) -> type[KlarnaAPIError]:
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else KlarnaAPIError)
    specific = _BY_CODE.get(error_code or "")
    # A code only refines its own status: a proxy's odd code never turns a 5xx into a 404.
    return specific if specific is not None and issubclass(specific, cls) else cls


def decode_error(status: int, headers: Mapping[str, str], body: bytes) -> KlarnaAPIError:
    """Turn a non-2xx answer into the matching typed exception; a pure function, no I/O.

    Klarna's error body is ``{"error_code", "error_messages", "correlation_id"}``; a proxy or
    load balancer may send HTML, its own JSON (``{"message": ...}``, ``{"error": {...}}``) or
    nothing, which still yields the class for the status. ``error_code`` and
    ``error_messages`` hold only what Klarna's own fields said; readable text found anywhere
    else in the body goes to ``body``, trimmed to one line, so ``str(err)`` shows it.
    """
    error_code: str | None = None
    messages: tuple[str, ...] = ()
    correlation_id = headers.get("Klarna-Correlation-Id")
    try:
        payload = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        payload = _NOT_JSON
    if isinstance(payload, dict):
        code = payload.get("error_code")
        error_code = code if isinstance(code, str) else None
        raw_messages = payload.get("error_messages")
        if isinstance(raw_messages, list):
            messages = tuple(str(m) for m in raw_messages)
        if isinstance(payload.get("correlation_id"), str):
            correlation_id = payload["correlation_id"]
    retry_after = parse_retry_after(headers.get("Retry-After"))
    if retry_after is None and status == 429:
        retry_after = reset_after(headers)  # a 429 may still say when its window resets
    if messages and any(m.strip() for m in messages):
        text = ""
    elif payload is _NOT_JSON:
        text = _one_line(body[:1000].decode("utf-8", errors="replace"))
    else:
        text = "; ".join(_readable(payload))
        if not text and error_code is None and payload is not None:
            text = _one_line(body[:1000].decode("utf-8", errors="replace"))
    error = _error_class(status, error_code)(
        status=status,
        error_code=error_code,
        error_messages=messages,
        correlation_id=correlation_id,
        retry_after=retry_after,
        body=text,
    )
    if isinstance(error, RateLimitError):
        error.stated_limit = header_number(headers.get("X-Ratelimit-Limit"))
    return error


_NOT_JSON = object()
# Where error bodies keep their text: Klarna's fields (singular too), then the shapes
# gateways and proxies use (``message``, ``error.message``, OAuth, RFC 7807, Apigee).
_TEXT_KEYS = (
    "error_messages",
    "error_message",
    "message",
    "messages",
    "error",
    "errors",
    "error_description",
    "detail",
    "title",
    "fault",
    "faultstring",
    "description",
    "reason",
)


def _readable(value: object, depth: int = 0) -> list[str]:
    """The human-readable strings in a decoded error body, in order, without repeats."""
    found: list[str] = []
    if depth > 4:
        return found
    if isinstance(value, str):
        found.append(_one_line(value))
    elif isinstance(value, list):
        for item in value[:20]:
            found.extend(_readable(item, depth + 1))
    elif isinstance(value, dict):
        for key in _TEXT_KEYS:
            if key in value:
                found.extend(_readable(value[key], depth + 1))
    unique: list[str] = []
    for text in found:
        if text and text not in unique:
            unique.append(text)
    return unique


def _one_line(text: str) -> str:
    return " ".join(text.split())


class ItemConflictError(KlarnaError, ValueError):
    """A batch item differs from the item its journal holds under the same key; not sent.

    Raised (as a batch outcome's ``error``) when a rerun's line was edited after an attempt,
    or when its idempotency key already belongs to another item. The message names both
    amounts when they differ and says what to do.
    """

    def __init__(self, message: str, *, item_key: str, idempotency_key: str | None) -> None:
        super().__init__(message)
        #: The item's key in the journal.
        self.item_key = item_key
        self.idempotency_key = idempotency_key


class ClockSkewError(KlarnaError):
    """A journaled batch's item was not sent: the journal's clock is off Klarna's, or
    Klarna's time could not be learned to check it.

    A journal dates each idempotency key by its clock, and judges by that date whether
    Klarna, which remembers a key for 24 hours, still does (an older key is reconciled, not
    resent), and which of an order's captures could be the key's. A clock more than
    ``MAX_CLOCK_SKEW`` (5 minutes, reconciliation's ``clock_skew``) from the time in
    Klarna's answers (HTTP ``Date``) would have a forgotten key resent, booking again. The
    batch stops sending (``BatchAbortedError``); set this machine's clock right (NTP), then
    rerun. Nothing was sent for the item (``outcome_unknown`` is False unless an earlier run
    sent its key).
    """

    def __init__(
        self,
        *,
        skew: timedelta | None,
        klarna_time: datetime | None,
        idempotency_key: str | None,
        failure: KlarnaError | None = None,
    ) -> None:
        #: The journal's clock minus Klarna's (positive: ahead); None when Klarna's time
        #: could not be learned.
        self.skew = skew
        #: Klarna's time (UTC), from its latest answer's ``Date`` header, if any.
        self.klarna_time = klarna_time
        #: What kept Klarna from telling its time (reading the item's order), if anything.
        self.failure = failure
        self.idempotency_key = idempotency_key
        why = (
            "the journal dates each idempotency key by its clock to know whether Klarna (24"
            " hours) still remembers it"
        )
        if skew is not None and klarna_time is not None:
            way = "ahead of" if skew > timedelta(0) else "behind"
            #: What was found, in words.
            self.measured = (
                f"the journal's clock is {_duration(abs(skew))} {way} Klarna's (Klarna's"
                f" answers say {klarna_time:%Y-%m-%d %H:%M:%S} UTC)"
            )
            #: What to do.
            self.advice = f"{why}: set this machine's clock right (NTP), then rerun"
        elif failure is not None:
            self.measured = f"Klarna's time could not be learned (reading the order: {failure})"
            self.advice = (
                f"{why}, and checks it against Klarna's before sending: rerun once Klarna answers"
            )
        else:
            self.measured = "Klarna's answers tell no time (no HTTP Date header)"
            self.advice = (
                f"{why}, and checks it against Klarna's: send through a proxy that keeps"
                " Klarna's Date header"
            )
        super().__init__(f"not sent: {self.measured}; {self.advice}.")


def _duration(span: timedelta) -> str:
    """``span`` in words, to the nearest second or minute: "7 min 30 s", "2 h 5 min", "3 days"."""
    seconds = round(span.total_seconds())
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    minutes = round(seconds / 60)
    if minutes < 1440:
        return f"{minutes // 60} h {minutes % 60} min"
    days, hours = divmod(round(minutes / 60), 24)
    whole = f"{days} day" if days == 1 else f"{days} days"
    return f"{whole} {hours} h" if hours else whole


class NeedsReviewError(KlarnaError):
    """Reconciliation could not tell whether an item's capture was booked; never resent.

    ``evidence`` lists what Klarna's order shows (candidate captures, amounts). A person
    decides: look the order up in the merchant portal, then settle the item in the journal.
    """

    def __init__(self, evidence: str, *, order_id: str, idempotency_key: str | None) -> None:
        super().__init__(evidence)
        #: What the order shows, in one line.
        self.evidence = evidence
        self.order_id = order_id
        self.idempotency_key = idempotency_key

    @property
    def outcome_unknown(self) -> bool:
        """Always: that is what needs review."""
        return True

    def __str__(self) -> str:
        return f"needs review: order {self.order_id}: {self.evidence} (key {self.idempotency_key})."
