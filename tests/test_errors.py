"""decode_error is a pure function: status, headers and body in, the right typed error out."""

from __future__ import annotations

import email.utils

import pytest

from klarna_om_async.errors import (
    AuthenticationError,
    BadRequestError,
    CaptureNotAllowedError,
    ConflictError,
    KlarnaAPIError,
    KlarnaConnectionError,
    KlarnaTimeoutError,
    NoSuchCaptureError,
    NoSuchOrderError,
    NotAllowedError,
    NotFoundError,
    RateLimitError,
    RequestTooLargeError,
    ServerError,
    UnprocessableEntityError,
    decode_error,
    parse_retry_after,
)


def body(code: str, *messages: str) -> bytes:
    import orjson

    return orjson.dumps(
        {"error_code": code, "error_messages": list(messages), "correlation_id": "corr-1"}
    )


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "BAD_VALUE", BadRequestError),
        (401, "UNAUTHORIZED", AuthenticationError),
        (403, "NOT_ALLOWED", NotAllowedError),
        (403, "CAPTURE_NOT_ALLOWED", CaptureNotAllowedError),
        (404, "NO_SUCH_ORDER", NoSuchOrderError),
        (404, "NO_SUCH_CAPTURE", NoSuchCaptureError),
        (404, "NOT_FOUND", NotFoundError),
        (409, "CONFLICT", ConflictError),
        (413, "REQUEST_TOO_LARGE", RequestTooLargeError),
        (422, "INVALID_ADDRESS", UnprocessableEntityError),
        (429, "TOO_MANY_REQUESTS", RateLimitError),
        (500, "INTERNAL_SERVER_ERROR", ServerError),
        (503, "TEMPORARILY_UNAVAILABLE", ServerError),
        (418, "TEAPOT", KlarnaAPIError),
    ],
)
def test_status_and_code_choose_the_class(status: int, code: str, cls: type) -> None:
    error = decode_error(status, {}, body(code, "why"))
    assert type(error) is cls
    assert error.status == status
    assert error.error_code == code
    assert error.error_messages == ("why",)
    assert error.correlation_id == "corr-1"


def test_a_code_never_moves_an_error_to_another_status_class() -> None:
    error = decode_error(503, {}, body("NO_SUCH_ORDER"))
    assert type(error) is ServerError


@pytest.mark.parametrize("raw", [b"<html>Bad Gateway</html>", b"", b"{not json", b"[1, 2]"])
def test_non_json_bodies_still_give_the_class_for_the_status(raw: bytes) -> None:
    error = decode_error(502, {"Klarna-Correlation-Id": "from-header"}, raw)
    assert type(error) is ServerError
    assert error.error_code is None
    assert error.correlation_id == "from-header"
    assert "Bad Gateway" in str(error) if raw.startswith(b"<html>") else True


def test_str_is_one_readable_line_with_the_correlation_id() -> None:
    error = decode_error(403, {}, body("CAPTURE_NOT_ALLOWED", "Order x is expired."))
    error.bind(
        method="POST", url="http://k/ordermanagement/v1/orders/x/captures", idempotency_key="k1"
    )
    text = str(error)
    assert "\n" not in text
    assert text.startswith("403 CAPTURE_NOT_ALLOWED on POST http://k/")
    assert "Order x is expired." in text
    assert "correlation_id=corr-1" in text
    # A refusal is final: no hint to retry it.
    assert not error.outcome_unknown
    assert "Retry with" not in text


def test_a_server_error_on_a_post_says_the_outcome_is_unknown_and_names_the_key() -> None:
    error = decode_error(503, {}, body("TEMPORARILY_UNAVAILABLE"))
    error.bind(method="POST", url="http://k/x", idempotency_key="key-123", attempts=5)
    assert error.outcome_unknown
    assert error.attempts == 5
    assert "idempotency_key='key-123'" in str(error)


def test_a_server_error_on_a_get_has_no_unknown_outcome() -> None:
    error = decode_error(503, {}, b"")
    error.bind(method="GET", url="http://k/x", idempotency_key=None)
    assert not error.outcome_unknown


def test_connection_errors_on_posts_have_unknown_outcomes() -> None:
    error = KlarnaTimeoutError("No answer")
    error.bind(method="POST", url="http://k/x", idempotency_key="key-9", attempts=3)
    assert isinstance(error, KlarnaConnectionError)
    assert isinstance(error, TimeoutError)
    assert error.outcome_unknown
    assert "3 attempts" in str(error)
    assert "key-9" in str(error)


def test_retry_after_in_seconds_and_as_an_http_date() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") is None  # negative: no usable wait, as if absent
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == 30.0
    error = decode_error(429, {"Retry-After": "7"}, b"")
    assert isinstance(error, RateLimitError)
    assert error.retry_after == 7.0
