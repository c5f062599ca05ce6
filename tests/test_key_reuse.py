"""One idempotency key, two different requests: Klarna replays by key alone ("input values
of the operation are disregarded ..., only the key matters"), so the second request gets the
FIRST one's 201 and nothing happens for it. The client must say so: never report the first
request's capture or refund as this one's, never call it an unknown outcome to be rerun with
the same key. Through the library (a new KlarnaOM per call, as a new process: the client's
memory of its own keys cannot catch it) and through `klarna-om`, against FakeKlarna over
loopback."""

from __future__ import annotations

from typing import Literal

import pytest
from click.testing import Result
from test_cli import ORDERS, ServedFake, capture, cli, json_lines
from test_cli import served as served  # the fixture

import klarna_om_async
from klarna_om_async import (
    BatchItem,
    CaptureCreated,
    CaptureRequest,
    CaptureStatus,
    IdempotencyKeyReusedError,
    KlarnaError,
    KlarnaOM,
    KlarnaResponseError,
    RefundCreated,
    RefundRequest,
    RetryPolicy,
    ShippingInfo,
    _routes,
    new_idempotency_key,
)
from klarna_om_async.middleware import Request, Response
from klarna_om_async.testing import DropAfterProcessing, FakeKlarna, InstantSleep, ServerFailure

Kind = Literal["capture", "refund"]


def client(fake: FakeKlarna) -> KlarnaOM:
    """A new client: it remembers no key another client sent (as after a restart)."""
    sleep = InstantSleep()
    policy = RetryPolicy(max_attempts=3, sleep=sleep)
    return KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, retry=policy, clock=sleep.clock
    )


async def create(
    fake: FakeKlarna, kind: Kind, order_id: str, amount: int, key: str | None = None
) -> CaptureCreated | RefundCreated:
    """A capture or refund of ``amount`` made by a client of its own."""
    async with client(fake) as om:
        if kind == "capture":
            request = CaptureRequest(captured_amount=amount)
            return await om.captures.create(order_id, request, idempotency_key=key)
        refund = RefundRequest(refunded_amount=amount)
        return await om.refunds.create(order_id, refund, idempotency_key=key)


def created_id(created: CaptureCreated | RefundCreated) -> str:
    return created.capture_id if isinstance(created, CaptureCreated) else created.refund_id


async def captured_order(fake: FakeKlarna, amount: int = 10_000) -> str:
    order_id = fake.add_order(amount=amount)
    await create(fake, "capture", order_id, amount)
    return order_id


def booked(fake: FakeKlarna) -> tuple[int, int]:
    """How many captures and refunds the fake booked, on every order."""
    return len(fake.booked_captures), len(fake.booked_refunds)


def assert_reused(
    error: IdempotencyKeyReusedError, fake: FakeKlarna, path: str, key: str, earlier: str
) -> None:
    """Nothing happened for this call, and the error says why and what to do, in one line."""
    assert isinstance(error, KlarnaError)
    assert not isinstance(error, KlarnaResponseError)  # not "booked, id unknown"
    assert error.outcome_unknown is False
    assert (error.method, error.url, error.idempotency_key) == ("POST", fake.base_url + path, key)
    assert error.status == 201
    text = str(error)
    assert "\n" not in text
    for said in ("earlier request", repr(key), earlier, "did nothing", "new key"):
        assert said in text
    assert "outcome is unknown" not in text
    assert "Retry with" not in text


# -- through the library ----------------------------------------------------------------------


def test_the_error_is_public() -> None:
    assert "IdempotencyKeyReusedError" in klarna_om_async.__all__
    assert issubclass(IdempotencyKeyReusedError, KlarnaError)


@pytest.mark.parametrize("kind", ["capture", "refund"])
async def test_a_key_reused_for_another_order_books_nothing_and_says_so(
    fake: FakeKlarna, kind: Kind
) -> None:
    if kind == "capture":
        first, second = fake.add_order(amount=10_000), fake.add_order(amount=10_000)
    else:
        first, second = await captured_order(fake), await captured_order(fake)
    key = new_idempotency_key()
    earlier = await create(fake, kind, first, 100, key)
    before = booked(fake)

    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await create(fake, kind, second, 5000, key)

    error = caught.value
    assert_reused(error, fake, f"{ORDERS}/{second}/{kind}s", key, created_id(earlier))
    assert first in str(error)
    assert error.attempts == 1
    assert error.location == earlier.location
    assert booked(fake) == before
    # The remedy it names works: a new key books it.
    await create(fake, kind, second, 5000)
    assert booked(fake) == (before[0] + (kind == "capture"), before[1] + (kind == "refund"))


async def test_a_captures_key_reused_for_a_refund_refunds_nothing(fake: FakeKlarna) -> None:
    order_id = fake.add_order(amount=3000)
    key = new_idempotency_key()
    earlier = await create(fake, "capture", order_id, 3000, key)

    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await create(fake, "refund", order_id, 3000, key)

    assert_reused(caught.value, fake, f"{ORDERS}/{order_id}/refunds", key, created_id(earlier))
    assert "capture" in str(caught.value)
    assert fake.refunds(order_id) == []
    assert fake.order(order_id).refunded_amount == 0


async def test_a_refunds_key_reused_for_a_capture_captures_nothing(fake: FakeKlarna) -> None:
    order_id = fake.add_order(amount=10_000)
    await create(fake, "capture", order_id, 5000)
    key = new_idempotency_key()
    earlier = await create(fake, "refund", order_id, 1000, key)

    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await create(fake, "capture", order_id, 2000, key)

    assert_reused(caught.value, fake, f"{ORDERS}/{order_id}/captures", key, created_id(earlier))
    assert len(fake.captures(order_id)) == 1
    assert fake.order(order_id).captured_amount == 5000


async def test_a_replay_met_after_a_lost_answer_is_still_nothing_booked(fake: FakeKlarna) -> None:
    # Attempt 1 is answered from the key's record too, so losing its answer changes nothing.
    first, second = await captured_order(fake), await captured_order(fake)
    key = new_idempotency_key()
    await create(fake, "refund", first, 100, key)
    fake.inject(DropAfterProcessing(), path=f"{second}/refunds")

    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await create(fake, "refund", second, 200, key)

    assert (caught.value.attempts, caught.value.outcome_unknown) == (2, False)
    assert fake.refunds(second) == []


async def test_a_batch_item_whose_key_was_used_is_refused(fake: FakeKlarna) -> None:
    first, second = fake.add_order(amount=1000), fake.add_order(amount=1000)
    key = new_idempotency_key()
    await create(fake, "capture", first, 1000, key)
    async with client(fake) as om:
        item = BatchItem(
            order_id=second, request=CaptureRequest(captured_amount=1000), idempotency_key=key
        )
        [outcome] = [o async for o in om.capture_many([item])]
    assert outcome.status == CaptureStatus.REFUSED  # nothing booked: a rerun needs a new key
    assert isinstance(outcome.error, IdempotencyKeyReusedError)
    assert fake.captures(second) == []


async def post(om: KlarnaOM, kind: Kind, key: str) -> str:
    if kind == "capture":
        request = CaptureRequest(captured_amount=5)
        return (await om.captures.create("o1", request, idempotency_key=key)).capture_id
    refund = RefundRequest(refunded_amount=5)
    return (await om.refunds.create("o1", refund, idempotency_key=key)).refund_id


@pytest.mark.parametrize(
    ("kind", "headers"),
    [
        ("capture", {"Capture-Id": "c-9", "Location": f"{ORDERS}/OTHER/captures/c-9"}),
        ("capture", {"Location": "{origin}" + f"{ORDERS}/o1/refunds/r-1?x=1"}),
        ("capture", {"Capture-Id": "c-9", "Location": "orders/o2/captures/c-9"}),
        ("refund", {"Refund-Id": "r-9", "Location": "{origin}" + f"{ORDERS}/OTHER/refunds/r-9"}),
        ("refund", {"Capture-Id": "c-1", "Location": f"{ORDERS}/o1/captures/c-1"}),
        ("refund", {"Refund-Id": "r-9", "Location": f"{ORDERS}/o%2F1/refunds/r-9"}),
        # This request's own path after a query or a fragment is not where the item lives.
        (
            "capture",
            {
                "Capture-Id": "c-9",
                "Location": f"{ORDERS}/OTHER/captures/c-9#{ORDERS}/o1/captures/c-9",
            },
        ),
        ("refund", {"Location": f"{ORDERS}/OTHER/refunds/r-9?next={ORDERS}/o1/refunds/r-9"}),
    ],
)
async def test_a_location_naming_another_order_or_kind_is_a_reused_key(
    answer_201: tuple[dict[str, str], KlarnaOM], kind: Kind, headers: dict[str, str]
) -> None:
    sent, om = answer_201
    sent.update(headers)
    key = new_idempotency_key()
    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await post(om, kind, key)
    error = caught.value
    assert (error.outcome_unknown, error.idempotency_key, error.attempts) == (False, key, 1)
    assert error.location.endswith(headers["Location"].removeprefix("{origin}"))
    assert str(error.url).endswith(f"/orders/o1/{kind}s")


@pytest.mark.parametrize("kind", ["capture", "refund"])
async def test_a_location_naming_this_order_in_other_letters_is_no_false_alarm(
    answer_201: tuple[dict[str, str], KlarnaOM], kind: Kind
) -> None:
    # Klarna's order ids are UUIDs: "O1" is "o1". Calling a booked item unbooked would
    # invite a second one.
    sent, om = answer_201
    sent["Location"] = f"{ORDERS}/O1/{kind}s/x-1"
    assert await post(om, kind, new_idempotency_key()) == "x-1"


# -- through `klarna-om` ----------------------------------------------------------------------


def cli_create(served: ServedFake, kind: Kind, order_id: str, amount: int, key: str) -> Result:
    return cli([kind, order_id, "--amount", str(amount), "--idempotency-key", key], served)


def served_booked(served: ServedFake) -> tuple[int, int]:
    return served.do(lambda: booked(served.fake))


def captured(served: ServedFake, amount: int = 10_000) -> str:
    order_id = served.add_order(amount)
    capture(served, order_id, amount)
    return order_id


def assert_refused_without_rerun_advice(stderr: str, key: str) -> str:
    """The one error line: it names the replay and a new key, never a rerun with ``key``."""
    [line] = [text for text in stderr.splitlines() if not text.startswith("idempotency key:")]
    assert line.startswith("Error: Klarna answered with the result of an earlier request")
    assert "new key" in line
    assert f"--idempotency-key {key}" not in line
    assert "outcome is unknown" not in line
    return line


@pytest.mark.parametrize("kind", ["capture", "refund"])
def test_cli_a_key_reused_for_another_order_exits_1_and_books_nothing(
    served: ServedFake, kind: Kind
) -> None:
    first = captured(served) if kind == "refund" else served.add_order(10_000)
    second = captured(served, 5000) if kind == "refund" else served.add_order(5000)
    assert cli_create(served, kind, first, 100, "K1").exit_code == 0
    before = served_booked(served)

    result = cli([kind, second, "--amount", "5000", "--idempotency-key", "K1", "--json"], served)

    assert result.exit_code == 1, result.output
    request, error = json_lines(result.stdout)
    assert request["order_id"] == second
    assert (error["type"], error["error"]) == ("error", "IdempotencyKeyReusedError")
    assert (error["outcome_unknown"], error["exit_code"], error["idempotency_key"]) == (
        False,
        1,
        "K1",
    )
    assert f"/orders/{first}/{kind}s/" in error["location"]
    assert f"{kind}_id" not in error  # no capture or refund of this call to report
    line = assert_refused_without_rerun_advice(result.stderr, "K1")
    assert first in line
    assert served_booked(served) == before


@pytest.mark.parametrize(("first_kind", "then"), [("capture", "refund"), ("refund", "capture")])
def test_cli_a_key_reused_for_the_other_kind_exits_1_not_3(
    served: ServedFake, first_kind: Kind, then: Kind
) -> None:
    order_id = served.add_order(3000)
    if first_kind == "refund":
        capture(served, order_id, 1000)
    assert cli_create(served, first_kind, order_id, 1000, "CK").exit_code == 0
    before = served_booked(served)

    result = cli([then, order_id, "--amount", "1000", "--idempotency-key", "CK"], served)

    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert_refused_without_rerun_advice(result.stderr, "CK")
    assert served_booked(served) == before
    # The same command with a new key does what was asked.
    again = cli([then, order_id, "--amount", "1000"], served)
    assert again.exit_code == 0, again.output
    assert served_booked(served) == (
        before[0] + (then == "capture"),
        before[1] + (then == "refund"),
    )


@pytest.mark.parametrize("kind", ["capture", "refund"])
def test_cli_a_key_reused_with_another_amount_exits_1_naming_what_was_booked(
    served: ServedFake, kind: Kind
) -> None:
    order_id = captured(served) if kind == "refund" else served.add_order(10_000)
    first = cli([kind, order_id, "--amount", "100", "--idempotency-key", "K1", "--json"], served)
    booked_id = json_lines(first.stdout)[-1][f"{kind}_id"]
    before = served_booked(served)

    human = cli([kind, order_id, "--amount", "9000", "--idempotency-key", "K1"], served)

    assert human.exit_code == 1, human.output
    assert human.stdout == ""
    key_line, line = human.stderr.splitlines()
    assert key_line == "idempotency key: K1"
    assert line.startswith("Error: Klarna replayed an earlier request made with idempotency key")
    past = "captured" if kind == "capture" else "refunded"
    for said in (booked_id, " 100 ", "9000", f"nothing more was {past}", "new key"):
        assert said in line
    assert "--idempotency-key K1" not in line
    assert served_booked(served) == before

    as_json = cli([kind, order_id, "--amount", "9000", "--idempotency-key", "K1", "--json"], served)
    assert as_json.exit_code == 1
    _, error = json_lines(as_json.stdout)
    assert (error["type"], error["error"], error["outcome_unknown"]) == (
        "error",
        "IdempotencyKeyReusedError",
        False,
    )
    assert (error[f"{kind}_id"], error[f"{past}_amount"], error["exit_code"]) == (
        booked_id,
        100,
        1,
    )
    assert served_booked(served) == before


@pytest.mark.parametrize("kind", ["capture", "refund"])
def test_cli_a_key_reused_with_another_reference_exits_1(served: ServedFake, kind: Kind) -> None:
    # Only the amount was compared: the same amount under another reference (another
    # parcel) was reported done with the first one's id, and nothing more was booked.
    order_id = captured(served) if kind == "refund" else served.add_order(10_000)
    args = [kind, order_id, "--amount", "100", "--idempotency-key", "K1"]
    assert cli([*args, "--reference", "box-1"], served).exit_code == 0
    before = served_booked(served)

    again = cli([*args, "--reference", "box-2"], served)

    assert again.exit_code == 1, again.output
    line = again.stderr.splitlines()[-1]
    assert "of 100 with reference 'box-1'" in line
    assert "not the 100 with reference 'box-2' asked" in line
    assert served_booked(served) == before
    # No reference asked, but Klarna's has one: not this request either.
    assert cli(args, served).exit_code == 1
    # The same reference with spaces around it is the same request.
    assert cli([*args, "--reference", " box-1 "], served).exit_code == 0
    assert served_booked(served) == before


@pytest.mark.parametrize("kind", ["capture", "refund"])
def test_cli_the_same_request_rerun_with_its_key_is_verified_and_exits_0(
    served: ServedFake, kind: Kind
) -> None:
    order_id = captured(served) if kind == "refund" else served.add_order(10_000)
    args = [kind, order_id, "--amount", "100", "--idempotency-key", "K1", "--json"]
    first, again = cli(args, served), cli(args, served)
    assert (first.exit_code, again.exit_code) == (0, 0)
    past = "captured" if kind == "capture" else "refunded"
    printed = json_lines(again.stdout)[-1]
    assert printed[f"{kind}_id"] == json_lines(first.stdout)[-1][f"{kind}_id"]
    assert (printed[f"{past}_amount"], printed["amount_verified"]) == (100, True)


@pytest.mark.parametrize("kind", ["capture", "refund"])
def test_cli_a_failed_read_back_still_reports_the_creation_unverified(
    served: ServedFake, kind: Kind
) -> None:
    order_id = captured(served) if kind == "refund" else served.add_order(10_000)
    served.do(
        lambda: served.fake.inject(ServerFailure(503), method="GET", path=f"/{kind}s/", times=None)
    )
    args = [kind, order_id, "--amount", "100", "--idempotency-key", "K1", "--max-attempts", "1"]

    human = cli(args, served)

    assert human.exit_code == 0, human.output
    made_id = served.do(
        lambda: getattr(getattr(served.fake, f"{kind}s")(order_id)[-1], f"{kind}_id")
    )
    assert made_id in human.stdout
    assert "amount not verified" in human.stdout
    [warning] = [t for t in human.stderr.splitlines() if t.startswith("Warning:")]
    assert "503" in warning
    assert made_id in warning

    as_json = cli([*args, "--json"], served)
    assert as_json.exit_code == 0
    printed = json_lines(as_json.stdout)[-1]
    past = "captured" if kind == "capture" else "refunded"
    assert (printed[f"{kind}_id"], printed[f"{past}_amount"], printed["amount_verified"]) == (
        made_id,
        None,
        False,
    )


@pytest.mark.parametrize("kind", ["capture", "refund"])
async def test_a_shipping_info_key_reused_for_a_create_books_nothing(
    fake: FakeKlarna, kind: Kind
) -> None:
    # Klarna replays the 204 of the call that first had the key: no Location, no id.
    order_id = fake.add_order(amount=10_000)
    shipped = await create(fake, "capture", order_id, 4000)
    key = new_idempotency_key()
    async with client(fake) as om:
        info = [ShippingInfo(shipping_company="DHL", tracking_number="1")]
        await om.captures.add_shipping_info(
            order_id, created_id(shipped), info, idempotency_key=key
        )
    before = booked(fake)

    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await create(fake, kind, order_id, 1000, key)

    error = caught.value
    assert (error.status, error.outcome_unknown, error.idempotency_key) == (204, False, key)
    assert "204 No Content" in str(error)
    assert "new key" in str(error)
    assert booked(fake) == before


# -- the Location read without parsing -------------------------------------------------------


def _created_id(path: str, location: str) -> object:
    """The id ``created`` reads from a 201 with only ``location`` (or its error's name)."""
    request = Request("POST", path, b"{}", {}, "key-1")
    response = Response(201, {"Location": location}, b"", request, "http://k" + path)
    try:
        return _routes.created(response, "Capture-Id", "capture")[0]
    except KlarnaError as error:
        return type(error).__name__


@pytest.mark.parametrize(
    "location",
    [
        f"http://k{ORDERS}/o1/captures/c-1",
        f"{ORDERS}/o1/captures/c-1",
        f"http://k{ORDERS}/o1/captures/..",  # a dot segment is no id
        f"https://k{ORDERS}/o1/captures/.",
        f"{ORDERS}/o1/captures/C\tD",  # control characters: as yarl reads them
        f"http://k{ORDERS}/o1/captures/C%2DD",
        f"http://k{ORDERS}/o1/captures/c-1?x=1",
    ],
)
def test_a_plain_location_is_read_as_parsing_it_would(
    location: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = f"{ORDERS}/o1/captures"
    fast = _created_id(path, location)
    monkeypatch.setattr(_routes, "_own_item_in", lambda location, posted: None)
    assert fast == _created_id(path, location)
