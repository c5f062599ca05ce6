"""Field reports: values that would become malformed headers are refused before sending."""

from __future__ import annotations

import pytest

from klarna_om_async import (
    BatchItem,
    CaptureRequest,
    KlarnaOM,
    ValidationError,
)
from klarna_om_async.testing import FakeKlarna

BAD_KEYS = ["INV-1\n", "INV-1\r\nX-Evil: 1", " INV-1", "INV-1 ", "", "ключ", "a" * 256, "\t"]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_a_bad_idempotency_key_is_refused_before_sending(
    om: KlarnaOM, fake: FakeKlarna, key: str
) -> None:
    order_id = fake.add_order(amount=100)
    with pytest.raises(ValidationError) as caught:
        await om.captures.create(order_id, CaptureRequest(captured_amount=100), idempotency_key=key)
    assert caught.value.field == "idempotency_key"
    assert fake.requests == []


@pytest.mark.parametrize("key", BAD_KEYS[:3])
def test_a_batch_item_with_a_bad_key_cannot_be_made(key: str) -> None:
    with pytest.raises(ValidationError, match="idempotency_key"):
        BatchItem(order_id="o", request=CaptureRequest(captured_amount=1), idempotency_key=key)


@pytest.mark.parametrize(
    ("username", "password", "field"),
    [("user\n", "pw", "username"), ("user", "pw\n", "password"), ("us:er", "pw", "username")],
)
def test_credentials_basic_auth_cannot_carry_are_refused_without_showing_them(
    username: str, password: str, field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        KlarnaOM(username, password)
    assert caught.value.field == field
    assert "pw" not in str(caught.value)
