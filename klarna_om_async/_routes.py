"""Paths and request values shared by the endpoint modules."""

from __future__ import annotations

import re
from typing import NoReturn, TypeVar
from urllib.parse import quote

import yarl

from ._convert import from_json
from ._version import __version__
from .errors import (
    IdempotencyKeyReusedError,
    KlarnaAPIError,
    KlarnaResponseError,
    ValidationError,
)
from .middleware import Handler, Request, Response

T = TypeVar("T")

_ORDERS = "/ordermanagement/v1/orders/"

# Shared, never mutated: middlewares copy before adding headers.
_GET_HEADERS = {"Accept": "application/json", "User-Agent": f"klarna-om-async/{__version__}"}
_JSON_HEADERS = {**_GET_HEADERS, "Content-Type": "application/json"}


# Ids made only of URL-unreserved characters (as Klarna's are) need no quoting.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.~-]+").fullmatch
# C0 controls, DEL and C1 controls: never part of an id, and a newline or carriage return
# in one would forge a line wherever the id is printed (e.g. the CLI's "idempotency key:").
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]").search
# Segments every URL normaliser collapses (RFC 3986 5.2.4), also when percent-encoded:
# ``.../captures/../shipping-info`` would reach another endpoint.
_DOT_SEGMENTS = frozenset({".", ".."})


def normalize_id(field: str, value: object) -> str:
    """The id every input path sends: surrounding whitespace trimmed, never empty.

    The one normalisation for order and capture ids, shared by the endpoint coroutines,
    the batch files and the CLI, so ``" ORDER "`` is ``ORDER`` everywhere. An id with a
    control character left inside it (newline, carriage return, tab, any other C0 or C1
    control, DEL) is refused: no id of Klarna's has one, and printed it would forge a line.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field, f"must be a non-empty string, got {value!r}")
    value = value.strip()
    if _CONTROL(value):
        raise ValidationError(
            field, f"must not contain control characters (newline, tab, ...), got {value!r}"
        )
    if value in _DOT_SEGMENTS:
        raise ValidationError(
            field, f"{value!r} is not an id: URL normalisation would drop it from the path"
        )
    return value


def quote_id(field: str, value: str) -> str:
    """Validate an order or capture id and quote it as one path segment."""
    if value.__class__ is str and _PLAIN_ID(value) and value not in _DOT_SEGMENTS:
        return value
    # Percent signs are quoted too, so "%2e" goes out as "%252e" and no dot segment
    # can reappear after the server decodes the path.
    return quote(normalize_id(field, value), safe="")


def order_path(order_id: str) -> str:
    """``/ordermanagement/v1/orders/{order_id}``."""
    return _ORDERS + quote_id("order_id", order_id)


def captures_path(order_id: str) -> str:
    """``/ordermanagement/v1/orders/{order_id}/captures``."""
    return _ORDERS + quote_id("order_id", order_id) + "/captures"


def capture_path(order_id: str, capture_id: str) -> str:
    """``/ordermanagement/v1/orders/{order_id}/captures/{capture_id}``."""
    return f"{order_path(order_id)}/captures/{quote_id('capture_id', capture_id)}"


def refunds_path(order_id: str) -> str:
    """``/ordermanagement/v1/orders/{order_id}/refunds``."""
    return _ORDERS + quote_id("order_id", order_id) + "/refunds"


def refund_path(order_id: str, refund_id: str) -> str:
    """``/ordermanagement/v1/orders/{order_id}/refunds/{refund_id}``."""
    return f"{order_path(order_id)}/refunds/{quote_id('refund_id', refund_id)}"


#: What a 201 creates, by the collection its ``Location`` names.
_CREATED_NOUNS = {"captures": "capture", "refunds": "refund"}


def _named_in_location(location: str) -> tuple[str, str, str] | None:
    """``(order_id, collection, item_id)`` of a Location ending in
    ``/orders/{order_id}/captures|refunds/{item_id}`` (query and fragment ignored), else None.
    """
    try:
        parts = yarl.URL(location).parts  # decoded segments: "a%2Fb" stays one segment
    except ValueError:
        return None
    if len(parts) < 4 or parts[-4] != "orders" or parts[-2] not in _CREATED_NOUNS:
        return None
    order_id, collection, item_id = parts[-3:]
    if not order_id.strip() or not item_id.strip():
        return None
    return order_id, collection, item_id


def _own_item_in(location: str, posted_path: str) -> tuple[str, str, str] | None:
    """The common case, without parsing: ``location`` is ``[scheme://host]{posted_path}/{id}``
    with a plain ``id`` (letters, digits, ``_.~-``; not a dot segment) and no query or
    fragment, so it names an item of the very collection the request posted to. None means
    "parse it" (``_named_in_location``), which decides every other ``Location``.
    """
    # Parsing the Location with yarl cost more CPU than the rest of reading the answer.
    cut = location.rfind("/")
    item_id = location[cut + 1 :]
    if (
        cut < 0
        or not _PLAIN_ID(item_id)
        or item_id in _DOT_SEGMENTS
        or not location.endswith(posted_path, 0, cut)
        or "?" in location
        or "#" in location
    ):
        return None
    order_id, collection = posted_path.rsplit("/", 2)[-2:]
    return order_id, collection, item_id


def created(response: Response, id_header: str, noun: str) -> tuple[str, str, str]:
    """``(id, location, idempotency_key)`` of what a 201 created, read from its headers.

    A ``Location`` naming an item of another order or another collection than the one the
    request posted to is Klarna replaying the answer of an earlier request made with the
    same key: ``IdempotencyKeyReusedError`` (nothing happened for this request). Otherwise
    a non-blank ``id_header`` (``Capture-Id``, ``Refund-Id``) wins, then the id in the
    ``Location``. Anything else raises ``KlarnaResponseError``: Klarna booked the ``noun``,
    but which one is unknown, so its ``outcome_unknown`` is true.
    """
    location = response.headers.get("Location")
    named = None
    if location:
        named = _own_item_in(location, response.request.path)
        if named is None:
            named = _named_in_location(location)
            if named is not None:
                _check_same_collection(response, named, location)
    created_id = (response.headers.get(id_header) or "").strip()
    if not created_id and named is not None:
        created_id = named[2]
    key = response.request.idempotency_key
    if not created_id and response.status == 204:
        # Only the calls that create nothing (shipping info, send-out, cancel, release, ...)
        # answer 204: a key sent before with one of them gets its 204 replayed for this create.
        _raise_reused(
            response,
            "its answer, 204 No Content, is that of a call that creates nothing (shipping"
            f" info, send-out, cancel, release, an update), not a new {noun}",
            location or "",
        )
    if not created_id or key is None:
        raise unreadable(
            response,
            f"Klarna booked the {noun} but sent no {id_header} and no Location naming a"
            f" {noun} (Location: {location!r})",
        )
    return created_id, location or f"{response.url}/{created_id}", key


def _check_same_collection(response: Response, named: tuple[str, str, str], location: str) -> None:
    """Raise ``IdempotencyKeyReusedError`` when ``named`` (from the 201's ``location``) is not
    an item of the collection the request posted to.

    Order ids compare without regard to case (Klarna's are UUIDs): a false alarm here would
    report a booked capture or refund as not booked, and invite a second one.
    """
    order_id, collection, item_id = named
    request = response.request
    own_order, own_collection = yarl.URL(request.path).parts[-2:]
    if order_id.casefold() == own_order.casefold() and collection == own_collection:
        return
    _raise_reused(
        response,
        f"its Location names {_CREATED_NOUNS[collection]} {item_id} of order {order_id}, not a"
        f" new {_CREATED_NOUNS.get(own_collection, own_collection)} of order {own_order}",
        location,
    )


def _raise_reused(response: Response, what: str, location: str) -> NoReturn:
    request = response.request
    raise _reused(
        request.idempotency_key,
        what,
        status=response.status,
        location=location,
        method=request.method,
        url=response.url,
        attempts=response.attempts,
    )


def _reused(
    key: str | None,
    what: str,
    *,
    status: int,
    location: str,
    method: str,
    url: str,
    attempts: int,
) -> IdempotencyKeyReusedError:
    error = IdempotencyKeyReusedError(
        f"Klarna answered with the result of an earlier request made with idempotency key"
        f" {key!r}: {what}, so Klarna did nothing for this call",
        status=status,
        location=location,
    )
    error.bind(method=method, url=url, idempotency_key=key, attempts=attempts)
    return error


#: The refusal codes Klarna gives to one operation only, and that operation.
_REFUSAL_OWNERS = {
    "CAPTURE_NOT_ALLOWED": "capture",
    "REFUND_NOT_ALLOWED": "refund",
    "CANCEL_NOT_ALLOWED": "cancel",
}


async def call(send: Handler, request: Request, operation: str) -> Response:
    """Send ``request`` (the call ``operation``: ``"capture"``, ``"refund"``, ``"cancel"``,
    or any other name) through ``send``; its 2xx answer, or the error the chain raised.

    A refusal whose code belongs to another operation (``CAPTURE_NOT_ALLOWED`` answering
    anything but a capture, ``REFUND_NOT_ALLOWED`` anything but a refund,
    ``CANCEL_NOT_ALLOWED`` anything but a cancel) is Klarna replaying the answer of an
    earlier request made with the same key: ``IdempotencyKeyReusedError`` (this call was
    never attempted; ``outcome_unknown`` is false), chained to the replayed refusal.
    """
    try:
        return await send(request)
    except KlarnaAPIError as error:
        owner = _REFUSAL_OWNERS.get(error.error_code or "")
        if owner is None or owner == operation or request.idempotency_key is None:
            raise
        raise _reused(
            request.idempotency_key,
            f"its answer, {error.status} {error.error_code}, refuses a {owner}, not this"
            f" {operation}",
            status=error.status,
            location="",
            method=error.method or request.method,
            url=error.url or request.path,
            attempts=error.attempts,
        ) from error


async def call_no_content(send: Handler, request: Request, operation: str) -> int:
    """Send a call that creates nothing (``operation`` names it), whose success is ``204``;
    the HTTP attempts it took.

    Any other 2xx (e.g. a capture's 201 with ``Capture-Id`` and ``Location``) is Klarna
    replaying the answer of an earlier request made with the same key, which created
    something: ``IdempotencyKeyReusedError``, as ``created`` does for a 204 answering a
    create. Refusals are read as by ``call``. A key sent before with another call that
    creates nothing gets that call's 204 back, which cannot be told from this call's own
    success: only reading the order back can tell.
    """
    response = await call(send, request, operation)
    if response.status == 204:
        return response.attempts
    location = response.headers.get("Location") or ""
    named = _named_in_location(location) if location else None
    if named is not None:
        what = f" ({_CREATED_NOUNS[named[1]]} {named[2]})"
    elif response.headers.get("Capture-Id"):
        what = f" (capture {response.headers['Capture-Id']})"
    elif response.headers.get("Refund-Id"):
        what = f" (refund {response.headers['Refund-Id']})"
    else:
        what = ""
    _raise_reused(
        response,
        f"its answer, {response.status}{what}, is not the 204 No Content of this {operation}",
        location,
    )


def get(path: str) -> Request:
    """A GET request value."""
    return Request("GET", path, headers=_GET_HEADERS)


def post(path: str, body: bytes | None = None, *, idempotency_key: str | None = None) -> Request:
    """A POST request value; the idempotency middleware adds the key header."""
    headers = _JSON_HEADERS if body is not None else _GET_HEADERS
    return Request("POST", path, body, headers, idempotency_key)


def patch(path: str, body: bytes, *, idempotency_key: str | None = None) -> Request:
    """A PATCH request value (always with a JSON body); the idempotency middleware adds the
    key header, as for a POST."""
    return Request("PATCH", path, body, _JSON_HEADERS, idempotency_key)


def unreadable(response: Response, message: str) -> KlarnaResponseError:
    """A KlarnaResponseError for a 2xx answer we could not make sense of."""
    request = response.request
    error = KlarnaResponseError(message, status=response.status)
    error.bind(
        method=request.method,
        url=response.url,
        idempotency_key=request.idempotency_key,
        attempts=response.attempts,
    )
    return error


def read(response: Response, cls: type[T]) -> T:
    """Structure a 2xx JSON body into ``cls``; a body that does not fit is Klarna's fault."""
    try:
        return from_json(response.body, cls)
    except ValueError as exc:
        raise unreadable(response, f"Klarna's answer does not fit {cls}: {exc}") from exc
