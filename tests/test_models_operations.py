"""The request and response models of the order operations: valid values build and serialize
with unset fields omitted, every documented limit is refused naming its field, and answers are
read tolerantly (unknown fields, unknown enum values, long values)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klarna_om_async._convert import from_json, to_json
from klarna_om_async.errors import (
    CancelNotAllowedError,
    NotAllowedError,
    NotFoundError,
    ServerError,
    ValidationError,
    decode_error,
)
from klarna_om_async.models import (
    Address,
    Customer,
    ExtendDueDateOption,
    ExtendDueDateOptions,
    ExtendDueDateRequest,
    InitialPaymentMethod,
    InitialPaymentMethodType,
    Order,
    OrderLine,
    OrderLineType,
    ShippingInfo,
    ShippingMethod,
    UpdateAuthorizationRequest,
    UpdateMerchantReferencesRequest,
    UpdateShippingAddressRequest,
    validate_address_request,
    validate_shipping_info_request,
)

MAX_AMOUNT = 200_000_000
MAX_INT32 = 2**31 - 1
modest = settings(max_examples=60, deadline=None)
#: The spec's maxLength of each address field a request may send (country has none: it is
#: an ISO 3166 alpha-2 code).
ADDRESS_LIMITS = {
    "given_name": 100,
    "family_name": 100,
    "title": 20,
    "organization_name": 255,
    "attention": 255,
    "street_address": 100,
    "street_address2": 100,
    "postal_code": 10,
    "city": 200,
    "region": 200,
    "email": 100,
    "phone": 100,
}
LINE = OrderLine(name="Charger", quantity=1, unit_price=2000, total_amount=2000)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def raises_on(field: str, make: Callable[[], object]) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        make()
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    return caught.value


def sent_fields(model: Any) -> set[str]:
    """The fields of ``model`` that are set: exactly what its JSON must hold."""
    return {f.name for f in attrs.fields(type(model)) if getattr(model, f.name) is not None}


def has_no_null(value: object) -> bool:
    if isinstance(value, dict):
        return all(v is not None and has_no_null(v) for v in value.values())
    if isinstance(value, list):
        return all(has_no_null(v) for v in value)
    return True


order_lines = st.builds(
    OrderLine,
    name=st.text(max_size=255),
    quantity=st.integers(0, 10**6),
    unit_price=st.integers(-MAX_AMOUNT, MAX_AMOUNT),
    total_amount=st.integers(-MAX_AMOUNT, MAX_AMOUNT),
    type=optional(st.sampled_from(OrderLineType)),
    reference=optional(st.text(max_size=255)),
)
authorizations = st.builds(
    UpdateAuthorizationRequest,
    order_amount=st.integers(0, MAX_AMOUNT),
    description=optional(st.text(max_size=255)),
    order_lines=optional(st.lists(order_lines, max_size=3)),
)
request_addresses = st.builds(
    Address,
    country=optional(st.just("") | st.from_regex(r"[A-Za-z]{2}", fullmatch=True)),
    **{name: optional(st.text(max_size=limit)) for name, limit in ADDRESS_LIMITS.items()},
).filter(lambda address: sent_fields(address) != set())
shipping_addresses = st.builds(UpdateShippingAddressRequest, shipping_address=request_addresses)
due_dates = st.builds(ExtendDueDateRequest, number_of_days=st.integers(1, MAX_INT32))


@st.composite
def some_references(draw: st.DrawFn) -> UpdateMerchantReferencesRequest:
    first = draw(optional(st.text(max_size=255)))
    second = draw(st.text(max_size=255) if first is None else optional(st.text(max_size=255)))
    return UpdateMerchantReferencesRequest(merchant_reference1=first, merchant_reference2=second)


@modest
@given(
    model=st.one_of(authorizations, some_references(), shipping_addresses, due_dates),
)
def test_valid_requests_serialize_only_their_set_fields_and_round_trip(model: object) -> None:
    body = orjson.loads(to_json(model))
    assert set(body) == sent_fields(model)
    assert has_no_null(body)
    assert from_json(to_json(model), type(model)) == model


@modest
@given(address=request_addresses)
def test_a_valid_address_passes_the_request_check_unchanged(address: Address) -> None:
    assert validate_address_request(address) is address
    assert set(orjson.loads(to_json(address))) == sent_fields(address)


# --- every limit, refused naming its field ----------------------------------------------------


@modest
@given(amount=st.integers(max_value=-1) | st.integers(min_value=MAX_AMOUNT + 1))
def test_an_order_amount_out_of_range_is_refused(amount: int) -> None:
    raises_on("order_amount", lambda: UpdateAuthorizationRequest(order_amount=amount))


@pytest.mark.parametrize("amount", [None, True, 12.0, "12000"])
def test_an_order_amount_that_is_no_int_is_refused(amount: object) -> None:
    raises_on("order_amount", lambda: UpdateAuthorizationRequest(order_amount=amount))  # type: ignore[arg-type]


@modest
@given(extra=st.integers(1, 50))
def test_a_description_over_255_characters_is_refused(extra: int) -> None:
    raises_on(
        "description",
        lambda: UpdateAuthorizationRequest(order_amount=1, description="x" * (255 + extra)),
    )


@pytest.mark.parametrize("count", [1001, 1500])
def test_more_than_1000_order_lines_are_refused(count: int) -> None:
    raises_on(
        "order_lines",
        lambda: UpdateAuthorizationRequest(order_amount=1, order_lines=[LINE] * count),
    )
    assert UpdateAuthorizationRequest(order_amount=1, order_lines=[LINE] * 1000).order_lines


def test_an_unknown_line_type_or_a_non_line_is_refused_in_an_update() -> None:
    raises_on(
        "order_lines[1].type",
        lambda: UpdateAuthorizationRequest(
            order_amount=1, order_lines=[LINE, attrs.evolve(LINE, type="rental")]
        ),
    )
    raises_on(
        "order_lines[0]",
        lambda: UpdateAuthorizationRequest(order_amount=1, order_lines=[{"name": "x"}]),  # type: ignore[list-item]
    )


@modest
@given(
    field=st.sampled_from(["merchant_reference1", "merchant_reference2"]),
    extra=st.integers(1, 100),
)
def test_a_merchant_reference_over_255_characters_is_refused(field: str, extra: int) -> None:
    raises_on(field, lambda: UpdateMerchantReferencesRequest(**{field: "r" * (255 + extra)}))


def test_merchant_references_with_nothing_to_update_are_refused() -> None:
    error = raises_on("merchant_reference1", UpdateMerchantReferencesRequest)
    assert "merchant_reference2" in error.reason
    raises_on("merchant_reference2", lambda: UpdateMerchantReferencesRequest(merchant_reference2=5))  # type: ignore[arg-type]


@modest
@given(field=st.sampled_from(sorted(ADDRESS_LIMITS)), extra=st.integers(1, 50))
def test_an_address_field_over_its_limit_is_refused_on_sending_only(field: str, extra: int) -> None:
    limit = ADDRESS_LIMITS[field]
    address = Address(**{field: "a" * (limit + extra)})  # a response may hold it ...
    error = raises_on(
        f"shipping_address.{field}",
        lambda: UpdateShippingAddressRequest(shipping_address=address),
    )
    assert str(limit) in error.reason
    # ... and reading it from an answer still works.
    read = from_json(orjson.dumps({"shipping_address": {field: "a" * (limit + extra)}}), Order)
    assert read.shipping_address == address


def test_an_address_at_its_limits_passes() -> None:
    address = Address(country="us", **{f: "a" * n for f, n in ADDRESS_LIMITS.items()})
    assert UpdateShippingAddressRequest(shipping_address=address).shipping_address is address


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (Address(), "shipping_address"),
        (None, "shipping_address"),
        ({"city": "Knoxville"}, "shipping_address"),
        (ShippingInfo(), "shipping_address"),
    ],
)
def test_no_address_or_an_empty_one_is_refused(value: object, field: str) -> None:
    raises_on(field, lambda: UpdateShippingAddressRequest(shipping_address=value))  # type: ignore[arg-type]


def test_a_country_alone_is_an_address_to_send() -> None:
    assert validate_address_request(Address(country="se")) == Address(country="se")


@pytest.mark.parametrize("country", ["DE", "us", "Se", ""])
def test_a_country_is_an_iso_3166_alpha_2_code_or_empty_to_clear(country: str) -> None:
    address = Address(city="Berlin", country=country)
    assert UpdateShippingAddressRequest(shipping_address=address).shipping_address is address


@pytest.mark.parametrize("country", ["Germany", "x" * 1000, "D", "12", "D1", "ÄÖ", " DE", "D\n"])
def test_a_country_that_is_no_alpha_2_code_is_refused_in_one_line(country: str) -> None:
    """The spec says "ISO 3166 alpha-2" (and shows "us"), and Klarna answers 400 otherwise;
    it gives e-mail and postal code no format of their own, so only their lengths count."""
    address = Address(country=country)
    error = raises_on(
        "shipping_address.country",
        lambda: UpdateShippingAddressRequest(shipping_address=address),
    )
    assert "alpha-2" in error.reason
    assert len(str(error)) < 200
    assert "\n" not in str(error)
    # Not a field the client checks the format of: anything within the length passes.
    other = Address(email="not an e-mail", postal_code="?")
    assert validate_address_request(other) is other


@modest
@given(days=st.integers(max_value=0) | st.integers(min_value=MAX_INT32 + 1))
def test_number_of_days_out_of_range_is_refused(days: int) -> None:
    raises_on("number_of_days", lambda: ExtendDueDateRequest(number_of_days=days))


@pytest.mark.parametrize("days", [None, True, 14.0, "14"])
def test_number_of_days_that_is_no_int_is_refused(days: object) -> None:
    raises_on("number_of_days", lambda: ExtendDueDateRequest(number_of_days=days))  # type: ignore[arg-type]


@modest
@given(count=st.integers(1, 500))
def test_order_level_shipping_info_takes_1_to_500_entries(count: int) -> None:
    entry = ShippingInfo(shipping_company="DHL US", shipping_method=ShippingMethod.HOME)
    assert validate_shipping_info_request([entry] * count) == (entry,) * count


@pytest.mark.parametrize("count", [0, 501])
def test_order_level_shipping_info_outside_1_to_500_is_refused(count: int) -> None:
    raises_on("shipping_info", lambda: validate_shipping_info_request([ShippingInfo()] * count))


# --- answers: tolerant reading -----------------------------------------------------------------


@modest
@given(
    currency=optional(st.text(max_size=3)),
    options=optional(
        st.lists(
            st.fixed_dictionaries(
                {"number_of_days": st.integers(1, 365), "amount": st.integers(0, 10**6)},
                optional={"fee_type": st.text(max_size=5)},
            ),
            max_size=4,
        )
    ),
)
def test_extend_due_date_options_are_read_ignoring_unknown_fields(
    currency: str | None, options: list[dict[str, Any]] | None
) -> None:
    raw = {"currency": currency, "options": options, "extra": [1, 2]}
    read = from_json(orjson.dumps(raw), ExtendDueDateOptions)
    assert read.currency == currency
    expected = (
        None
        if options is None
        else tuple(
            ExtendDueDateOption(number_of_days=o["number_of_days"], amount=o["amount"])
            for o in options
        )
    )
    assert read.options == expected


def test_the_initial_payment_method_keeps_a_type_added_later_as_str() -> None:
    known = from_json(b'{"initial_payment_method": {"type": "INVOICE"}}', Order)
    assert known.initial_payment_method == InitialPaymentMethod(
        type=InitialPaymentMethodType.INVOICE
    )
    later = from_json(
        b'{"initial_payment_method": {"type": "CRYPTO", "description": "x", "new": 1}}', Order
    )
    assert later.initial_payment_method == InitialPaymentMethod(type="CRYPTO", description="x")


def test_an_order_with_every_new_field_round_trips() -> None:
    order = Order(
        purchase_country="us",
        merchant_data="meta",
        shipping_info=[ShippingInfo(shipping_company="UPS", tracking_number="1Z")],
        initial_payment_method=InitialPaymentMethod(
            type=InitialPaymentMethodType.FIXED_AMOUNT, number_of_installments=3
        ),
    )
    assert from_json(to_json(order), Order) == order


@modest
@given(born=optional(st.dates()), number=optional(st.text(max_size=20)))
def test_the_customer_is_read_with_a_date_of_birth_and_kept_out_of_repr(
    born: date | None, number: str | None
) -> None:
    raw = {"customer": {"date_of_birth": born and born.isoformat(), "gender": "x"}}
    raw["customer"]["national_identification_number"] = number
    order = from_json(orjson.dumps(raw), Order)
    assert order.customer == Customer(date_of_birth=born, national_identification_number=number)
    assert from_json(to_json(order), Order) == order
    if born is not None:
        assert born.isoformat() not in repr(order)
    if number:
        assert repr(number) not in repr(order)


@pytest.mark.parametrize("born", [19810906, "06/09/1981", ["1981-09-06"]])
def test_a_date_of_birth_that_is_no_iso_date_is_a_value_error(born: object) -> None:
    body = orjson.dumps({"customer": {"date_of_birth": born}})
    with pytest.raises(ValueError, match="date_of_birth") as caught:
        from_json(body, Order)
    assert not isinstance(caught.value, ValidationError)


@pytest.mark.parametrize(
    "body",
    [
        b'{"options": [{"number_of_days": "14"}]}',
        b'{"options": [{"amount": 1.5}]}',
        b'{"currency": 840}',
        b'{"options": {}}',
    ],
)
def test_options_of_the_wrong_shape_are_a_value_error_never_validation_error(body: bytes) -> None:
    with pytest.raises(ValueError, match="ExtendDueDateOptions") as caught:
        from_json(body, ExtendDueDateOptions)
    assert not isinstance(caught.value, ValidationError)


# --- the new error code ------------------------------------------------------------------------


def test_cancel_not_allowed_decodes_by_its_code_and_only_under_a_403() -> None:
    body = b'{"error_code": "CANCEL_NOT_ALLOWED", "error_messages": ["has captures"]}'
    error = decode_error(403, {}, body)
    assert type(error) is CancelNotAllowedError
    assert isinstance(error, NotAllowedError)
    assert not error.retryable
    assert type(decode_error(404, {}, body)) is NotFoundError
    assert type(decode_error(503, {}, body)) is ServerError
