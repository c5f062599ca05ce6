"""Field reports on the command line (issue 8, items 4, 14-17): first use, output, wording.

Every test runs the real `klarna-om` entry point (in-process through click, or as a
subprocess) against FakeKlarna over loopback.
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console
from test_cli import (
    ServedFake,
    capture,
    cli,
    json_lines,
    outcomes_by_order,
    served,
    subprocess_env,
    write,
)

from klarna_om_async import CaptureOutcome, CaptureRequest, CaptureStatus, ValidationError
from klarna_om_async.cli._render import BatchView
from klarna_om_async.testing import RateLimited, ServerFailure

__all__ = ("served",)  # the fixture, imported for the tests here

# -- 14: without the [cli] extra ---------------------------------------------------------------

_BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    sys.argv = ["klarna-om", "--help"]
    """
)
# As `python -m klarna_om_async.cli`, and as the console script (`cli:main`) calls it.
_AS_MODULE = "import runpy; runpy.run_module('klarna_om_async.cli', run_name='__main__')"
_AS_SCRIPT = "from klarna_om_async.cli import main; sys.exit(main())"


@pytest.mark.parametrize("entry", [_AS_MODULE, _AS_SCRIPT], ids=["module", "console-script"])
@pytest.mark.parametrize("blocked", ["click", "rich"])
def test_without_the_cli_extra_the_command_names_it_in_one_line_and_exits_2(
    blocked: str, entry: str
) -> None:
    code = _BLOCK.format(blocked=blocked) + entry
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert 'pip install "klarna-om-async[cli]"' in line
    assert repr(blocked) in line


# -- 15: --json errors are JSON, and an unknown outcome has its own exit status -----------------


def test_an_unknown_outcome_prints_a_json_error_and_exits_3(served: ServedFake) -> None:
    order_id = served.add_order(1000)
    served.do(lambda: served.fake.inject(ServerFailure(503), times=None))
    args = ["capture", order_id, "--amount", "1000", "--idempotency-key", "k-503", "--json"]
    result = cli([*args, "--max-attempts", "1"], served)
    assert result.exit_code == 3
    request, error = json_lines(result.stdout)
    assert request["type"] == "request"
    assert error["type"] == "error"
    assert error["outcome_unknown"] is True
    assert (error["idempotency_key"], error["status"]) == ("k-503", 503)
    assert {"correlation_id", "error_code", "message"} <= error.keys()
    # The hint is the command line's, not Python's.
    assert "--idempotency-key k-503" in result.stderr
    assert "idempotency_key=" not in result.stderr + error["message"]


def test_a_refusal_prints_a_json_error_and_exits_1(served: ServedFake) -> None:
    order_id = served.add_order(1000)
    result = cli(["capture", order_id, "--amount", "5000", "--json"], served)
    assert result.exit_code == 1
    request, error = json_lines(result.stdout)
    assert error["type"] == "error"
    assert error["outcome_unknown"] is False
    assert (error["status"], error["error_code"]) == (403, "CAPTURE_NOT_ALLOWED")
    assert error["correlation_id"]
    assert error["idempotency_key"] == request["idempotency_key"]
    assert "403 CAPTURE_NOT_ALLOWED" in result.stderr


@pytest.mark.parametrize("command", ["ship", "send-out"])
def test_other_money_moving_commands_exit_3_with_a_json_error_when_unknown(
    served: ServedFake, command: str
) -> None:
    order_id = served.add_order(1000)
    capture_id = capture(served, order_id, 1000)
    served.do(lambda: served.fake.inject(ServerFailure(503), times=None))
    extra = ["--company", "DHL", "--tracking-number", "1"] if command == "ship" else []
    args = [command, order_id, capture_id, *extra, "--idempotency-key", "k-1", "--json"]
    result = cli([*args, "--max-attempts", "1"], served)
    assert result.exit_code == 3
    error = json_lines(result.stdout)[-1]
    assert (error["type"], error["outcome_unknown"], error["idempotency_key"]) == (
        "error",
        True,
        "k-1",
    )
    assert "--idempotency-key k-1" in result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["capture", "o", "--amount", "-1"], "captured_amount"),
        (["order", "o", "--base-url", "ftp://x"], "base_url"),
        (["list", "o", "--region", "mars"], "mars"),
    ],
)
def test_usage_errors_with_json_print_a_json_error_too(
    served: ServedFake, args: list[str], says: str
) -> None:
    result = cli([*args, "--json"], served)
    assert result.exit_code == 2
    [error] = json_lines(result.stdout)
    assert (error["type"], error["outcome_unknown"], error["exit_code"]) == ("error", False, 2)
    assert says in error["message"]


def test_list_json_prints_one_capture_per_line(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    first, second = capture(served, order_id, 3000), capture(served, order_id, 2000)
    result = cli(["list", order_id, "--json"], served)
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert [c["capture_id"] for c in json_lines(result.stdout)] == [first, second]


def test_help_documents_exit_3_for_an_unknown_outcome() -> None:
    text = " ".join(cli(["--help"]).stdout.split())
    assert "3 outcome unknown" in text
    assert "--idempotency-key KEY" in text


def test_the_batch_problem_list_says_rerun_the_batch_not_python(
    served: ServedFake, tmp_path: Path
) -> None:
    order_id = served.add_order(1000)
    # The captures: the read of Klarna's time before them needs an answer of Klarna's own.
    served.do(lambda: served.fake.inject(ServerFailure(503), method="POST", times=None))
    path = write(tmp_path, "b.csv", f"order_id,captured_amount\n{order_id},1000\n")
    result = cli(["batch", path, "--max-attempts", "1"], served)
    assert result.exit_code == 1
    text = " ".join(result.stdout.split())
    assert "rerun the same batch command" in text
    assert "idempotency_key=" not in text


# -- 16: output people use --------------------------------------------------------------------


@pytest.mark.parametrize("command", ["list", "order"])
@pytest.mark.parametrize("columns", ["80", "60"])
def test_capture_ids_are_never_cut_short(served: ServedFake, command: str, columns: str) -> None:
    order_id = served.add_order(10_000)
    ids = [capture(served, order_id, 3000), capture(served, order_id, 2000)]
    result = cli([command, order_id], served, env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    for capture_id in ids:
        assert capture_id in result.stdout
    assert "…" not in result.stdout.split("Captures of")[-1]


def test_get_shows_every_shipping_detail_after_ship(served: ServedFake) -> None:
    order_id = served.add_order(1000)
    capture_id = capture(served, order_id, 1000)
    uri = "https://t.example/1Z9"
    ship = ["ship", order_id, capture_id, "--company", "UPS", "--tracking-number", "1Z9"]
    assert cli([*ship, "--tracking-uri", uri], served).exit_code == 0
    result = cli(["get", order_id, capture_id], served, env={"COLUMNS": "120"})
    assert "UPS Home 1Z9" in result.stdout
    assert uri in result.stdout


def test_log_lines_print_above_the_progress_bar_on_its_console() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    logger = logging.getLogger("klarna_om_async")
    before = list(logger.handlers)
    with BatchView(console, json_output=False, title="t", total=1) as view:
        logger.error("retrying with key k-log-1")
        view.report(
            CaptureOutcome(
                order_id="o", item_key="o", status=CaptureStatus.CAPTURED, idempotency_key="k"
            )
        )
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())
    assert "retrying with key k-log-1" in text
    assert logger.handlers == before  # put back when the bar stops


def test_a_rerun_says_it_is_resuming_and_what_it_will_resend(
    served: ServedFake, tmp_path: Path
) -> None:
    good, flaky = served.add_order(1000), served.add_order(1000)
    path = write(tmp_path, "b.csv", f"order_id,captured_amount\n{good},1000\n{flaky},1000\n")
    fail = ServerFailure(503)
    served.do(lambda: served.fake.inject(fail, times=None, path=f"/{flaky}/captures"))
    first = cli(["batch", path, "--max-attempts", "1"], served)
    assert first.exit_code == 1
    assert "Resuming" not in first.stderr
    served.do(lambda: served.fake.clear_faults())
    again = cli(["batch", path], served)
    assert again.exit_code == 0, again.output
    assert "Resuming from the journal" in again.stderr
    assert "1 line already captured (skipped), 1 to resend with their keys" in again.stderr


def test_verbose_is_accepted_after_the_command(served: ServedFake) -> None:
    order_id = served.add_order(1000)
    served.do(lambda: served.fake.inject(RateLimited("0")))
    args = ["capture", order_id, "--amount", "1000", "--idempotency-key", "k-v", "-v"]
    result = cli(args, served)
    assert result.exit_code == 0, result.output
    assert "RateLimitError" in result.stderr


def test_connection_flags_go_before_the_command_too(served: ServedFake) -> None:
    order_id = served.add_order(1000)
    flags = ["--username", "merchant-7", "--base-url", served.fake.base_url]
    env = {"KLARNA_USERNAME": None, "KLARNA_BASE_URL": None}
    before = cli([*flags, "order", order_id], served, env=env)
    assert before.exit_code == 0, before.output
    # Given in both places, the command's own flag wins; a default never overrides a flag.
    mixed = ["--base-url", "http://127.0.0.1:1", "order", order_id, *flags]
    assert cli(mixed, served, env=env).exit_code == 0
    assert cli(["--max-attempts", "1", "order", order_id], served).exit_code == 0


# -- 4: --proxy --------------------------------------------------------------------------------


def test_proxy_sends_every_request_through_the_proxy(served: ServedFake) -> None:
    order_id = served.add_order(1000)
    # The fake stands in for the proxy: it answers absolute-form requests for any host.
    args = ["order", order_id, "--base-url", "http://klarna.invalid", "--json"]
    result = cli([*args, "--proxy", served.fake.base_url], served)
    assert result.exit_code == 0, result.output
    assert json_lines(result.stdout)[0]["order_id"] == order_id
    assert served.requests_for(order_id) == 1


def test_a_proxy_that_is_no_url_is_a_usage_error(served: ServedFake) -> None:
    result = cli(["order", "o", "--proxy", "proxy:3128"], served)
    assert result.exit_code == 2
    assert "--proxy must be an http(s) URL" in result.stderr


# -- 17: wording -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix", ["/ordermanagement/v1", "/ordermanagement/v1/", "/ordermanagement"]
)
def test_a_base_url_with_the_api_path_is_refused_with_the_root_to_use(
    served: ServedFake, suffix: str
) -> None:
    order_id = served.add_order(1000)
    base = served.fake.base_url
    result = cli(["order", order_id, "--base-url", base + suffix], served)
    assert result.exit_code == 2
    assert f"--base-url {base}" in result.stderr
    assert served.requests_for(order_id) == 0


@pytest.mark.parametrize(
    ("build", "says"),
    [
        (lambda: CaptureRequest(captured_amount=1, order_lines=[None]), "got nothing (None)"),
        (lambda: CaptureRequest(captured_amount=1, order_lines=[1]), "must be an OrderLine"),
        (lambda: CaptureRequest(captured_amount=12.5), "got a decimal number (12.5)"),
        (lambda: CaptureRequest(captured_amount=1, reference=5), "must be a string"),
    ],
)
def test_validation_messages_speak_plainly(build: object, says: str) -> None:
    with pytest.raises(ValidationError) as raised:
        build()  # type: ignore[operator]
    assert says in str(raised.value)
    assert "NoneType" not in str(raised.value)
    assert "a OrderLine" not in str(raised.value)


def test_a_duplicate_batch_line_is_named_by_its_columns_not_item_key(
    served: ServedFake, tmp_path: Path
) -> None:
    order_id = served.add_order(1000)
    rows = f"{order_id},500,r1\n{order_id},500,r1\n"
    path = write(tmp_path, "d.csv", "order_id,captured_amount,reference\n" + rows)
    human = cli(["batch", path, "--no-journal"], served)
    assert human.exit_code == 1
    assert "appears twice" in human.stdout
    assert "item_key" not in human.stdout
    path2 = write(tmp_path, "d2.csv", "order_id,captured_amount,reference\n" + rows)
    as_json = cli(["batch", path2, "--no-journal", "--json"], served)
    [refused] = [o for o in json_lines(as_json.stdout) if o.get("status") == "refused"]
    assert refused["error"].startswith("order_id and reference")


def test_a_klarna_refusal_is_reported_with_its_line_number(
    served: ServedFake, tmp_path: Path
) -> None:
    good, over = served.add_order(1000), served.add_order(1000)
    path = write(tmp_path, "o.csv", f"order_id,captured_amount\n{good},1000\n\n{over},5000\n")
    as_json = cli(["batch", path, "--json", "--no-journal"], served)
    assert as_json.exit_code == 1
    refused = outcomes_by_order(as_json.stdout)[over]
    assert (refused["status"], refused["line"]) == ("refused", 4)
    assert outcomes_by_order(as_json.stdout)[good]["line"] == 2
    shown = cli(["batch", path, "--no-journal"], served)
    assert f"- line 4: {over} refused" in shown.stdout
