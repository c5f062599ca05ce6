"""The order-lifecycle commands (release, extend, cancel, acknowledge, update-authorization,
references, ship-order, extend-due-date, due-date-options) through the real entry point,
against a FakeKlarna served over loopback from its own thread (see test_cli.py)."""

from __future__ import annotations

import datetime
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result
from test_cli import (
    ORDERS,
    PASSWORD,
    ServedFake,
    capture,
    cli,
    json_lines,
    klarna_env,
    subprocess_env,
)

from klarna_om_async.cli import _lifecycle, main
from klarna_om_async.testing import DropAfterProcessing, ServerFailure

KEY_LINE = "idempotency key: "


@pytest.fixture
def served() -> Iterator[ServedFake]:
    served = ServedFake()
    try:
        yield served
    finally:
        served.close()


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands see a terminal on stdin (CliRunner's stdin is none), so they ask."""
    monkeypatch.setattr(_lifecycle, "_on_terminal", lambda: True)


def sent(served: ServedFake, order_id: str, tail: str, method: str = "POST") -> list[str | None]:
    """Idempotency keys of the ``method`` requests received for ``…/orders/{order_id}{tail}``."""
    path = f"{ORDERS}/{order_id}{tail}"
    return served.do(
        lambda: [
            r.idempotency_key for r in served.fake.requests if r.path == path and r.method == method
        ]
    )


def only_key(served: ServedFake, order_id: str, tail: str, method: str = "POST") -> str:
    """The key of the one request received for ``…/orders/{order_id}{tail}``."""
    [key] = sent(served, order_id, tail, method)
    assert key is not None
    return key


def status(served: ServedFake, order_id: str) -> str:
    return served.do(lambda: served.fake.order(order_id).status)


def read_order(served: ServedFake, order_id: str) -> dict[str, Any]:
    """The order as `klarna-om order --json` reads it from the fake."""
    result = cli(["order", order_id, "--json"], served)
    assert result.exit_code == 0, result.output
    [order] = json_lines(result.stdout)
    return order


def key_of(stderr: str) -> str:
    [line] = [line for line in stderr.splitlines() if line.startswith(KEY_LINE)]
    return line.removeprefix(KEY_LINE)


def typed(text: str, args: list[str], served: ServedFake) -> Result:
    """`cli()`, with ``text`` typed on stdin by the person at the terminal."""
    result = CliRunner().invoke(main, args, input=text, env=klarna_env(served))
    assert PASSWORD not in result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_says_its_key_cancels_and_shows_the_new_status(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    result = cli(["cancel", order_id, "--yes"], served)
    assert result.exit_code == 0, result.output
    key = only_key(served, order_id, "/cancel")
    assert result.stderr == f"{KEY_LINE}{key}\n"
    assert status(served, order_id) == "CANCELLED"
    assert result.stdout.startswith(f"Cancelled order {order_id} (idempotency key {key})")
    assert "status CANCELLED" in result.stdout


def test_cancel_json_prints_the_request_then_the_result_and_the_order(
    served: ServedFake,
) -> None:
    order_id = served.add_order(10_000)
    args = ["cancel", order_id, "--yes", "--json", "--idempotency-key", "ck-1"]
    result = cli(args, served)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    request, printed = json_lines(result.stdout)
    assert request == {
        "type": "request",
        "command": "cancel",
        "order_id": order_id,
        "idempotency_key": "ck-1",
    }
    assert printed["order"]["status"] == "CANCELLED"
    assert printed["order"]["remaining_authorized_amount"] == 0
    assert {k: v for k, v in printed.items() if k != "order"} == {
        "order_id": order_id,
        "cancelled": True,
        "idempotency_key": "ck-1",
    }
    assert set(printed["order"]) == {
        "status",
        "order_amount",
        "remaining_authorized_amount",
        "expires_at",
    }
    assert sent(served, order_id, "/cancel") == ["ck-1"]


def test_cancel_after_a_capture_is_refused_in_one_line_and_exits_1(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    capture(served, order_id, 1000)
    result = cli(["cancel", order_id, "--yes"], served)
    assert result.exit_code == 1
    assert result.stdout == ""
    key_line, line = result.stderr.splitlines()
    assert key_line == f"{KEY_LINE}{sent(served, order_id, '/cancel')[0]}"
    assert "403 CANCEL_NOT_ALLOWED" in line
    assert "correlation_id=" in line
    assert status(served, order_id) == "PART_CAPTURED"
    as_json = cli(["cancel", order_id, "--yes", "--json"], served)
    assert as_json.exit_code == 1
    _, error = json_lines(as_json.stdout)
    assert (error["type"], error["error"], error["error_code"]) == (
        "error",
        "CancelNotAllowedError",
        "CANCEL_NOT_ALLOWED",
    )
    assert (error["outcome_unknown"], error["exit_code"]) == (False, 1)


@pytest.mark.parametrize("command", ["cancel", "release"])
def test_without_a_terminal_yes_is_required_and_nothing_is_sent(
    served: ServedFake, command: str
) -> None:
    order_id = served.add_order(10_000)
    result = cli([command, order_id], served)
    assert result.exit_code == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "--yes" in line
    assert "not a terminal" in line
    assert served.requests_for(order_id) == 0
    as_json = cli([command, order_id, "--json"], served)
    assert as_json.exit_code == 2
    [error] = json_lines(as_json.stdout)
    assert (error["type"], error["outcome_unknown"], error["exit_code"]) == ("error", False, 2)
    assert "--yes" in error["message"]
    assert served.requests_for(order_id) == 0


@pytest.mark.usefixtures("terminal")
@pytest.mark.parametrize(
    ("command", "asks"),
    [("cancel", "Cancel order"), ("release", "Release the remaining authorization of order")],
)
@pytest.mark.parametrize("answer", ["n\n", "\n", ""])
def test_on_a_terminal_it_asks_and_anything_but_yes_sends_nothing(
    served: ServedFake, command: str, asks: str, answer: str
) -> None:
    order_id = served.add_order(10_000)
    result = typed(answer, [command, order_id], served)
    assert result.exit_code == 1
    assert f"{asks} {order_id}?" in result.stderr
    assert "nothing was sent" in result.stderr
    assert KEY_LINE not in result.stderr
    assert result.stdout == ""
    assert served.requests_for(order_id) == 0
    assert status(served, order_id) == "AUTHORIZED"


class CtrlC(io.RawIOBase):
    """A terminal whose person presses Ctrl-C at the question."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if len(buffer):  # (a read of 0 bytes only asks what the stream gives)
            raise KeyboardInterrupt
        return 0


@pytest.mark.usefixtures("terminal")
@pytest.mark.parametrize("command", ["cancel", "release"])
def test_ctrl_c_at_the_question_exits_130_and_sends_nothing(
    served: ServedFake, command: str
) -> None:
    # It said "not confirmed" and exited 1, as for a "no".
    order_id = served.add_order(10_000)
    result = CliRunner().invoke(main, [command, order_id], input=CtrlC(), env=klarna_env(served))
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1].startswith("Interrupted: nothing was sent")
    assert served.requests_for(order_id) == 0


@pytest.mark.usefixtures("terminal")
def test_on_a_terminal_yes_goes_ahead(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    result = typed("y\n", ["cancel", order_id, "--json"], served)
    assert result.exit_code == 0, result.output
    assert f"Cancel order {order_id}?" in result.stderr  # the question never goes to stdout
    request, printed = json_lines(result.stdout)
    assert printed["order"]["status"] == "CANCELLED"
    assert sent(served, order_id, "/cancel") == [request["idempotency_key"]]


@pytest.mark.usefixtures("terminal")
def test_a_no_with_json_is_one_json_error_and_exit_1(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    result = typed("n\n", ["release", order_id, "--json"], served)
    assert result.exit_code == 1
    [error] = json_lines(result.stdout)
    assert (error["type"], error["outcome_unknown"], error["exit_code"]) == ("error", False, 1)
    assert "nothing was sent" in error["message"]
    assert served.requests_for(order_id) == 0


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_on_a_real_terminal_the_command_asks_and_no_sends_nothing(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    controller, terminal = os.openpty()
    try:
        os.write(controller, b"n\n")  # typed ahead; the terminal holds it until read
        done = subprocess.run(
            [sys.executable, "-W", "error", "-m", "klarna_om_async.cli", "cancel", order_id],
            stdin=terminal,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=subprocess_env(served.fake.base_url),
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert done.returncode == 1, done.stderr
    assert f"Cancel order {order_id}?" in done.stderr
    assert "nothing was sent" in done.stderr
    assert done.stdout == ""
    assert served.requests_for(order_id) == 0


def test_an_unknown_outcome_exits_3_and_the_printed_key_cancels_exactly_once(
    served: ServedFake,
) -> None:
    order_id = served.add_order(10_000)
    # Cancelled, but the answer is lost; the retry meets a 503.
    served.do(lambda: served.fake.inject(DropAfterProcessing(), path="/cancel"))
    served.do(lambda: served.fake.inject(ServerFailure(503), path="/cancel"))
    args = ["cancel", order_id, "--yes", "--json"]
    result = cli([*args, "--max-attempts", "2"], served)
    assert result.exit_code == 3
    request, error = json_lines(result.stdout)
    key = request["idempotency_key"]
    assert (error["outcome_unknown"], error["idempotency_key"]) == (True, key)
    assert f"--idempotency-key {key}" in result.stderr
    assert status(served, order_id) == "CANCELLED"

    again = cli([*args, "--idempotency-key", key], served)
    assert again.exit_code == 0, again.output
    assert json_lines(again.stdout)[-1]["order"]["status"] == "CANCELLED"
    assert sent(served, order_id, "/cancel") == [key, key, key]


def test_a_failed_read_back_does_not_hide_that_the_call_succeeded(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    served.do(lambda: served.fake.inject(ServerFailure(500), method="GET", path=order_id))
    args = ["cancel", order_id, "--yes", "--max-attempts", "1"]
    result = cli(args, served)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Cancelled order {order_id}")
    warning = result.stderr.splitlines()[-1]
    assert warning.startswith(f"Warning: Cancelled order {order_id}, but reading the order")
    assert f"klarna-om order {order_id}" in warning
    assert status(served, order_id) == "CANCELLED"
    other = served.add_order(10_000)
    served.do(lambda: served.fake.inject(ServerFailure(500), method="GET", path=other))
    as_json = cli(["cancel", other, "--yes", "--json", "--max-attempts", "1"], served)
    assert as_json.exit_code == 0, as_json.output
    _, printed = json_lines(as_json.stdout)
    assert (printed["cancelled"], printed["order"]) == (True, None)
    assert status(served, other) == "CANCELLED"


# -- release ---------------------------------------------------------------------------------


def test_release_frees_what_is_left_and_shows_it(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    capture(served, order_id, 4000)
    result = cli(["release", order_id, "-y"], served)
    assert result.exit_code == 0, result.output
    key = only_key(served, order_id, "/release-remaining-authorization")
    assert result.stderr == f"{KEY_LINE}{key}\n"
    assert served.do(lambda: served.fake.order(order_id).remaining_authorized_amount) == 0
    assert "remaining_authorized_amount 0" in result.stdout
    as_json = cli(["release", order_id, "--yes", "--json", "--idempotency-key", key], served)
    assert as_json.exit_code == 0, as_json.output
    request, printed = json_lines(as_json.stdout)
    assert (request["command"], printed["released"], printed["idempotency_key"]) == (
        "release",
        True,
        key,
    )
    assert printed["order"]["remaining_authorized_amount"] == 0
    assert printed["order"]["order_amount"] == 10_000


# -- extend ----------------------------------------------------------------------------------


def operations(served: ServedFake, order_id: str, name: str) -> int:
    """How many times the fake performed operation ``name`` on the order."""
    return served.do(lambda: served.fake.order(order_id).operations.count(name))


def test_extend_moves_expires_at_and_a_rerun_with_its_key_extends_nothing_more(
    served: ServedFake,
) -> None:
    order_id = served.add_order(10_000)
    before = read_order(served, order_id)["expires_at"]
    served.do(lambda: served.fake.advance_clock(3 * 86_400))
    result = cli(["extend", order_id, "--json"], served)
    assert result.exit_code == 0, result.output
    request, printed = json_lines(result.stdout)
    key = request["idempotency_key"]
    assert (request["type"], request["command"], request["order_id"]) == (
        "request",
        "extend",
        order_id,
    )
    extended = printed["order"]["expires_at"]
    assert extended > before
    assert (printed["extended"], printed["idempotency_key"]) == (True, key)
    assert read_order(served, order_id)["expires_at"] == extended

    # An hour later the same key replays the answer: the authorization is not extended again.
    served.do(lambda: served.fake.advance_clock(3600))
    again = cli(["extend", order_id, "--idempotency-key", key], served)
    assert again.exit_code == 0, again.output
    assert again.stderr == f"{KEY_LINE}{key}\n"
    assert f"expires_at {extended}" in again.stdout
    assert read_order(served, order_id)["expires_at"] == extended
    assert sent(served, order_id, "/extend-authorization-time") == [key, key]
    assert operations(served, order_id, "extendAuthorizationTime") == 1


def test_extend_of_a_cancelled_order_is_refused(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    served.do(lambda: served.fake.set_order_status(order_id, "CANCELLED"))
    result = cli(["extend", order_id], served)
    assert result.exit_code == 1
    assert "403 NOT_ALLOWED" in result.stderr.splitlines()[-1]


# -- acknowledge -----------------------------------------------------------------------------


def test_acknowledge_says_its_key_and_acknowledges(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    result = cli(["acknowledge", order_id], served)
    assert result.exit_code == 0, result.output
    key = only_key(served, order_id, "/acknowledge")
    assert result.stderr == f"{KEY_LINE}{key}\n"
    assert result.stdout == f"Acknowledged order {order_id} (idempotency key {key}).\n"
    assert served.do(lambda: served.fake.order(order_id).acknowledged_at) is not None
    as_json = cli(["acknowledge", order_id, "--json", "--idempotency-key", "ak-1"], served)
    request, printed = json_lines(as_json.stdout)
    assert request["idempotency_key"] == "ak-1"
    assert printed == {"order_id": order_id, "acknowledged": True, "idempotency_key": "ak-1"}
    assert cli(["acknowledge", order_id, "--idempotency-key", "ak-1"], served).exit_code == 0
    assert sent(served, order_id, "/acknowledge") == [key, "ak-1", "ak-1"]
    assert operations(served, order_id, "acknowledgeOrder") == 2
    unknown = cli(["acknowledge", "no-such"], served)
    assert unknown.exit_code == 1
    assert "404 NO_SUCH_ORDER" in unknown.stderr


# -- update-authorization --------------------------------------------------------------------


def test_update_authorization_sets_the_amount_and_shows_it(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    capture(served, order_id, 2000)
    args = ["update-authorization", order_id, "--amount", "8000", "--description", "smaller"]
    result = cli(args, served)
    assert result.exit_code == 0, result.output
    key = only_key(served, order_id, "/authorization", "PATCH")
    assert result.stderr == f"{KEY_LINE}{key}\n"
    assert served.do(lambda: served.fake.order(order_id).order_amount) == 8000
    assert "order_amount 8000" in result.stdout
    assert "remaining_authorized_amount 6000" in result.stdout
    as_json = cli([*args, "--json", "--idempotency-key", key], served)
    assert as_json.exit_code == 0, as_json.output
    _, printed = json_lines(as_json.stdout)
    assert printed["order_amount"] == 8000
    assert printed["description"] == "smaller"
    assert printed["order"]["order_amount"] == 8000
    assert printed["order"]["remaining_authorized_amount"] == 6000


def test_update_authorization_with_a_key_of_another_amount_exits_1(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    first = cli(["update-authorization", order_id, "--amount", "9000"], served)
    key = key_of(first.stderr)
    args = ["update-authorization", order_id, "--amount", "7000", "--idempotency-key", key]
    replayed = cli(args, served)
    assert replayed.exit_code == 1
    assert "not the 7000 asked" in replayed.stderr
    assert "new key" in replayed.stderr
    assert served.do(lambda: served.fake.order(order_id).order_amount) == 9000
    as_json = cli([*args, "--json"], served)
    assert as_json.exit_code == 1
    request, error = json_lines(as_json.stdout)
    assert (request["idempotency_key"], error["type"], error["exit_code"]) == (key, "error", 1)
    assert (error["error"], error["idempotency_key"]) == ("IdempotencyKeyReusedError", key)
    assert as_json.stderr == f"Error: {error['message']}\n"
    assert operations(served, order_id, "updateAuthorization") == 1


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--amount", "-1"], "order_amount: must be at least 0"),
        (["--amount", "1.5"], "not a valid integer"),
        (["--amount", "1_000"], "not a valid integer"),
        (["--amount", "1", "--description", "x" * 256], "description: must be at most 255"),
        (["--amount", "1", "--idempotency-key", " k"], "idempotency_key"),
    ],
)
def test_bad_update_authorization_input_exits_2_and_sends_nothing(
    served: ServedFake, extra: list[str], says: str
) -> None:
    order_id = served.add_order(10_000)
    result = cli(["update-authorization", order_id, *extra], served)
    assert result.exit_code == 2
    assert says in result.stderr
    assert KEY_LINE not in result.output
    assert served.requests_for(order_id) == 0


# -- references ------------------------------------------------------------------------------


def test_references_sets_the_given_references_only(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    result = cli(["references", order_id, "--ref1", "ORD-1", "--ref2", "int-9"], served)
    assert result.exit_code == 0, result.output
    key = only_key(served, order_id, "/merchant-references", "PATCH")
    assert result.stderr == f"{KEY_LINE}{key}\n"
    assert "merchant_reference1='ORD-1', merchant_reference2='int-9'" in result.stdout
    only2 = cli(["references", order_id, "--ref2", "int-10", "--json"], served)
    assert only2.exit_code == 0, only2.output
    request, printed = json_lines(only2.stdout)
    assert printed == {
        "order_id": order_id,
        "merchant_reference1": None,
        "merchant_reference2": "int-10",
        "idempotency_key": request["idempotency_key"],
    }
    order = read_order(served, order_id)
    assert (order["merchant_reference1"], order["merchant_reference2"]) == ("ORD-1", "int-10")
    # Replayed by key: the first call's answer, and nothing changes.
    args = ["references", order_id, "--ref1", "OTHER", "--idempotency-key", key]
    assert cli(args, served).exit_code == 0
    assert read_order(served, order_id)["merchant_reference1"] == "ORD-1"
    assert operations(served, order_id, "updateMerchantReferences") == 2


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ([], "give --ref1, --ref2 or both"),
        (["--ref1", "x" * 256], "merchant_reference1: must be at most 255"),
    ],
)
def test_bad_references_exit_2_and_send_nothing(
    served: ServedFake, extra: list[str], says: str
) -> None:
    order_id = served.add_order(10_000)
    result = cli(["references", order_id, *extra], served)
    assert result.exit_code == 2
    assert says in result.stderr
    assert KEY_LINE not in result.output
    assert served.requests_for(order_id) == 0


# -- ship-order ------------------------------------------------------------------------------


def test_ship_order_adds_tracking_details_to_the_order(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    args = ["ship-order", order_id, "--company", "DHL", "--tracking-number", "T-1"]
    result = cli(args, served)
    assert result.exit_code == 0, result.output
    key = only_key(served, order_id, "/shipping-info")
    assert result.stderr == f"{KEY_LINE}{key}\n"
    assert f"Added shipping info to order {order_id}: DHL Home T-1" in result.stdout
    as_json = cli([*args, "--method", "PickUpPoint", "--json"], served)
    request, printed = json_lines(as_json.stdout)
    assert (request["type"], request["command"]) == ("request", "ship-order")
    assert printed["shipping_info"] == [
        {"shipping_company": "DHL", "shipping_method": "PickUpPoint", "tracking_number": "T-1"}
    ]
    shipped = read_order(served, order_id)["shipping_info"]
    assert [s["shipping_method"] for s in shipped] == ["Home", "PickUpPoint"]
    again = cli([*args, "--idempotency-key", key], served)
    assert again.exit_code == 0, again.output
    assert served.do(lambda: len(served.fake.order(order_id).shipping_info)) == 2


def test_ship_order_with_a_bad_field_exits_2_and_sends_nothing(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    args = ["ship-order", order_id, "--company", "x" * 101, "--tracking-number", "T-1"]
    result = cli(args, served)
    assert result.exit_code == 2
    assert "shipping_company" in result.stderr
    assert served.requests_for(order_id) == 0


# -- extend-due-date and due-date-options ----------------------------------------------------


def test_due_date_options_then_extend_due_date(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    capture_id = capture(served, order_id, 10_000)
    options = cli(["due-date-options", order_id, capture_id, "--json"], served)
    assert options.exit_code == 0, options.output
    [found] = json_lines(options.stdout)
    days = found["options"][0]["number_of_days"]
    human = cli(["due-date-options", order_id, capture_id], served)
    assert human.exit_code == 0, human.output
    assert f"Due date options of capture {capture_id}" in human.stdout
    assert str(days) in human.stdout

    args = ["extend-due-date", order_id, capture_id, "--days", str(days)]
    result = cli(args, served)
    assert result.exit_code == 0, result.output
    tail = f"/captures/{capture_id}/extend-due-date"
    key = only_key(served, order_id, tail, "PATCH")
    assert result.stderr == f"{KEY_LINE}{key}\n"
    assert f"by {days} days" in result.stdout
    as_json = cli([*args, "--json", "--idempotency-key", key], served)
    assert as_json.exit_code == 0, as_json.output
    request, printed = json_lines(as_json.stdout)
    assert request == {
        "type": "request",
        "command": "extend-due-date",
        "order_id": order_id,
        "capture_id": capture_id,
        "idempotency_key": key,
    }
    assert printed == {
        "order_id": order_id,
        "capture_id": capture_id,
        "number_of_days": days,
        "idempotency_key": key,
    }
    assert sent(served, order_id, tail, "PATCH") == [key, key]
    assert served.do(lambda: served.fake.captures(order_id)[0].due_date_extensions) == [days]


def test_a_card_order_has_no_due_date_options_and_its_extension_is_refused(
    served: ServedFake,
) -> None:
    order_id = served.do(lambda: served.fake.add_order(amount=10_000, payment_method="CARD"))
    capture_id = capture(served, order_id, 10_000)
    human = cli(["due-date-options", order_id, capture_id], served)
    assert human.exit_code == 0, human.output
    assert human.stdout == f"Capture {capture_id} of order {order_id} has no due date options.\n"
    refused = cli(["extend-due-date", order_id, capture_id, "--days", "14"], served)
    assert refused.exit_code == 1
    key_line, line = refused.stderr.splitlines()
    assert key_line.startswith(KEY_LINE)
    assert "403 NOT_ALLOWED" in line


@pytest.mark.parametrize(
    ("days", "says"),
    [
        ("0", "number_of_days: must be at least 1"),
        ("-1", "not a number of days"),
        ("1_4", "not a number of days"),
        (" 14", "not a number of days"),
    ],
)
def test_bad_days_exit_2_and_send_nothing(served: ServedFake, days: str, says: str) -> None:
    order_id = served.add_order(10_000)
    result = cli(["extend-due-date", order_id, "c-1", "--days", days], served)
    assert result.exit_code == 2
    assert says in result.stderr
    assert KEY_LINE not in result.output
    assert served.requests_for(order_id) == 0


def test_due_date_options_of_an_unknown_capture_exits_1(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    result = cli(["due-date-options", order_id, "nope", "--json"], served)
    assert result.exit_code == 1
    [error] = json_lines(result.stdout)
    assert (error["type"], error["status"]) == ("error", 404)


# -- a key reused between two calls: Klarna's 204 cannot tell, the order read back can ---------


def test_cancel_with_a_captures_key_exits_1_and_does_not_say_cancelled(served: ServedFake) -> None:
    """Klarna replays the capture's 201: the library says nothing was done for the cancel."""
    order_id = served.add_order(10_000)
    booked = cli(["capture", order_id, "--amount", "4000", "--idempotency-key", "K-1"], served)
    assert booked.exit_code == 0, booked.output
    result = cli(["cancel", order_id, "--yes", "--idempotency-key", "K-1"], served)
    assert result.exit_code == 1, result.output
    assert "Cancelled order" not in result.stdout
    assert "K-1" in result.stderr.splitlines()[-1]
    assert status(served, order_id) == "PART_CAPTURED"


def test_release_with_extends_key_exits_1_naming_the_key(served: ServedFake) -> None:
    """Both answer 204: only the read-back (remaining_authorized_amount still 6000) shows
    nothing was released."""
    order_id = served.add_order(10_000)
    capture(served, order_id, 4000)
    assert cli(["extend", order_id, "--idempotency-key", "K-2"], served).exit_code == 0
    result = cli(["release", order_id, "--yes", "--idempotency-key", "K-2"], served)
    assert result.exit_code == 1, result.output
    assert "Released the remaining authorization" not in result.stdout
    key_line, line = result.stderr.splitlines()
    assert key_line == f"{KEY_LINE}K-2"
    assert line.startswith("Error: ")
    assert "remaining_authorized_amount is 6000" in line
    assert "idempotency key K-2" in line
    assert f"klarna-om order {order_id}" in line
    assert served.do(lambda: served.fake.order(order_id).remaining_authorized_amount) == 6000

    as_json = cli(["release", order_id, "--yes", "--idempotency-key", "K-2", "--json"], served)
    assert as_json.exit_code == 1
    _, error = json_lines(as_json.stdout)
    assert (error["type"], error["error"], error["idempotency_key"]) == (
        "error",
        "IdempotencyKeyReusedError",
        "K-2",
    )
    assert (error["outcome_unknown"], error["exit_code"]) == (False, 1)
    assert as_json.stderr == f"Error: {error['message']}\n"


def test_cancel_with_acknowledges_key_exits_1_and_the_order_can_then_be_cancelled(
    served: ServedFake,
) -> None:
    order_id = served.add_order(10_000)
    assert cli(["acknowledge", order_id, "--idempotency-key", "K-3"], served).exit_code == 0
    result = cli(["cancel", order_id, "--yes", "--idempotency-key", "K-3"], served)
    assert result.exit_code == 1, result.output
    assert "Cancelled order" not in result.stdout
    assert "status is AUTHORIZED" in result.stderr
    assert status(served, order_id) == "AUTHORIZED"
    # As the message says: sent again with a new key, it is done.
    assert cli(["cancel", order_id, "--yes"], served).exit_code == 0
    assert status(served, order_id) == "CANCELLED"


def backdate(
    served: ServedFake, order_id: str, created_days_ago: int, expires_in_days: int
) -> None:
    """Make ``order_id`` look created ``created_days_ago`` and expiring in
    ``expires_in_days`` (real time, as the CLI reads it)."""

    def move() -> None:
        order = served.fake.order(order_id)
        now = datetime.datetime.now(datetime.UTC)
        for name, days in (("created_at", -created_days_ago), ("expires_at", expires_in_days)):
            moment = now + datetime.timedelta(days=days)
            setattr(order, name, moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"))

    served.do(move)


def test_extend_with_another_calls_key_exits_1_when_expires_at_could_have_moved(
    served: ServedFake,
) -> None:
    order_id = served.add_order(10_000)
    backdate(served, order_id, created_days_ago=20, expires_in_days=8)
    before = read_order(served, order_id)["expires_at"]
    assert cli(["acknowledge", order_id, "--idempotency-key", "K-4"], served).exit_code == 0
    result = cli(["extend", order_id, "--idempotency-key", "K-4"], served)
    assert result.exit_code == 1, result.output
    assert "Extended the authorization" not in result.stdout
    assert "expires_at" in result.stderr
    assert "idempotency key K-4" in result.stderr
    assert read_order(served, order_id)["expires_at"] == before
    # A new key extends it: the check raises no false alarm.
    extended = cli(["extend", order_id], served)
    assert extended.exit_code == 0, extended.output
    assert read_order(served, order_id)["expires_at"] > before


@pytest.mark.parametrize(
    ("created_days_ago", "expires_in_days"),
    [(0, 28), (179, 1), (170, 10)],
    ids=["the-same-day", "at-the-180-day-limit", "near-the-limit"],
)
def test_extend_that_cannot_move_expires_at_exits_0(
    served: ServedFake, created_days_ago: int, expires_in_days: int
) -> None:
    """Klarna answers 204 and keeps the date at its limit or on a repeat the same day."""
    order_id = served.add_order(10_000)
    backdate(served, order_id, created_days_ago, expires_in_days)
    result = cli(["extend", order_id], served)
    assert result.exit_code == 0, result.output
    assert "Extended the authorization" in result.stdout


def test_update_authorization_rerun_with_its_own_key_after_a_change_does_not_blame_the_key(
    served: ServedFake,
) -> None:
    """U-1 was done, then the amount changed; rerunning U-1 (as after an unknown outcome)
    replays its own 204. The read-back cannot tell that from a foreign key: the CLI says
    both are possible and to read the order first, never "send it again with a new key"
    (which would undo the later change)."""
    order_id = served.add_order(10_000)
    first = ["update-authorization", order_id, "--amount", "5000", "--idempotency-key", "U-1"]
    assert cli(first, served).exit_code == 0
    assert cli(["update-authorization", order_id, "--amount", "6000"], served).exit_code == 0
    rerun = cli(first, served)
    assert rerun.exit_code == 1
    line = rerun.stderr.splitlines()[-1]
    assert "amount read back is 6000, not the 5000 asked" in line
    assert "or the amount was changed since" in line
    assert f"Read the order (klarna-om order {order_id}) before sending anything again" in line
    assert "did nothing for this one" not in line
    assert "again with a new key" not in line
    assert operations(served, order_id, "updateAuthorization") == 2


# -- every command ---------------------------------------------------------------------------

ORDER_COMMANDS = [
    ["release", "--yes"],
    ["extend"],
    ["cancel", "--yes"],
    ["acknowledge"],
    ["update-authorization", "--amount", "1"],
    ["references", "--ref1", "r"],
    ["ship-order", "--company", "DHL", "--tracking-number", "1"],
]


@pytest.mark.parametrize("command", ORDER_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("order_id", [" ", "", ".."])
def test_a_blank_or_dot_order_id_is_one_json_error_before_any_key(
    served: ServedFake, command: list[str], order_id: str
) -> None:
    before = served.do(lambda: len(served.fake.requests))
    result = cli([command[0], order_id, *command[1:], "--json"], served)
    assert result.exit_code == 2
    [error] = json_lines(result.stdout)
    assert (error["type"], error["exit_code"]) == ("error", 2)
    assert "order_id" in error["message"]
    assert KEY_LINE not in result.stderr
    assert served.do(lambda: len(served.fake.requests)) == before


@pytest.mark.parametrize("command", ORDER_COMMANDS, ids=lambda c: c[0])
def test_an_unknown_order_is_one_line_after_the_key_and_exit_1(
    served: ServedFake, command: list[str]
) -> None:
    result = cli([command[0], "no-such-order", *command[1:]], served)
    assert result.exit_code == 1
    key_line, line = result.stderr.splitlines()
    assert key_line.startswith(KEY_LINE)
    assert line.startswith("Error: ")
    assert "404 NO_SUCH_ORDER" in line


@pytest.mark.parametrize("command", ORDER_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("control", ["\n", "\r", "\t", "\x1b", "\x85"])
def test_an_id_with_a_control_character_is_one_line_exit_2_and_nothing_sent(
    served: ServedFake, command: list[str], control: str
) -> None:
    """A newline in an id would print a forged "idempotency key: FAKE" line."""
    before = served.do(lambda: len(served.fake.requests))
    result = cli([command[0], f"a{control}idempotency key: FAKE", *command[1:]], served)
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ")
    assert "order_id" in line
    assert served.do(lambda: len(served.fake.requests)) == before


def test_extend_due_date_refuses_a_capture_id_with_a_newline(served: ServedFake) -> None:
    result = cli(["extend-due-date", "o", "c\nidempotency key: FAKE", "--days", "7"], served)
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert "capture_id" in line


def test_help_lists_the_lifecycle_commands() -> None:
    text = cli(["--help"]).stdout
    for name in (
        "release",
        "extend",
        "cancel",
        "acknowledge",
        "update-authorization",
        "references",
        "ship-order",
        "extend-due-date",
        "due-date-options",
    ):
        assert f"  {name} " in text
    words = " ".join(text.split())
    assert "--yes skips the question" in words
    for name in ("cancel", "release"):
        assert "--yes" in cli([name, "--help"]).stdout
