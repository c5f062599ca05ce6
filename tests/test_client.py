"""Every capture-and-track call through the whole client, against FakeKlarna over loopback."""

from __future__ import annotations

import re

import aiohttp
import orjson
import pytest

from klarna_om_async import (
    AuthenticationError,
    CaptureNotAllowedError,
    CaptureRequest,
    KlarnaConnectionError,
    KlarnaOM,
    KlarnaResponseError,
    KlarnaTimeoutError,
    NoSuchCaptureError,
    NoSuchOrderError,
    OrderLine,
    OrderStatus,
    RateLimitError,
    Request,
    Response,
    RetryPolicy,
    ServerError,
    ShippingInfo,
    ShippingMethod,
    ValidationError,
)
from klarna_om_async.middleware import Handler
from klarna_om_async.testing import (
    Delay,
    DropAfterProcessing,
    DropConnection,
    FakeKlarna,
    InstantSleep,
    NonJsonError,
    RateLimited,
    ServerFailure,
)

TOMATOES = OrderLine(
    type="physical",
    reference="123050",
    name="Tomatoes",
    quantity=10,
    quantity_unit="kg",
    unit_price=600,
    tax_rate=2500,
    total_amount=6000,
    total_tax_amount=1200,
)


def capture_posts(fake: FakeKlarna) -> list[str | None]:
    """The idempotency keys of the capture POSTs the fake received, in order."""
    return [
        r.idempotency_key
        for r in fake.requests
        if r.method == "POST" and r.path.endswith("/captures")
    ]


async def test_full_capture_returns_the_id_and_location_from_the_headers(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=6000)
    created = await om.captures.create(
        order_id, CaptureRequest(captured_amount=6000, order_lines=[TOMATOES])
    )
    [booked] = fake.captures(order_id)
    assert created.capture_id == booked.capture_id
    assert created.location.endswith(f"/orders/{order_id}/captures/{booked.capture_id}")
    assert created.idempotency_key == booked.idempotency_key
    assert created.attempts == 1
    [wire] = [r for r in fake.requests if r.method == "POST"]
    assert wire.headers["Content-Type"] == "application/json"
    assert wire.json() == {
        "captured_amount": 6000,
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
    order = await om.orders.get(order_id)
    assert order.status is OrderStatus.CAPTURED
    assert order.remaining_authorized_amount == 0


async def test_partial_capture_leaves_the_rest_to_capture(om: KlarnaOM, fake: FakeKlarna) -> None:
    order_id = fake.add_order(amount=10000)
    created = await om.captures.create(
        order_id, CaptureRequest(captured_amount=2500, reference="part-1", description="Box 1")
    )
    order = await om.orders.get(order_id)
    assert order.status is OrderStatus.PART_CAPTURED
    assert order.captured_amount == 2500
    assert order.remaining_authorized_amount == 7500
    assert [c.capture_id for c in order.captures or ()] == [created.capture_id]

    capture = await om.captures.get(order_id, created.capture_id)
    assert capture.capture_id == created.capture_id
    assert capture.captured_amount == 2500
    assert capture.reference == "part-1"
    assert capture.captured_at is not None
    assert capture.captured_at.tzinfo is not None

    await om.captures.create(order_id, CaptureRequest(captured_amount=7500))
    listed = await om.captures.list(order_id)
    assert [c.captured_amount for c in listed] == [2500, 7500]
    assert (await om.orders.get(order_id)).status is OrderStatus.CAPTURED


async def test_add_shipping_info_sends_klarnas_body_and_the_capture_keeps_it(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=6000)
    created = await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
    info = ShippingInfo(
        shipping_company="DHL US",
        shipping_method=ShippingMethod.HOME,
        tracking_number="63456415674545679874",
        tracking_uri="http://shipping.example/findmypackage?63456415674545679874",
    )
    result = await om.captures.add_shipping_info(order_id, created.capture_id, [info])
    assert result is None
    wire = fake.requests[-1]
    assert wire.path.endswith("/shipping-info")
    assert wire.status == 204
    assert wire.idempotency_key is not None
    assert wire.json() == {
        "shipping_info": [
            {
                "shipping_company": "DHL US",
                "shipping_method": "Home",
                "tracking_number": "63456415674545679874",
                "tracking_uri": "http://shipping.example/findmypackage?63456415674545679874",
            }
        ]
    }
    capture = await om.captures.get(order_id, created.capture_id)
    assert capture.shipping_info == (info,)


async def test_trigger_send_out(om: KlarnaOM, fake: FakeKlarna) -> None:
    order_id = fake.add_order(amount=6000)
    created = await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
    assert await om.captures.trigger_send_out(order_id, created.capture_id) is None
    assert fake.captures(order_id)[0].send_outs == 1
    wire = fake.requests[-1]
    assert wire.status == 204
    assert wire.body == b""


async def test_over_capture_is_refused_once_and_never_retried(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=1000)
    with pytest.raises(CaptureNotAllowedError) as caught:
        await om.captures.create(order_id, CaptureRequest(captured_amount=1001))
    error = caught.value
    assert error.status == 403
    assert error.error_code == "CAPTURE_NOT_ALLOWED"
    assert error.correlation_id
    assert error.attempts == 1
    assert not error.outcome_unknown
    assert error.idempotency_key == capture_posts(fake)[0]
    assert len(capture_posts(fake)) == 1
    assert fake.booked_captures == []


@pytest.mark.parametrize("status", ["CANCELLED", "EXPIRED"])
async def test_cancelled_or_expired_orders_cannot_be_captured(
    om: KlarnaOM, fake: FakeKlarna, status: str
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.set_order_status(order_id, status)
    with pytest.raises(CaptureNotAllowedError):
        await om.captures.create(order_id, CaptureRequest(captured_amount=1000))
    assert len(capture_posts(fake)) == 1


async def test_unknown_order_and_capture_are_typed_404s(om: KlarnaOM, fake: FakeKlarna) -> None:
    with pytest.raises(NoSuchOrderError):
        await om.captures.create("no-such-order", CaptureRequest(captured_amount=1))
    with pytest.raises(NoSuchOrderError):
        await om.orders.get("no-such-order")
    order_id = fake.add_order(amount=1000)
    with pytest.raises(NoSuchCaptureError):
        await om.captures.get(order_id, "no-such-capture")
    with pytest.raises(NoSuchCaptureError):
        await om.captures.trigger_send_out(order_id, "no-such-capture")
    assert len(fake.requests) == 4


async def test_wrong_credentials_fail_once_without_leaking_the_password(fake: FakeKlarna) -> None:
    async with KlarnaOM(fake.username, "wrong-secret", base_url=fake.base_url) as om:
        with pytest.raises(AuthenticationError) as caught:
            await om.captures.create(fake.add_order(amount=10), CaptureRequest(captured_amount=10))
        assert "wrong-secret" not in repr(om)
    assert "wrong-secret" not in str(caught.value)
    assert "wrong-secret" not in repr(caught.value)
    assert len(fake.requests) == 1


async def test_process_then_drop_books_exactly_one_capture(om: KlarnaOM, fake: FakeKlarna) -> None:
    order_id = fake.add_order(amount=6000)
    fake.inject(DropAfterProcessing(), method="POST", path="/captures")
    created = await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
    [booked] = fake.booked_captures
    assert created.capture_id == booked.capture_id
    assert created.attempts == 2
    keys = capture_posts(fake)
    assert len(keys) == 2
    assert keys[0] == keys[1] == created.idempotency_key
    assert fake.requests[-1].replayed


async def test_a_dropped_connection_before_processing_is_retried(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=500)
    fake.inject(DropConnection(), method="POST", times=2)
    created = await om.captures.create(order_id, CaptureRequest(captured_amount=500))
    assert created.attempts == 3
    assert len(fake.booked_captures) == 1


async def test_503_then_success_books_one_capture(
    om: KlarnaOM, fake: FakeKlarna, sleeps: InstantSleep
) -> None:
    order_id = fake.add_order(amount=6000)
    fake.inject(ServerFailure(503), method="POST")
    created = await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
    assert created.attempts == 2
    assert len(fake.booked_captures) == 1
    assert sleeps.waits == [0.5]
    assert len(set(capture_posts(fake))) == 1


async def test_503_until_the_end_reports_an_unknown_outcome_with_the_key(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=6000)
    fake.inject(ServerFailure(503), method="POST", times=4)
    with pytest.raises(ServerError) as caught:
        await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
    error = caught.value
    assert error.attempts == 4
    assert error.outcome_unknown
    [key] = set(capture_posts(fake))
    assert error.idempotency_key == key
    assert f"idempotency_key={key!r}" in str(error)
    assert fake.booked_captures == []
    # The promised safe retry: the same key later books the capture exactly once.
    created = await om.captures.create(
        order_id, CaptureRequest(captured_amount=6000), idempotency_key=key
    )
    assert [c.capture_id for c in fake.booked_captures] == [created.capture_id]


async def test_a_read_timeout_after_booking_is_retried_with_the_same_key(
    fake: FakeKlarna, sleeps: InstantSleep
) -> None:
    order_id = fake.add_order(amount=6000)
    fake.inject(Delay(5, after_processing=True), method="POST")
    policy = RetryPolicy(max_attempts=3, jitter=lambda d: d, sleep=sleeps)
    async with KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, retry=policy, timeout=0.2
    ) as om:
        created = await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
    [booked] = fake.booked_captures
    assert created.capture_id == booked.capture_id
    assert created.attempts == 2


async def test_a_timeout_on_the_last_attempt_raises_a_timeout_error_with_the_key(
    fake: FakeKlarna,
) -> None:
    order_id = fake.add_order(amount=6000)
    fake.inject(Delay(5), method="POST")
    async with KlarnaOM(
        fake.username,
        fake.password,
        base_url=fake.base_url,
        retry=RetryPolicy.no_retries(),
        timeout=0.2,
    ) as om:
        with pytest.raises(KlarnaTimeoutError) as caught:
            await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
    assert caught.value.attempts == 1
    assert caught.value.outcome_unknown
    assert caught.value.idempotency_key == capture_posts(fake)[0]


async def test_429_retry_after_is_honoured(
    om: KlarnaOM, fake: FakeKlarna, sleeps: InstantSleep
) -> None:
    order_id = fake.add_order(amount=100)
    fake.inject(RateLimited(retry_after="2"), method="POST")
    await om.captures.create(order_id, CaptureRequest(captured_amount=100))
    # The retry waits Retry-After, not the jittered schedule; the client-wide pause it set
    # has already elapsed by then, so nothing else sleeps.
    assert sleeps.waits[0] == 2.0
    assert len(fake.booked_captures) == 1


async def test_429_until_the_end_is_not_an_unknown_outcome(fake: FakeKlarna) -> None:
    order_id = fake.add_order(amount=100)
    fake.inject(RateLimited(retry_after=None), method="POST")
    async with KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, retry=RetryPolicy.no_retries()
    ) as om:
        with pytest.raises(RateLimitError) as caught:
            await om.captures.create(order_id, CaptureRequest(captured_amount=100))
    assert not caught.value.outcome_unknown


async def test_429_after_a_lost_answer_keeps_the_outcome_unknown(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    # Attempt 1 is booked but its answer lost; every later attempt meets a 429. The 429
    # proves nothing about attempt 1, so the caller must be told to retry with the key.
    order_id = fake.add_order(amount=10_000)
    fake.inject(DropAfterProcessing(), method="POST")
    fake.inject(RateLimited(retry_after="1"), method="POST", times=None)
    request = CaptureRequest(captured_amount=4000)
    with pytest.raises(RateLimitError) as caught:
        await om.captures.create(order_id, request)
    assert caught.value.outcome_unknown
    # 429s do not use up max_attempts: the call waited its turn until the deadline.
    assert caught.value.attempts > om.retry_policy.max_attempts
    key = caught.value.idempotency_key
    assert key is not None
    assert repr(key) in str(caught.value)

    fake.clear_faults()
    again = await om.captures.create(order_id, request, idempotency_key=key)
    [booked] = fake.booked_captures
    assert again.capture_id == booked.capture_id


async def test_a_proxys_html_error_is_still_typed(fake: FakeKlarna) -> None:
    fake.inject(NonJsonError(502, "<html>Bad Gateway</html>"))
    async with KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, retry=RetryPolicy.no_retries()
    ) as om:
        with pytest.raises(ServerError) as caught:
            await om.orders.get(fake.add_order(amount=5))
    assert caught.value.status == 502
    assert caught.value.error_code is None
    assert "Bad Gateway" in str(caught.value)


async def test_bad_input_is_refused_before_anything_is_sent(om: KlarnaOM, fake: FakeKlarna) -> None:
    with pytest.raises(ValidationError, match="order_id"):
        await om.captures.create("", CaptureRequest(captured_amount=1))
    with pytest.raises(ValidationError, match="capture_id"):
        await om.captures.get("order", " ")
    with pytest.raises(ValidationError, match="shipping_info"):
        await om.captures.add_shipping_info("order", "capture", [])
    with pytest.raises(ValidationError, match="idempotency_key"):
        await om.captures.trigger_send_out("order", "capture", idempotency_key="")
    with pytest.raises(TypeError, match="CaptureRequest"):
        await om.captures.create("order", {"captured_amount": 1})  # type: ignore[arg-type]
    assert fake.requests == []


async def test_ids_are_quoted_as_one_path_segment(om: KlarnaOM, fake: FakeKlarna) -> None:
    with pytest.raises(NoSuchOrderError):
        await om.orders.get("../captures?x=1")
    assert fake.requests[0].path == "/ordermanagement/v1/orders/../captures?x=1"


async def test_gets_carry_no_idempotency_key(om: KlarnaOM, fake: FakeKlarna) -> None:
    await om.orders.get(fake.add_order(amount=5))
    assert fake.requests[0].idempotency_key is None


async def test_user_middleware_sees_every_attempt_with_its_key_but_no_credentials(
    fake: FakeKlarna, sleeps: InstantSleep
) -> None:
    seen: list[tuple[str | None, bool, int | None]] = []

    async def log_attempts(request: Request, call_next: Handler) -> Response:
        try:
            response = await call_next(request)
        except KlarnaConnectionError:
            seen.append((request.idempotency_key, "Authorization" in request.headers, None))
            raise
        seen.append((request.idempotency_key, "Authorization" in request.headers, response.status))
        return response

    fake.inject(DropAfterProcessing(), method="POST")
    policy = RetryPolicy(jitter=lambda d: d, sleep=sleeps)
    async with KlarnaOM(
        fake.username,
        fake.password,
        base_url=fake.base_url,
        retry=policy,
        middlewares=[log_attempts],
    ) as om:
        created = await om.captures.create(
            fake.add_order(amount=5), CaptureRequest(captured_amount=5)
        )
    key = created.idempotency_key
    assert seen == [(key, False, None), (key, False, 201)]


async def test_an_answer_that_does_not_fit_the_model_is_a_response_error(
    fake: FakeKlarna,
) -> None:
    async def corrupt(request: Request, call_next: Handler) -> Response:
        response = await call_next(request)
        return Response(
            status=200,
            headers=response.headers,
            body=orjson.dumps({"captured_amount": "lots"}),
            request=response.request,
            url=response.url,
        )

    async with KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, middlewares=[corrupt]
    ) as om:
        with pytest.raises(KlarnaResponseError, match="captured_amount"):
            await om.orders.get(fake.add_order(amount=5))


async def test_a_201_without_capture_id_or_location_keeps_the_key(fake: FakeKlarna) -> None:
    async def strip_headers(request: Request, call_next: Handler) -> Response:
        response = await call_next(request)
        return Response(
            status=201, headers={}, body=b"", request=response.request, url=response.url
        )

    async with KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, middlewares=[strip_headers]
    ) as om:
        with pytest.raises(KlarnaResponseError) as caught:
            await om.captures.create(fake.add_order(amount=5), CaptureRequest(captured_amount=5))
    assert caught.value.outcome_unknown
    assert caught.value.idempotency_key == fake.booked_captures[0].idempotency_key


async def test_a_borrowed_session_stays_open(fake: FakeKlarna) -> None:
    async with aiohttp.ClientSession() as session:
        async with KlarnaOM(
            fake.username, fake.password, base_url=fake.base_url, session=session
        ) as om:
            await om.orders.get(fake.add_order(amount=5))
        assert not session.closed


async def test_a_closed_client_refuses_new_calls(fake: FakeKlarna) -> None:
    om = KlarnaOM(fake.username, fake.password, base_url=fake.base_url)
    await om.orders.get(fake.add_order(amount=5))
    await om.close()
    await om.close()
    with pytest.raises(RuntimeError, match="closed"):
        await om.orders.get("x")


@pytest.mark.parametrize(
    ("base_url", "says"),
    [
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://user:pw@api.klarna.com", "must not hold credentials"),
        ("https://api.klarna.com/?x=1", "no query or fragment"),
        ("https://api.klarna.com/#top", "no query or fragment"),
        ("https://api.klarna.com?", "no query or fragment"),
    ],
)
def test_a_base_url_every_path_cannot_be_added_to_is_refused(base_url: str, says: str) -> None:
    # With credentials in it every request failed in aiohttp (reported "outcome unknown");
    # after a query or fragment every path went to .../?x=1/ordermanagement/...
    with pytest.raises(ValueError, match=re.escape(says)):
        KlarnaOM("u", "p", base_url=base_url)


def test_configuration_is_checked_up_front() -> None:
    with pytest.raises(ValueError, match="base_url"):
        KlarnaOM("u", "p", base_url="ftp://example")
    with pytest.raises(ValueError, match="timeout"):
        KlarnaOM("u", "p", timeout=0)
    with pytest.raises(ValueError, match="non-empty"):
        KlarnaOM("u", "")
    assert KlarnaOM("u", "p", region="na", playground=True).base_url == (
        "https://api-na.playground.klarna.com"
    )
