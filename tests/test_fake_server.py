"""FakeKlarna driven by a raw aiohttp client over loopback."""

from __future__ import annotations

import asyncio
import io
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy

from klarna_om_async.testing import (
    REPLAYED_HEADER,
    Delay,
    DropAfterProcessing,
    DropConnection,
    FakeKlarna,
    NonJsonError,
    RateLimited,
    ServerFailure,
)

ORDERS = "/ordermanagement/v1/orders"
KEY_HEADER = "Klarna-Idempotency-Key"
SHIPPING_INFO = {
    "shipping_company": "DHL US",
    "shipping_method": "Home",
    "tracking_number": "63456415674545679874",
    "tracking_uri": "http://shipping.example/findmypackage?63456415674545679874",
}
TOMATOES = {
    "type": "physical",
    "reference": "123050",
    "name": "Tomatoes",
    "quantity": 10,
    "quantity_unit": "kg",
    "unit_price": 600,
    "tax_rate": 2500,
    "total_amount": 6000,
    "total_tax_amount": 1200,
}


@pytest.fixture
async def session(fake: FakeKlarna) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": fake.auth_header}
    async with aiohttp.ClientSession(fake.base_url, headers=headers) as client:
        yield client


class Answer(NamedTuple):
    status: int
    headers: CIMultiDictProxy[str]
    content_type: str
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def fetch(session: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> Answer:
    async with session.request(method, path, **kwargs) as response:
        body = await response.read()
        return Answer(response.status, response.headers, response.content_type, body)


async def capture(
    session: aiohttp.ClientSession,
    order_id: str,
    amount: int = 1000,
    *,
    key: str | None = None,
    **fields: Any,
) -> Answer:
    headers = {KEY_HEADER: key} if key is not None else {}
    return await fetch(
        session,
        "POST",
        f"{ORDERS}/{order_id}/captures",
        data=orjson.dumps({"captured_amount": amount, **fields}),
        headers={"Content-Type": "application/json", **headers},
    )


def error_of(answer: Answer) -> dict[str, Any]:
    body: dict[str, Any] = answer.json()
    assert set(body) == {"error_code", "error_messages", "correlation_id"}
    assert isinstance(body["error_messages"], list)
    uuid.UUID(body["correlation_id"])
    return body


def expect_error(answer: Answer, status: int, code: str) -> dict[str, Any]:
    assert answer.status == status
    assert answer.content_type == "application/json"
    body = error_of(answer)
    assert body["error_code"] == code
    return body


# -- orders ------------------------------------------------------------------------------------


async def test_get_order_returns_klarnas_order_shape(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=6000, currency="SEK", reference="shop-1")
    response = await fetch(session, "GET", f"{ORDERS}/{order_id}")
    assert response.status == 200
    order = response.json()
    assert order["order_id"] == order_id
    assert order["status"] == "AUTHORIZED"
    assert order["fraud_status"] == "ACCEPTED"
    assert order["order_amount"] == order["original_order_amount"] == 6000
    assert order["captured_amount"] == order["refunded_amount"] == 0
    assert order["remaining_authorized_amount"] == 6000
    assert order["purchase_currency"] == "SEK"
    assert order["merchant_reference1"] == "shop-1"
    assert order["captures"] == order["refunds"] == []
    assert order["order_lines"][0]["total_amount"] == 6000
    assert order["created_at"].endswith("Z")
    assert order["expires_at"] > order["created_at"]


async def test_get_order_includes_full_captures(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=6000)
    created = await capture(session, order_id, 6000, description="All of it")
    response = await fetch(session, "GET", f"{ORDERS}/{order_id}")
    order = response.json()
    assert order["status"] == "CAPTURED"
    assert order["remaining_authorized_amount"] == 0
    [booked] = order["captures"]
    assert booked["capture_id"] == created.headers["Capture-Id"]
    assert booked["description"] == "All of it"
    assert "merchant_reference1" not in order


async def test_unknown_order_is_no_such_order(session: aiohttp.ClientSession) -> None:
    response = await fetch(session, "GET", f"{ORDERS}/nope")
    body = expect_error(response, 404, "NO_SUCH_ORDER")
    assert body["error_messages"] == ["Order nope cannot be found"]


def test_add_order_validates_its_arguments(fake: FakeKlarna) -> None:
    fake.add_order("fixed", amount=1)
    with pytest.raises(ValueError, match="already exists"):
        fake.add_order("fixed", amount=1)
    with pytest.raises(ValueError, match="unknown order status"):
        fake.add_order(amount=1, status="PAID")
    with pytest.raises(ValueError, match="non-negative int"):
        fake.add_order(amount=-1)
    with pytest.raises(ValueError, match="non-negative int"):
        fake.add_order(amount=True)
    with pytest.raises(ValueError, match="path segment"):
        fake.add_order("a/b", amount=1)
    with pytest.raises(ValueError, match="unknown order status"):
        fake.set_order_status("fixed", "PAID")
    with pytest.raises(KeyError, match="no order"):
        fake.order("missing")


def test_add_orders_creates_distinct_authorized_orders(fake: FakeKlarna) -> None:
    ids = fake.add_orders(3, amount=500)
    assert len(set(ids)) == 3
    for order_id in ids:
        uuid.UUID(order_id)
        order = fake.order(order_id)
        assert (order.status, order.order_amount, order.purchase_currency) == (
            "AUTHORIZED",
            500,
            "EUR",
        )


# -- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Basic dGVzdC11c2VyOndyb25n",  # test-user:wrong
        "Bearer token",
        "Basic !!!not-base64",
        "Basic dGVzdC11c2Vy",  # no colon
    ],
)
async def test_bad_credentials_are_401(fake: FakeKlarna, authorization: str | None) -> None:
    order_id = fake.add_order(amount=100)
    headers = {} if authorization is None else {"Authorization": authorization}
    async with aiohttp.ClientSession(fake.base_url) as client:
        answer = await fetch(
            client,
            "POST",
            f"{ORDERS}/{order_id}/captures",
            json={"captured_amount": 1},
            headers=headers,
        )
    expect_error(answer, 401, "UNAUTHORIZED")
    assert fake.booked_captures == []


async def test_credentials_come_from_the_constructor() -> None:
    async with FakeKlarna(username="merchant", password="s3cret") as fake:
        assert (fake.username, fake.password) == ("merchant", "s3cret")
        order_id = fake.add_order(amount=100)
        # lower-case scheme: Basic is case-insensitive
        headers = {"Authorization": "basic bWVyY2hhbnQ6czNjcmV0"}
        async with aiohttp.ClientSession(fake.base_url) as client:
            assert (
                await fetch(client, "GET", f"{ORDERS}/{order_id}", headers=headers)
            ).status == 200


# -- captures ----------------------------------------------------------------------------------


async def test_capture_is_201_with_capture_id_and_location(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=6000)
    response = await capture(
        session,
        order_id,
        6000,
        reference="c9a94cf1",
        description="Shipped the full order",
        order_lines=[TOMATOES],
        shipping_info=[SHIPPING_INFO],
    )
    assert response.status == 201
    assert response.body == b""
    capture_id = response.headers["Capture-Id"]
    uuid.UUID(capture_id)
    assert response.headers["Location"] == (
        f"{fake.base_url}{ORDERS}/{order_id}/captures/{capture_id}"
    )
    got = await fetch(session, "GET", response.headers["Location"])
    assert got.status == 200
    body = got.json()
    assert body["capture_id"] == capture_id
    assert re.fullmatch(r"[0-9A-F]{8}-1", body["klarna_reference"])
    assert body["captured_amount"] == 6000
    assert body["captured_at"].endswith("Z")
    assert body["description"] == "Shipped the full order"
    assert body["reference"] == "c9a94cf1"
    assert body["order_lines"] == [TOMATOES]
    assert body["shipping_info"] == [SHIPPING_INFO]
    assert body["refunded_amount"] == 0
    assert body["billing_address"]["family_name"] == "Doe"
    assert body["shipping_address"]["city"] == "New York"
    [booked] = fake.captures(order_id)
    assert booked.capture_id == capture_id
    assert booked.idempotency_key is None


async def test_partial_then_full_capture_moves_the_order_status(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    assert (await capture(session, order_id, 400)).status == 201
    order = fake.order(order_id)
    assert (order.status, order.captured_amount, order.remaining_authorized_amount) == (
        "PART_CAPTURED",
        400,
        600,
    )
    assert (await capture(session, order_id, 600)).status == 201
    assert (order.status, order.captured_amount, order.remaining_authorized_amount) == (
        "CAPTURED",
        1000,
        0,
    )
    response = await fetch(session, "GET", f"{ORDERS}/{order_id}/captures")
    captures = response.json()
    assert [c["captured_amount"] for c in captures] == [400, 600]
    assert [c["klarna_reference"][-2:] for c in captures] == ["-1", "-2"]
    assert [c.captured_amount for c in fake.booked_captures] == [400, 600]


async def test_over_capture_is_capture_not_allowed(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    await capture(session, order_id, 700)
    response = await capture(session, order_id, 301)
    assert response.status == 403
    body = error_of(response)
    assert body["error_code"] == "CAPTURE_NOT_ALLOWED"
    assert "remaining authorized amount 300" in body["error_messages"][0]
    assert len(fake.captures(order_id)) == 1


@pytest.mark.parametrize(
    ("status", "word"), [("CANCELLED", "cancelled"), ("EXPIRED", "expired"), ("CLOSED", "closed")]
)
async def test_capture_on_a_final_order_is_not_allowed(
    fake: FakeKlarna, session: aiohttp.ClientSession, status: str, word: str
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.set_order_status(order_id, status)
    assert fake.order(order_id).remaining_authorized_amount == 0
    response = await capture(session, order_id, 100)
    assert response.status == 403
    body = error_of(response)
    assert body["error_code"] == "CAPTURE_NOT_ALLOWED"
    assert body["error_messages"] == [f"Order {order_id} is {word}. Capture not possible."]
    assert fake.booked_captures == []


async def test_order_created_expired_refuses_captures(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000, status="EXPIRED")
    assert (await capture(session, order_id, 1)).status == 403


async def test_capture_on_unknown_order_is_no_such_order(
    session: aiohttp.ClientSession,
) -> None:
    response = await capture(session, "missing", 100)
    assert response.status == 404
    assert (error_of(response))["error_code"] == "NO_SUCH_ORDER"


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b'{"captured_amount": "100"}',
        b'{"captured_amount": true}',
        b'{"captured_amount": 10.5}',
        b'{"captured_amount": -1}',
        b'{"captured_amount": 200000001}',
        b'{"captured_amount": 100, "description": 5}',
        b'{"captured_amount": 100, "reference": "' + b"x" * 256 + b'"}',
        b'{"captured_amount": 100, "order_lines": {}}',
        b'{"captured_amount": 100, "order_lines": [{"quantity": 1}]}',
        b'{"captured_amount": 100, "order_lines": [{"name": "a", "quantity": 1,'
        b' "unit_price": 1, "totl_amount": 1}]}',
        b'{"captured_amount": 100, "order_lines": [{"name": "a", "quantity": 1,'
        b' "unit_price": 1, "total_amount": 1, "tax_rate": "25"}]}',
        b'{"captured_amount": 100, "shipping_info": [{"shipping_method": "Drone"}]}',
        b'{"captured_amount": 100, "shipping_info": [{"tracking_number": 1}]}',
        b'{"captured_amount": 100, "shipping_info": ["DHL"]}',
        b'{"captured_amount": 100, "shipping_delay": -1}',
        b"[100]",
        b"not json",
        b"",
    ],
)
async def test_invalid_capture_body_is_bad_value(
    fake: FakeKlarna, session: aiohttp.ClientSession, body: bytes
) -> None:
    order_id = fake.add_order(amount=1000)
    response = await fetch(session, "POST", f"{ORDERS}/{order_id}/captures", data=body)
    expect_error(response, 400, "BAD_VALUE")
    assert fake.booked_captures == []


async def test_capture_accepts_the_largest_amount_and_nulls(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=200_000_000)
    response = await capture(
        session, order_id, 200_000_000, description=None, reference=None, shipping_delay=0
    )
    assert response.status == 201
    [booked] = fake.captures(order_id)
    assert booked.description is None
    got = await fetch(session, "GET", response.headers["Location"])
    body = got.json()
    assert "description" not in body
    assert "reference" not in body


async def test_get_capture_errors(fake: FakeKlarna, session: aiohttp.ClientSession) -> None:
    order_id = fake.add_order(amount=1000)
    other_id = fake.add_order(amount=1000)
    capture_id = (await capture(session, other_id)).headers["Capture-Id"]
    response = await fetch(session, "GET", f"{ORDERS}/{order_id}/captures/{capture_id}")
    body = expect_error(response, 404, "NO_SUCH_CAPTURE")
    assert capture_id in body["error_messages"][0]
    response = await fetch(session, "GET", f"{ORDERS}/missing/captures/{capture_id}")
    expect_error(response, 404, "NO_SUCH_ORDER")
    response = await fetch(session, "GET", f"{ORDERS}/missing/captures")
    expect_error(response, 404, "NO_SUCH_ORDER")


# -- shipping info and send-outs ---------------------------------------------------------------


async def test_shipping_info_is_appended(fake: FakeKlarna, session: aiohttp.ClientSession) -> None:
    order_id = fake.add_order(amount=1000)
    location = (await capture(session, order_id, shipping_info=[SHIPPING_INFO])).headers["Location"]
    second = {"shipping_company": "UPS", "tracking_number": "1Z"}
    response = await fetch(
        session, "POST", f"{location}/shipping-info", json={"shipping_info": [second, second]}
    )
    assert (response.status, response.body) == (204, b"")
    [booked] = fake.captures(order_id)
    assert booked.shipping_info == [SHIPPING_INFO, second, second]
    got = await fetch(session, "GET", location)
    assert (got.json())["shipping_info"] == [SHIPPING_INFO, second, second]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"shipping_info": []},
        {"shipping_info": {}},
        {"shipping_info": [{}] * 501},
        {"shipping_info": [{"shipping_company": "x" * 101}]},
        [{"shipping_company": "DHL"}],
    ],
)
async def test_bad_shipping_info_is_bad_value(
    fake: FakeKlarna, session: aiohttp.ClientSession, body: object
) -> None:
    order_id = fake.add_order(amount=1000)
    location = (await capture(session, order_id)).headers["Location"]
    response = await fetch(session, "POST", f"{location}/shipping-info", json=body)
    expect_error(response, 400, "BAD_VALUE")
    assert fake.captures(order_id)[0].shipping_info == []


async def test_shipping_info_on_unknown_capture_is_404(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    body = {"shipping_info": [SHIPPING_INFO]}
    response = await fetch(
        session, "POST", f"{ORDERS}/{order_id}/captures/nope/shipping-info", json=body
    )
    expect_error(response, 404, "NO_SUCH_CAPTURE")
    response = await fetch(session, "POST", f"{ORDERS}/nope/captures/nope/shipping-info", json=body)
    expect_error(response, 404, "NO_SUCH_ORDER")


async def test_trigger_send_out_is_counted(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    location = (await capture(session, order_id)).headers["Location"]
    for _ in range(2):
        response = await fetch(session, "POST", f"{location}/trigger-send-out")
        assert response.status == 204
    assert fake.captures(order_id)[0].send_outs == 2
    response = await fetch(session, "POST", f"{ORDERS}/{order_id}/captures/nope/trigger-send-out")
    expect_error(response, 404, "NO_SUCH_CAPTURE")


# -- routing -----------------------------------------------------------------------------------


async def test_unknown_route_is_not_found(session: aiohttp.ClientSession) -> None:
    response = await fetch(session, "GET", "/ordermanagement/v2/elsewhere")
    expect_error(response, 404, "NOT_FOUND")


async def test_wrong_method_is_405_in_klarnas_shape(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    response = await fetch(session, "DELETE", f"{ORDERS}/{order_id}/captures")
    expect_error(response, 405, "METHOD_NOT_ALLOWED")
    assert "POST" in response.headers["Allow"]


async def test_oversized_body_is_request_too_large(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    body = b'{"captured_amount": 1, "description": "' + b"x" * 2_000_000 + b'"}'
    response = await fetch(session, "POST", f"{ORDERS}/{order_id}/captures", data=io.BytesIO(body))
    expect_error(response, 413, "REQUEST_TOO_LARGE")
    assert fake.booked_captures == []


# -- idempotency -------------------------------------------------------------------------------


async def test_same_key_replays_the_first_answer_and_ignores_the_body(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    key = str(uuid.uuid4())
    first = await capture(session, order_id, 100, key=key)
    second = await capture(session, order_id, 900, key=key)
    assert first.status == second.status == 201
    assert REPLAYED_HEADER not in first.headers
    assert second.headers[REPLAYED_HEADER] == "true"
    assert second.headers["Capture-Id"] == first.headers["Capture-Id"]
    assert second.headers["Location"] == first.headers["Location"]
    assert second.body == b""
    [booked] = fake.booked_captures
    assert (booked.captured_amount, booked.idempotency_key) == (100, key)
    assert [r.replayed for r in fake.requests] == [False, True]


async def test_error_answers_are_replayed_too(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    first = await capture(session, order_id, 5000, key="k")
    second = await capture(session, order_id, 10, key="k")
    assert first.status == second.status == 403
    assert second.headers[REPLAYED_HEADER] == "true"
    assert second.content_type == "application/json"
    assert error_of(first) == error_of(second)
    assert fake.booked_captures == []


async def test_requests_without_a_key_are_processed_each_time(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    first = await capture(session, order_id, 100)
    second = await capture(session, order_id, 100)
    assert first.headers["Capture-Id"] != second.headers["Capture-Id"]
    assert len(fake.captures(order_id)) == 2


async def test_keys_on_get_are_ignored(fake: FakeKlarna, session: aiohttp.ClientSession) -> None:
    order_id = fake.add_order(amount=1000)
    response = await fetch(session, "GET", f"{ORDERS}/{order_id}", headers={KEY_HEADER: "k"})
    assert response.status == 200
    await capture(session, order_id, 100, key="k")
    response = await fetch(session, "GET", f"{ORDERS}/{order_id}", headers={KEY_HEADER: "k"})
    assert response.status == 200
    assert REPLAYED_HEADER not in response.headers


async def test_keys_expire_after_the_ttl() -> None:
    async with FakeKlarna(idempotency_ttl=0) as fake:
        order_id = fake.add_order(amount=1000)
        headers = {"Authorization": fake.auth_header}
        async with aiohttp.ClientSession(fake.base_url, headers=headers) as session:
            first = await capture(session, order_id, 100, key="k")
            second = await capture(session, order_id, 100, key="k")
        assert REPLAYED_HEADER not in second.headers
        assert first.headers["Capture-Id"] != second.headers["Capture-Id"]


async def test_unauthorized_answers_are_not_stored(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    response = await fetch(
        session,
        "POST",
        f"{ORDERS}/{order_id}/captures",
        json={"captured_amount": 1},
        headers={"Authorization": "Basic eDp5", KEY_HEADER: "k"},
    )
    assert response.status == 401
    assert (await capture(session, order_id, 1, key="k")).status == 201


async def test_concurrent_request_with_the_same_key_is_conflict(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(Delay(0.3))
    first = asyncio.create_task(capture(session, order_id, 100, key="k"))
    async with asyncio.timeout(5):
        await fake.wait_for_requests(1)
    second = await capture(session, order_id, 100, key="k")
    assert second.status == 409
    assert (error_of(second))["error_code"] == "CONFLICT"
    assert REPLAYED_HEADER not in second.headers
    assert (await first).status == 201
    assert len(fake.booked_captures) == 1
    third = await capture(session, order_id, 100, key="k")
    assert third.headers[REPLAYED_HEADER] == "true"


# -- faults ------------------------------------------------------------------------------------


async def test_drop_after_processing_books_the_capture_but_the_client_sees_a_disconnect(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(DropAfterProcessing())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with asyncio.timeout(5):
            await capture(session, order_id, 100, key="k")
    [booked] = fake.booked_captures
    assert fake.requests[0].status is None
    assert isinstance(fake.requests[0].fault, DropAfterProcessing)
    retry = await capture(session, order_id, 100, key="k")
    assert retry.status == 201
    assert retry.headers["Capture-Id"] == booked.capture_id
    assert retry.headers[REPLAYED_HEADER] == "true"
    assert len(fake.booked_captures) == 1


async def test_drop_after_processing_double_captures_a_client_without_keys(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(DropAfterProcessing())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await capture(session, order_id, 100)
    await capture(session, order_id, 100)
    assert len(fake.captures(order_id)) == 2


async def test_drop_connection_books_nothing(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(DropConnection())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with asyncio.timeout(5):
            await capture(session, order_id, 100, key="k")
    assert fake.booked_captures == []
    assert fake.requests[0].status is None
    retry = await capture(session, order_id, 100, key="k")
    assert retry.status == 201
    assert REPLAYED_HEADER not in retry.headers
    assert len(fake.booked_captures) == 1


async def test_delay_after_processing_lets_the_client_time_out_after_booking(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(Delay(0.3, after_processing=True))
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.1):
            await capture(session, order_id, 100)
    assert len(fake.booked_captures) == 1


async def test_delay_before_processing_holds_the_answer(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(Delay(0.1))
    started = time.monotonic()
    response = await capture(session, order_id, 100)
    assert response.status == 201
    assert time.monotonic() - started >= 0.1


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (ServerFailure(), 503, "TEMPORARILY_UNAVAILABLE"),
        (ServerFailure(500), 500, "INTERNAL_SERVER_ERROR"),
        (ServerFailure(502, error_code="UNEXPECTED_ERROR"), 502, "UNEXPECTED_ERROR"),
        (RateLimited(), 429, "TOO_MANY_REQUESTS"),
    ],
)
async def test_error_faults_answer_klarna_errors_and_process_nothing(
    fake: FakeKlarna,
    session: aiohttp.ClientSession,
    fault: ServerFailure | RateLimited,
    status: int,
    code: str,
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(fault)
    response = await capture(session, order_id, 100, key="k")
    expect_error(response, status, code)
    assert fake.booked_captures == []
    assert fake.requests[0].status == status
    retry = await capture(session, order_id, 100, key="k")
    assert retry.status == 201
    assert REPLAYED_HEADER not in retry.headers


async def test_rate_limited_sends_retry_after_unless_none(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(RateLimited("7"))
    fake.inject(RateLimited(None))
    first = await capture(session, order_id)
    second = await capture(session, order_id)
    assert (first.status, first.headers["Retry-After"]) == (429, "7")
    assert second.status == 429
    assert "Retry-After" not in second.headers


async def test_non_json_error_sends_the_proxy_body(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(NonJsonError())
    fake.inject(NonJsonError(504, "upstream timed out", "text/plain"))
    r = await fetch(session, "POST", f"{ORDERS}/{order_id}/captures", json={"captured_amount": 1})
    assert (r.status, r.content_type) == (502, "text/html")
    assert r.body.decode() == "<html>Bad Gateway</html>"
    r = await fetch(session, "GET", f"{ORDERS}/{order_id}")
    assert (r.status, r.content_type) == (504, "text/plain")
    assert r.body.decode() == "upstream timed out"
    assert fake.booked_captures == []


def test_fault_arguments_are_validated(fake: FakeKlarna) -> None:
    with pytest.raises(ValueError, match="5xx"):
        ServerFailure(404)
    with pytest.raises(ValueError, match=">= 0"):
        Delay(-1)
    with pytest.raises(ValueError, match="times"):
        fake.inject(ServerFailure(), times=0)


async def test_faults_match_by_method_and_path(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(ServerFailure(), method="get", path="/captures")
    fake.inject(RateLimited(), path=re.compile(r"/orders/[^/]+$"))
    assert (await capture(session, order_id)).status == 201
    response = await fetch(session, "GET", f"{ORDERS}/{order_id}")
    assert response.status == 429
    response = await fetch(session, "GET", f"{ORDERS}/{order_id}")
    assert response.status == 200
    assert fake.pending_faults == 1
    response = await fetch(session, "GET", f"{ORDERS}/{order_id}/captures")
    assert response.status == 503
    assert fake.pending_faults == 0


async def test_faults_are_consumed_first_in_first_out_times_over(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(ServerFailure(503), times=2)
    fake.inject(ServerFailure(500))
    statuses = []
    for _ in range(4):
        response = await fetch(session, "GET", f"{ORDERS}/{order_id}")
        statuses.append(response.status)
    assert statuses == [503, 503, 500, 200]


async def test_unlimited_faults_last_until_cleared(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(ServerFailure(), times=None)
    for _ in range(3):
        response = await fetch(session, "GET", f"{ORDERS}/{order_id}")
        assert response.status == 503
    fake.clear_faults()
    response = await fetch(session, "GET", f"{ORDERS}/{order_id}")
    assert response.status == 200


async def test_faults_apply_before_authentication(fake: FakeKlarna) -> None:
    fake.inject(ServerFailure())
    async with aiohttp.ClientSession(fake.base_url) as client:
        assert (await fetch(client, "GET", f"{ORDERS}/x")).status == 503


# -- observation -------------------------------------------------------------------------------


async def test_requests_are_recorded(fake: FakeKlarna, session: aiohttp.ClientSession) -> None:
    order_id = fake.add_order(amount=1000)
    before = time.monotonic()
    await capture(session, order_id, 100, key="k")
    await fetch(session, "GET", f"{ORDERS}/{order_id}?x=1")
    post, get = fake.requests
    assert (post.method, post.path, post.status) == ("POST", f"{ORDERS}/{order_id}/captures", 201)
    assert post.idempotency_key == "k"
    assert post.headers["klarna-idempotency-key"] == "k"
    assert post.json() == {"captured_amount": 100}
    assert post.fault is None
    assert (get.method, get.path, get.status, get.body) == ("GET", f"{ORDERS}/{order_id}", 200, b"")
    assert before <= post.received_at <= get.received_at <= time.monotonic()


async def test_recording_can_be_turned_off() -> None:
    async with FakeKlarna(record_requests=False) as fake:
        async with aiohttp.ClientSession(fake.base_url) as client:
            assert (await fetch(client, "GET", f"{ORDERS}/x")).status == 401
        assert fake.requests == []
        async with asyncio.timeout(1):
            await fake.wait_for_requests(1)


async def test_in_flight_is_observed(fake: FakeKlarna, session: aiohttp.ClientSession) -> None:
    order_ids = fake.add_orders(5, amount=1000)
    fake.inject(Delay(0.2), times=5)
    assert fake.in_flight == 0
    responses = await asyncio.gather(*(capture(session, order_id) for order_id in order_ids))
    assert [r.status for r in responses] == [201] * 5
    assert fake.max_in_flight == 5
    assert fake.in_flight == 0


async def test_a_cancelled_call_holds_its_key_until_the_fake_is_idle(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(Delay(0.1))
    sent = asyncio.ensure_future(capture(session, order_id, key="k"))
    await fake.wait_for_requests(1)
    sent.cancel()
    # The cancelled request still holds its key: a resend now is refused as in progress.
    assert (await capture(session, order_id, key="k")).status == 409
    async with asyncio.timeout(5):
        await fake.wait_until_idle()
    assert fake.in_flight == 0
    assert (await capture(session, order_id, key="k")).status == 201
    assert len(fake.captures(order_id)) == 1
    async with asyncio.timeout(1):
        await fake.wait_until_idle()  # idle already: returns at once


# -- lifecycle ---------------------------------------------------------------------------------


async def test_lifecycle() -> None:
    fake = FakeKlarna()
    with pytest.raises(RuntimeError, match="not running"):
        _ = fake.base_url
    await fake.start()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", fake.base_url)
        with pytest.raises(RuntimeError, match="already running"):
            await fake.start()
    finally:
        await fake.close()
    await fake.close()
    with pytest.raises(RuntimeError, match="not running"):
        _ = fake.base_url


async def test_close_does_not_wait_for_long_delays(fake: FakeKlarna) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(Delay(30))
    async with aiohttp.ClientSession(
        fake.base_url, headers={"Authorization": fake.auth_header}
    ) as session:
        pending = asyncio.create_task(capture(session, order_id))
        await fake.wait_for_requests(1)
        started = time.monotonic()
        await fake.close()
        assert time.monotonic() - started < 5
        with pytest.raises(aiohttp.ClientError):
            await pending


async def test_start_failure_leaves_the_fake_stopped(fake: FakeKlarna) -> None:
    port = int(fake.base_url.rsplit(":", 1)[1])
    other = FakeKlarna()
    with pytest.raises(OSError, match="in use"):
        await other.start(port=port)
    with pytest.raises(RuntimeError, match="not running"):
        _ = other.base_url


async def test_the_app_can_be_mounted_under_a_prefix() -> None:
    fake = FakeKlarna()
    order_id = fake.add_order(amount=1000)
    parent = web.Application()
    parent.add_subapp("/klarna", fake.app)
    async with (
        TestServer(parent) as server,
        aiohttp.ClientSession(headers={"Authorization": fake.auth_header}) as session,
    ):
        url = server.make_url(f"/klarna{ORDERS}/{order_id}/captures")
        response = await fetch(session, "POST", str(url), json={"captured_amount": 10})
        assert response.status == 201
        assert response.headers["Location"] == f"{url}/{response.headers['Capture-Id']}"
        assert (await fetch(session, "GET", response.headers["Location"])).status == 200


async def test_waiters_wake_in_count_order(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await fake.wait_for_requests(1)
    first = asyncio.create_task(fake.wait_for_requests(1))
    second = asyncio.create_task(fake.wait_for_requests(2))
    await asyncio.sleep(0)
    await fetch(session, "GET", f"{ORDERS}/x")
    async with asyncio.timeout(1):
        await first
    assert not second.done()
    await fetch(session, "GET", f"{ORDERS}/x")
    async with asyncio.timeout(1):
        await second


async def _statuses_with_a_seeded_fault(seed: int, n: int) -> list[int]:
    async with FakeKlarna(seed=seed) as fake:
        order_id = fake.add_order(amount=1000)
        fake.inject(ServerFailure(503), times=None, probability=0.3)
        async with aiohttp.ClientSession(
            fake.base_url, headers={"Authorization": fake.auth_header}
        ) as client:
            return [(await fetch(client, "GET", f"{ORDERS}/{order_id}")).status for _ in range(n)]


async def test_probabilistic_faults_spread_over_a_run_and_repeat_with_the_seed() -> None:
    first = await _statuses_with_a_seeded_fault(7, 60)
    assert set(first) == {200, 503}
    assert 5 <= first.count(503) <= 35
    last_failure = max(i for i, status in enumerate(first) if status == 503)
    assert 200 in first[:last_failure]  # spread out, not simply the first requests
    assert await _statuses_with_a_seeded_fault(7, 60) == first


async def test_a_request_escaping_a_probabilistic_fault_takes_the_next_one(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(ServerFailure(503), times=None, probability=0.5)
    fake.inject(RateLimited("0"), times=None)
    statuses = {(await fetch(session, "GET", f"{ORDERS}/{order_id}")).status for _ in range(30)}
    assert statuses == {429, 503}


def test_probability_is_validated(fake: FakeKlarna) -> None:
    for probability in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="probability"):
            fake.inject(ServerFailure(), probability=probability)
