"""Models and the converter: Klarna's samples, tolerant reading, and request validation."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klarna_om_async._convert import converter, from_json, to_json
from klarna_om_async.errors import NoSuchOrderError, ValidationError, decode_error
from klarna_om_async.models import (
    Address,
    Capture,
    CaptureCreated,
    CaptureRequest,
    FraudStatus,
    Order,
    OrderLine,
    OrderLineType,
    OrderStatus,
    Refund,
    ShippingInfo,
    ShippingMethod,
    validate_shipping_info_request,
)

SAMPLES = Path(__file__).parent / "samples"
MAX_AMOUNT = 200_000_000
modest = settings(max_examples=60, deadline=None)


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def sample_dict(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads(sample(name))
    return loaded


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
DHL = ShippingInfo(
    shipping_company="DHL US",
    tracking_number="1234567890",
    return_shipping_company="UPS",
    return_tracking_number="112233445566778899",
)
LINE_KWARGS: dict[str, Any] = {
    "name": "Tomatoes",
    "quantity": 10,
    "unit_price": 600,
    "total_amount": 6000,
}
BASE_KWARGS: dict[type[object], dict[str, Any]] = {
    OrderLine: LINE_KWARGS,
    ShippingInfo: {},
    CaptureRequest: {"captured_amount": 6000},
}


def build(cls: type[object], **changes: object) -> object:
    return cls(**{**BASE_KWARGS[cls], **changes})


def raises_on(field: str, make: Callable[[], object]) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        make()
    assert caught.value.field == field, str(caught.value)
    return caught.value


# --- Klarna's samples -------------------------------------------------------------------------


def test_capture_request_sample_serializes_to_exactly_klarnas_json() -> None:
    request = CaptureRequest(
        captured_amount=6000,
        reference="c9a94cf1-7126-4f55-92fa-4d34f416ed7f",
        description="Shipped the full order",
        order_lines=[TOMATOES],
        shipping_info=[DHL],
    )
    assert orjson.loads(to_json(request)) == sample_dict("capture_request.json")


def test_capture_request_sample_has_no_field_our_model_lacks() -> None:
    strict = converter.copy(forbid_extra_keys=True)
    parsed = strict.structure(sample_dict("capture_request.json"), CaptureRequest)
    assert parsed.order_lines == (TOMATOES,)
    assert parsed.shipping_info == (DHL,)


def test_required_zero_amount_is_kept_and_unset_fields_are_omitted() -> None:
    assert orjson.loads(to_json(CaptureRequest(captured_amount=0))) == {"captured_amount": 0}


def test_capture_sample_parses_with_aware_datetime_and_enum_members() -> None:
    capture = from_json(sample("capture.json"), Capture)
    assert capture.capture_id == "5b33ed47-79d0-4d76-99ea-4afaa7c8e552"
    assert capture.captured_amount == 6000
    assert capture.refunded_amount == 0
    assert capture.captured_at == datetime(2017, 1, 10, 10, 31, 17, 973000, tzinfo=UTC)
    assert capture.captured_at.tzinfo is not None
    assert capture.order_lines is not None
    assert capture.order_lines[0].type is OrderLineType.PHYSICAL
    assert capture.order_lines[0].total_discount_amount == 0
    assert capture.billing_address == capture.shipping_address
    assert capture.billing_address is not None
    assert capture.billing_address.city == "New York"
    assert capture.shipping_info == (DHL,)


def test_capture_sample_round_trips() -> None:
    capture = from_json(sample("capture.json"), Capture)
    assert from_json(to_json(capture), Capture) == capture
    written = orjson.loads(to_json(capture))
    expected = sample_dict("capture.json")
    assert datetime.fromisoformat(written.pop("captured_at")) == capture.captured_at
    del expected["captured_at"]
    assert written == expected


def test_shipping_info_request_sample_is_what_add_shipping_info_sends() -> None:
    items = [
        converter.structure(i, ShippingInfo)
        for i in sample_dict("shipping_info_request.json")["shipping_info"]
    ]
    checked = validate_shipping_info_request(iter(items))
    assert isinstance(checked, tuple)
    assert checked[0].shipping_method is ShippingMethod.HOME
    body = to_json({"shipping_info": checked})
    assert orjson.loads(body) == sample_dict("shipping_info_request.json")


def test_order_sample_parses_ignoring_fields_not_in_the_model() -> None:
    order = from_json(sample("order.json"), Order)
    assert order.status is OrderStatus.PART_CAPTURED
    assert order.fraud_status is FraudStatus.ACCEPTED
    assert (order.order_amount, order.captured_amount, order.remaining_authorized_amount) == (
        10000,
        6000,
        4000,
    )
    assert order.created_at == datetime(2017, 1, 9, 18, 12, 3, 123000, tzinfo=UTC)
    assert order.expires_at == datetime(2017, 2, 6, 18, 12, 3, tzinfo=UTC)
    assert order.refunds == ()
    assert order.captures is not None
    assert len(order.captures) == 1
    capture = order.captures[0]
    assert isinstance(capture, Capture)
    assert capture.captured_at == datetime(2017, 1, 10, 10, 31, 17, 973000, tzinfo=UTC)
    assert capture.shipping_info is not None
    assert capture.shipping_info[0].shipping_method is ShippingMethod.HOME
    assert order.order_lines is not None
    discount = order.order_lines[2]
    assert (discount.type, discount.total_amount) == (OrderLineType.DISCOUNT, -1000)
    assert from_json(to_json(order), Order) == order


def test_error_sample_decodes_to_no_such_order() -> None:
    error = decode_error(404, {}, sample("error_no_such_order.json"))
    assert isinstance(error, NoSuchOrderError)
    assert error.correlation_id == "f072554f-ef99-4b21-85da-633355aab998"


def test_capture_list_parses_into_a_list_of_captures() -> None:
    body = b"[" + sample("capture.json") + b"," + sample("capture.json") + b"]"
    captures = from_json(body, list[Capture])
    assert captures == [from_json(sample("capture.json"), Capture)] * 2


# --- tolerant reading -------------------------------------------------------------------------


def test_unknown_fields_are_ignored_at_every_level() -> None:
    data = sample_dict("capture.json")
    data["brand_new_field"] = {"nested": [1, 2]}
    data["order_lines"][0]["product_identifiers"] = {"brand": "Red Farm"}
    data["shipping_info"][0]["carrier_product"] = "express"
    data["billing_address"]["care_of"] = "Jane"
    assert from_json(orjson.dumps(data), Capture) == from_json(sample("capture.json"), Capture)


@pytest.mark.parametrize(
    ("key", "value", "read"),
    [
        ("status", "PENDING_REVIEW", lambda o: o.status),
        ("fraud_status", "UNDER_REVIEW", lambda o: o.fraud_status),
        ("order_lines", "bundle", lambda o: o.order_lines[0].type),
        ("captures", "DroneDelivery", lambda o: o.captures[0].shipping_info[0].shipping_method),
    ],
)
def test_unknown_enum_value_in_a_response_is_kept_as_str(
    key: str, value: str, read: Callable[[Order], object]
) -> None:
    data = sample_dict("order.json")
    if key == "order_lines":
        data["order_lines"][0]["type"] = value
    elif key == "captures":
        data["captures"][0]["shipping_info"][0]["shipping_method"] = value
    else:
        data[key] = value
    order = from_json(orjson.dumps(data), Order)
    assert read(order) == value
    assert type(read(order)) is str
    assert from_json(to_json(order), Order) == order


@pytest.mark.parametrize(
    ("make", "member"),
    [
        (lambda: OrderLine(**LINE_KWARGS, type="gift_card"), OrderLineType.GIFT_CARD),
        (lambda: ShippingInfo(shipping_method="DHLPackstation"), ShippingMethod.DHL_PACKSTATION),
        (lambda: Order(status="CLOSED"), OrderStatus.CLOSED),
        (lambda: Order(fraud_status="REJECTED"), FraudStatus.REJECTED),
    ],
)
def test_known_enum_value_becomes_the_member(make: Callable[[], object], member: object) -> None:
    model = make()
    assert member in attrs.astuple(model, recurse=False)
    assert any(value is member for value in attrs.astuple(model, recurse=False))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2015-11-19T01:51:17Z", datetime(2015, 11, 19, 1, 51, 17, tzinfo=UTC)),
        ("2017-01-10T10:31:17.973Z", datetime(2017, 1, 10, 10, 31, 17, 973000, tzinfo=UTC)),
        ("2015-11-19T01:51:17", datetime(2015, 11, 19, 1, 51, 17, tzinfo=UTC)),
        ("2015-11-19T03:51:17+02:00", datetime(2015, 11, 19, 1, 51, 17, tzinfo=UTC)),
    ],
)
def test_datetimes_are_always_aware(text: str, expected: datetime) -> None:
    refund = from_json(orjson.dumps({"refunded_at": text}), Refund)
    assert refund.refunded_at == expected
    assert refund.refunded_at is not None
    assert refund.refunded_at.tzinfo is not None


def test_datetimes_are_written_as_iso_8601() -> None:
    moment = datetime(2015, 11, 19, 1, 51, 17, tzinfo=UTC)
    assert converter.unstructure(Refund(refunded_at=moment)) == {
        "refunded_at": "2015-11-19T01:51:17+00:00"
    }


@pytest.mark.parametrize(
    ("body", "cls"),
    [
        (b"<html>502 Bad Gateway</html>", Capture),
        (b"[]", Capture),
        (b'"captured"', Capture),
        (b"{}", list[Capture]),
        (b'{"captured_amount": 1.5}', Capture),
        (b'{"captured_amount": true}', Capture),
        (b'{"captured_amount": "6000"}', Capture),
        (b'{"captured_at": "yesterday"}', Capture),
        (b'{"order_lines": {}}', Capture),
        (b'{"order_lines": [{"name": "x", "quantity": 1, "unit_price": 1}]}', Capture),
        (
            b'{"order_lines": [{"name": "x", "quantity": -1, "unit_price": 1, "total_amount": 1}]}',
            Capture,
        ),
        (b'{"billing_address": {"city": 42}}', Capture),
        (b'{"billing_address": ["Main St"]}', Capture),
        (b'{"order_lines": ["Tomatoes"]}', Capture),
        (b'{"shipping_info": [{"tracking_number": 1234567890}]}', Capture),
        (b'{"status": 7}', Order),
    ],
)
def test_a_malformed_answer_raises_value_error_never_validation_error(
    body: bytes, cls: type[object]
) -> None:
    with pytest.raises(ValueError, match=r"JSON|valid") as caught:
        from_json(body, cls)
    assert not isinstance(caught.value, ValidationError)


# --- building models --------------------------------------------------------------------------


def test_lists_are_stored_as_tuples_and_models_are_frozen() -> None:
    request = CaptureRequest(
        captured_amount=6000, order_lines=(line for line in [TOMATOES]), shipping_info=[DHL]
    )
    assert request.order_lines == (TOMATOES,)
    assert request.shipping_info == (DHL,)
    assert Order(captures=[Capture()], refunds=[Refund()]).captures == (Capture(),)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        request.captured_amount = 1  # type: ignore[misc]


def test_capture_created_is_a_plain_value() -> None:
    created = CaptureCreated(capture_id="c1", location="https://x/c1", idempotency_key="k")
    assert created == CaptureCreated(capture_id="c1", location="https://x/c1", idempotency_key="k")
    assert created.attempts == 1


def test_a_leaf_accepts_an_unknown_enum_value_but_a_request_refuses_it() -> None:
    line = OrderLine(**LINE_KWARGS, type="bundle")
    assert line.type == "bundle"
    error = raises_on(
        "order_lines[1].type",
        lambda: CaptureRequest(captured_amount=1, order_lines=[TOMATOES, line]),
    )
    assert "bundle" in str(error)


# --- validation (hypothesis) ------------------------------------------------------------------

STRING_LIMITS = [
    (OrderLine, "name", 255),
    (OrderLine, "reference", 255),
    (OrderLine, "quantity_unit", 10),
    (OrderLine, "merchant_data", 1024),
    (OrderLine, "image_url", 1024),
    (OrderLine, "product_url", 1024),
    (ShippingInfo, "shipping_company", 100),
    (ShippingInfo, "return_shipping_company", 100),
    (ShippingInfo, "tracking_number", 100),
    (ShippingInfo, "return_tracking_number", 100),
    (ShippingInfo, "tracking_uri", 1024),
    (ShippingInfo, "return_tracking_uri", 1024),
    (CaptureRequest, "description", 255),
    (CaptureRequest, "reference", 255),
]
INT_LIMITS = [
    (OrderLine, "quantity", 0, None),
    (OrderLine, "unit_price", None, MAX_AMOUNT),
    (OrderLine, "total_amount", None, MAX_AMOUNT),
    (OrderLine, "tax_rate", 0, None),
    (OrderLine, "total_discount_amount", 0, MAX_AMOUNT),
    (OrderLine, "total_tax_amount", None, MAX_AMOUNT),
    (CaptureRequest, "captured_amount", 0, MAX_AMOUNT),
    (CaptureRequest, "shipping_delay", 0, None),
]
not_an_int = st.one_of(
    st.booleans(),
    st.floats(allow_nan=True),
    st.integers().map(str),
    st.just(None).map(lambda _: [1]),
)
unknown_line_type = st.text().filter(lambda s: s not in set(OrderLineType))
unknown_method = st.text().filter(lambda s: s not in set(ShippingMethod))


@pytest.mark.parametrize(("cls", "field", "limit"), STRING_LIMITS)
@modest
@given(extra=st.integers(1, 300))
def test_too_long_string_is_refused_naming_the_field(
    cls: type[object], field: str, limit: int, extra: int
) -> None:
    build(cls, **{field: "é" * limit})
    raises_on(field, lambda: build(cls, **{field: "x" * (limit + extra)}))


@pytest.mark.parametrize(("cls", "field", "limit"), STRING_LIMITS)
def test_non_string_is_refused_naming_the_field(cls: type[object], field: str, limit: int) -> None:
    raises_on(field, lambda: build(cls, **{field: limit}))


@pytest.mark.parametrize(("cls", "field", "lo", "hi"), INT_LIMITS)
@modest
@given(data=st.data())
def test_out_of_range_amount_is_refused_naming_the_field(
    cls: type[object], field: str, lo: int | None, hi: int | None, data: st.DataObject
) -> None:
    outside = []
    if lo is not None:
        outside.append(st.integers(max_value=lo - 1))
    if hi is not None:
        outside.append(st.integers(min_value=hi + 1))
    value = data.draw(st.one_of(outside))
    raises_on(field, lambda: build(cls, **{field: value}))
    build(cls, **{field: lo if lo is not None else hi})


@pytest.mark.parametrize(("cls", "field", "lo", "hi"), INT_LIMITS)
@modest
@given(value=not_an_int)
def test_bool_float_or_str_amount_is_refused_naming_the_field(
    cls: type[object], field: str, lo: int | None, hi: int | None, value: object
) -> None:
    raises_on(field, lambda: build(cls, **{field: value}))


@pytest.mark.parametrize(
    ("cls", "field"),
    [
        (OrderLine, "name"),
        (OrderLine, "quantity"),
        (OrderLine, "unit_price"),
        (OrderLine, "total_amount"),
        (CaptureRequest, "captured_amount"),
    ],
)
def test_missing_required_field_is_refused_naming_the_field(cls: type[object], field: str) -> None:
    error = raises_on(field, lambda: build(cls, **{field: None}))
    assert error.reason == "is required"
    # Leaving the argument out is Python's own TypeError (and a mypy error) before any check.
    kwargs = {k: v for k, v in BASE_KWARGS[cls].items() if k != field}
    with pytest.raises(TypeError, match=field):
        cls(**kwargs)


@modest
@given(count=st.integers(1001, 1500))
def test_more_than_1000_order_lines_are_refused(count: int) -> None:
    CaptureRequest(captured_amount=1, order_lines=[TOMATOES] * 1000)
    raises_on(
        "order_lines", lambda: CaptureRequest(captured_amount=1, order_lines=[TOMATOES] * count)
    )


@modest
@given(count=st.integers(501, 800))
def test_more_than_500_shipping_infos_are_refused(count: int) -> None:
    CaptureRequest(captured_amount=1, shipping_info=[DHL] * 500)
    raises_on(
        "shipping_info", lambda: CaptureRequest(captured_amount=1, shipping_info=[DHL] * count)
    )
    raises_on("shipping_info", lambda: validate_shipping_info_request([DHL] * count))


@modest
@given(value=unknown_line_type, before=st.integers(0, 5))
def test_unknown_order_line_type_is_refused_in_a_request(value: str, before: int) -> None:
    lines = [TOMATOES] * before + [OrderLine(**LINE_KWARGS, type=value)]
    raises_on(
        f"order_lines[{before}].type", lambda: CaptureRequest(captured_amount=1, order_lines=lines)
    )


@modest
@given(value=unknown_method, before=st.integers(0, 5))
def test_unknown_shipping_method_is_refused_in_a_request(value: str, before: int) -> None:
    infos = [DHL] * before + [ShippingInfo(shipping_method=value)]
    field = f"shipping_info[{before}].shipping_method"
    raises_on(field, lambda: CaptureRequest(captured_amount=1, shipping_info=infos))
    raises_on(field, lambda: validate_shipping_info_request(infos))


@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("order_lines", lambda: CaptureRequest(captured_amount=1, order_lines="Tomatoes")),
        ("order_lines", lambda: CaptureRequest(captured_amount=1, order_lines={"name": "x"})),
        ("order_lines", lambda: CaptureRequest(captured_amount=1, order_lines=5)),
        (
            "order_lines[1]",
            lambda: CaptureRequest(captured_amount=1, order_lines=[TOMATOES, LINE_KWARGS]),
        ),
        ("shipping_info[0]", lambda: CaptureRequest(captured_amount=1, shipping_info=[TOMATOES])),
        ("shipping_info", lambda: validate_shipping_info_request([])),
        ("shipping_info", lambda: validate_shipping_info_request("Home")),
        ("shipping_info[0]", lambda: validate_shipping_info_request([{"shipping_method": "Home"}])),
        ("type", lambda: OrderLine(**LINE_KWARGS, type=3)),
        ("shipping_method", lambda: ShippingInfo(shipping_method=["Home"])),
        ("status", lambda: Order(status=1)),
    ],
)
def test_malformed_request_shape_is_refused_naming_the_field(
    field: str, make: Callable[[], object]
) -> None:
    raises_on(field, make)


# --- round trips (hypothesis) -----------------------------------------------------------------


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


amounts = st.integers(-MAX_AMOUNT, MAX_AMOUNT)
order_lines = st.builds(
    OrderLine,
    name=st.text(max_size=255),
    quantity=st.integers(0, 10**9),
    unit_price=amounts,
    total_amount=amounts,
    type=optional(st.sampled_from(OrderLineType)),
    reference=optional(st.text(max_size=255)),
    quantity_unit=optional(st.text(max_size=10)),
    tax_rate=optional(st.integers(0, 10_000)),
    total_discount_amount=optional(st.integers(0, MAX_AMOUNT)),
    total_tax_amount=optional(amounts),
    merchant_data=optional(st.text(max_size=1024)),
    image_url=optional(st.text(max_size=1024)),
    product_url=optional(st.text(max_size=1024)),
)
shipping_infos = st.builds(
    ShippingInfo,
    shipping_company=optional(st.text(max_size=100)),
    shipping_method=optional(st.sampled_from(ShippingMethod)),
    tracking_number=optional(st.text(max_size=100)),
    tracking_uri=optional(st.text(max_size=1024)),
    return_shipping_company=optional(st.text(max_size=100)),
    return_tracking_number=optional(st.text(max_size=100)),
    return_tracking_uri=optional(st.text(max_size=1024)),
)
capture_requests = st.builds(
    CaptureRequest,
    captured_amount=st.integers(0, MAX_AMOUNT),
    description=optional(st.text(max_size=255)),
    reference=optional(st.text(max_size=255)),
    order_lines=optional(st.lists(order_lines, max_size=4)),
    shipping_info=optional(st.lists(shipping_infos, max_size=3)),
    shipping_delay=optional(st.integers(0, 10**6)),
)
aware_datetimes = st.builds(
    lambda moment, minutes: moment.replace(tzinfo=timezone(timedelta(minutes=minutes))),
    st.datetimes(datetime(1970, 1, 2), datetime(2999, 12, 30)),
    st.integers(-1439, 1439),
)
captures = st.builds(
    Capture,
    capture_id=optional(st.uuids().map(str)),
    captured_amount=optional(st.integers(1, MAX_AMOUNT)),
    captured_at=optional(aware_datetimes),
    order_lines=optional(st.lists(order_lines, max_size=3)),
    billing_address=optional(
        st.builds(Address, city=optional(st.text()), country=optional(st.text()))
    ),
    shipping_info=optional(st.lists(shipping_infos, max_size=2)),
)


def has_no_null(value: object) -> bool:
    if isinstance(value, dict):
        return all(v is not None and has_no_null(v) for v in value.values())
    if isinstance(value, list):
        return all(has_no_null(v) for v in value)
    return True


@modest
@given(model=st.one_of(capture_requests, order_lines, shipping_infos, captures))
def test_valid_models_round_trip_through_json(model: object) -> None:
    body = to_json(model)
    assert from_json(body, type(model)) == model
    assert has_no_null(orjson.loads(body))


@modest
@given(line=order_lines, unknown=unknown_line_type)
def test_leaf_with_unknown_enum_value_round_trips(line: OrderLine, unknown: str) -> None:
    line = attrs.evolve(line, type=unknown)
    assert from_json(to_json(line), OrderLine) == line


@modest
@given(moment=st.datetimes())
def test_naive_datetime_in_an_answer_is_read_as_utc(moment: datetime) -> None:
    refund = from_json(orjson.dumps({"refunded_at": moment.isoformat()}), Refund)
    assert refund.refunded_at == moment.replace(tzinfo=UTC)


def test_a_refund_as_credit_invoice_reads_its_flag() -> None:
    body = {"refund_id": "r-1", "refunded_amount": 2500, "credit_invoice": True, "new": 1}
    refund = from_json(orjson.dumps(body), Refund)
    assert refund.credit_invoice is True
    assert refund.refunded_amount == 2500


def test_a_credit_invoice_flag_that_is_not_a_boolean_is_klarnas_fault() -> None:
    with pytest.raises(ValueError, match="credit_invoice"):
        from_json(orjson.dumps({"credit_invoice": 1}), Refund)
