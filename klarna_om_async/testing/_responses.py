"""The fake's HTTP answers: JSON bodies, Klarna-shaped errors, and the answers faults give."""

from __future__ import annotations

import uuid

import orjson
from aiohttp import web

from ._faults import NonJsonError, RateLimited, ServerFailure

__all__ = ("error_response", "fault_response", "json_response")

_JSON = "application/json"


def json_response(payload: object, status: int = 200) -> web.Response:
    """A JSON answer serialized with orjson."""
    return web.Response(status=status, body=orjson.dumps(payload), content_type=_JSON)


def error_response(
    status: int, error_code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Klarna's error body: ``error_code``, ``error_messages`` and a fresh ``correlation_id``."""
    payload = {
        "error_code": error_code,
        "error_messages": [message],
        "correlation_id": str(uuid.uuid4()),
    }
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type=_JSON, headers=headers
    )


def fault_response(fault: ServerFailure | RateLimited | NonJsonError) -> web.Response:
    """What an injected error fault answers instead of processing the request."""
    if isinstance(fault, ServerFailure):
        default = "INTERNAL_SERVER_ERROR" if fault.status == 500 else "TEMPORARILY_UNAVAILABLE"
        return error_response(
            fault.status, fault.error_code or default, "Injected server error (FakeKlarna)."
        )
    if isinstance(fault, RateLimited):
        headers = None if fault.retry_after is None else {"Retry-After": fault.retry_after}
        return error_response(429, "TOO_MANY_REQUESTS", "Too many requests.", headers)
    return web.Response(status=fault.status, text=fault.body, content_type=fault.content_type)
