"""The order operations beyond capture and refund, over real HTTP on loopback: what goes on the
wire (method, path, body, idempotency key), what comes back (204 -> None, 200 -> a model), the
typed errors, and the refusals made before anything is sent."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import orjson
import pytest
from aiohttp import web
from conftest import served_app

import klarna_om_async
from klarna_om_async import (
    Address,
    BadRequestError,
    CancelNotAllowedError,
    CaptureNotAllowedError,
    CaptureRequest,
    ExtendDueDateOption,
    ExtendDueDateOptions,
    IdempotencyKeyReusedError,
    InitialPaymentMethodType,
    KlarnaOM,
    KlarnaResponseError,
    NoSuchCaptureError,
    NoSuchOrderError,
    NotAllowedError,
    OrderLine,
    OrderLineType,
    OrderStatus,
    RefundRequest,
    RetryPolicy,
    ServerError,
    ShippingInfo,
    ShippingMethod,
    UnprocessableEntityError,
    UpdateAuthorizationRequest,
    ValidationError,
    new_idempotency_key,
)
from klarna_om_async.captures import CapturesService
from klarna_om_async.errors import RefundNotAllowedError
from klarna_om_async.orders import OrdersService
from klarna_om_async.testing import DropAfterProcessing, FakeKlarna, InstantSleep

ORDER = "f3392f8b-6116-4073-ab96-e330819e2c07"
CAPTURE = "4ba29b50-be7b-44f5-a492-113e6a865e22"
ORDER_PATH = f"/ordermanagement/v1/orders/{ORDER}"
DOCS = "https://docs.klarna.com/api/ordermanagement/#operation/"
KEY_HEADER = "Klarna-Idempotency-Key"

CHARGER = OrderLine(
    type=OrderLineType.PHYSICAL,
    reference="75001",
    name="Charger",
    quantity=1,
    unit_price=2000,
    total_amount=2000,
    tax_rate=2500,
    total_tax_amount=400,
)
KNOXVILLE = Address(
    given_name="Klara",
    family_name="Joyce",
    street_address="Apartment 10",
    street_address2="1 Safeway",
    postal_code="12345",
    city="Knoxville",
    region="TN",
    country="us",
)
DHL = ShippingInfo(
    shipping_company="DHL US", shipping_method=ShippingMethod.HOME, tracking_number="6345"
)


@attrs.frozen
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@attrs.define
class Scripted:
    """A tiny Klarna: records every request; answers from ``answers`` in turn, then with
    ``default``."""

    default: tuple[int, bytes] = (204, b"")
    answers: list[tuple[int, bytes]] = attrs.Factory(list)
    seen: list[Seen] = attrs.Factory(list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(
            Seen(request.method, request.path, dict(request.headers), await request.read())
        )
        status, body = self.answers.pop(0) if self.answers else self.default
        if not body:
            return web.Response(status=status)
        return web.Response(status=status, body=body, content_type="application/json")

    def keys(self) -> list[str | None]:
        return [seen.headers.get(KEY_HEADER) for seen in self.seen]


@pytest.fixture
async def klarna() -> AsyncIterator[tuple[Scripted, KlarnaOM]]:
    """A scripted server and a client of it (4 attempts, instant un-jittered backoff)."""
    server = Scripted()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    sleeps = InstantSleep()
    policy = RetryPolicy(max_attempts=4, jitter=lambda d: d, sleep=sleeps)
    async with (
        served_app(app) as url,
        KlarnaOM("u", "p", base_url=url, retry=policy, clock=sleeps.clock) as om,
    ):
        yield server, om


def error_body(code: str, message: str = "why") -> bytes:
    return orjson.dumps(
        {"error_code": code, "error_messages": [message], "correlation_id": "corr-1"}
    )


# object, not None: the tests check that the value really is None.
Call = Callable[[KlarnaOM, str | None], Awaitable[object]]


@attrs.frozen
class Operation:
    """One keyed operation: how to call it, and what it must send."""

    name: str
    call: Call
    method: str
    path: str
    body: bytes
    operation_id: str

    def __str__(self) -> str:
        return self.name


OPERATIONS = [
    Operation(
        "release_remaining_authorization",
        lambda om, key: om.orders.release_remaining_authorization(ORDER, idempotency_key=key),
        "POST",
        "/release-remaining-authorization",
        b"",
        "releaseRemainingAuthorization",
    ),
    Operation(
        "extend_authorization_time",
        lambda om, key: om.orders.extend_authorization_time(ORDER, idempotency_key=key),
        "POST",
        "/extend-authorization-time",
        b"",
        "extendAuthorizationTime",
    ),
    Operation(
        "cancel",
        lambda om, key: om.orders.cancel(ORDER, idempotency_key=key),
        "POST",
        "/cancel",
        b"",
        "cancelOrder",
    ),
    Operation(
        "acknowledge",
        lambda om, key: om.orders.acknowledge(ORDER, idempotency_key=key),
        "POST",
        "/acknowledge",
        b"",
        "acknowledgeOrder",
    ),
    Operation(
        "update_authorization",
        lambda om, key: om.orders.update_authorization(
            ORDER,
            UpdateAuthorizationRequest(
                order_amount=12000, description="Added charger", order_lines=[CHARGER]
            ),
            idempotency_key=key,
        ),
        "PATCH",
        "/authorization",
        b'{"order_amount":12000,"description":"Added charger","order_lines":[{"name":"Charger",'
        b'"quantity":1,"unit_price":2000,"total_amount":2000,"type":"physical","reference":'
        b'"75001","tax_rate":2500,"total_tax_amount":400}]}',
        "updateAuthorization",
    ),
    Operation(
        "update_merchant_references",
        lambda om, key: om.orders.update_merchant_references(ORDER, "10001", idempotency_key=key),
        "PATCH",
        "/merchant-references",
        b'{"merchant_reference1":"10001"}',
        "updateMerchantReferences",
    ),
    Operation(
        "update_shipping_address",
        lambda om, key: om.orders.update_shipping_address(ORDER, KNOXVILLE, idempotency_key=key),
        "PATCH",
        "/customer-details",
        b'{"shipping_address":{"given_name":"Klara","family_name":"Joyce","street_address":'
        b'"Apartment 10","street_address2":"1 Safeway","postal_code":"12345","city":"Knoxville",'
        b'"region":"TN","country":"us"}}',
        "updateConsumerDetails",
    ),
    Operation(
        "add_shipping_info",
        lambda om, key: om.orders.add_shipping_info(ORDER, [DHL], idempotency_key=key),
        "POST",
        "/shipping-info",
        b'{"shipping_info":[{"shipping_company":"DHL US","shipping_method":"Home",'
        b'"tracking_number":"6345"}]}',
        "appendOrderShippingInfo",
    ),
    Operation(
        "extend_due_date",
        lambda om, key: om.captures.extend_due_date(ORDER, CAPTURE, 14, idempotency_key=key),
        "PATCH",
        f"/captures/{CAPTURE}/extend-due-date",
        b'{"number_of_days":14}',
        "extendDueDate",
    ),
]
by_name = pytest.mark.parametrize("operation", OPERATIONS, ids=str)


@by_name
async def test_each_operation_sends_its_method_path_body_and_a_key_and_returns_none(
    klarna: tuple[Scripted, KlarnaOM], operation: Operation
) -> None:
    server, om = klarna
    assert await operation.call(om, None) is None
    (seen,) = server.seen
    assert (seen.method, seen.path, seen.body) == (
        operation.method,
        ORDER_PATH + operation.path,
        operation.body,
    )
    assert seen.headers[KEY_HEADER]
    assert seen.headers["Authorization"].startswith("Basic ")
    if operation.body:
        assert seen.headers["Content-Type"] == "application/json"


@by_name
async def test_a_retry_after_a_503_carries_the_same_key(
    klarna: tuple[Scripted, KlarnaOM], operation: Operation
) -> None:
    server, om = klarna
    server.answers.append((503, error_body("TEMPORARILY_UNAVAILABLE")))
    assert await operation.call(om, None) is None
    first, second = server.keys()
    assert first is not None
    assert first == second
    assert server.seen[0].body == server.seen[1].body == operation.body


@by_name
async def test_the_callers_key_is_sent_and_each_call_without_one_gets_a_fresh_one(
    klarna: tuple[Scripted, KlarnaOM], operation: Operation
) -> None:
    server, om = klarna
    key = new_idempotency_key()
    await operation.call(om, key)
    await operation.call(om, None)
    await operation.call(om, None)
    mine, fresh, other = server.keys()
    assert mine == key
    assert fresh is not None
    assert other is not None
    assert len({mine, fresh, other}) == 3


@by_name
async def test_a_403_is_typed_never_retried_and_names_the_key(
    klarna: tuple[Scripted, KlarnaOM], operation: Operation
) -> None:
    server, om = klarna
    server.default = (403, error_body("NOT_ALLOWED", "Not allowed in this state"))
    key = new_idempotency_key()
    with pytest.raises(NotAllowedError) as caught:
        await operation.call(om, key)
    error = caught.value
    assert type(error) is NotAllowedError
    assert len(server.seen) == 1
    assert error.attempts == 1
    assert error.idempotency_key == key
    assert error.method == operation.method
    assert error.url is not None
    assert error.url.endswith(ORDER_PATH + operation.path)
    assert not error.outcome_unknown
    assert "corr-1" in str(error)


@by_name
async def test_a_5xx_that_never_ends_names_the_key_and_an_unknown_outcome(
    klarna: tuple[Scripted, KlarnaOM], operation: Operation
) -> None:
    server, om = klarna
    server.default = (500, error_body("INTERNAL_SERVER_ERROR"))
    with pytest.raises(ServerError) as caught:
        await operation.call(om, None)
    error = caught.value
    assert error.attempts == 4
    assert len(set(server.keys())) == 1
    assert error.idempotency_key == server.keys()[0]
    assert error.outcome_unknown


@by_name
async def test_no_such_order_is_typed(
    klarna: tuple[Scripted, KlarnaOM], operation: Operation
) -> None:
    server, om = klarna
    server.default = (404, error_body("NO_SUCH_ORDER"))
    with pytest.raises(NoSuchOrderError):
        await operation.call(om, None)
    assert len(server.seen) == 1


@by_name
async def test_a_400_is_a_bad_request_and_not_retried(
    klarna: tuple[Scripted, KlarnaOM], operation: Operation
) -> None:
    server, om = klarna
    server.default = (400, error_body("BAD_VALUE"))
    with pytest.raises(BadRequestError):
        await operation.call(om, None)
    assert len(server.seen) == 1


@by_name
def test_each_operation_documents_its_klarna_page(operation: Operation) -> None:
    service = CapturesService if operation.name == "extend_due_date" else OrdersService
    doc = getattr(service, operation.name).__doc__
    assert DOCS + operation.operation_id in doc
    assert "Raises" in doc


async def test_cancel_refused_for_an_order_with_captures_is_cancel_not_allowed(
    klarna: tuple[Scripted, KlarnaOM],
) -> None:
    server, om = klarna
    server.default = (403, error_body("CANCEL_NOT_ALLOWED", "Order has previous captures."))
    with pytest.raises(CancelNotAllowedError) as caught:
        await om.orders.cancel(ORDER)
    assert isinstance(caught.value, NotAllowedError)
    assert caught.value.error_code == "CANCEL_NOT_ALLOWED"
    assert len(server.seen) == 1


async def test_extend_due_date_of_an_unknown_capture_is_no_such_capture(
    klarna: tuple[Scripted, KlarnaOM],
) -> None:
    server, om = klarna
    server.default = (404, error_body("NO_SUCH_CAPTURE"))
    with pytest.raises(NoSuchCaptureError):
        await om.captures.extend_due_date(ORDER, CAPTURE, 14)
    with pytest.raises(NoSuchCaptureError):
        await om.captures.get_extend_due_date_options(ORDER, CAPTURE)


async def test_an_invalid_address_is_unprocessable(klarna: tuple[Scripted, KlarnaOM]) -> None:
    server, om = klarna
    server.default = (422, error_body("INVALID_ADDRESS"))
    with pytest.raises(UnprocessableEntityError) as caught:
        await om.orders.update_shipping_address(ORDER, KNOXVILLE)
    assert caught.value.error_code == "INVALID_ADDRESS"
    assert len(server.seen) == 1


async def test_extend_due_date_options_are_read_with_a_get_without_a_key(
    klarna: tuple[Scripted, KlarnaOM],
) -> None:
    server, om = klarna
    server.default = (
        200,
        b'{"currency":"usd","options":[{"number_of_days":14,"amount":500},'
        b'{"number_of_days":28,"amount":900,"new":true}],"added_later":{}}',
    )
    options = await om.captures.get_extend_due_date_options(ORDER, CAPTURE)
    assert options == ExtendDueDateOptions(
        currency="usd",
        options=(
            ExtendDueDateOption(number_of_days=14, amount=500),
            ExtendDueDateOption(number_of_days=28, amount=900),
        ),
    )
    (seen,) = server.seen
    assert (seen.method, seen.path, seen.body) == (
        "GET",
        f"{ORDER_PATH}/captures/{CAPTURE}/extend-due-date-options",
        b"",
    )
    assert KEY_HEADER not in seen.headers


async def test_extend_due_date_options_retry_a_503(klarna: tuple[Scripted, KlarnaOM]) -> None:
    server, om = klarna
    server.answers.append((503, b""))
    server.default = (200, b'{"currency":"sek","options":[]}')
    options = await om.captures.get_extend_due_date_options(ORDER, CAPTURE)
    assert options == ExtendDueDateOptions(currency="sek", options=())
    assert len(server.seen) == 2


@pytest.mark.parametrize("body", [b"[]", b'{"options":{"number_of_days":14}}', b"not json"])
async def test_extend_due_date_options_that_do_not_fit_are_a_response_error(
    klarna: tuple[Scripted, KlarnaOM], body: bytes
) -> None:
    server, om = klarna
    server.default = (200, body)
    with pytest.raises(KlarnaResponseError):
        await om.captures.get_extend_due_date_options(ORDER, CAPTURE)


async def test_merchant_references_omit_the_one_left_at_none(
    klarna: tuple[Scripted, KlarnaOM],
) -> None:
    server, om = klarna
    await om.orders.update_merchant_references(ORDER, merchant_reference2="501")
    await om.orders.update_merchant_references(ORDER, "10001", "501")
    await om.orders.update_merchant_references(ORDER, "")
    assert [seen.body for seen in server.seen] == [
        b'{"merchant_reference2":"501"}',
        b'{"merchant_reference1":"10001","merchant_reference2":"501"}',
        b'{"merchant_reference1":""}',
    ]


async def test_an_order_read_shows_the_new_fields(klarna: tuple[Scripted, KlarnaOM]) -> None:
    server, om = klarna
    server.default = (
        200,
        orjson.dumps(
            {
                "order_id": ORDER,
                "status": "AUTHORIZED",
                "purchase_country": "us",
                "merchant_data": "Order metadata",
                "expires_at": "2015-12-04T10:26:06Z",
                "initial_payment_method": {
                    "type": "FIXED_AMOUNT",
                    "description": "Slice it (Fixed Payments)",
                    "number_of_installments": 3,
                },
                "shipping_info": [{"shipping_company": "DHL US", "shipping_method": "Home"}],
                "shipping_address": {"postal_code": "1" * 40, "given_name": "K" * 300},
            }
        ),
    )
    order = await om.orders.get(ORDER)
    assert order.purchase_country == "us"
    assert order.merchant_data == "Order metadata"
    assert order.initial_payment_method is not None
    assert order.initial_payment_method.type == "FIXED_AMOUNT"
    assert order.initial_payment_method.number_of_installments == 3
    assert order.shipping_info == (
        ShippingInfo(shipping_company="DHL US", shipping_method=ShippingMethod.HOME),
    )
    # An address longer than a request may be is still read.
    assert order.shipping_address is not None
    assert order.shipping_address.postal_code == "1" * 40


Refusal = Callable[[KlarnaOM], Awaitable[object]]
REFUSALS: list[tuple[str, Refusal]] = [
    ("merchant_reference1", lambda om: om.orders.update_merchant_references(ORDER)),
    ("merchant_reference1", lambda om: om.orders.update_merchant_references(ORDER, "x" * 256)),
    (
        "merchant_reference2",
        lambda om: om.orders.update_merchant_references(ORDER, None, "x" * 256),
    ),
    (
        "shipping_address.postal_code",
        lambda om: om.orders.update_shipping_address(ORDER, Address(postal_code="12345678901")),
    ),
    (
        "shipping_address.title",
        lambda om: om.orders.update_shipping_address(ORDER, Address(title="x" * 21)),
    ),
    ("shipping_address", lambda om: om.orders.update_shipping_address(ORDER, Address())),
    (
        "shipping_address",
        lambda om: om.orders.update_shipping_address(ORDER, {"city": "K"}),  # type: ignore[arg-type]
    ),
    ("shipping_info", lambda om: om.orders.add_shipping_info(ORDER, [])),
    ("shipping_info", lambda om: om.orders.add_shipping_info(ORDER, [DHL] * 501)),
    (
        "shipping_info[0].shipping_method",
        lambda om: om.orders.add_shipping_info(ORDER, [ShippingInfo(shipping_method="Drone")]),
    ),
    ("number_of_days", lambda om: om.captures.extend_due_date(ORDER, CAPTURE, 0)),
    ("number_of_days", lambda om: om.captures.extend_due_date(ORDER, CAPTURE, 2**31)),
    (
        "number_of_days",
        lambda om: om.captures.extend_due_date(ORDER, CAPTURE, True),
    ),
    (
        "number_of_days",
        lambda om: om.captures.extend_due_date(ORDER, CAPTURE, 14.0),  # type: ignore[arg-type]
    ),
    ("order_id", lambda om: om.orders.cancel("  ")),
    ("order_id", lambda om: om.orders.release_remaining_authorization("..")),
    ("capture_id", lambda om: om.captures.extend_due_date(ORDER, "", 14)),
    ("capture_id", lambda om: om.captures.get_extend_due_date_options(ORDER, " ")),
    ("idempotency_key", lambda om: om.orders.acknowledge(ORDER, idempotency_key="")),
]


@pytest.mark.parametrize(("field", "call"), REFUSALS)
async def test_bad_input_is_refused_naming_the_field_before_anything_is_sent(
    klarna: tuple[Scripted, KlarnaOM], field: str, call: Refusal
) -> None:
    server, om = klarna
    with pytest.raises(ValidationError) as caught:
        await call(om)
    assert caught.value.field == field
    assert server.seen == []


async def test_update_authorization_takes_only_its_request_model(
    klarna: tuple[Scripted, KlarnaOM],
) -> None:
    server, om = klarna
    bad: Any = {"order_amount": 100}
    with pytest.raises(TypeError, match="UpdateAuthorizationRequest"):
        await om.orders.update_authorization(ORDER, bad)
    assert server.seen == []


async def test_a_key_reused_for_another_patch_is_refused_before_sending(
    klarna: tuple[Scripted, KlarnaOM],
) -> None:
    server, om = klarna
    key = new_idempotency_key()
    await om.orders.update_merchant_references(ORDER, "10001", idempotency_key=key)
    # The same request again (an unknown outcome finished) passes ...
    await om.orders.update_merchant_references(ORDER, "10001", idempotency_key=key)
    # ... another one with that key would get the first one's answer from Klarna.
    with pytest.raises(ValidationError) as caught:
        await om.orders.update_merchant_references(ORDER, "10002", idempotency_key=key)
    assert caught.value.field == "idempotency_key"
    assert len(server.seen) == 2


def test_a_capture_refusal_code_never_turns_a_cancel_refusal_into_another_class() -> None:
    assert not issubclass(CancelNotAllowedError, CaptureNotAllowedError)
    assert not CancelNotAllowedError.retryable


def test_the_new_public_names_are_exported() -> None:
    for name in (
        "CancelNotAllowedError",
        "ExtendDueDateOption",
        "ExtendDueDateOptions",
        "ExtendDueDateRequest",
        "InitialPaymentMethod",
        "InitialPaymentMethodType",
        "UpdateAuthorizationRequest",
        "UpdateMerchantReferencesRequest",
        "UpdateShippingAddressRequest",
    ):
        assert name in klarna_om_async.__all__
        assert getattr(klarna_om_async, name).__doc__
    assert list(klarna_om_async.__all__) == sorted(klarna_om_async.__all__)


# --- through FakeKlarna: Klarna's rules, end to end ------------------------------------------


async def test_an_order_is_updated_before_delivery_then_released_after_a_partial_capture(
    fake: FakeKlarna, om: KlarnaOM
) -> None:
    order_id = fake.add_order(amount=10000, reference="old")
    await om.orders.acknowledge(order_id)
    await om.orders.update_merchant_references(order_id, "10001", "ERP-501")
    await om.orders.update_shipping_address(order_id, KNOXVILLE)
    await om.orders.update_authorization(
        order_id,
        UpdateAuthorizationRequest(order_amount=8000, description="One item out of stock"),
    )
    await om.orders.add_shipping_info(order_id, [DHL])
    order = await om.orders.get(order_id)
    assert (order.merchant_reference1, order.merchant_reference2) == ("10001", "ERP-501")
    assert order.shipping_address is not None
    assert order.shipping_address.postal_code == "12345"
    assert order.shipping_address.city == "Knoxville"
    assert (order.order_amount, order.remaining_authorized_amount) == (8000, 8000)
    assert order.original_order_amount == 10000
    assert order.shipping_info == (DHL,)
    assert order.initial_payment_method is not None
    assert order.initial_payment_method.type is InitialPaymentMethodType.INVOICE

    await om.captures.create(order_id, CaptureRequest(captured_amount=5000))
    await om.orders.release_remaining_authorization(order_id)
    order = await om.orders.get(order_id)
    assert (order.status, order.remaining_authorized_amount) == (OrderStatus.CAPTURED, 0)
    assert fake.order(order_id).operations == [
        "acknowledgeOrder",
        "updateMerchantReferences",
        "updateConsumerDetails",
        "updateAuthorization",
        "appendOrderShippingInfo",
        "releaseRemainingAuthorization",
    ]
    assert all(r.idempotency_key for r in fake.requests if r.method in ("POST", "PATCH"))


async def test_an_uncaptured_order_cancels_and_a_captured_one_refuses(
    fake: FakeKlarna, om: KlarnaOM
) -> None:
    fresh = fake.add_order(amount=1000)
    await om.orders.cancel(fresh)
    assert (await om.orders.get(fresh)).status is OrderStatus.CANCELLED

    shipped = fake.add_order(amount=1000)
    await om.captures.create(shipped, CaptureRequest(captured_amount=400))
    with pytest.raises(CancelNotAllowedError) as caught:
        await om.orders.cancel(shipped)
    assert caught.value.idempotency_key == fake.requests[-1].idempotency_key
    assert caught.value.attempts == 1
    assert (await om.orders.get(shipped)).status is OrderStatus.PART_CAPTURED


async def test_release_without_captures_or_after_a_full_capture_is_not_allowed(
    fake: FakeKlarna, om: KlarnaOM
) -> None:
    uncaptured = fake.add_order(amount=1000)
    with pytest.raises(NotAllowedError):
        await om.orders.release_remaining_authorization(uncaptured)
    captured = fake.add_order(amount=1000)
    await om.captures.create(captured, CaptureRequest(captured_amount=1000))
    with pytest.raises(NotAllowedError):
        await om.orders.release_remaining_authorization(captured)
    assert fake.order(uncaptured).operations == fake.order(captured).operations == []


async def test_extending_the_authorization_keeps_an_order_capturable(
    fake: FakeKlarna, om: KlarnaOM
) -> None:
    kept = fake.add_order(amount=1000)
    lapsed = fake.add_order(amount=1000)
    before = (await om.orders.get(kept)).expires_at
    fake.advance_clock(20 * 86400)
    await om.orders.extend_authorization_time(kept)
    after = (await om.orders.get(kept)).expires_at
    assert before is not None
    assert after is not None
    assert after > before
    fake.advance_clock(10 * 86400)  # 30 days in: past the first expiry only
    await om.captures.create(kept, CaptureRequest(captured_amount=1000))
    assert (await om.orders.get(lapsed)).status is OrderStatus.EXPIRED
    with pytest.raises(CaptureNotAllowedError):
        await om.captures.create(lapsed, CaptureRequest(captured_amount=1000))
    with pytest.raises(NotAllowedError):
        await om.orders.extend_authorization_time(lapsed)


async def test_a_capture_due_date_is_extended_by_one_of_its_options(
    fake: FakeKlarna, om: KlarnaOM
) -> None:
    order_id = fake.add_order(amount=1000, payment_method="INVOICE")
    created = await om.captures.create(order_id, CaptureRequest(captured_amount=1000))
    options = await om.captures.get_extend_due_date_options(order_id, created.capture_id)
    assert options.currency == "EUR"
    assert options.options
    choice = options.options[0]
    assert choice.number_of_days is not None
    await om.captures.extend_due_date(order_id, created.capture_id, choice.number_of_days)
    (capture,) = fake.order(order_id).captures
    assert capture.due_date_extensions == [choice.number_of_days]
    offered = {option.number_of_days for option in options.options}
    with pytest.raises(NotAllowedError):
        await om.captures.extend_due_date(
            order_id, created.capture_id, max(d or 0 for d in offered) + 1
        )
    with pytest.raises(NoSuchCaptureError):
        await om.captures.get_extend_due_date_options(order_id, "no-such-capture")


async def test_a_card_order_offers_no_due_date_extension_and_refuses_an_increase(
    fake: FakeKlarna, om: KlarnaOM
) -> None:
    order_id = fake.add_order(amount=1000, payment_method="CARD")
    created = await om.captures.create(order_id, CaptureRequest(captured_amount=500))
    options = await om.captures.get_extend_due_date_options(order_id, created.capture_id)
    assert options.options == ()
    with pytest.raises(NotAllowedError):
        await om.orders.update_authorization(
            order_id, UpdateAuthorizationRequest(order_amount=2000)
        )
    with pytest.raises(NotAllowedError):
        await om.orders.update_authorization(order_id, UpdateAuthorizationRequest(order_amount=400))


async def test_an_unknown_order_is_no_such_order_for_every_operation(
    fake: FakeKlarna, om: KlarnaOM
) -> None:
    for operation in OPERATIONS:
        with pytest.raises(NoSuchOrderError):
            await operation.call(om, None)
    assert len(fake.requests) == len(OPERATIONS)


@pytest.mark.parametrize("operation", OPERATIONS[:8], ids=str)
async def test_a_lost_answer_is_retried_with_the_same_key_and_applied_once(
    fake: FakeKlarna, om: KlarnaOM, operation: Operation
) -> None:
    fake.add_order(ORDER, amount=20000)
    if operation.name == "release_remaining_authorization":
        await om.captures.create(ORDER, CaptureRequest(captured_amount=100))
    fake.inject(DropAfterProcessing(), method=operation.method, path=operation.path)
    await operation.call(om, None)
    sent = [r for r in fake.requests if r.path == ORDER_PATH + operation.path]
    assert len(sent) == 2
    assert sent[0].idempotency_key == sent[1].idempotency_key
    assert sent[1].replayed
    assert fake.order(ORDER).operations == [operation.operation_id]


async def test_a_lost_due_date_extension_is_applied_once(fake: FakeKlarna, om: KlarnaOM) -> None:
    order_id = fake.add_order(amount=1000)
    created = await om.captures.create(order_id, CaptureRequest(captured_amount=1000))
    options = await om.captures.get_extend_due_date_options(order_id, created.capture_id)
    assert options.options
    assert options.options[0].number_of_days is not None
    days = options.options[0].number_of_days
    fake.inject(DropAfterProcessing(), method="PATCH", path="/extend-due-date")
    await om.captures.extend_due_date(order_id, created.capture_id, days)
    (capture,) = fake.order(order_id).captures
    assert capture.due_date_extensions == [days]


# --- another request's answer, replayed under a reused key -----------------------------------

#: Every call that creates nothing: those above, and a capture's shipping info and send-out.
NO_CONTENT = [
    *OPERATIONS,
    Operation(
        "add_capture_shipping_info",
        lambda om, key: om.captures.add_shipping_info(ORDER, CAPTURE, [DHL], idempotency_key=key),
        "POST",
        f"/captures/{CAPTURE}/shipping-info",
        b"",
        "appendShippingInfo",
    ),
    Operation(
        "trigger_send_out",
        lambda om, key: om.captures.trigger_send_out(ORDER, CAPTURE, idempotency_key=key),
        "POST",
        f"/captures/{CAPTURE}/trigger-send-out",
        b"",
        "triggerSendOut",
    ),
]
no_content = pytest.mark.parametrize("operation", NO_CONTENT, ids=str)


def assert_nothing_done(error: IdempotencyKeyReusedError, key: str) -> None:
    assert error.idempotency_key == key
    assert not error.outcome_unknown
    assert "did nothing for this call" in str(error)
    assert "again with a new key" in str(error)


@no_content
@pytest.mark.parametrize("answer", [(200, b'{"order_id": "x"}'), (201, b""), (202, b"")])
async def test_any_2xx_but_204_answering_a_call_that_creates_nothing_is_a_reused_key(
    klarna: tuple[Scripted, KlarnaOM], operation: Operation, answer: tuple[int, bytes]
) -> None:
    """Such a call succeeds with 204 only; another 2xx (a capture's 201) is the answer of
    an earlier request made with the same key, as a 204 answering a create is."""
    server, om = klarna
    server.default = answer
    key = new_idempotency_key()
    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await operation.call(om, key)
    assert_nothing_done(caught.value, key)
    assert caught.value.status == answer[0]
    assert len(server.seen) == 1  # not retried


@no_content
@pytest.mark.parametrize(
    "code", ["CAPTURE_NOT_ALLOWED", "REFUND_NOT_ALLOWED", "CANCEL_NOT_ALLOWED"]
)
async def test_a_refusal_of_another_operation_is_a_reused_key(
    klarna: tuple[Scripted, KlarnaOM], operation: Operation, code: str
) -> None:
    """CAPTURE_NOT_ALLOWED answers only a capture, REFUND_NOT_ALLOWED only a refund,
    CANCEL_NOT_ALLOWED only a cancel: answering anything else, it is a replayed refusal of
    an earlier request made with this key, and this call was never attempted."""
    server, om = klarna
    server.default = (403, error_body(code))
    key = new_idempotency_key()
    if operation.name == "cancel" and code == "CANCEL_NOT_ALLOWED":
        with pytest.raises(CancelNotAllowedError):  # its own refusal
            await operation.call(om, key)
        return
    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await operation.call(om, key)
    assert_nothing_done(caught.value, key)
    assert caught.value.status == 403
    assert code in str(caught.value)
    assert len(server.seen) == 1


@pytest.mark.parametrize(
    ("name", "call"),
    [
        (
            "capture",
            lambda om, k: om.captures.create(
                ORDER, CaptureRequest(captured_amount=1), idempotency_key=k
            ),
        ),
        (
            "refund",
            lambda om, k: om.refunds.create(
                ORDER, RefundRequest(refunded_amount=1), idempotency_key=k
            ),
        ),
    ],
)
@pytest.mark.parametrize(
    "code", ["CAPTURE_NOT_ALLOWED", "REFUND_NOT_ALLOWED", "CANCEL_NOT_ALLOWED"]
)
async def test_a_create_refused_with_another_operations_code_is_a_reused_key(
    klarna: tuple[Scripted, KlarnaOM], name: str, call: Call, code: str
) -> None:
    server, om = klarna
    server.default = (403, error_body(code))
    key = new_idempotency_key()
    if code.startswith(name.upper()):
        own = CaptureNotAllowedError if name == "capture" else RefundNotAllowedError
        with pytest.raises(own):
            await call(om, key)
        return
    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await call(om, key)
    assert_nothing_done(caught.value, key)


@pytest.fixture
async def other_om(fake: FakeKlarna) -> AsyncIterator[KlarnaOM]:
    """A second client of ``fake`` (another process, a rerun): it has not seen the keys the
    first client sent, so only Klarna's answer can tell a reused key."""
    async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as client:
        yield client


async def _capture_and_refund(fake: FakeKlarna, om: KlarnaOM, order_id: str) -> str:
    created = await om.captures.create(
        order_id, CaptureRequest(captured_amount=4000), idempotency_key="capture-key"
    )
    await om.refunds.create(
        order_id, RefundRequest(refunded_amount=1000), idempotency_key="refund-key"
    )
    return created.capture_id


#: ``NO_CONTENT``'s calls on a capture the fake booked.
NO_CONTENT_ON: dict[str, Callable[[KlarnaOM, str, str | None], Awaitable[None]]] = {
    "release_remaining_authorization": lambda om, c, k: om.orders.release_remaining_authorization(
        ORDER, idempotency_key=k
    ),
    "extend_authorization_time": lambda om, c, k: om.orders.extend_authorization_time(
        ORDER, idempotency_key=k
    ),
    "cancel": lambda om, c, k: om.orders.cancel(ORDER, idempotency_key=k),
    "acknowledge": lambda om, c, k: om.orders.acknowledge(ORDER, idempotency_key=k),
    "update_authorization": lambda om, c, k: om.orders.update_authorization(
        ORDER, UpdateAuthorizationRequest(order_amount=9000), idempotency_key=k
    ),
    "update_merchant_references": lambda om, c, k: om.orders.update_merchant_references(
        ORDER, "SO-1", idempotency_key=k
    ),
    "update_shipping_address": lambda om, c, k: om.orders.update_shipping_address(
        ORDER, Address(city="Berlin"), idempotency_key=k
    ),
    "add_shipping_info": lambda om, c, k: om.orders.add_shipping_info(
        ORDER, [DHL], idempotency_key=k
    ),
    "extend_due_date": lambda om, c, k: om.captures.extend_due_date(ORDER, c, 7, idempotency_key=k),
    "add_capture_shipping_info": lambda om, c, k: om.captures.add_shipping_info(
        ORDER, c, [DHL], idempotency_key=k
    ),
    "trigger_send_out": lambda om, c, k: om.captures.trigger_send_out(ORDER, c, idempotency_key=k),
}


@pytest.mark.parametrize("key", ["capture-key", "refund-key"])
@pytest.mark.parametrize("operation", NO_CONTENT, ids=str)
async def test_a_capture_or_refund_key_given_to_a_call_that_creates_nothing_does_nothing(
    fake: FakeKlarna, om: KlarnaOM, other_om: KlarnaOM, operation: Operation, key: str
) -> None:
    """Klarna replays the capture's (or refund's) 201 and does nothing: the call must not
    return None ("done"), but say nothing happened and name the key."""
    fake.add_order(ORDER, amount=20_000)
    capture_id = await _capture_and_refund(fake, om, ORDER)
    before = (list(fake.order(ORDER).operations), fake.order(ORDER).status)
    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await NO_CONTENT_ON[operation.name](other_om, capture_id, key)
    assert_nothing_done(caught.value, key)
    assert (list(fake.order(ORDER).operations), fake.order(ORDER).status) == before


async def test_a_capture_refusal_replayed_to_a_cancel_is_a_reused_key_not_a_refusal(
    fake: FakeKlarna, om: KlarnaOM, other_om: KlarnaOM
) -> None:
    """A capture refused with key K (403 CAPTURE_NOT_ALLOWED, kept by Klarna under K), then
    K given to cancel: the cancel was never attempted, and can still be done with a new key."""
    order_id = fake.add_order(amount=1000)
    with pytest.raises(CaptureNotAllowedError):
        await om.captures.create(
            order_id, CaptureRequest(captured_amount=5000), idempotency_key="refused-key"
        )
    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await other_om.orders.cancel(order_id, idempotency_key="refused-key")
    assert_nothing_done(caught.value, "refused-key")
    assert fake.order(order_id).status == "AUTHORIZED"
    await other_om.orders.cancel(order_id)
    assert fake.order(order_id).status == "CANCELLED"


async def test_a_refund_refusal_replayed_to_a_capture_is_a_reused_key_and_captures_nothing(
    fake: FakeKlarna, om: KlarnaOM, other_om: KlarnaOM
) -> None:
    order_id = fake.add_order(amount=1000)
    with pytest.raises(RefundNotAllowedError):
        await om.refunds.create(
            order_id, RefundRequest(refunded_amount=100), idempotency_key="refused-refund"
        )
    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await other_om.captures.create(
            order_id, CaptureRequest(captured_amount=100), idempotency_key="refused-refund"
        )
    assert_nothing_done(caught.value, "refused-refund")
    assert fake.order(order_id).captures == []


# --- ids and addresses refused before sending -----------------------------------------------


@pytest.mark.parametrize(
    "control", ["\n", "\r", "\t", "\x00", "\x0b", "\x1b", "\x7f", "\x85", "\x9b"]
)
async def test_an_id_with_a_control_character_is_refused_before_sending(
    fake: FakeKlarna, om: KlarnaOM, control: str
) -> None:
    """A newline or other control character in an id would forge a line wherever the id
    is printed (the CLI's "idempotency key:" line): refused in the one id normaliser."""
    with pytest.raises(ValidationError) as caught:
        await om.orders.cancel(f"a{control}b")
    assert caught.value.field == "order_id"
    assert "\n" not in str(caught.value)
    with pytest.raises(ValidationError) as caught:
        await om.captures.trigger_send_out("order", f"c{control}d")
    assert caught.value.field == "capture_id"
    assert fake.requests == []


@pytest.mark.parametrize("order_id", ["a b", "ordre-ü", "50%", "a/b", " trimmed\n"])
async def test_unusual_but_printable_ids_still_reach_klarna(
    fake: FakeKlarna, om: KlarnaOM, order_id: str
) -> None:
    with pytest.raises(NoSuchOrderError):
        await om.orders.extend_authorization_time(order_id)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("country", ["Germany", "x" * 1000, "D", "12", "D1", "ÄÖ"])
async def test_a_bad_shipping_country_is_refused_before_sending(
    fake: FakeKlarna, om: KlarnaOM, country: str
) -> None:
    order_id = fake.add_order(amount=10_000)
    with pytest.raises(ValidationError) as caught:
        await om.orders.update_shipping_address(order_id, Address(country=country))
    assert caught.value.field == "shipping_address.country"
    assert "\n" not in str(caught.value)
    assert len(str(caught.value)) < 200
    assert fake.requests == []
