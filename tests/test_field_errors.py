"""Field reports: error bodies of every shape, ids that URL normalisation collapses, amount 0."""

from __future__ import annotations

import pytest
from test_cli import ORDERS, ServedFake, cli, served  # noqa: F401  (served: a fixture)

from klarna_om_async import CaptureRequest, KlarnaOM, ShippingInfo, ValidationError
from klarna_om_async.errors import (
    BadRequestError,
    NotAllowedError,
    NotFoundError,
    ServerError,
    decode_error,
)
from klarna_om_async.testing import FakeKlarna, NonJsonError

# -- item 6: the readable text of any error body reaches str(err) ------------------------------


@pytest.mark.parametrize(
    ("status", "body", "text"),
    [
        # Klarna's own code with the singular field some endpoints and proxies use.
        (
            400,
            b'{"error_code":"BAD_VALUE","error_message":"Bad value: order_lines[0].name"}',
            "400 BAD_VALUE: Bad value: order_lines[0].name.",
        ),
        # error_messages as a string instead of a list, with stray whitespace.
        (
            400,
            b'{"error_code":"BAD_VALUE","error_messages":"  Bad value:\\n captured_amount  "}',
            "400 BAD_VALUE: Bad value: captured_amount.",
        ),
        # A gateway's own JSON shapes.
        (403, b'{"message": "  Forbidden by policy "}', "403: Forbidden by policy."),
        (
            502,
            b'{"error": {"code": 502, "message": "Upstream timed out"}}',
            "502: Upstream timed out.",
        ),
        (400, b'{"errors": [{"message": "a"}, {"detail": "b"}]}', "400: a; b."),
        (503, b'"Service Unavailable"', "503: Service Unavailable."),
        # Multi-line HTML stays one line.
        (502, b"<html>\n  <body>Bad\n Gateway</body>\n</html>\n", "502: <html> <body>Bad Gateway"),
    ],
)
def test_readable_text_of_any_error_body_reaches_str(status: int, body: bytes, text: str) -> None:
    error = decode_error(status, {}, body)
    assert str(error).startswith(text)
    assert "\n" not in str(error)


def test_error_code_and_messages_stay_what_klarna_sent() -> None:
    error = decode_error(400, {}, b'{"error_code":"BAD_VALUE","error_message":"Bad value: x"}')
    assert isinstance(error, BadRequestError)
    assert (error.error_code, error.error_messages) == ("BAD_VALUE", ())
    assert str(error) == "400 BAD_VALUE: Bad value: x."
    gateway = decode_error(502, {}, b'{"message": "nope", "error_code": 7}')
    assert isinstance(gateway, ServerError)
    assert (gateway.error_code, gateway.error_messages) == (None, ())
    assert str(gateway) == "502: nope."
    klarna = decode_error(403, {}, b'{"error_code":"X","error_messages":["a "," b"]}')
    assert klarna.error_messages == ("a ", " b")


async def test_a_gateways_json_error_is_readable_through_the_client(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=100)
    body = '{"error": {"message": "Request blocked by WAF rule 942100"}}'
    fake.inject(NonJsonError(403, body, "application/json"), method="POST")
    with pytest.raises(
        NotAllowedError, match=r"^403 on POST .*: Request blocked by WAF rule 942100\.$"
    ):
        await om.captures.create(order_id, CaptureRequest(captured_amount=100))


# -- item 11: ids that URL normalisation collapses ---------------------------------------------


@pytest.mark.parametrize("capture_id", ["..", ".", " .. ", "\t.\n"])
async def test_dot_segment_ids_are_refused_before_sending(
    om: KlarnaOM, fake: FakeKlarna, capture_id: str
) -> None:
    order_id = fake.add_order(amount=100)
    info = [ShippingInfo(shipping_company="DHL", tracking_number="1")]
    with pytest.raises(ValidationError) as caught:
        await om.captures.add_shipping_info(order_id, capture_id, info)
    assert caught.value.field == "capture_id"
    with pytest.raises(ValidationError, match="order_id"):
        await om.captures.create(capture_id, CaptureRequest(captured_amount=1))
    assert fake.requests == []


async def test_no_id_leaves_its_own_path_segment_on_the_wire(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=100)
    for capture_id in ["%2e", ".%2E", "%2E%2E", "...", "a/../b", ".."]:
        before = len(fake.requests)
        try:
            await om.captures.get(order_id, capture_id)
        except ValidationError:
            assert capture_id == ".."
            assert len(fake.requests) == before
            continue
        except NotFoundError:
            pass
        [request] = fake.requests[before:]
        # The fake records the decoded path: the id arrives whole, in its own segment.
        assert request.path == f"{ORDERS}/{order_id}/captures/{capture_id}"
        assert request.status == 404


def test_ship_with_a_dot_dot_capture_id_sends_nothing(served: ServedFake) -> None:  # noqa: F811
    order_id = served.add_order(100)
    result = cli(["ship", order_id, "..", "--company", "DHL", "--tracking-number", "1"], served)
    assert result.exit_code == 2, result.output
    assert "capture_id" in result.output
    assert served.do(lambda: list(served.fake.requests)) == []


# -- item 10 (single-call commands): ids are trimmed everywhere --------------------------------


async def test_surrounding_spaces_are_trimmed_from_ids(om: KlarnaOM, fake: FakeKlarna) -> None:
    order_id = fake.add_order(amount=100)
    await om.captures.create(f"  {order_id}\t", CaptureRequest(captured_amount=40))
    order = await om.orders.get(f" {order_id} ")
    assert order.captured_amount == 40
    assert [r.path for r in fake.requests] == [
        f"{ORDERS}/{order_id}/captures",
        f"{ORDERS}/{order_id}",
    ]


def test_capture_command_trims_the_order_id(served: ServedFake) -> None:  # noqa: F811
    order_id = served.add_order(100)
    result = cli(["capture", f" {order_id} ", "--amount", "100", "--json"], served)
    assert result.exit_code == 0, result.output
    assert served.booked(order_id) == 1


# -- item 17: captured_amount 0 (CaptureObject: minimum 0) -------------------------------------


async def test_a_capture_of_0_is_accepted_by_client_and_fake_alike(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=100)
    created = await om.captures.create(order_id, CaptureRequest(captured_amount=0))
    capture = await om.captures.get(order_id, created.capture_id)
    assert capture.captured_amount == 0
    order = await om.orders.get(order_id)
    # Nothing moved: the order is still fully capturable.
    assert (order.status, order.remaining_authorized_amount) == ("AUTHORIZED", 100)
    await om.captures.create(order_id, CaptureRequest(captured_amount=100))
