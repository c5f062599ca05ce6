"""Every request the client sends validates against Klarna's published OpenAPI description."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from klarna_om_async import (
    Address,
    CaptureRequest,
    KlarnaOM,
    OrderLine,
    RefundRequest,
    ShippingInfo,
    ShippingMethod,
    UpdateAuthorizationRequest,
)
from klarna_om_async.testing import FakeKlarna, RecordedRequest

SPEC = Path(__file__).resolve().parents[2] / "shared" / "reference" / "klarna-om-openapi.yml"

pytestmark = pytest.mark.skipif(
    not SPEC.exists(),
    reason=f"Klarna's OpenAPI file is not beside this checkout ({SPEC}); contract not checked",
)


class SpecRequest:
    """A request the fake recorded, in the shape openapi-core validates."""

    host_url = "https://api.klarna.com"  # the spec's server; the fake's port is irrelevant

    def __init__(self, recorded: RecordedRequest) -> None:
        from openapi_core.datatypes import RequestParameters

        self.path = recorded.path
        self.method = recorded.method.lower()
        self.body = recorded.body or None
        self.content_type = recorded.headers.get("Content-Type", "").lower()
        # openapi-core writes the resolved path parameters back into this object.
        self.parameters = RequestParameters(header=CIMultiDict(recorded.headers))


async def test_every_request_the_client_sends_matches_the_spec(fake: FakeKlarna) -> None:
    openapi_core = pytest.importorskip("openapi_core")
    # The mirror has defects in parts we never call (refund headers); check requests only.
    spec = openapi_core.OpenAPI.from_file_path(
        str(SPEC), config=openapi_core.Config(spec_validator_cls=None)
    )
    order_id = fake.add_order(amount=10000)
    async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as om:
        created = await om.captures.create(
            order_id,
            CaptureRequest(
                captured_amount=6000,
                reference="c9a94cf1",
                description="Shipped the full order",
                order_lines=[
                    OrderLine(
                        type="physical",
                        name="Tomatoes",
                        quantity=10,
                        quantity_unit="kg",
                        unit_price=600,
                        tax_rate=2500,
                        total_amount=6000,
                        total_tax_amount=1200,
                    )
                ],
                shipping_info=[ShippingInfo(shipping_company="DHL US", tracking_number="1")],
                shipping_delay=0,
            ),
        )
        await om.captures.create(order_id, CaptureRequest(captured_amount=100))
        await om.captures.get(order_id, created.capture_id)
        await om.captures.list(order_id)
        await om.captures.add_shipping_info(
            order_id,
            created.capture_id,
            [ShippingInfo(shipping_company="UPS", shipping_method=ShippingMethod.PICK_UP_POINT)],
        )
        await om.captures.trigger_send_out(order_id, created.capture_id)
        refund = await om.refunds.create(
            order_id,
            RefundRequest(
                refunded_amount=600,
                reference="RMA-1",
                description="One kilo came back",
                order_lines=[
                    OrderLine(
                        type="physical",
                        name="Tomatoes",
                        quantity=1,
                        quantity_unit="kg",
                        unit_price=600,
                        tax_rate=2500,
                        total_amount=600,
                        total_tax_amount=120,
                    )
                ],
            ),
        )
        await om.refunds.create(order_id, RefundRequest(refunded_amount=100))
        await om.refunds.get(order_id, refund.refund_id)
        await om.orders.get(order_id)

    assert len(fake.requests) == 10
    assert [r.status for r in fake.requests] == [201, 201, 200, 200, 204, 204, 201, 201, 200, 200]
    order_path = f"/ordermanagement/v1/orders/{order_id}"
    assert [(r.method, r.path.removeprefix(order_path)) for r in fake.requests[6:9]] == [
        ("POST", "/refunds"),
        ("POST", "/refunds"),
        ("GET", f"/refunds/{refund.refund_id}"),
    ]
    for recorded in fake.requests:
        spec.validate_request(SpecRequest(recorded))


def load_spec() -> Any:
    openapi_core = pytest.importorskip("openapi_core")
    # The mirror has defects in parts we never call (refund headers); check requests only.
    return openapi_core.OpenAPI.from_file_path(
        str(SPEC), config=openapi_core.Config(spec_validator_cls=None)
    )


async def test_every_order_operation_the_client_sends_matches_the_spec(fake: FakeKlarna) -> None:
    spec = load_spec()
    tomatoes = OrderLine(
        type="physical",
        reference="123050",
        name="Tomatoes",
        quantity=10,
        quantity_unit="kg",
        unit_price=600,
        tax_rate=2500,
        total_amount=6000,
        total_tax_amount=1200,
        total_discount_amount=0,
        merchant_data="crate 7",
        image_url="https://yourstore.example/tomatoes.png",
        product_url="https://yourstore.example/tomatoes",
    )
    address = Address(
        given_name="Klara",
        family_name="Joyce",
        title="Mrs",
        organization_name="Klarna",
        attention="John Smith",
        street_address="Apartment 10",
        street_address2="1 Safeway",
        postal_code="12345",
        city="Knoxville",
        region="TN",
        country="us",
        email="klara.joyce@klarna.com",
        phone="1-555-555-5555",
    )
    shipped = ShippingInfo(
        shipping_company="DHL US",
        shipping_method=ShippingMethod.HOME,
        tracking_number="63456415674545679874",
        tracking_uri="http://shipping.example/findmypackage?63456415674545679874",
        return_shipping_company="DHL US",
        return_tracking_number="93456415674545679888",
        return_tracking_uri="http://shipping.example/findmypackage?93456415674545679888",
    )
    order_id = fake.add_order(amount=10000)
    to_cancel = fake.add_order(amount=100)
    async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as om:
        await om.orders.acknowledge(order_id)
        await om.orders.extend_authorization_time(order_id)
        await om.orders.update_authorization(
            order_id,
            UpdateAuthorizationRequest(
                order_amount=6000, description="Fewer tomatoes", order_lines=[tomatoes]
            ),
        )
        await om.orders.update_authorization(
            order_id, UpdateAuthorizationRequest(order_amount=6000)
        )
        await om.orders.update_merchant_references(order_id, "10001", "501")
        await om.orders.update_merchant_references(order_id, merchant_reference2="502")
        await om.orders.update_shipping_address(order_id, address)
        await om.orders.update_shipping_address(order_id, Address(postal_code="12346"))
        await om.orders.add_shipping_info(order_id, [shipped, ShippingInfo(tracking_number="2")])
        created = await om.captures.create(order_id, CaptureRequest(captured_amount=3000))
        options = await om.captures.get_extend_due_date_options(order_id, created.capture_id)
        assert options.options
        assert options.options[0].number_of_days is not None
        await om.captures.extend_due_date(
            order_id, created.capture_id, options.options[0].number_of_days
        )
        await om.orders.release_remaining_authorization(order_id)
        await om.orders.cancel(to_cancel)

    assert [r.status for r in fake.requests] == [204] * 9 + [201, 200, 204, 204, 204]
    assert {r.method for r in fake.requests} == {"GET", "POST", "PATCH"}
    for recorded in fake.requests:
        spec.validate_request(SpecRequest(recorded))


@pytest.mark.parametrize(
    ("method", "endpoint", "body"),
    [
        ("PATCH", "merchant-references", b'{"merchant_reference1": "' + b"r" * 256 + b'"}'),
        ("PATCH", "authorization", b'{"description": "no amount"}'),
        ("PATCH", "authorization", b'{"order_amount": 200000001}'),
        ("PATCH", "customer-details", b'{"shipping_address": {"postal_code": "12345678901"}}'),
        ("POST", "shipping-info", b'{"shipping_info": []}'),
    ],
)
async def test_the_contract_check_rejects_an_order_operation_off_the_spec(
    fake: FakeKlarna, method: str, endpoint: str, body: bytes
) -> None:
    from openapi_core.validation.request.exceptions import RequestValidationError

    spec = load_spec()
    order_id = fake.add_order(amount=100)
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"{fake.base_url}/ordermanagement/v1/orders/{order_id}/{endpoint}",
            data=body,
            headers={"Authorization": fake.auth_header, "Content-Type": "application/json"},
        ) as answer,
    ):
        assert answer.status in (400, 403)
    with pytest.raises(RequestValidationError):
        spec.validate_request(SpecRequest(fake.requests[0]))


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("captures", b'{"captured_amount": "100"}'),
        ("refunds", b'{"refunded_amount": 200000001}'),
        ("refunds", b'{"refunded_amount": 1, "reference": "' + b"x" * 256 + b'"}'),
    ],
)
async def test_the_contract_check_rejects_a_request_off_the_spec(
    fake: FakeKlarna, endpoint: str, body: bytes
) -> None:
    openapi_core = pytest.importorskip("openapi_core")
    from openapi_core.validation.request.exceptions import RequestValidationError

    spec = openapi_core.OpenAPI.from_file_path(
        str(SPEC), config=openapi_core.Config(spec_validator_cls=None)
    )
    order_id = fake.add_order(amount=100)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{fake.base_url}/ordermanagement/v1/orders/{order_id}/{endpoint}",
            data=body,
            headers={"Authorization": fake.auth_header, "Content-Type": "application/json"},
        ) as answer,
    ):
        assert answer.status == 400
    with pytest.raises(RequestValidationError):
        spec.validate_request(SpecRequest(fake.requests[0]))
