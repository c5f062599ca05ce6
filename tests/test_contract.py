"""Every request the client sends validates against Klarna's published OpenAPI description."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from klarna_om_async import (
    CaptureRequest,
    KlarnaOM,
    OrderLine,
    RefundRequest,
    ShippingInfo,
    ShippingMethod,
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
