"""FakeKlarna's order operations beyond capture and refund, driven by a raw aiohttp client over
loopback: release, extend and cancel the authorization, acknowledge, update the amount, the
merchant references and the shipping address, order-level shipping info, and a capture's due
date; Klarna's refusals, validation, expiry on the fake's clock, idempotent replay and faults."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy

from klarna_om_async.testing import (
    REPLAYED_HEADER,
    DropAfterProcessing,
    FakeKlarna,
    ServerFailure,
)

ORDERS = "/ordermanagement/v1/orders"
KEY_HEADER = "Klarna-Idempotency-Key"
DAY = 24 * 60 * 60.0
SHIPPING_INFO = {
    "shipping_company": "DHL US",
    "shipping_method": "Home",
    "tracking_number": "63456415674545679874",
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


class Answer(NamedTuple):
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@pytest.fixture
async def session(fake: FakeKlarna) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": fake.auth_header}
    async with aiohttp.ClientSession(fake.base_url, headers=headers) as client:
        yield client


async def call(
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    body: object = None,
    *,
    key: str | None = None,
    raw: bytes | None = None,
) -> Answer:
    """``method`` on ``ORDERS + path`` with a JSON ``body`` (or ``raw`` bytes) and a key."""
    headers = {KEY_HEADER: key} if key is not None else {}
    data = raw if raw is not None else (None if body is None else orjson.dumps(body))
    if data is not None:
        headers["Content-Type"] = "application/json"
    async with session.request(method, ORDERS + path, data=data, headers=headers) as response:
        return Answer(response.status, response.headers, await response.read())


async def get_order(session: aiohttp.ClientSession, order_id: str) -> dict[str, Any]:
    answer = await call(session, "GET", f"/{order_id}")
    assert answer.status == 200
    order: dict[str, Any] = answer.json()
    return order


async def capture(session: aiohttp.ClientSession, order_id: str, amount: int) -> Answer:
    return await call(session, "POST", f"/{order_id}/captures", {"captured_amount": amount})


async def capture_id(session: aiohttp.ClientSession, order_id: str, amount: int) -> str:
    answer = await capture(session, order_id, amount)
    assert answer.status == 201
    return answer.headers["Capture-Id"]


def expect_error(answer: Answer, status: int, code: str) -> str:
    """Assert Klarna's error shape, status and code; return the one message."""
    assert answer.status == status, answer.body
    body = answer.json()
    assert set(body) == {"error_code", "error_messages", "correlation_id"}
    assert body["error_code"] == code
    uuid.UUID(body["correlation_id"])
    [message] = body["error_messages"]
    assert isinstance(message, str)
    return message


def expect_no_content(answer: Answer) -> None:
    assert (answer.status, answer.body) == (204, b""), answer.body


def parse(moment: str) -> datetime.datetime:
    assert moment.endswith("Z")
    return datetime.datetime.fromisoformat(moment)


# -- release remaining authorization -----------------------------------------------------------


async def test_release_after_a_partial_capture_leaves_nothing_to_capture(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=10000)
    await capture_id(session, order_id, 4000)
    expect_no_content(await call(session, "POST", f"/{order_id}/release-remaining-authorization"))
    order = await get_order(session, order_id)
    assert (order["status"], order["remaining_authorized_amount"]) == ("CAPTURED", 0)
    assert (order["order_amount"], order["captured_amount"]) == (10000, 4000)
    assert fake.order(order_id).released_at is not None
    message = expect_error(await capture(session, order_id, 1), 403, "CAPTURE_NOT_ALLOWED")
    assert message == (
        f"The remaining authorization of order {order_id} was released. Capture not possible."
    )
    assert expect_error(await capture(session, order_id, 0), 403, "CAPTURE_NOT_ALLOWED")
    assert len(fake.captures(order_id)) == 1


async def test_release_of_a_fully_captured_order_is_not_allowed(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    await capture_id(session, order_id, 1000)
    answer = await call(session, "POST", f"/{order_id}/release-remaining-authorization")
    message = expect_error(answer, 403, "NOT_ALLOWED")
    assert message == "Order is fully captured. Remaining authorization cannot be released."
    assert fake.order(order_id).operations == []


async def test_release_without_captures_is_not_allowed_cancel_instead(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    answer = await call(session, "POST", f"/{order_id}/release-remaining-authorization")
    assert "cancel the order instead" in expect_error(answer, 403, "NOT_ALLOWED")
    assert fake.order(order_id).status == "AUTHORIZED"
    assert fake.order(order_id).remaining_authorized_amount == 1000


async def test_an_order_whose_only_capture_is_0_cannot_be_cancelled_but_can_be_released(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    """Klarna: cancel "only before any capture"; release counts captures the same way, so
    the order is never stuck between two refusals that each point to the other call."""
    order_id = fake.add_order(amount=10000)
    await capture_id(session, order_id, 0)
    answer = await call(session, "POST", f"/{order_id}/cancel")
    assert "previous captures" in expect_error(answer, 403, "CANCEL_NOT_ALLOWED")
    expect_no_content(await call(session, "POST", f"/{order_id}/release-remaining-authorization"))
    order = await get_order(session, order_id)
    assert (order["status"], order["remaining_authorized_amount"]) == ("CLOSED", 0)
    assert fake.order(order_id).operations == ["releaseRemainingAuthorization"]


@pytest.mark.parametrize("status", ["CANCELLED", "EXPIRED", "CLOSED"])
async def test_release_of_a_final_order_is_not_allowed(
    fake: FakeKlarna, session: aiohttp.ClientSession, status: str
) -> None:
    order_id = fake.add_order(amount=1000)
    await capture_id(session, order_id, 100)
    fake.set_order_status(order_id, status)
    answer = await call(session, "POST", f"/{order_id}/release-remaining-authorization")
    assert f"is {status.lower()}" in expect_error(answer, 403, "NOT_ALLOWED")


async def test_release_when_everything_captured_was_refunded_closes_the_order(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    await capture_id(session, order_id, 400)
    refund = await call(session, "POST", f"/{order_id}/refunds", {"refunded_amount": 400})
    assert refund.status == 201
    assert fake.order(order_id).status == "PART_CAPTURED"
    expect_no_content(await call(session, "POST", f"/{order_id}/release-remaining-authorization"))
    order = await get_order(session, order_id)
    assert (order["status"], order["remaining_authorized_amount"]) == ("CLOSED", 0)


async def test_the_lifecycle_capture_capture_release_refund(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    """Klarna: after the last partial capture the rest is released; the order is then
    CAPTURED (not CLOSED: 4500 captured is not refunded) and keeps its order amount."""
    order_id = fake.add_order(amount=10000)
    await capture_id(session, order_id, 4000)
    await capture_id(session, order_id, 3000)
    expect_no_content(await call(session, "POST", f"/{order_id}/release-remaining-authorization"))
    refund = await call(session, "POST", f"/{order_id}/refunds", {"refunded_amount": 2500})
    assert refund.status == 201
    order = await get_order(session, order_id)
    assert order["order_amount"] == order["original_order_amount"] == 10000
    assert (order["captured_amount"], order["refunded_amount"]) == (7000, 2500)
    assert (order["remaining_authorized_amount"], order["status"]) == (0, "CAPTURED")
    assert [c["refunded_amount"] for c in order["captures"]] == [2500, 0]
    expect_error(await capture(session, order_id, 100), 403, "CAPTURE_NOT_ALLOWED")
    # What is left captured can still be refunded; then the order is closed.
    refund = await call(session, "POST", f"/{order_id}/refunds", {"refunded_amount": 4500})
    assert refund.status == 201
    assert (await get_order(session, order_id))["status"] == "CLOSED"


# -- idempotency and faults, for every new POST and PATCH --------------------------------------


class Operation(NamedTuple):
    name: str
    method: str
    #: After ``/{order_id}``; ``{capture_id}`` is filled in.
    path: str
    body: object
    #: The amount to capture first, if the operation needs a capture.
    captured: int | None


OPERATIONS = [
    Operation(
        "releaseRemainingAuthorization", "POST", "/release-remaining-authorization", None, 400
    ),
    Operation("extendAuthorizationTime", "POST", "/extend-authorization-time", None, None),
    Operation("cancelOrder", "POST", "/cancel", None, None),
    Operation("acknowledgeOrder", "POST", "/acknowledge", None, None),
    Operation("updateAuthorization", "PATCH", "/authorization", {"order_amount": 900}, None),
    Operation(
        "updateMerchantReferences",
        "PATCH",
        "/merchant-references",
        {"merchant_reference2": "erp-7"},
        None,
    ),
    Operation(
        "updateConsumerDetails",
        "PATCH",
        "/customer-details",
        {"shipping_address": {"city": "Stockholm"}},
        None,
    ),
    Operation(
        "appendOrderShippingInfo",
        "POST",
        "/shipping-info",
        {"shipping_info": [SHIPPING_INFO]},
        None,
    ),
    Operation(
        "extendDueDate",
        "PATCH",
        "/captures/{capture_id}/extend-due-date",
        {"number_of_days": 14},
        1000,
    ),
]
OPERATION_IDS = [operation.name for operation in OPERATIONS]


async def prepared(
    fake: FakeKlarna, session: aiohttp.ClientSession, operation: Operation
) -> tuple[str, str]:
    """A fresh order ready for ``operation``, and the operation's path on it."""
    order_id = fake.add_order(amount=1000)
    found = ""
    if operation.captured is not None:
        found = await capture_id(session, order_id, operation.captured)
    return order_id, f"/{order_id}" + operation.path.format(capture_id=found)


@pytest.mark.parametrize("operation", OPERATIONS, ids=OPERATION_IDS)
async def test_same_key_replays_the_first_answer_and_applies_once(
    fake: FakeKlarna, session: aiohttp.ClientSession, operation: Operation
) -> None:
    order_id, path = await prepared(fake, session, operation)
    first = await call(session, operation.method, path, operation.body, key="k-1")
    second = await call(session, operation.method, path, operation.body, key="k-1")
    expect_no_content(first)
    expect_no_content(second)
    assert REPLAYED_HEADER not in first.headers
    assert second.headers[REPLAYED_HEADER] == "true"
    assert fake.order(order_id).operations == [operation.name]


@pytest.mark.parametrize("operation", OPERATIONS, ids=OPERATION_IDS)
async def test_a_lost_answer_then_a_retry_with_the_same_key_applies_once(
    fake: FakeKlarna, session: aiohttp.ClientSession, operation: Operation
) -> None:
    order_id, path = await prepared(fake, session, operation)
    fake.inject(DropAfterProcessing(), method=operation.method, path=operation.path[-12:])
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(session, operation.method, path, operation.body, key="k-2")
    assert fake.order(order_id).operations == [operation.name]  # applied, answer lost
    retry = await call(session, operation.method, path, operation.body, key="k-2")
    expect_no_content(retry)
    assert retry.headers[REPLAYED_HEADER] == "true"
    assert fake.order(order_id).operations == [operation.name]
    assert [r.replayed for r in fake.requests if r.idempotency_key == "k-2"] == [False, True]


@pytest.mark.parametrize("operation", OPERATIONS, ids=OPERATION_IDS)
async def test_an_injected_server_failure_applies_nothing(
    fake: FakeKlarna, session: aiohttp.ClientSession, operation: Operation
) -> None:
    order_id, path = await prepared(fake, session, operation)
    fake.inject(ServerFailure(503), path=operation.path[-12:])
    answer = await call(session, operation.method, path, operation.body, key="k-3")
    expect_error(answer, 503, "TEMPORARILY_UNAVAILABLE")
    assert fake.order(order_id).operations == []
    expect_no_content(await call(session, operation.method, path, operation.body, key="k-3"))
    assert fake.order(order_id).operations == [operation.name]


@pytest.mark.parametrize("operation", OPERATIONS, ids=OPERATION_IDS)
async def test_an_unknown_order_is_no_such_order(
    session: aiohttp.ClientSession, operation: Operation
) -> None:
    path = "/nope" + operation.path.format(capture_id="c")
    answer = await call(session, operation.method, path, operation.body)
    assert "nope" in expect_error(answer, 404, "NO_SUCH_ORDER")


async def test_a_replayed_release_is_the_first_204_not_a_403(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    await capture_id(session, order_id, 400)
    path = f"/{order_id}/release-remaining-authorization"
    expect_no_content(await call(session, "POST", path, key="r"))
    expect_no_content(await call(session, "POST", path, key="r"))
    expect_error(await call(session, "POST", path, key="another"), 403, "NOT_ALLOWED")
    assert fake.order(order_id).operations == ["releaseRemainingAuthorization"]


async def test_get_on_an_update_path_is_405(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    answer = await call(session, "GET", f"/{order_id}/cancel")
    expect_error(answer, 405, "METHOD_NOT_ALLOWED")
    assert "POST" in answer.headers["Allow"]


# -- expiry and extending the authorization time -----------------------------------------------


async def test_an_order_past_expires_at_is_expired_and_refuses_captures(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    held = fake.order(order_id)
    expires_at = parse(held.expires_at)
    assert expires_at - parse(held.created_at) == datetime.timedelta(days=28)
    fake.advance_clock(27 * DAY)
    assert held.status == "AUTHORIZED"
    fake.advance_clock(DAY + 1)
    assert held.status == "EXPIRED"  # a reference held across advance_clock is live too
    message = expect_error(await capture(session, order_id, 100), 403, "CAPTURE_NOT_ALLOWED")
    assert message == f"Order {order_id} is expired. Capture not possible."
    order = await get_order(session, order_id)
    assert (order["status"], order["remaining_authorized_amount"]) == ("EXPIRED", 0)
    answer = await call(session, "POST", f"/{order_id}/extend-authorization-time")
    assert "is expired" in expect_error(answer, 403, "NOT_ALLOWED")
    assert order["expires_at"] == held.expires_at


async def test_a_part_captured_order_expires_but_stays_refundable(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    await capture_id(session, order_id, 600)
    fake.advance_clock(29 * DAY)
    order = await get_order(session, order_id)
    assert (order["status"], order["remaining_authorized_amount"]) == ("EXPIRED", 0)
    refund = await call(session, "POST", f"/{order_id}/refunds", {"refunded_amount": 600})
    assert refund.status == 201


async def test_fully_captured_and_released_orders_never_expire(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    captured = fake.add_order(amount=1000)
    released = fake.add_order(amount=1000)
    await capture_id(session, captured, 1000)
    await capture_id(session, released, 10)
    expect_no_content(await call(session, "POST", f"/{released}/release-remaining-authorization"))
    fake.advance_clock(60 * DAY)
    assert fake.order(captured).status == fake.order(released).status == "CAPTURED"


async def test_extend_moves_expires_at_to_28_days_after_today(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    order = fake.order(order_id)
    created = parse(order.created_at)
    fake.advance_clock(10 * DAY)
    days = [(fake.now().date() - created.date()).days + 28]
    expect_no_content(await call(session, "POST", f"/{order_id}/extend-authorization-time"))
    days.append((fake.now().date() - created.date()).days + 28)  # midnight may pass meanwhile
    assert parse(order.expires_at) in {created + datetime.timedelta(days=d) for d in days}
    first = order.expires_at
    fake.advance_clock(1)  # later the same day (or just past midnight, see above)
    if fake.now().date() == parse(first).date() - datetime.timedelta(days=28):
        expect_no_content(await call(session, "POST", f"/{order_id}/extend-authorization-time"))
        assert order.expires_at == first
    assert (await get_order(session, order_id))["expires_at"] == order.expires_at
    # Past the old expiry the order can still be captured.
    fake.advance_clock(20 * DAY)
    assert (await capture(session, order_id, 100)).status == 201
    assert order.operations.count("extendAuthorizationTime") >= 1


async def test_an_extension_on_the_day_of_creation_changes_nothing(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    order = fake.order(order_id)
    before = order.expires_at
    if fake.now().date() == parse(order.created_at).date():
        expect_no_content(await call(session, "POST", f"/{order_id}/extend-authorization-time"))
        expect_no_content(await call(session, "POST", f"/{order_id}/extend-authorization-time"))
        assert order.expires_at == before


async def test_extensions_stop_at_180_days_after_creation(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    order = fake.order(order_id)
    cap = parse(order.created_at) + datetime.timedelta(days=180)
    for _ in range(8):  # 8 x 20 days, each extension before the last one ran out
        fake.advance_clock(20 * DAY)
        expect_no_content(await call(session, "POST", f"/{order_id}/extend-authorization-time"))
        assert parse(order.expires_at) <= cap
    assert parse(order.expires_at) == cap
    assert order.status == "AUTHORIZED"
    fake.advance_clock(cap.timestamp() - fake.now().timestamp() + 1)
    assert order.status == "EXPIRED"


@pytest.mark.parametrize("status", ["CANCELLED", "CLOSED"])
async def test_extend_of_a_cancelled_or_closed_order_is_not_allowed(
    fake: FakeKlarna, session: aiohttp.ClientSession, status: str
) -> None:
    order_id = fake.add_order(amount=1000, status=status)
    answer = await call(session, "POST", f"/{order_id}/extend-authorization-time")
    assert f"is {status.lower()}" in expect_error(answer, 403, "NOT_ALLOWED")


# -- cancel ------------------------------------------------------------------------------------


async def test_cancel_before_any_capture(fake: FakeKlarna, session: aiohttp.ClientSession) -> None:
    order_id = fake.add_order(amount=1000)
    expect_no_content(await call(session, "POST", f"/{order_id}/cancel"))
    order = await get_order(session, order_id)
    assert (order["status"], order["remaining_authorized_amount"]) == ("CANCELLED", 0)
    assert fake.order(order_id).cancelled_at is not None
    message = expect_error(await capture(session, order_id, 1), 403, "CAPTURE_NOT_ALLOWED")
    assert message == f"Order {order_id} is cancelled. Capture not possible."
    again = await call(session, "POST", f"/{order_id}/cancel")
    assert "is cancelled" in expect_error(again, 403, "CANCEL_NOT_ALLOWED")


async def test_cancel_after_a_capture_is_cancel_not_allowed(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    await capture_id(session, order_id, 100)
    message = expect_error(
        await call(session, "POST", f"/{order_id}/cancel"), 403, "CANCEL_NOT_ALLOWED"
    )
    assert message == "Order has previous captures. Cancel not possible."
    assert fake.order(order_id).status == "PART_CAPTURED"


@pytest.mark.parametrize("status", ["EXPIRED", "CLOSED"])
async def test_cancel_of_an_expired_or_closed_order_is_not_allowed(
    fake: FakeKlarna, session: aiohttp.ClientSession, status: str
) -> None:
    order_id = fake.add_order(amount=1000, status=status)
    answer = await call(session, "POST", f"/{order_id}/cancel")
    expect_error(answer, 403, "CANCEL_NOT_ALLOWED")


async def test_a_replayed_cancel_is_the_first_204(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    expect_no_content(await call(session, "POST", f"/{order_id}/cancel", key="c"))
    expect_no_content(await call(session, "POST", f"/{order_id}/cancel", key="c"))
    assert fake.order(order_id).operations == ["cancelOrder"]


# -- acknowledge -------------------------------------------------------------------------------


async def test_acknowledge_records_the_first_time(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    assert fake.order(order_id).acknowledged_at is None
    expect_no_content(await call(session, "POST", f"/{order_id}/acknowledge"))
    first = fake.order(order_id).acknowledged_at
    assert first is not None
    fake.advance_clock(60)
    expect_no_content(await call(session, "POST", f"/{order_id}/acknowledge"))
    assert fake.order(order_id).acknowledged_at == first
    assert fake.order(order_id).operations == ["acknowledgeOrder"] * 2


# -- update authorization ----------------------------------------------------------------------


async def test_update_authorization_changes_the_amount_and_lines_not_the_original(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=10000)
    body = {"order_amount": 6000, "description": "Removed a charger", "order_lines": [TOMATOES]}
    expect_no_content(await call(session, "PATCH", f"/{order_id}/authorization", body))
    order = await get_order(session, order_id)
    assert (order["order_amount"], order["original_order_amount"]) == (6000, 10000)
    assert order["remaining_authorized_amount"] == 6000
    assert order["order_lines"] == [TOMATOES]
    assert fake.order(order_id).original_order_amount == 10000
    expect_error(await capture(session, order_id, 6001), 403, "CAPTURE_NOT_ALLOWED")
    # An increase is allowed with the default payment method (pay later, INVOICE).
    body = {"order_amount": 12000}
    expect_no_content(await call(session, "PATCH", f"/{order_id}/authorization", body))
    order = await get_order(session, order_id)
    assert (order["order_amount"], order["original_order_amount"]) == (12000, 10000)
    assert order["order_lines"] == []  # none sent: Klarna deletes the old ones
    assert (await capture(session, order_id, 12000)).status == 201


async def test_update_authorization_down_to_the_captured_amount_completes_the_order(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    await capture_id(session, order_id, 400)
    expect_no_content(
        await call(session, "PATCH", f"/{order_id}/authorization", {"order_amount": 400})
    )
    order = await get_order(session, order_id)
    assert (order["status"], order["remaining_authorized_amount"]) == ("CAPTURED", 0)


@pytest.mark.parametrize(("refunded", "status"), [(400, "CLOSED"), (100, "CAPTURED")])
async def test_update_authorization_down_to_a_refunded_capture_closes_the_order_as_release_does(
    fake: FakeKlarna, session: aiohttp.ClientSession, refunded: int, status: str
) -> None:
    """Nothing left to capture and nothing to refund is CLOSED, whatever the order of the
    operations that got there (release, a refund, or this update last)."""
    order_id = fake.add_order(amount=1000)
    await capture_id(session, order_id, 400)
    refund = await call(session, "POST", f"/{order_id}/refunds", {"refunded_amount": refunded})
    assert refund.status == 201
    expect_no_content(
        await call(session, "PATCH", f"/{order_id}/authorization", {"order_amount": 400})
    )
    order = await get_order(session, order_id)
    assert (order["status"], order["remaining_authorized_amount"]) == (status, 0)
    assert fake.order(order_id).refundable_amount == 400 - refunded


async def test_update_authorization_below_the_captured_amount_is_not_allowed(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    await capture_id(session, order_id, 400)
    answer = await call(session, "PATCH", f"/{order_id}/authorization", {"order_amount": 399})
    assert "lower than the captured amount 400" in expect_error(answer, 403, "NOT_ALLOWED")
    assert fake.order(order_id).order_amount == 1000


async def test_an_increase_needs_a_payment_method_that_allows_it(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000, payment_method="CARD")
    assert (await get_order(session, order_id))["initial_payment_method"]["type"] == "CARD"
    answer = await call(session, "PATCH", f"/{order_id}/authorization", {"order_amount": 1001})
    assert "CARD" in expect_error(answer, 403, "NOT_ALLOWED")
    decrease = await call(session, "PATCH", f"/{order_id}/authorization", {"order_amount": 999})
    expect_no_content(decrease)


@pytest.mark.parametrize(
    ("status", "word"),
    [
        ("CAPTURED", "fully captured"),
        ("CANCELLED", "cancelled"),
        ("EXPIRED", "expired"),
        ("CLOSED", "closed"),
    ],
)
async def test_update_authorization_of_a_finished_order_is_not_allowed(
    fake: FakeKlarna, session: aiohttp.ClientSession, status: str, word: str
) -> None:
    order_id = fake.add_order(amount=1000, status=status)
    answer = await call(session, "PATCH", f"/{order_id}/authorization", {"order_amount": 500})
    assert f"is {word}" in expect_error(answer, 403, "NOT_ALLOWED")


async def test_update_authorization_of_a_released_order_is_not_allowed(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    await capture_id(session, order_id, 100)
    expect_no_content(await call(session, "POST", f"/{order_id}/release-remaining-authorization"))
    answer = await call(session, "PATCH", f"/{order_id}/authorization", {"order_amount": 2000})
    expect_error(answer, 403, "NOT_ALLOWED")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "order_amount"),
        ({"order_amount": "100"}, "order_amount"),
        ({"order_amount": True}, "order_amount"),
        ({"order_amount": -1}, "order_amount"),
        ({"order_amount": 200_000_001}, "order_amount"),
        ({"order_amount": 1, "description": "x" * 256}, "description"),
        ({"order_amount": 1, "order_lines": {}}, "order_lines"),
        ({"order_amount": 1, "order_lines": [{"name": "x"}]}, "order_lines[0].quantity"),
        ({"order_amount": 1, "order_lines": [{**TOMATOES, "name": 3}]}, "order_lines[0].name"),
    ],
)
async def test_a_bad_authorization_body_is_bad_value(
    fake: FakeKlarna, session: aiohttp.ClientSession, body: dict[str, Any], field: str
) -> None:
    order_id = fake.add_order(amount=1000)
    answer = await call(session, "PATCH", f"/{order_id}/authorization", body)
    assert f"Bad value: {field}" in expect_error(answer, 400, "BAD_VALUE")
    assert fake.order(order_id).operations == []


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]"])
async def test_a_body_that_is_not_a_json_object_is_bad_value(
    fake: FakeKlarna, session: aiohttp.ClientSession, raw: bytes
) -> None:
    order_id = fake.add_order(amount=1000)
    for path in ("/authorization", "/merchant-references", "/customer-details"):
        answer = await call(session, "PATCH", f"/{order_id}{path}", raw=raw)
        expect_error(answer, 400, "BAD_VALUE")


# -- merchant references -----------------------------------------------------------------------


async def test_merchant_references_overwrite_only_the_fields_sent(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000, reference="shop-1")
    body = {"merchant_reference2": "erp-9"}
    expect_no_content(await call(session, "PATCH", f"/{order_id}/merchant-references", body))
    order = await get_order(session, order_id)
    assert (order["merchant_reference1"], order["merchant_reference2"]) == ("shop-1", "erp-9")
    body = {"merchant_reference1": "shop-2"}
    expect_no_content(await call(session, "PATCH", f"/{order_id}/merchant-references", body))
    held = fake.order(order_id)
    assert (held.merchant_reference1, held.merchant_reference2) == ("shop-2", "erp-9")
    expect_no_content(await call(session, "PATCH", f"/{order_id}/merchant-references", {}))
    assert (held.merchant_reference1, held.merchant_reference2) == ("shop-2", "erp-9")


async def test_merchant_references_of_a_cancelled_order_are_not_allowed(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000, status="CANCELLED")
    body = {"merchant_reference1": "x"}
    answer = await call(session, "PATCH", f"/{order_id}/merchant-references", body)
    assert "cancelled" in expect_error(answer, 403, "NOT_ALLOWED")
    assert fake.order(order_id).merchant_reference1 is None


@pytest.mark.parametrize(
    "body",
    [{"merchant_reference1": "x" * 256}, {"merchant_reference2": 7}, {"merchant_reference1": []}],
)
async def test_bad_merchant_references_are_bad_value(
    fake: FakeKlarna, session: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    order_id = fake.add_order(amount=1000)
    answer = await call(session, "PATCH", f"/{order_id}/merchant-references", body)
    [field] = body
    assert f"Bad value: {field}" in expect_error(answer, 400, "BAD_VALUE")


# -- customer details (the shipping address) ---------------------------------------------------


async def test_customer_details_merge_into_the_shipping_address(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    before = await capture_id(session, order_id, 100)
    old = dict(fake.order(order_id).shipping_address)
    address = {"street_address": "Sveavägen 46", "postal_code": "11134", "region": ""}
    body = {"shipping_address": {**address, "city": "Stockholm", "country": "SE", "x": 1}}
    expect_no_content(await call(session, "PATCH", f"/{order_id}/customer-details", body))
    order = await get_order(session, order_id)
    expected = {**old, **address, "city": "Stockholm", "country": "SE"}
    del expected["region"]  # "" clears a field
    assert order["shipping_address"] == expected == fake.order(order_id).shipping_address
    assert order["billing_address"] == old  # untouched
    after = await capture_id(session, order_id, 100)
    shipped = {c["capture_id"]: c["shipping_address"] for c in order["captures"]}
    assert shipped[before] == old
    capture = await call(session, "GET", f"/{order_id}/captures/{after}")
    assert capture.json()["shipping_address"] == expected
    expect_no_content(await call(session, "PATCH", f"/{order_id}/customer-details", {}))
    assert fake.order(order_id).shipping_address == expected


async def test_the_billing_address_cannot_be_updated(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    body = {"billing_address": {"city": "Oslo"}, "shipping_address": {"city": "Oslo"}}
    answer = await call(session, "PATCH", f"/{order_id}/customer-details", body)
    assert expect_error(answer, 403, "NOT_ALLOWED") == "Billing address cannot be updated."
    assert fake.order(order_id).shipping_address["city"] == "New York"


@pytest.mark.parametrize("status", ["CANCELLED", "EXPIRED", "CLOSED"])
async def test_customer_details_of_a_final_order_are_not_allowed(
    fake: FakeKlarna, session: aiohttp.ClientSession, status: str
) -> None:
    order_id = fake.add_order(amount=1000, status=status)
    body = {"shipping_address": {"city": "Oslo"}}
    answer = await call(session, "PATCH", f"/{order_id}/customer-details", body)
    expect_error(answer, 403, "NOT_ALLOWED")


@pytest.mark.parametrize(
    ("address", "field"),
    [
        ("Oslo", "shipping_address"),
        ({"postal_code": "12345678901"}, "shipping_address.postal_code"),
        ({"title": "x" * 21}, "shipping_address.title"),
        ({"city": 5}, "shipping_address.city"),
        ({"country": "SWE"}, "shipping_address.country"),
        ({"country": "12"}, "shipping_address.country"),
    ],
)
async def test_a_bad_shipping_address_is_bad_value(
    fake: FakeKlarna, session: aiohttp.ClientSession, address: object, field: str
) -> None:
    order_id = fake.add_order(amount=1000)
    body = {"shipping_address": address}
    answer = await call(session, "PATCH", f"/{order_id}/customer-details", body)
    assert f"Bad value: {field}" in expect_error(answer, 400, "BAD_VALUE")


# -- order-level shipping info -----------------------------------------------------------------


async def test_order_shipping_info_is_appended_and_read_back(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    assert (await get_order(session, order_id))["shipping_info"] == []
    second = {**SHIPPING_INFO, "tracking_number": "2"}
    for item in (SHIPPING_INFO, second):
        body = {"shipping_info": [item]}
        expect_no_content(await call(session, "POST", f"/{order_id}/shipping-info", body))
    assert (await get_order(session, order_id))["shipping_info"] == [SHIPPING_INFO, second]
    assert fake.order(order_id).shipping_info == [SHIPPING_INFO, second]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"shipping_info": []},
        {"shipping_info": [SHIPPING_INFO] * 501},
        {"shipping_info": [{"shipping_method": "Teleport"}]},
        {"shipping_info": [{"tracking_number": "1" * 101}]},
    ],
)
async def test_bad_order_shipping_info_is_bad_value(
    fake: FakeKlarna, session: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    order_id = fake.add_order(amount=1000)
    answer = await call(session, "POST", f"/{order_id}/shipping-info", body)
    assert "shipping_info" in expect_error(answer, 400, "BAD_VALUE")


# -- a capture's due date ----------------------------------------------------------------------


async def test_due_date_options_and_extension(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000, currency="SEK")
    found = await capture_id(session, order_id, 1000)
    path = f"/{order_id}/captures/{found}"
    options = await call(session, "GET", path + "/extend-due-date-options")
    assert options.status == 200
    assert options.json() == {
        "currency": "SEK",
        "options": [
            {"number_of_days": 7, "amount": 195},
            {"number_of_days": 14, "amount": 295},
            {"number_of_days": 28, "amount": 495},
        ],
    }
    expect_no_content(
        await call(session, "PATCH", path + "/extend-due-date", {"number_of_days": 14})
    )
    expect_no_content(
        await call(session, "PATCH", path + "/extend-due-date", {"number_of_days": 7})
    )
    [booked] = fake.captures(order_id)
    assert booked.due_date_extensions == [14, 7]
    assert (booked.due_date_extended_by, booked.due_date_fees) == (21, 490)
    answer = await call(session, "PATCH", path + "/extend-due-date", {"number_of_days": 10})
    assert "options: [7, 14, 28]" in expect_error(answer, 403, "NOT_ALLOWED")
    assert booked.due_date_extensions == [14, 7]


async def test_due_dates_extend_only_for_pay_later_methods(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000, payment_method="CARD")
    found = await capture_id(session, order_id, 1000)
    path = f"/{order_id}/captures/{found}"
    options = await call(session, "GET", path + "/extend-due-date-options")
    assert options.json() == {"currency": "EUR", "options": []}
    answer = await call(session, "PATCH", path + "/extend-due-date", {"number_of_days": 14})
    expect_error(answer, 403, "NOT_ALLOWED")


@pytest.mark.parametrize(
    "body", [{}, {"number_of_days": "14"}, {"number_of_days": -1}, {"number_of_days": 1.5}]
)
async def test_a_bad_due_date_body_is_bad_value(
    fake: FakeKlarna, session: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    order_id = fake.add_order(amount=1000)
    found = await capture_id(session, order_id, 1000)
    answer = await call(session, "PATCH", f"/{order_id}/captures/{found}/extend-due-date", body)
    assert "Bad value: number_of_days" in expect_error(answer, 400, "BAD_VALUE")


async def test_due_dates_of_an_unknown_capture_are_no_such_capture(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    path = f"/{order_id}/captures/nope"
    answer = await call(session, "PATCH", path + "/extend-due-date", {"number_of_days": 14})
    expect_error(answer, 404, "NO_SUCH_CAPTURE")
    expect_error(
        await call(session, "GET", path + "/extend-due-date-options"), 404, "NO_SUCH_CAPTURE"
    )
    answer = await call(session, "GET", "/nope/captures/nope/extend-due-date-options")
    expect_error(answer, 404, "NO_SUCH_ORDER")


# -- the order's shape and the inspection API --------------------------------------------------


async def test_the_order_reads_back_the_new_fields_in_the_specs_names(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    order = await get_order(session, order_id)
    assert "merchant_reference2" not in order  # the spec's strings are not nullable
    assert order["initial_payment_method"] == {"type": "INVOICE", "description": "Pay later"}
    assert order["shipping_info"] == []
    assert set(order["shipping_address"]) >= {"street_address", "postal_code", "city", "country"}
    assert order["billing_address"] == order["shipping_address"]


def test_add_order_validates_the_payment_method(fake: FakeKlarna) -> None:
    with pytest.raises(ValueError, match="unknown payment method 'CHEQUE'"):
        fake.add_order(amount=1, payment_method="CHEQUE")
    assert fake.order(fake.add_order(amount=1, payment_method="SWISH")).payment_method == "SWISH"


async def test_capture_level_updates_are_counted_in_the_orders_operations(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=1000)
    found = await capture_id(session, order_id, 1000)
    path = f"/{order_id}/captures/{found}"
    expect_no_content(await call(session, "POST", path + "/trigger-send-out"))
    body = {"shipping_info": [SHIPPING_INFO]}
    expect_no_content(await call(session, "POST", path + "/shipping-info", body))
    assert fake.order(order_id).operations == ["triggerSendOut", "appendShippingInfo"]
