"""Refunds through the whole client, against FakeKlarna over loopback: create and read,
Klarna's refusals, exactly-once under lost answers, the order's refunded amount and status,
and the request model's validation."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import aiohttp
import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import klarna_om_async
from klarna_om_async import (
    BadRequestError,
    CaptureNotAllowedError,
    CaptureRequest,
    KlarnaOM,
    KlarnaResponseError,
    NoSuchOrderError,
    NoSuchRefundError,
    NotAllowedError,
    NotFoundError,
    OrderLine,
    OrderLineType,
    OrderStatus,
    Refund,
    RefundCreated,
    RefundNotAllowedError,
    RefundRequest,
    Request,
    Response,
    RetryPolicy,
    ServerError,
    ValidationError,
    new_idempotency_key,
)
from klarna_om_async._convert import converter, to_json
from klarna_om_async.errors import decode_error
from klarna_om_async.middleware import Handler
from klarna_om_async.refunds import RefundsService
from klarna_om_async.testing import (
    REPLAYED_HEADER,
    Delay,
    DropAfterProcessing,
    DropConnection,
    FakeKlarna,
    FakeRefund,
    InstantSleep,
    NonJsonError,
    ServerFailure,
)

MAX_AMOUNT = 200_000_000
KLARNA_DOCS = "https://docs.klarna.com/api/ordermanagement/"
TOMATOES = OrderLine(
    type=OrderLineType.PHYSICAL,
    reference="123050",
    name="Tomatoes",
    quantity=10,
    quantity_unit="kg",
    unit_price=600,
    tax_rate=2500,
    total_amount=6000,
    total_tax_amount=1200,
)


def refund_posts(fake: FakeKlarna) -> list[str | None]:
    """The idempotency keys of the refund POSTs the fake received, in order."""
    return [
        r.idempotency_key
        for r in fake.requests
        if r.method == "POST" and r.path.endswith("/refunds")
    ]


async def captured_order(om: KlarnaOM, fake: FakeKlarna, amount: int, captured: int) -> str:
    """An order of ``amount`` with ``captured`` of it captured through the client."""
    order_id = fake.add_order(amount=amount)
    await om.captures.create(order_id, CaptureRequest(captured_amount=captured))
    return order_id


# -- create and read -------------------------------------------------------------------------


async def test_a_refund_returns_its_id_and_location_from_the_201s_headers(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = await captured_order(om, fake, 10_000, 6000)
    created = await om.refunds.create(
        order_id,
        RefundRequest(
            refunded_amount=6000,
            reference="RMA-1",
            description="Returned the tomatoes",
            order_lines=[TOMATOES],
        ),
    )
    [booked] = fake.refunds(order_id)
    assert isinstance(created, RefundCreated)
    assert created.refund_id == booked.refund_id
    assert created.location == (
        f"{fake.base_url}/ordermanagement/v1/orders/{order_id}/refunds/{booked.refund_id}"
    )
    assert created.idempotency_key == booked.idempotency_key
    assert created.attempts == 1
    [wire] = [r for r in fake.requests if r.path.endswith("/refunds")]
    assert wire.status == 201
    assert wire.headers["Content-Type"] == "application/json"
    assert wire.idempotency_key == created.idempotency_key
    assert wire.json() == {
        "refunded_amount": 6000,
        "description": "Returned the tomatoes",
        "reference": "RMA-1",
        "order_lines": [
            {
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
        ],
    }
    assert fake.booked_refunds == [booked]


async def test_unset_optional_fields_are_absent_from_the_body_never_null(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = await captured_order(om, fake, 1000, 1000)
    await om.refunds.create(order_id, RefundRequest(refunded_amount=250))
    wire = fake.requests[-1]
    assert wire.body == b'{"refunded_amount":250}'
    assert b"null" not in wire.body


async def test_get_reads_the_refund_back(om: KlarnaOM, fake: FakeKlarna) -> None:
    order_id = await captured_order(om, fake, 10_000, 10_000)
    created = await om.refunds.create(
        order_id,
        RefundRequest(refunded_amount=2500, reference="RMA-7", order_lines=[TOMATOES]),
    )
    refund = await om.refunds.get(order_id, created.refund_id)
    assert isinstance(refund, Refund)
    assert refund.refund_id == created.refund_id
    assert refund.refunded_amount == 2500
    assert refund.reference == "RMA-7"
    assert refund.description is None
    assert refund.order_lines == (TOMATOES,)
    assert refund.refunded_at is not None
    assert refund.refunded_at.tzinfo is not None
    wire = fake.requests[-1]
    assert (wire.method, wire.status, wire.idempotency_key) == ("GET", 200, None)


async def test_the_order_shows_its_refunds_and_refunded_amount(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=10_000)
    await om.captures.create(order_id, CaptureRequest(captured_amount=3000))
    await om.captures.create(order_id, CaptureRequest(captured_amount=5000))
    first = await om.refunds.create(order_id, RefundRequest(refunded_amount=1000))
    second = await om.refunds.create(
        order_id, RefundRequest(refunded_amount=2500, description="Damaged")
    )
    order = await om.orders.get(order_id)
    assert order.refunded_amount == 3500
    assert order.captured_amount == 8000
    assert order.remaining_authorized_amount == 2000
    assert order.status is OrderStatus.PART_CAPTURED
    assert [(r.refund_id, r.refunded_amount) for r in order.refunds or ()] == [
        (first.refund_id, 1000),
        (second.refund_id, 2500),
    ]
    assert (order.refunds or ())[1].description == "Damaged"
    # The fake spreads refunds over the captures, oldest first.
    assert [c.refunded_amount for c in order.captures or ()] == [3000, 500]


async def test_a_full_refund_of_a_fully_captured_order_closes_it(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = await captured_order(om, fake, 6000, 6000)
    await om.refunds.create(order_id, RefundRequest(refunded_amount=4000))
    assert (await om.orders.get(order_id)).status is OrderStatus.CAPTURED
    await om.refunds.create(order_id, RefundRequest(refunded_amount=2000))
    order = await om.orders.get(order_id)
    assert order.status is OrderStatus.CLOSED
    assert (order.captured_amount, order.refunded_amount) == (6000, 6000)
    assert order.remaining_authorized_amount == 0
    with pytest.raises(CaptureNotAllowedError, match="closed"):
        await om.captures.create(order_id, CaptureRequest(captured_amount=0))


async def test_refunding_all_captured_while_authorization_is_left_keeps_the_order_open(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = await captured_order(om, fake, 6000, 2000)
    await om.refunds.create(order_id, RefundRequest(refunded_amount=2000))
    order = await om.orders.get(order_id)
    assert order.status is OrderStatus.PART_CAPTURED
    assert order.remaining_authorized_amount == 4000
    # What is left can still be captured, and then refunded.
    await om.captures.create(order_id, CaptureRequest(captured_amount=4000))
    await om.refunds.create(order_id, RefundRequest(refunded_amount=4000))
    assert (await om.orders.get(order_id)).status is OrderStatus.CLOSED


async def test_a_refund_of_0_is_accepted_by_client_and_fake_and_moves_nothing(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # RefundObject: refunded_amount minimum 0, as for captures.
    order_id = await captured_order(om, fake, 100, 100)
    created = await om.refunds.create(order_id, RefundRequest(refunded_amount=0))
    assert (await om.refunds.get(order_id, created.refund_id)).refunded_amount == 0
    order = await om.orders.get(order_id)
    assert (order.status, order.refunded_amount) == (OrderStatus.CAPTURED, 0)


async def test_surrounding_spaces_are_trimmed_from_ids(om: KlarnaOM, fake: FakeKlarna) -> None:
    order_id = await captured_order(om, fake, 100, 100)
    created = await om.refunds.create(f" {order_id}\t", RefundRequest(refunded_amount=40))
    refund = await om.refunds.get(f"  {order_id}", f" {created.refund_id} ")
    assert refund.refunded_amount == 40
    orders = "/ordermanagement/v1/orders"
    assert [r.path for r in fake.requests[1:]] == [
        f"{orders}/{order_id}/refunds",
        f"{orders}/{order_id}/refunds/{created.refund_id}",
    ]


# -- Klarna's refusals -----------------------------------------------------------------------


async def test_refunding_more_than_captured_and_not_refunded_is_refused_once(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = await captured_order(om, fake, 10_000, 5000)
    await om.refunds.create(order_id, RefundRequest(refunded_amount=3000))
    with pytest.raises(RefundNotAllowedError) as caught:
        await om.refunds.create(order_id, RefundRequest(refunded_amount=2001))
    error = caught.value
    assert isinstance(error, NotAllowedError)
    assert (error.status, error.error_code) == (403, "REFUND_NOT_ALLOWED")
    assert "2000" in str(error)
    assert error.correlation_id
    # Never retried, though the client would try 4 times: nothing was refunded.
    assert error.attempts == 1
    assert not error.outcome_unknown
    keys = refund_posts(fake)
    assert len(keys) == 2
    assert error.idempotency_key == keys[1]
    assert [r.refunded_amount for r in fake.booked_refunds] == [3000]
    # Exactly what is left still goes through.
    await om.refunds.create(order_id, RefundRequest(refunded_amount=2000))


@pytest.mark.parametrize("amount", [0, 1])
async def test_an_order_with_nothing_captured_cannot_be_refunded(
    om: KlarnaOM, fake: FakeKlarna, amount: int
) -> None:
    order_id = fake.add_order(amount=1000)
    with pytest.raises(RefundNotAllowedError, match="no captures") as caught:
        await om.refunds.create(order_id, RefundRequest(refunded_amount=amount))
    assert caught.value.attempts == 1
    assert len(refund_posts(fake)) == 1
    assert fake.booked_refunds == []
    assert fake.order(order_id).refunded_amount == 0


async def test_an_unknown_order_is_no_such_order_for_create_and_get(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    with pytest.raises(NoSuchOrderError):
        await om.refunds.create("no-such-order", RefundRequest(refunded_amount=1))
    with pytest.raises(NoSuchOrderError) as caught:
        await om.refunds.get("no-such-order", "r-1")
    assert caught.value.error_code == "NO_SUCH_ORDER"
    assert len(fake.requests) == 2


async def test_an_unknown_refund_is_no_such_refund_with_klarnas_answer(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=1000)
    with pytest.raises(NoSuchRefundError) as caught:
        await om.refunds.get(order_id, "no-such-refund")
    error = caught.value
    assert isinstance(error, NotFoundError)
    assert (error.status, error.error_code) == (404, "NOT_FOUND")
    assert error.error_messages == (f"Refund no-such-refund cannot be found on order {order_id}",)
    assert error.correlation_id
    assert error.method == "GET"
    assert error.url == (
        f"{fake.base_url}/ordermanagement/v1/orders/{order_id}/refunds/no-such-refund"
    )
    assert (error.attempts, error.idempotency_key, error.outcome_unknown) == (1, None, False)
    assert "404 NOT_FOUND on GET" in str(error)
    assert "correlation_id=" in str(error)
    assert len(fake.requests) == 1


async def test_a_proxys_404_on_a_refund_read_is_no_such_refund_too(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(NonJsonError(404, "<html>Not Found</html>"), path="/refunds/")
    with pytest.raises(NoSuchRefundError) as caught:
        await om.refunds.get(order_id, "r-1")
    assert caught.value.error_code is None
    assert "Not Found" in str(caught.value)


async def test_a_body_klarna_rejects_is_a_bad_request_and_never_retried(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    async def corrupt(request: Request, call_next: Handler) -> Response:
        # Stands in for a body Klarna rejects that the model could not catch.
        return await call_next(attrs.evolve(request, body=b'{"refunded_amount": "100"}'))

    order_id = await captured_order(om, fake, 1000, 1000)
    async with KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, middlewares=[corrupt]
    ) as om:
        with pytest.raises(BadRequestError) as caught:
            await om.refunds.create(order_id, RefundRequest(refunded_amount=100))
    assert (caught.value.status, caught.value.error_code) == (400, "BAD_VALUE")
    assert "refunded_amount" in str(caught.value)
    assert not caught.value.outcome_unknown
    assert len(refund_posts(fake)) == 1
    assert fake.booked_refunds == []


async def test_bad_input_is_refused_before_anything_is_sent(om: KlarnaOM, fake: FakeKlarna) -> None:
    with pytest.raises(ValidationError, match="order_id"):
        await om.refunds.create(" ", RefundRequest(refunded_amount=1))
    with pytest.raises(ValidationError, match="refund_id"):
        await om.refunds.get("order", "")
    with pytest.raises(ValidationError, match="refund_id"):
        await om.refunds.get("order", "..")
    with pytest.raises(ValidationError, match="idempotency_key"):
        await om.refunds.create("order", RefundRequest(refunded_amount=1), idempotency_key=" k")
    with pytest.raises(TypeError, match="RefundRequest"):
        await om.refunds.create("order", CaptureRequest(captured_amount=1))  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as caught:
        RefundRequest(refunded_amount=-1)
    assert caught.value.field == "refunded_amount"
    assert fake.requests == []


# -- exactly once ----------------------------------------------------------------------------


async def test_a_lost_answer_is_retried_with_the_same_key_and_refunds_once(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = await captured_order(om, fake, 6000, 6000)
    fake.inject(DropAfterProcessing(), method="POST", path="/refunds")
    created = await om.refunds.create(order_id, RefundRequest(refunded_amount=6000))
    [booked] = fake.booked_refunds
    assert created.refund_id == booked.refund_id
    assert created.attempts == 2
    keys = refund_posts(fake)
    assert keys == [created.idempotency_key, created.idempotency_key]
    first, retry = [r for r in fake.requests if r.path.endswith("/refunds")]
    assert (first.status, retry.status) == (None, 201)
    assert retry.replayed
    assert fake.order(order_id).refunded_amount == 6000


async def test_a_dropped_connection_before_processing_is_retried(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = await captured_order(om, fake, 500, 500)
    fake.inject(DropConnection(), method="POST", path="/refunds", times=2)
    created = await om.refunds.create(order_id, RefundRequest(refunded_amount=500))
    assert created.attempts == 3
    assert len(fake.booked_refunds) == 1


async def test_a_read_timeout_after_booking_is_retried_with_the_same_key(
    fake: FakeKlarna, sleeps: InstantSleep
) -> None:
    order_id = fake.add_order(amount=6000)
    policy = RetryPolicy(max_attempts=3, jitter=lambda d: d, sleep=sleeps)
    async with KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, retry=policy, timeout=0.2
    ) as om:
        await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
        fake.inject(Delay(5, after_processing=True), method="POST", path="/refunds")
        created = await om.refunds.create(order_id, RefundRequest(refunded_amount=6000))
    [booked] = fake.booked_refunds
    assert created.refund_id == booked.refund_id
    assert created.attempts == 2


async def test_an_unknown_outcome_names_the_key_that_later_refunds_exactly_once(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = await captured_order(om, fake, 6000, 6000)
    fake.inject(DropAfterProcessing(), method="POST", path="/refunds")
    fake.inject(ServerFailure(503), method="POST", path="/refunds", times=3)
    request = RefundRequest(refunded_amount=6000, reference="RMA-9")
    with pytest.raises(ServerError) as caught:
        await om.refunds.create(order_id, request)
    error = caught.value
    assert error.attempts == 4
    assert error.outcome_unknown
    key = error.idempotency_key
    assert key is not None
    assert f"idempotency_key={key!r}" in str(error)
    [booked] = fake.booked_refunds  # the first attempt was booked; its answer was lost
    # The same key with another request is refused here, unsent.
    sent = len(fake.requests)
    with pytest.raises(ValidationError, match="idempotency_key"):
        await om.refunds.create(order_id, RefundRequest(refunded_amount=1), idempotency_key=key)
    assert len(fake.requests) == sent
    again = await om.refunds.create(order_id, request, idempotency_key=key)
    assert again.refund_id == booked.refund_id
    assert fake.requests[-1].replayed
    assert fake.booked_refunds == [booked]
    assert fake.order(order_id).refunded_amount == 6000


async def test_one_key_for_the_same_refund_twice_at_once_refunds_once(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = await captured_order(om, fake, 10_000, 10_000)
    key = new_idempotency_key()
    first, second = await asyncio.gather(
        om.refunds.create(order_id, RefundRequest(refunded_amount=1000), idempotency_key=key),
        om.refunds.create(order_id, RefundRequest(refunded_amount=1000), idempotency_key=key),
    )
    [booked] = fake.booked_refunds
    assert first.refund_id == second.refund_id == booked.refund_id


async def test_a_refund_and_a_capture_never_share_a_key(om: KlarnaOM, fake: FakeKlarna) -> None:
    order_id = fake.add_order(amount=1000)
    created = await om.captures.create(order_id, CaptureRequest(captured_amount=1000))
    with pytest.raises(ValidationError, match="idempotency_key"):
        await om.refunds.create(
            order_id,
            RefundRequest(refunded_amount=1000),
            idempotency_key=created.idempotency_key,
        )
    assert fake.booked_refunds == []


# -- the 201's refund id ---------------------------------------------------------------------


REFUNDS = "{origin}/ordermanagement/v1/orders/o1/refunds"


@pytest.mark.parametrize(
    ("headers", "refund_id"),
    [
        ({"Location": REFUNDS + "/ref-1?x=1#top"}, "ref-1"),
        ({"Location": "/ordermanagement/v1/orders/o1/refunds/ref%2F2"}, "ref/2"),
        ({"Refund-Id": "ref-3", "Location": "/foo/bar"}, "ref-3"),
        ({"Refund-Id": " ref-4 "}, "ref-4"),
    ],
)
async def test_the_refund_id_comes_from_refund_id_or_a_refund_location(
    answer_201: tuple[dict[str, str], KlarnaOM], headers: dict[str, str], refund_id: str
) -> None:
    sent, om = answer_201
    sent.update(headers)
    created = await om.refunds.create("o1", RefundRequest(refunded_amount=5))
    assert created.refund_id == refund_id
    assert created.location


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Location": REFUNDS},
        # Another order's refund, or a capture: a reused key (test_key_reuse.py).
        {"Location": "http://[::1"},
        {"Refund-Id": " ", "Location": REFUNDS + "/"},
        {"Capture-Id": "cap-1"},
    ],
)
async def test_a_201_without_a_refund_id_is_an_unknown_outcome_with_the_key(
    answer_201: tuple[dict[str, str], KlarnaOM], headers: dict[str, str]
) -> None:
    sent, om = answer_201
    sent.update(headers)
    key = new_idempotency_key()
    with pytest.raises(KlarnaResponseError) as caught:
        await om.refunds.create("o1", RefundRequest(refunded_amount=5), idempotency_key=key)
    error = caught.value
    assert (error.status, error.idempotency_key, error.attempts) == (201, key, 1)
    assert error.outcome_unknown
    assert "Refund-Id" in str(error)
    assert repr(key) in str(error)


async def test_a_refund_that_does_not_fit_the_model_is_a_response_error(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    async def corrupt(request: Request, call_next: Handler) -> Response:
        response = await call_next(request)
        return attrs.evolve(response, body=orjson.dumps({"refunded_amount": "lots"}))

    order_id = await captured_order(om, fake, 5, 5)
    created = await om.refunds.create(order_id, RefundRequest(refunded_amount=5))
    async with KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, middlewares=[corrupt]
    ) as corrupted:
        with pytest.raises(KlarnaResponseError, match="refunded_amount"):
            await corrupted.refunds.get(order_id, created.refund_id)


# -- FakeKlarna's refund endpoint, spoken to directly ----------------------------------------


async def post_refund(
    fake: FakeKlarna, order_id: str, body: bytes, key: str | None = None
) -> tuple[int, dict[str, Any], bytes]:
    headers = {"Authorization": fake.auth_header, "Content-Type": "application/json"}
    if key is not None:
        headers["Klarna-Idempotency-Key"] = key
    url = f"{fake.base_url}/ordermanagement/v1/orders/{order_id}/refunds"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as answer,
    ):
        return answer.status, dict(answer.headers), await answer.read()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "JSON"),
        (b"[]", "object"),
        (b"{}", "refunded_amount"),
        (b'{"refunded_amount": true}', "refunded_amount"),
        (b'{"refunded_amount": 200000001}', "refunded_amount"),
        (b'{"refunded_amount": -1}', "refunded_amount"),
        (b'{"refunded_amount": 1, "reference": "' + b"x" * 256 + b'"}', "reference"),
        (b'{"refunded_amount": 1, "description": 5}', "description"),
        (b'{"refunded_amount": 1, "order_lines": {}}', "order_lines"),
        (b'{"refunded_amount": 1, "order_lines": [{"name": "x"}]}', "order_lines[0].quantity"),
    ],
)
async def test_the_fake_answers_a_bad_refund_body_400_before_looking_at_the_order(
    fake: FakeKlarna, body: bytes, field: str
) -> None:
    status, _, answer = await post_refund(fake, "no-such-order", body)
    assert status == 400
    payload = orjson.loads(answer)
    assert payload["error_code"] == "BAD_VALUE"
    assert field in payload["error_messages"][0]


async def test_the_fake_replays_a_reused_key_even_with_another_body(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # Klarna: "only the key matters". The client refuses to do this; the fake shows why.
    order_id = await captured_order(om, fake, 1000, 1000)
    first = await post_refund(fake, order_id, b'{"refunded_amount": 100}', key="k-1")
    second = await post_refund(fake, order_id, b'{"refunded_amount": 900}', key="k-1")
    assert first[0] == second[0] == 201
    assert first[1]["Refund-Id"] == second[1]["Refund-Id"]
    assert second[1][REPLAYED_HEADER] == "true"
    [booked] = fake.booked_refunds
    assert booked.refunded_amount == 100
    assert booked.idempotency_key == "k-1"
    assert fake.requests[-1].replayed


async def test_the_fake_keeps_each_refund_readable(om: KlarnaOM, fake: FakeKlarna) -> None:
    order_id = await captured_order(om, fake, 1000, 1000)
    created = await om.refunds.create(order_id, RefundRequest(refunded_amount=400))
    [refund] = fake.refunds(order_id)
    assert isinstance(refund, FakeRefund)
    assert (refund.order_id, refund.refund_id, refund.refunded_amount) == (
        order_id,
        created.refund_id,
        400,
    )
    assert refund.refunded_at.endswith("Z")
    assert fake.order(order_id).refunds == [refund]
    assert fake.order(order_id).refundable_amount == 600
    with pytest.raises(KeyError):
        fake.refunds("no-such-order")


# -- errors and names ------------------------------------------------------------------------


def test_refund_errors_are_public_and_sit_under_their_status_classes() -> None:
    for name in (
        "RefundRequest",
        "RefundCreated",
        "RefundNotAllowedError",
        "NoSuchRefundError",
    ):
        assert name in klarna_om_async.__all__
    assert issubclass(RefundNotAllowedError, NotAllowedError)
    assert issubclass(NoSuchRefundError, NotFoundError)
    body = orjson.dumps({"error_code": "REFUND_NOT_ALLOWED", "error_messages": ["no"]})
    assert type(decode_error(403, {}, body)) is RefundNotAllowedError
    # A code only refines its own status.
    assert type(decode_error(503, {}, body)) is ServerError


def test_the_refund_calls_name_units_errors_and_klarnas_docs() -> None:
    create = inspect.getdoc(RefundsService.create) or ""
    for word in (
        "ValidationError",
        "RefundNotAllowedError",
        "NoSuchOrderError",
        "AuthenticationError",
        "KlarnaConnectionError",
        "KlarnaTimeoutError",
        "KlarnaResponseError",
        "ServerError",
        "``int`` minor units",
        f"{KLARNA_DOCS}#operation/refundOrder",
    ):
        assert word in create
    for field in attrs.fields(RefundCreated):
        assert f"``{field.name}``" in create
    get = inspect.getdoc(RefundsService.get) or ""
    for word in ("NoSuchRefundError", "NoSuchOrderError", "minor units", KLARNA_DOCS):
        assert word in get
    request = inspect.getdoc(RefundRequest) or ""
    for field in attrs.fields(RefundRequest):
        assert f"- ``{field.name}``:" in request
    assert "``refunded_amount``: ``int`` minor units" in request


# -- RefundRequest validation (hypothesis) ---------------------------------------------------

modest = settings(max_examples=60, deadline=None)
short_text = st.text(max_size=255)
lines = st.lists(st.just(TOMATOES), max_size=3)


@modest
@given(
    amount=st.integers(0, MAX_AMOUNT),
    description=st.none() | short_text,
    reference=st.none() | short_text,
    order_lines=st.none() | lines,
)
def test_a_valid_refund_request_is_accepted_and_sent_as_given(
    amount: int, description: str | None, reference: str | None, order_lines: list[OrderLine] | None
) -> None:
    request = RefundRequest(
        refunded_amount=amount,
        description=description,
        reference=reference,
        order_lines=order_lines,
    )
    sent = orjson.loads(to_json(request))
    expected: dict[str, object] = {"refunded_amount": amount}
    if description is not None:
        expected["description"] = description
    if reference is not None:
        expected["reference"] = reference
    if order_lines is not None:
        expected["order_lines"] = [converter.unstructure(line) for line in order_lines]
    assert sent == expected
    strict = converter.copy(forbid_extra_keys=True)
    assert strict.structure(sent, RefundRequest) == request


@modest
@given(amount=st.integers(max_value=-1) | st.integers(min_value=MAX_AMOUNT + 1))
def test_an_amount_out_of_range_is_refused_naming_the_field(amount: int) -> None:
    with pytest.raises(ValidationError) as caught:
        RefundRequest(refunded_amount=amount)
    assert caught.value.field == "refunded_amount"
    assert str(amount) in str(caught.value)


@modest
@given(amount=st.booleans() | st.floats(allow_nan=True) | st.integers().map(str) | st.none())
def test_an_amount_that_is_not_an_int_is_refused_naming_the_field(amount: object) -> None:
    with pytest.raises(ValidationError) as caught:
        RefundRequest(refunded_amount=amount)  # type: ignore[arg-type]
    assert caught.value.field == "refunded_amount"


@pytest.mark.parametrize("field", ["description", "reference"])
@modest
@given(extra=st.integers(1, 300))
def test_a_too_long_string_is_refused_naming_the_field(field: str, extra: int) -> None:
    RefundRequest(refunded_amount=1, **{field: "é" * 255})
    with pytest.raises(ValidationError) as caught:
        RefundRequest(refunded_amount=1, **{field: "x" * (255 + extra)})
    assert caught.value.field == field
    assert "at most 255 characters" in str(caught.value)


@modest
@given(line_type=st.text().filter(lambda s: s not in set(OrderLineType)))
def test_an_order_line_of_an_unknown_type_is_refused_naming_the_line(line_type: str) -> None:
    line = attrs.evolve(TOMATOES, type=line_type)
    with pytest.raises(ValidationError) as caught:
        RefundRequest(refunded_amount=1, order_lines=[TOMATOES, line])
    assert caught.value.field == "order_lines[1].type"


def test_more_than_1000_order_lines_are_refused() -> None:
    RefundRequest(refunded_amount=1, order_lines=[TOMATOES] * 1000)
    with pytest.raises(ValidationError) as caught:
        RefundRequest(refunded_amount=1, order_lines=[TOMATOES] * 1001)
    assert caught.value.field == "order_lines"
    with pytest.raises(ValidationError, match="order_lines"):
        RefundRequest(refunded_amount=1, order_lines="Tomatoes")  # type: ignore[arg-type]


def test_refund_values_are_plain_and_frozen() -> None:
    created = RefundCreated(refund_id="r1", location="https://x/r1", idempotency_key="k")
    assert created == RefundCreated(refund_id="r1", location="https://x/r1", idempotency_key="k")
    assert created.attempts == 1
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        RefundRequest(refunded_amount=1).refunded_amount = 2  # type: ignore[misc]
