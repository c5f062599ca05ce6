"""A batch holds no per-item state that grows with it: compact duplicate sets, a capped list
of the items a stopped batch did not send (issue 9, the journal at scale)."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given
from hypothesis import strategies as st

from klarna_om_async import (
    BatchAbortedError,
    BatchItem,
    CaptureRequest,
    CaptureStatus,
    KlarnaOM,
)
from klarna_om_async._seen import SeenSet
from klarna_om_async.batch import NOT_SENT_LISTED
from klarna_om_async.testing import FakeKlarna


@given(st.lists(st.text(max_size=12), max_size=300))
def test_seen_set_says_what_a_set_says(values: list[str]) -> None:
    seen, oracle = SeenSet(), set[str]()
    for value in values:
        assert (value in seen) == (value in oracle)
        assert seen.add(value) == (value not in oracle)
        oracle.add(value)
        assert value in seen
    assert len(seen) == len(oracle)


def test_seen_set_keeps_everything_across_growth() -> None:
    seen = SeenSet()
    keys = [f"order-{n}:part-{n % 7}" for n in range(20_000)]  # grows the table five times
    assert all(seen.add(key) for key in keys)
    assert not any(seen.add(key) for key in keys)
    assert len(seen) == 20_000
    # hash("") is 0, which marks an empty slot: it is stored as 1 and still remembered.
    assert seen.add("")
    assert not seen.add("")


async def test_a_stopped_batch_counts_every_item_not_sent_and_names_the_first(
    fake: FakeKlarna,
) -> None:
    total = NOT_SENT_LISTED + 500

    def items() -> Iterator[tuple[str, CaptureRequest]]:
        # Streamed, as a big batch is: the orders need not exist, none is ever sent.
        for n in range(total):
            yield f"order-{n}", CaptureRequest(captured_amount=100)

    outcomes = []
    async with KlarnaOM(fake.username, "wrong", base_url=fake.base_url) as om:
        try:
            async for outcome in om.capture_many(items(), concurrency=2):
                outcomes.append(outcome)
        except BatchAbortedError as error:
            stopped = error
    assert {o.status for o in outcomes} == {CaptureStatus.REFUSED}
    assert stopped.not_sent_count == total - len(outcomes)
    assert len(stopped.not_sent) == NOT_SENT_LISTED
    first = len(outcomes)
    assert stopped.not_sent[:2] == (f"order-{first}", f"order-{first + 1}")
    assert f"; {stopped.not_sent_count} items not sent; " in str(stopped)
    assert len(fake.requests) == len(outcomes)


async def test_an_item_refused_for_its_key_leaves_its_item_key_free(fake: FakeKlarna) -> None:
    # (o1, K1), (o2, K1), (o2, K2): the second is refused for reusing K1; the third is o2's
    # only capture with a key of its own, and is sent.
    first, second = fake.add_order(amount=100), fake.add_order(amount=100)
    request = CaptureRequest(captured_amount=100)
    items = [
        BatchItem(order_id=first, request=request, idempotency_key="K1"),
        BatchItem(order_id=second, request=request, idempotency_key="K1"),
        BatchItem(order_id=second, request=request, idempotency_key="K2"),
    ]
    async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as om:
        outcomes = [o async for o in om.capture_many(items, concurrency=1)]
    assert [o.status for o in outcomes] == [
        CaptureStatus.CAPTURED,
        CaptureStatus.REFUSED,
        CaptureStatus.CAPTURED,
    ]
    assert len(fake.captures(first)) == len(fake.captures(second)) == 1
