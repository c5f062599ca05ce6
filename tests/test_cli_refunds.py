"""`klarna-om refund` and `klarna-om refund-get` through the real entry point, against a
FakeKlarna served over loopback from its own thread (see test_cli.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from test_cli import ORDERS, ServedFake, capture, cli, json_lines

from klarna_om_async.testing import DropAfterProcessing, FakeRefund, ServerFailure

KEY_LINE = "idempotency key: "


@pytest.fixture
def served() -> Iterator[ServedFake]:
    served = ServedFake()
    try:
        yield served
    finally:
        served.close()


def refund_keys(served: ServedFake, order_id: str) -> list[str | None]:
    """Idempotency keys of the refund POSTs received for ``order_id``."""
    path = f"{ORDERS}/{order_id}/refunds"
    return served.do(lambda: [r.idempotency_key for r in served.fake.requests if r.path == path])


def refunds(served: ServedFake, order_id: str) -> list[FakeRefund]:
    return served.do(lambda: served.fake.refunds(order_id))


def captured(served: ServedFake, amount: int = 10_000) -> str:
    """An order of ``amount``, all of it captured with `klarna-om capture`."""
    order_id = served.add_order(amount)
    capture(served, order_id, amount)
    return order_id


def test_refund_says_its_key_first_then_books_and_prints_the_refund_id(
    served: ServedFake,
) -> None:
    order_id = captured(served)
    args = ["refund", order_id, "--amount", "4000", "--reference", "RMA-1"]
    result = cli([*args, "--description", "Returned"], served)
    assert result.exit_code == 0, result.output
    [booked] = refunds(served, order_id)
    assert (booked.refunded_amount, booked.reference, booked.description) == (
        4000,
        "RMA-1",
        "Returned",
    )
    assert result.stderr == f"{KEY_LINE}{booked.idempotency_key}\n"
    assert uuid.UUID(booked.idempotency_key or "").version == 4
    assert refund_keys(served, order_id) == [booked.idempotency_key]
    assert result.stdout == (
        f"Refunded 4000 on order {order_id}: refund_id {booked.refund_id} "
        f"(idempotency key {booked.idempotency_key}, 1 attempt)\n"
    )


def test_refund_json_prints_the_request_then_the_result_with_the_given_key(
    served: ServedFake,
) -> None:
    order_id = captured(served)
    args = ["refund", order_id, "--amount", "10000", "--idempotency-key", "rk-1", "--json"]
    result = cli(args, served)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    request, printed = json_lines(result.stdout)
    assert request == {
        "type": "request",
        "command": "refund",
        "order_id": order_id,
        "idempotency_key": "rk-1",
    }
    [booked] = refunds(served, order_id)
    assert printed == {
        "order_id": order_id,
        "refund_id": booked.refund_id,
        "location": f"{served.fake.base_url}{ORDERS}/{order_id}/refunds/{booked.refund_id}",
        "idempotency_key": "rk-1",
        "attempts": 1,
        "refunded_amount": 10000,  # read back from Klarna: what it booked
        "amount_verified": True,
    }
    assert booked.idempotency_key == "rk-1"
    assert served.do(lambda: served.fake.order(order_id).status) == "CLOSED"


def test_refund_refused_prints_its_key_then_one_line_and_exits_1(served: ServedFake) -> None:
    order_id = captured(served, 1000)
    result = cli(["refund", order_id, "--amount", "1001"], served)
    assert result.exit_code == 1
    assert result.stdout == ""
    key_line, line = result.stderr.splitlines()
    assert key_line == f"{KEY_LINE}{refund_keys(served, order_id)[0]}"
    assert "403 REFUND_NOT_ALLOWED" in line
    assert "correlation_id=" in line
    assert refunds(served, order_id) == []
    # Never retried: one POST.
    assert len(refund_keys(served, order_id)) == 1


def test_refund_of_an_order_with_nothing_captured_exits_1_with_a_json_error(
    served: ServedFake,
) -> None:
    order_id = served.add_order(1000)
    result = cli(["refund", order_id, "--amount", "1", "--json"], served)
    assert result.exit_code == 1
    request, error = json_lines(result.stdout)
    assert error["type"] == "error"
    assert (error["error"], error["status"], error["error_code"]) == (
        "RefundNotAllowedError",
        403,
        "REFUND_NOT_ALLOWED",
    )
    assert (error["outcome_unknown"], error["exit_code"]) == (False, 1)
    assert error["idempotency_key"] == request["idempotency_key"]


def test_refund_of_an_unknown_order_exits_1(served: ServedFake) -> None:
    result = cli(["refund", "no-such-order", "--amount", "1"], served)
    assert result.exit_code == 1
    assert "404 NO_SUCH_ORDER" in result.stderr


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--amount", "-1"], "refunded_amount: must be at least 0"),
        (["--amount", "200000001"], "refunded_amount: must be at most 200000000"),
        (["--amount", "1", "--reference", "x" * 256], "reference: must be at most 255"),
        (["--amount", "1", "--description", "x" * 256], "description: must be at most 255"),
        (["--amount", "1", "--idempotency-key", " k"], "idempotency_key"),
        (["--amount", "1.5"], "not a valid integer"),
    ],
)
def test_bad_refund_input_exits_2_says_no_key_and_sends_nothing(
    served: ServedFake, extra: list[str], says: str
) -> None:
    order_id = captured(served)
    sent = served.requests_for(order_id)
    result = cli(["refund", order_id, *extra], served)
    assert result.exit_code == 2
    assert says in result.stderr
    assert KEY_LINE not in result.output
    assert served.requests_for(order_id) == sent
    as_json = cli(["refund", order_id, *extra, "--json"], served)
    assert as_json.exit_code == 2
    [error] = json_lines(as_json.stdout)
    assert (error["type"], error["outcome_unknown"], error["exit_code"]) == ("error", False, 2)


def test_an_unknown_outcome_exits_3_and_the_printed_key_finishes_it_exactly_once(
    served: ServedFake,
) -> None:
    order_id = captured(served, 6000)
    # Booked, but the answer is lost; the retry meets a 503.
    served.do(lambda: served.fake.inject(DropAfterProcessing(), path="/refunds"))
    served.do(lambda: served.fake.inject(ServerFailure(503), path="/refunds"))
    args = ["refund", order_id, "--amount", "6000", "--json"]
    result = cli([*args, "--max-attempts", "2"], served)
    assert result.exit_code == 3
    request, error = json_lines(result.stdout)
    key = request["idempotency_key"]
    assert (error["type"], error["outcome_unknown"], error["idempotency_key"]) == (
        "error",
        True,
        key,
    )
    assert error["exit_code"] == 3
    assert f"--idempotency-key {key}" in result.stderr
    [booked] = refunds(served, order_id)

    again = cli([*args, "--idempotency-key", key], served)
    assert again.exit_code == 0, again.output
    assert json_lines(again.stdout)[-1]["refund_id"] == booked.refund_id
    assert refunds(served, order_id) == [booked]
    assert refund_keys(served, order_id) == [key, key, key]


def test_refund_get_shows_a_refund(served: ServedFake) -> None:
    order_id = captured(served)
    args = ["refund", order_id, "--amount", "2500", "--reference", "RMA-2", "--json"]
    refund_id = json_lines(cli(args, served).stdout)[-1]["refund_id"]
    human = cli(["refund-get", order_id, refund_id], served)
    assert human.exit_code == 0, human.output
    for shown in (refund_id, "2500", "RMA-2", "refunded_at"):
        assert shown in human.stdout
    as_json = cli(["refund-get", order_id, refund_id, "--json"], served)
    assert as_json.exit_code == 0
    [printed] = json_lines(as_json.stdout)
    assert (printed["refund_id"], printed["refunded_amount"], printed["reference"]) == (
        refund_id,
        2500,
        "RMA-2",
    )
    order = json_lines(cli(["order", order_id, "--json"], served).stdout)[0]
    assert order["refunded_amount"] == 2500
    assert [r["refund_id"] for r in order["refunds"]] == [refund_id]


def test_refund_get_of_an_unknown_refund_exits_1(served: ServedFake) -> None:
    order_id = served.add_order()
    result = cli(["refund-get", order_id, "nope", "--json"], served)
    assert result.exit_code == 1
    assert "404 NOT_FOUND" in result.stderr
    [error] = json_lines(result.stdout)
    assert (error["type"], error["error"], error["status"]) == ("error", "NoSuchRefundError", 404)
    unknown_order = cli(["refund-get", "no-such-order", "r-1"], served)
    assert unknown_order.exit_code == 1
    assert "404 NO_SUCH_ORDER" in unknown_order.stderr


def test_help_lists_the_refund_commands() -> None:
    text = cli(["--help"]).stdout
    assert "refund-get" in text
    assert "capture, refund, ship and send-out print their idempotency key" in " ".join(
        text.split()
    )
    refund_help = cli(["refund", "--help"]).stdout
    for word in ("--amount", "minor units", "--idempotency-key", "--reference", "--json"):
        assert word in refund_help


@pytest.mark.parametrize("command", ["refund", "capture"])
@pytest.mark.parametrize("order_id", [" ", "", ".", ".."])
def test_a_blank_or_dot_order_id_is_one_json_error_before_any_key(
    served: ServedFake, command: str, order_id: str
) -> None:
    sent = served.do(lambda: len(served.fake.requests))
    result = cli([command, order_id, "--amount", "1", "--json"], served)
    assert result.exit_code == 2
    [error] = json_lines(result.stdout)  # no request announced, one error object
    assert (error["type"], error["outcome_unknown"], error["exit_code"]) == ("error", False, 2)
    assert "order_id" in error["message"]
    assert KEY_LINE not in result.stderr
    assert served.do(lambda: len(served.fake.requests)) == sent


def test_refund_json_echoes_the_trimmed_order_id(served: ServedFake) -> None:
    order_id = captured(served)
    result = cli(["refund", f"  {order_id}\t", "--amount", "100", "--json"], served)
    assert result.exit_code == 0, result.output
    request, printed = json_lines(result.stdout)
    assert request["order_id"] == printed["order_id"] == order_id
    assert [r.refunded_amount for r in refunds(served, order_id)] == [100]


@pytest.mark.parametrize("command", ["refund", "capture"])
@pytest.mark.parametrize("amount", ["1_000", " 100", "100 ", "\u0661\u0660\u0660"])
def test_an_amount_is_an_optional_sign_and_ascii_digits_only(
    served: ServedFake, command: str, amount: str
) -> None:
    order_id = captured(served)
    sent = served.requests_for(order_id)
    result = cli([command, order_id, "--amount", amount], served)
    assert result.exit_code == 2
    assert "not a valid integer" in result.stderr
    assert KEY_LINE not in result.output
    assert served.requests_for(order_id) == sent


def test_the_order_view_lists_its_refunds(served: ServedFake) -> None:
    order_id = captured(served)
    args = ["refund", order_id, "--amount", "2500", "--reference", "RMA-7", "--json"]
    refund_id = json_lines(cli(args, served).stdout)[-1]["refund_id"]
    human = cli(["order", order_id], served, env={"COLUMNS": "200"})
    assert human.exit_code == 0, human.output
    assert f"Refunds of order {order_id}" in human.stdout
    [row] = [line for line in human.stdout.splitlines() if refund_id in line]
    assert "2500" in row
    assert "RMA-7" in row


def test_the_top_level_help_covers_refunds() -> None:
    text = " ".join(cli(["--help"]).stdout.split())
    assert "Capture and refund Klarna orders" in text
    assert "Capture Klarna orders:" not in text
