"""The `klarna-om` command through its real entry point, against FakeKlarna over loopback.

The commands call `asyncio.run`, which cannot run inside pytest-asyncio's loop, so these
tests are synchronous and the fake serves from its own loop in a background thread
(`ServedFake`); a few tests run the command as a real subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import re
import select
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from klarna_om_async import (
    BatchItem,
    CaptureOutcome,
    CaptureRequest,
    CaptureStatus,
    JournalStatus,
    KlarnaOM,
    RateLimitError,
    Region,
    RetryPolicy,
    SQLiteJournal,
)
from klarna_om_async.batch import capture_many
from klarna_om_async.cli import _fakeserver, _options, main
from klarna_om_async.cli._batchfile import BadLineError
from klarna_om_async.cli._demo import DemoCheck, _plan
from klarna_om_async.cli._render import BatchView
from klarna_om_async.journal import ItemRecord
from klarna_om_async.testing import (
    Delay,
    DropAfterProcessing,
    DropConnection,
    FakeKlarna,
    InstantSleep,
    RateLimited,
    ServerFailure,
)

T = TypeVar("T")

USERNAME = "merchant-7"
# Distinctive, so a leak anywhere in any output is caught by `cli()`.
PASSWORD = "pw-Sup3r-S3cret-do-not-print"
ORDERS = "/ordermanagement/v1/orders"
KLARNA_VARS = ("KLARNA_USERNAME", "KLARNA_PASSWORD", "KLARNA_REGION", "KLARNA_PLAYGROUND")


async def _cancel_the_rest() -> None:
    """End the tasks left on this loop (a request handler the fake's close let run on), or
    each is reported as "Task was destroyed but it is pending!" when it is collected."""
    rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


class ServedFake:
    """A FakeKlarna serving from its own event loop in a background thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-klarna")
        self._thread.start()
        self.fake = self.run(self._start())

    @staticmethod
    async def _start() -> FakeKlarna:
        fake = FakeKlarna(username=USERNAME, password=PASSWORD, seed=3)
        await fake.start()
        return fake

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the fake's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def do(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on the fake's loop, so it never races a request being served."""

        async def call() -> T:
            return fn()

        return self.run(call())

    def add_order(self, amount: int = 10_000, order_id: str | None = None) -> str:
        return self.do(lambda: self.fake.add_order(order_id, amount=amount))

    def posts(self, order_id: str) -> list[str | None]:
        """Idempotency keys of the capture POSTs received for ``order_id``."""
        path = f"{ORDERS}/{order_id}/captures"
        return self.do(lambda: [r.idempotency_key for r in self.fake.requests if r.path == path])

    def requests_for(self, order_id: str) -> int:
        return self.do(lambda: sum(order_id in r.path for r in self.fake.requests))

    def booked(self, order_id: str) -> int:
        return self.do(lambda: len(self.fake.captures(order_id)))

    def close(self) -> None:
        self.run(self.fake.close())
        self.run(_cancel_the_rest())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


@pytest.fixture
def served() -> Iterator[ServedFake]:
    served = ServedFake()
    try:
        yield served
    finally:
        served.close()


def klarna_env(served: ServedFake | None) -> dict[str, str | None]:
    """The environment the CLI reads credentials from; None unsets a variable."""
    env: dict[str, str | None] = dict.fromkeys((*KLARNA_VARS, "KLARNA_BASE_URL"))
    if served is not None:
        env.update(
            KLARNA_USERNAME=USERNAME,
            KLARNA_PASSWORD=PASSWORD,
            KLARNA_BASE_URL=served.fake.base_url,
        )
    return env


def cli(
    args: list[str], served: ServedFake | None = None, env: Mapping[str, str | None] = ()
) -> Result:
    """Invoke `klarna-om` in-process; every output is checked for the password."""
    result = CliRunner().invoke(main, args, env={**klarna_env(served), **dict(env)})
    assert PASSWORD not in result.output
    assert "Traceback" not in result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def outcomes_by_order(text: str) -> dict[str, dict[str, Any]]:
    return {o["order_id"]: o for o in json_lines(text) if o["type"] == "outcome"}


# -- single commands -------------------------------------------------------------------------


def test_capture_books_the_capture_and_prints_its_id(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    result = cli(["capture", order_id, "--amount", "4000", "--reference", "INV-1"], served)
    assert result.exit_code == 0, result.output
    [booked] = served.do(lambda: served.fake.captures(order_id))
    assert (booked.captured_amount, booked.reference) == (4000, "INV-1")
    assert f"capture_id {booked.capture_id}" in result.stdout
    assert booked.idempotency_key is not None
    assert booked.idempotency_key in result.stdout


def test_capture_json_uses_the_given_idempotency_key(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    args = ["capture", order_id, "--amount", "10000", "--description", "all", "--json"]
    result = cli([*args, "--idempotency-key", "key-1"], served)
    assert result.exit_code == 0, result.output
    request, printed = json_lines(result.stdout)
    assert request == {
        "type": "request",
        "command": "capture",
        "order_id": order_id,
        "idempotency_key": "key-1",
    }
    assert printed["order_id"] == order_id
    assert printed["idempotency_key"] == "key-1"
    assert printed["attempts"] == 1
    [booked] = served.do(lambda: served.fake.captures(order_id))
    assert printed["capture_id"] == booked.capture_id
    assert booked.description == "all"


def test_capture_refused_prints_its_key_then_one_line_and_exits_1(served: ServedFake) -> None:
    order_id = served.add_order(1000)
    result = cli(["capture", order_id, "--amount", "5000"], served)
    assert result.exit_code == 1
    assert result.stdout == ""
    key_line, line = result.stderr.splitlines()
    assert key_line == f"idempotency key: {served.posts(order_id)[0]}"
    assert "403 CAPTURE_NOT_ALLOWED" in line
    assert "correlation_id=" in line


def test_capture_of_an_invalid_amount_is_a_usage_error_and_sends_nothing(
    served: ServedFake,
) -> None:
    order_id = served.add_order(1000)
    result = cli(["capture", order_id, "--amount", "-1"], served)
    assert result.exit_code == 2
    assert "captured_amount: must be at least 0" in result.stderr
    assert served.requests_for(order_id) == 0


def test_an_unknown_outcome_names_the_key_to_retry_with(served: ServedFake) -> None:
    order_id = served.add_order(1000)
    served.do(lambda: served.fake.inject(ServerFailure(503), times=None))
    args = ["capture", order_id, "--amount", "1000", "--idempotency-key", "k-503"]
    # Two attempts: one retry, whose backoff is at most 0.5 s.
    result = cli([*args, "--max-attempts", "2"], served)
    assert result.exit_code == 3  # outcome unknown, not a refusal
    assert "503" in result.stderr
    assert "--idempotency-key k-503" in result.stderr
    assert served.posts(order_id) == ["k-503", "k-503"]


def test_a_retry_under_a_given_key_met_only_by_429s_exits_unknown(served: ServedFake) -> None:
    """The key may have booked in an earlier call; a 429 comes before Klarna's idempotency
    and says nothing of it. Exit 1 ("refused, nothing happened") led to a new key and a
    second booking (helper-88); it is 3 (outcome unknown), naming the key."""
    order_id = served.add_order(3000)
    served.do(lambda: served.fake.inject(RateLimited("30"), method="POST", times=None))
    args = ["capture", order_id, "--amount", "1000", "--idempotency-key", "k-busy"]
    result = cli([*args, "--max-attempts", "1"], served)
    assert result.exit_code == 3
    assert "--idempotency-key k-busy" in result.stderr


def test_a_capture_under_its_own_new_key_refused_401_exits_1(served: ServedFake) -> None:
    """The key the command made was never sent before: a 401 under it says nothing
    happened (helper-90: it was taken for a caller's key, exit 3, "rerun with it")."""
    order_id = served.add_order(3000)
    args = ["capture", order_id, "--amount", "1000"]
    result = cli(args, served, env={"KLARNA_PASSWORD": "wrong-pw-xyz"})
    assert result.exit_code == 1
    assert "401" in result.stderr
    assert "--idempotency-key" not in result.stderr.split("idempotency key:")[-1].partition("\n")[2]


def test_a_key_the_cli_made_is_not_vouched_for_by_a_later_command(served: ServedFake) -> None:
    """In one process (CliRunner), the key a capture made was still taken as never sent
    by the next command given it: its 429 said "refused" (exit 1), though the first had
    booked (helper-91). The retry under it stays unknown (exit 3)."""
    order_id = served.add_order(3000)
    served.do(lambda: served.fake.inject(DropAfterProcessing(), method="POST"))
    first = cli(["capture", order_id, "--amount", "1000", "--max-attempts", "1"], served)
    assert first.exit_code == 3
    key = first.stderr.split("idempotency key: ")[1].split()[0]
    served.do(lambda: served.fake.inject(RateLimited("30"), method="POST", times=None))
    args = ["capture", order_id, "--amount", "1000", "--idempotency-key", key]
    again = cli([*args, "--max-attempts", "1"], served)
    assert again.exit_code == 3
    assert served.posts(order_id)[0] == key


def test_a_key_the_cli_made_is_not_vouched_for_after_the_command(served: ServedFake) -> None:
    """A library call in the same process after the command, finishing its unknown capture
    under its key as the docs say, met a 429 and was told nothing had been booked; a new
    key then booked again (helper-92). It stays unknown."""
    order_id = served.add_order(3000)
    served.do(lambda: served.fake.inject(DropAfterProcessing(), method="POST"))
    first = cli(["capture", order_id, "--amount", "1000", "--max-attempts", "1"], served)
    assert first.exit_code == 3
    key = first.stderr.split("idempotency key: ")[1].split()[0]
    served.do(lambda: served.fake.inject(RateLimited("30"), method="POST", times=None))

    async def retry() -> RateLimitError:
        policy = RetryPolicy(max_attempts=1, deadline=1)
        url = served.fake.base_url
        async with KlarnaOM(USERNAME, PASSWORD, base_url=url, retry=policy) as om:
            request = CaptureRequest(captured_amount=1000)
            with pytest.raises(RateLimitError) as busy:
                await om.captures.create(order_id, request, idempotency_key=key)
        return busy.value

    assert asyncio.run(retry()).outcome_unknown
    assert served.posts(order_id)[0] == key


def test_get_shows_a_capture(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    capture_id = capture(served, order_id, 10_000)
    human = cli(["get", order_id, capture_id], served)
    assert human.exit_code == 0
    assert capture_id in human.stdout
    assert "10000" in human.stdout
    as_json = cli(["get", order_id, capture_id, "--json"], served)
    [printed] = json_lines(as_json.stdout)
    assert (printed["capture_id"], printed["captured_amount"]) == (capture_id, 10_000)


def test_get_of_an_unknown_capture_exits_1(served: ServedFake) -> None:
    order_id = served.add_order()
    result = cli(["get", order_id, "nope", "--json"], served)
    assert result.exit_code == 1
    assert "404 NO_SUCH_CAPTURE" in result.stderr
    [error] = json_lines(result.stdout)
    assert (error["type"], error["error_code"]) == ("error", "NO_SUCH_CAPTURE")


def test_list_shows_every_capture(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    empty = cli(["list", order_id], served)
    assert "has no captures" in empty.stdout
    first, second = capture(served, order_id, 3000), capture(served, order_id, 2000)
    human = cli(["list", order_id], served)
    assert human.exit_code == 0
    assert "3000" in human.stdout
    assert "2000" in human.stdout
    as_json = cli(["list", order_id, "--json"], served)
    assert [c["capture_id"] for c in json_lines(as_json.stdout)] == [first, second]


def test_list_of_an_unknown_order_exits_1(served: ServedFake) -> None:
    result = cli(["list", "no-such-order"], served)
    assert result.exit_code == 1
    assert "404 NO_SUCH_ORDER" in result.stderr


def test_ship_adds_tracking_details(served: ServedFake) -> None:
    order_id = served.add_order()
    capture_id = capture(served, order_id, 10_000)
    args = ["ship", order_id, capture_id, "--company", "DHL", "--tracking-number", "T-1"]
    result = cli([*args, "--tracking-uri", "https://track.example/T-1"], served)
    assert result.exit_code == 0, result.output
    assert "DHL Home T-1" in result.stdout
    as_json = cli([*args, "--method", "PickUpPoint", "--json"], served)
    request, printed = json_lines(as_json.stdout)
    assert (request["type"], request["command"]) == ("request", "ship")
    assert printed["shipping_info"][0]["shipping_method"] == "PickUpPoint"
    [booked] = served.do(lambda: served.fake.captures(order_id))
    assert [s["shipping_method"] for s in booked.shipping_info] == ["Home", "PickUpPoint"]
    assert booked.shipping_info[0]["tracking_uri"] == "https://track.example/T-1"


@pytest.mark.parametrize("blank", ["--company", "--tracking-number"])
def test_ship_with_a_blank_required_field_sends_nothing(served: ServedFake, blank: str) -> None:
    order_id = served.add_order()
    capture_id = capture(served, order_id, 10_000)
    fields = {"--company": "DHL", "--tracking-number": "T-1", blank: " "}
    result = cli(["ship", order_id, capture_id, *[x for f in fields.items() for x in f]], served)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"Error: {blank} must not be blank"]
    [booked] = served.do(lambda: served.fake.captures(order_id))
    assert booked.shipping_info == []


def test_ship_to_an_unknown_capture_exits_1(served: ServedFake) -> None:
    order_id = served.add_order()
    args = ["ship", order_id, "nope", "--company", "DHL", "--tracking-number", "1"]
    result = cli(args, served)
    assert result.exit_code == 1
    assert "404 NO_SUCH_CAPTURE" in result.stderr


def test_send_out_triggers_the_customer_communication(served: ServedFake) -> None:
    order_id = served.add_order()
    capture_id = capture(served, order_id, 10_000)
    assert "Triggered send-out" in cli(["send-out", order_id, capture_id], served).stdout
    result = cli(["send-out", order_id, capture_id, "--json"], served)
    request, printed = json_lines(result.stdout)
    assert (request["type"], request["command"]) == ("request", "send-out")
    assert printed == {"order_id": order_id, "capture_id": capture_id, "send_out": "triggered"}
    assert served.do(lambda: served.fake.captures(order_id)[0].send_outs) == 2


def test_send_out_of_an_unknown_capture_exits_1(served: ServedFake) -> None:
    order_id = served.add_order()
    result = cli(["send-out", order_id, "nope"], served)
    assert result.exit_code == 1
    assert "404 NO_SUCH_CAPTURE" in result.stderr


def test_order_shows_status_amounts_and_captures(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    capture_id = capture(served, order_id, 4000)
    human = cli(["order", order_id], served)
    assert human.exit_code == 0
    assert "PART_CAPTURED" in human.stdout
    assert "6000" in human.stdout
    assert capture_id[:8] in human.stdout
    [printed] = json_lines(cli(["order", order_id, "--json"], served).stdout)
    assert printed["remaining_authorized_amount"] == 6000
    assert printed["captures"][0]["capture_id"] == capture_id


def test_ids_are_shown_as_they_are_not_as_markup(served: ServedFake) -> None:
    # The tables' titles took "[red]" for rich markup: order x[red]y was shown as "xy".
    order_id = served.add_order(10_000, order_id="x[red]y")
    capture(served, order_id, 4000)
    for args in (["order", order_id], ["list", order_id]):
        shown = cli(args, served)
        assert shown.exit_code == 0, shown.output
        assert "x[red]y" in shown.stdout


def test_order_unknown_exits_1(served: ServedFake) -> None:
    result = cli(["order", "no-such-order", "--json"], served)
    assert result.exit_code == 1
    assert "404 NO_SUCH_ORDER" in result.stderr


def capture(served: ServedFake, order_id: str, amount: int) -> str:
    result = cli(["capture", order_id, "--amount", str(amount), "--json"], served)
    assert result.exit_code == 0, result.output
    capture_id: str = json_lines(result.stdout)[-1]["capture_id"]  # after the request line
    return capture_id


# -- credentials -----------------------------------------------------------------------------


def test_credentials_can_be_flags(served: ServedFake) -> None:
    order_id = served.add_order()
    flags = ["--username", USERNAME, "--password", PASSWORD, "--base-url", served.fake.base_url]
    result = cli(["order", order_id, *flags], None)
    assert result.exit_code == 0, result.output


def test_missing_credentials_are_a_usage_error() -> None:
    result = cli(["order", "x"], None)
    assert result.exit_code == 2
    assert "KLARNA_USERNAME and KLARNA_PASSWORD" in result.stderr


def test_wrong_credentials_exit_1_without_printing_them(served: ServedFake) -> None:
    result = cli(["order", "x"], served, env={"KLARNA_PASSWORD": "wrong-pw-xyz"})
    assert result.exit_code == 1
    assert "401" in result.stderr
    assert "wrong-pw-xyz" not in result.output


def test_region_and_playground_come_from_the_environment(
    served: ServedFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []

    def recording_client(username: str, password: str, **options: Any) -> KlarnaOM:
        seen.append({"username": username, **options})
        options["base_url"] = served.fake.base_url  # Klarna's real host is not for tests
        return KlarnaOM(username, password, **options)

    monkeypatch.setattr(_options, "KlarnaOM", recording_client)
    order_id = served.add_order()
    env = {"KLARNA_BASE_URL": None, "KLARNA_REGION": "na", "KLARNA_PLAYGROUND": "true"}
    assert cli(["order", order_id], served, env=env).exit_code == 0
    env = {"KLARNA_BASE_URL": None, "KLARNA_REGION": "OC", "KLARNA_PLAYGROUND": "0"}
    assert cli(["order", order_id], served, env=env).exit_code == 0
    assert [(s["region"], s["playground"], s["base_url"]) for s in seen] == [
        (Region.NA, True, None),
        (Region.OC, False, None),
    ]
    assert seen[0]["username"] == USERNAME


def test_an_unknown_region_is_a_usage_error(served: ServedFake) -> None:
    result = cli(["order", "x"], served, env={"KLARNA_REGION": "mars"})
    assert result.exit_code == 2
    assert "mars" in result.stderr


def test_a_bad_base_url_is_a_usage_error(served: ServedFake) -> None:
    result = cli(["order", "x"], served, env={"KLARNA_BASE_URL": "ftp://example"})
    assert result.exit_code == 2
    assert "base_url" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--base-url", "http://[::1"],
        ["--proxy", "http://[::1"],
        ["--base-url", "http://user:pw@127.0.0.1:9"],
        ["--base-url", "http://127.0.0.1:9/?x=1"],
        ["--password", "pass\nword"],
    ],
)
def test_a_bad_connection_is_one_line_before_the_key_is_said(
    served: ServedFake, args: list[str]
) -> None:
    # These came as tracebacks (exit 1), or after the key was said.
    order_id = served.add_order(10_000)
    result = cli(["capture", order_id, "--amount", "100", *args], served)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ")
    assert served.booked(order_id) == 0


def test_an_unusable_proxy_in_the_environment_is_one_line_before_the_key(
    served: ServedFake,
) -> None:
    # Every attempt failed in aiohttp, reported "outcome unknown" (exit 3): nothing was sent.
    order_id = served.add_order(10_000)
    args = ["capture", order_id, "--amount", "100"]
    result = cli(args, served, env={"HTTP_PROXY": "bogus", "NO_PROXY": ""})
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        "Error: the environment's HTTP_PROXY is 'bogus', not an http(s) proxy URL such as"
        " http://proxy:3128; fix it, or unset it"
    ]
    assert served.booked(order_id) == 0


@pytest.mark.parametrize(
    "args",
    [["demo", "--concurrency", "100000"], ["demo", "--fault-rate", "nan"]],
)
def test_demo_options_out_of_range_are_usage_errors(args: list[str]) -> None:
    result = cli(args)
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.stderr


def test_help_documents_the_environment_and_exit_codes() -> None:
    text = cli(["--help"]).stdout
    for name in (*KLARNA_VARS, "KLARNA_BASE_URL", "demo", "130"):
        assert name in text
    batch_help = cli(["batch", "--help"]).stdout
    for word in ("order_id", "captured_amount", "idempotency_key", "JSON Lines", ".journal.sqlite"):
        assert word in batch_help
    assert "--no-journal" in batch_help


# -- batch -----------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_batch_csv_reports_each_order_and_exits_1(served: ServedFake, tmp_path: Path) -> None:
    full, part, over, bad, last = (served.add_order(10_000) for _ in range(5))
    path = write(
        tmp_path,
        "orders.csv",
        "order_id,captured_amount,reference,shipping_company,tracking_number\n"
        f"{full},10000,INV-1,DHL,T-1\n"
        f"{part},4000,INV-2,,\n"
        f"{over},20000,INV-3,,\n"
        "no-such-order,100,INV-4,,\n"
        f"{bad},12.50,INV-5,,\n"
        "\n"
        f"{last},10000,,,\n",
    )
    result = cli(["batch", path, "--json"], served)
    assert result.exit_code == 1, result.output
    outcomes = outcomes_by_order(result.stdout)
    assert {order: o["status"] for order, o in outcomes.items()} == {
        full: "captured",
        part: "captured",
        over: "refused",
        "no-such-order": "refused",
        bad: "refused",
        last: "captured",
    }
    assert "403 CAPTURE_NOT_ALLOWED" in outcomes[over]["error"]
    assert "404 NO_SUCH_ORDER" in outcomes["no-such-order"]["error"]
    assert outcomes[bad]["line"] == 6
    assert outcomes[bad]["error"].startswith("line 6: captured_amount: must be a whole number")
    assert served.requests_for(bad) == 0  # nothing was sent for the bad line
    [booked] = served.do(lambda: served.fake.captures(full))
    assert booked.shipping_info == [{"shipping_company": "DHL", "tracking_number": "T-1"}]
    assert outcomes[full]["capture_id"] == booked.capture_id
    summary = json_lines(result.stdout)[-1]
    assert summary["type"] == "summary"
    assert (summary["captured"], summary["refused"], summary["failed"]) == (3, 3, 0)
    assert summary["journal"] == path + ".journal.sqlite"
    assert os.path.exists(path + ".journal.sqlite")


def test_batch_jsonl_reads_klarnas_shape_and_reports_bad_lines(
    served: ServedFake, tmp_path: Path
) -> None:
    lines_order, keyed, over, bad = (served.add_order(6000) for _ in range(4))
    order_line = {
        "type": "physical",
        "name": "Tomatoes",
        "quantity": 10,
        "unit_price": 600,
        "total_amount": 6000,
    }
    rows = [
        {
            "order_id": lines_order,
            "captured_amount": 6000,
            "order_lines": [order_line],
            "shipping_info": [{"shipping_company": "DHL", "shipping_method": "Home"}],
        },
        {"order_id": keyed, "captured_amount": 6000, "idempotency_key": "fixed-key"},
        {"order_id": over, "captured_amount": 6001},
        {"order_id": bad, "captured_amount": "6000"},
    ]
    text = "\n".join(orjson.dumps(row).decode() for row in rows) + "\n{not json\n\n"
    path = write(tmp_path, "orders.jsonl", text)
    result = cli(["batch", path, "--json", "--concurrency", "2"], served)
    assert result.exit_code == 1, result.output
    outcomes = outcomes_by_order(result.stdout)
    assert outcomes[lines_order]["status"] == "captured"
    assert outcomes[keyed]["idempotency_key"] == "fixed-key"
    assert outcomes[over]["status"] == "refused"
    assert outcomes[bad]["error"] == "line 4: captured_amount: expected int, got str"
    assert outcomes[""]["error"].startswith("line 5: not valid JSON")
    assert served.requests_for(bad) == 0
    [booked] = served.do(lambda: served.fake.captures(lines_order))
    assert booked.order_lines[0]["name"] == "Tomatoes"
    assert booked.shipping_info == [{"shipping_company": "DHL", "shipping_method": "Home"}]
    assert served.posts(keyed) == ["fixed-key"]


def test_batch_prints_a_summary_table_and_the_problems_with_line_numbers(
    served: ServedFake, tmp_path: Path
) -> None:
    good, bad = served.add_order(1000), served.add_order(1000)
    path = write(tmp_path, "o.csv", f"order_id,captured_amount\n{good},1000\n{bad},\n")
    result = cli(["batch", path, "--no-journal"], served)
    assert result.exit_code == 1
    for word in ("captured", "refused", "failed", "skipped", "retries", "items/s"):
        assert word in result.stdout
    assert "line 3: captured_amount: is required" in result.stdout
    assert "Journal:" not in result.stdout
    assert not os.path.exists(path + ".journal.sqlite")


def test_batch_rerun_with_the_journal_finishes_unknown_outcomes_exactly_once(
    served: ServedFake, tmp_path: Path
) -> None:
    orders = [served.add_order(1000) for _ in range(4)]
    lost = orders[1]
    # Klarna books the capture but the answer is lost; with one attempt the outcome is unknown.
    served.do(lambda: served.fake.inject(DropAfterProcessing(), path=f"/{lost}/captures"))
    path = write(
        tmp_path, "o.csv", "order_id,captured_amount\n" + "".join(f"{o},1000\n" for o in orders)
    )
    journal = str(tmp_path / "run.sqlite")
    first = cli(["batch", path, "--journal", journal, "--max-attempts", "1", "--json"], served)
    assert first.exit_code == 1
    assert outcomes_by_order(first.stdout)[lost]["status"] == "failed"
    assert served.booked(lost) == 1

    second = cli(["batch", path, "--journal", journal, "--json"], served)
    assert second.exit_code == 0, second.output
    statuses = {o: v["status"] for o, v in outcomes_by_order(second.stdout).items()}
    assert statuses == {o: "captured" if o == lost else "skipped" for o in orders}
    [first_key, resent_key] = served.posts(lost)
    assert resent_key == first_key  # resent with its original key: Klarna replayed it

    third = cli(["batch", path, "--journal", journal], served)
    assert third.exit_code == 0
    assert all(served.booked(order) == 1 for order in orders)
    assert all(len(served.posts(order)) == 1 for order in orders if order != lost)


def test_a_journaled_batch_on_a_clock_hours_off_sends_nothing_and_says_so_in_one_line(
    served: ServedFake, tmp_path: Path
) -> None:
    orders = [served.add_order(1000) for _ in range(4)]
    path = write(
        tmp_path, "o.csv", "order_id,captured_amount\n" + "".join(f"{o},1000\n" for o in orders)
    )
    journal = str(tmp_path / "run.sqlite")
    served.do(lambda: served.fake.advance_clock(2 * 3600))  # this machine is 2 hours behind

    result = cli(["batch", path, "--journal", journal, "--concurrency", "1", "--json"], served)

    assert result.exit_code == 1
    statuses = {o: v["status"] for o, v in outcomes_by_order(result.stdout).items()}
    assert statuses == {orders[0]: "refused"}
    assert "the journal's clock is 2 h 0 min behind Klarna's" in result.stderr
    assert "set this machine's clock right (NTP), then rerun" in result.stderr
    assert [len(served.posts(o)) for o in orders] == [0, 0, 0, 0]
    assert [served.booked(o) for o in orders] == [0, 0, 0, 0]


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "table"])
def test_a_rerun_whose_input_lacks_an_unknown_item_of_the_journal_says_so_and_fails(
    served: ServedFake, tmp_path: Path, json_output: bool
) -> None:
    # An edited file (or a stream given again from too late a line) without the line of an
    # item whose outcome the journal holds unknown: nothing settled it, and the rerun said
    # "all done" (exit 0) while money may have moved.
    orders = [served.add_order(1000) for _ in range(3)]
    lost = orders[1]
    served.do(lambda: served.fake.inject(DropAfterProcessing(), path=f"/{lost}/captures"))
    header = "order_id,captured_amount\n"
    path = write(tmp_path, "o.csv", header + "".join(f"{o},1000\n" for o in orders))
    journal = str(tmp_path / "run.sqlite")
    first = cli(["batch", path, "--journal", journal, "--max-attempts", "1"], served)
    assert first.exit_code == 1
    edited = write(tmp_path, "edited.csv", header + "".join(f"{o},1000\n" for o in orders[::2]))
    options = ["--json"] if json_output else []
    second = cli(["batch", edited, "--journal", journal, *options], served)
    assert second.exit_code == 1, second.output
    if json_output:
        summary = json_lines(second.stdout)[-1]
        assert summary["unknown_not_in_input"] == 1
        assert summary["unknown_not_in_input_first"] == [lost]
    else:
        assert "1 items the journal holds with an unknown outcome" in second.stdout
        assert f"order {lost}" in second.stdout
    whole = cli(["batch", path, "--journal", journal, "--json"], served)
    assert whole.exit_code == 0, whole.output
    assert "unknown_not_in_input" not in json_lines(whole.stdout)[-1]
    assert [served.booked(order) for order in orders] == [1, 1, 1]


def test_a_rerun_whose_input_lacks_an_item_needing_review_says_so_until_it_is_settled(
    served: ServedFake, tmp_path: Path
) -> None:
    review, other = served.add_order(1000), served.add_order(1000)
    journal = str(tmp_path / "j.sqlite")

    async def in_doubt() -> None:
        async with SQLiteJournal(journal) as opened:
            item = ItemRecord(
                item_key=review, order_id=review, captured_amount=100, fingerprint="f"
            )
            await opened.claim(item, f"key-{review}")
            await opened.finish(review, JournalStatus.NEEDS_REVIEW, reconciled=True)

    asyncio.run(in_doubt())
    path = write(tmp_path, "o.csv", f"order_id,captured_amount\n{other},1000\n")
    first = cli(["batch", path, "--journal", journal, "--json"], served)
    assert first.exit_code == 1, first.output
    assert json_lines(first.stdout)[-1]["unknown_not_in_input_first"] == [review]
    settled = cli(["reconcile", journal, "--not-captured", review], served)
    assert settled.exit_code == 0, settled.output
    again = cli(["batch", path, "--journal", journal, "--json"], served)
    assert again.exit_code == 0, again.output
    assert [served.booked(review), served.booked(other)] == [0, 1]


def fill_the_disk(journal: str, when: str) -> None:
    """Make ``journal``'s writes fail as on a full disk: an SQLite trigger rolls back the
    transaction ``when`` (a trigger's event and condition, e.g. ``BEFORE UPDATE ON journal
    WHEN ...``); the journal is made first if it does not exist. Undone by ``free_the_disk``."""

    async def make() -> None:
        async with SQLiteJournal(journal):
            pass

    asyncio.run(make())
    with sqlite3.connect(journal) as conn:
        conn.execute(
            f"CREATE TRIGGER full {when}"
            " BEGIN SELECT RAISE(ROLLBACK, 'database or disk is full'); END"
        )
    conn.close()


def free_the_disk(journal: str) -> None:
    with sqlite3.connect(journal) as conn:
        conn.execute("DROP TRIGGER full")
    conn.close()


def capture_file(tmp_path: Path, orders: list[str]) -> str:
    """A CSV batch file capturing 1000 of each of ``orders``."""
    rows = "".join(f"{o},1000\n" for o in orders)
    return write(tmp_path, "o.csv", "order_id,captured_amount\n" + rows)


def test_batch_whose_journal_cannot_be_written_stops_in_one_line_and_reruns_exactly_once(
    served: ServedFake, tmp_path: Path
) -> None:
    # A full disk fails the journal's writes mid-batch: SQLite's error came as a traceback
    # after a summary that looked complete.
    orders = [served.add_order(1000) for _ in range(6)]
    path = capture_file(tmp_path, orders)
    journal = str(tmp_path / "run.sqlite")
    # The fourth claim finds the disk full.
    fill_the_disk(journal, "BEFORE INSERT ON journal WHEN (SELECT count(*) FROM journal) >= 3")
    first = cli(["batch", path, "--journal", journal, "--concurrency", "1", "--json"], served)
    assert first.exit_code == 1, first.output
    assert isinstance(first.exception, SystemExit)
    [line] = first.stderr.splitlines()
    assert line.startswith(f"The journal {journal} could not be written (database or disk")
    assert "rerun the same command" in line
    summary = json_lines(first.stdout)[-1]
    assert summary["type"] == "summary"
    assert "could not be written" in summary["stopped"]
    free_the_disk(journal)
    second = cli(["batch", path, "--journal", journal], served)
    assert second.exit_code == 0, second.output
    assert [served.booked(order) for order in orders] == [1] * 6


def test_batch_reports_an_outcome_its_journal_could_not_record(
    served: ServedFake, tmp_path: Path
) -> None:
    # The disk fills between a capture's send and its outcome's write: the capture Klarna
    # booked was missing from the report and the summary, which undercounted the money moved.
    orders = [served.add_order(1000) for _ in range(5)]
    path = capture_file(tmp_path, orders)
    journal = str(tmp_path / "run.sqlite")
    # The third outcome finds the disk full.
    captured = "(SELECT count(*) FROM journal WHERE status = 'captured')"
    fill_the_disk(journal, f"BEFORE UPDATE ON journal WHEN {captured} >= 2")
    first = cli(["batch", path, "--journal", journal, "--concurrency", "1", "--json"], served)
    assert first.exit_code == 1, first.output
    [line] = first.stderr.splitlines()
    assert line.startswith(f"The journal {journal} could not be written (database or disk")
    *reported, summary = json_lines(first.stdout)
    assert [r["order_id"] for r in reported] == orders[:3]
    assert {r["status"] for r in reported} == {"captured"}
    assert [served.booked(order) for order in orders] == [1, 1, 1, 0, 0]
    assert (summary["captured"], summary["items"]) == (3, 3), summary
    free_the_disk(journal)
    second = cli(["batch", path, "--journal", journal, "--json"], served)
    assert second.exit_code == 0, second.output
    assert [served.booked(order) for order in orders] == [1] * 5
    resent = {r["order_id"]: r for r in json_lines(second.stdout)[:-1]}
    assert resent[orders[2]]["idempotency_key"] == reported[2]["idempotency_key"]


def test_batch_whose_journal_fails_its_last_fsync_says_so_in_one_line(
    served: ServedFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Closing fsyncs the outcomes written since the last claim; its OSError came as a
    # traceback after a summary that looked complete.
    order_id = served.add_order(1000)
    path = write(tmp_path, "o.csv", f"order_id,captured_amount\n{order_id},1000\n")
    journal = str(tmp_path / "run.sqlite")

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("klarna_om_async.sqlite_journal.os.fsync", broken)
    result = cli(["batch", path, "--journal", journal], served)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    [line] = result.stderr.splitlines()
    assert line.startswith(f"The journal {journal} could not be written ([Errno 5]")
    assert served.booked(order_id) == 1


def test_a_damaged_journal_is_one_line_that_warns_against_a_new_journal(
    served: ServedFake, tmp_path: Path
) -> None:
    # A page SQLite finds malformed came as a traceback from the batch, and reconcile blamed
    # a full disk.
    orders = [served.add_order(1000) for _ in range(300)]
    path = capture_file(tmp_path, orders)
    journal = tmp_path / "run.sqlite"
    assert cli(["batch", path, "--journal", str(journal)], served).exit_code == 0
    data = journal.read_bytes()
    journal.write_bytes(data[:4096] + bytes(4096) + data[8192:])  # page 2 zeroed
    sent = served.do(lambda: len(served.fake.requests))

    for args in (["batch", path, "--journal", str(journal)], ["reconcile", str(journal)]):
        result = cli(args, served)
        assert result.exit_code == 2, result.output
        [line] = result.stderr.splitlines()
        assert f"the journal {journal} is damaged (database disk image is malformed)" in line
        assert "under a new journal they would be sent again" in line
    assert served.do(lambda: len(served.fake.requests)) == sent


def test_batch_human_output_says_how_to_finish_failed_items(
    served: ServedFake, tmp_path: Path
) -> None:
    order_id = served.add_order(1000)
    served.do(lambda: served.fake.inject(DropAfterProcessing(), method="POST"))
    path = write(tmp_path, "o.csv", f"order_id,captured_amount\n{order_id},1000\n")
    result = cli(["batch", path, "--max-attempts", "1"], served)
    assert result.exit_code == 1
    assert "rerun the same command" in result.stdout
    assert f"Journal: {path}.journal.sqlite" in result.stdout


def test_batch_summary_counts_the_429s(served: ServedFake, tmp_path: Path) -> None:
    order_id = served.add_order(1000)
    served.do(lambda: served.fake.inject(RateLimited(retry_after="0"), times=2))
    path = write(tmp_path, "o.csv", f"order_id,captured_amount\n{order_id},1000\n")
    result = cli(["batch", path, "--no-journal", "--json"], served)
    assert result.exit_code == 0, result.output
    summary = json_lines(result.stdout)[-1]
    assert (summary["rate_limited"], summary["attempts"], summary["captured"]) == (2, 3, 1)
    human = cli(["batch", path, "--no-journal"], served)  # already captured: refused, no 429
    assert "429s (rate limited)" in human.stdout


@pytest.mark.parametrize(
    ("name", "text", "extra", "message"),
    [
        ("o.txt", "x", [], "cannot tell the format"),
        ("missing.csv", None, [], "No such file"),
        ("o.csv", "order,amount\nx,1\n", [], "unknown column(s) 'order', 'amount'"),
        ("o.csv", "order_id\nx\n", [], "missing required column(s) captured_amount"),
        ("o.csv", "", [], "empty file"),
        ("o.csv", "order_id,captured_amount\n", ["--no-journal", "--journal", "j"], "exclude"),
        ("o.csv", "order_id,captured_amount\n", ["--journal", "/no/such/dir/j"], "journal"),
    ],
)
# On a terminal the file is first counted for the progress bar's total.
@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_batch_input_errors_exit_2_and_send_nothing(
    served: ServedFake,
    tmp_path: Path,
    name: str,
    text: str | None,
    extra: list[str],
    message: str,
    terminal: bool,
) -> None:
    path = write(tmp_path, name, text) if text is not None else str(tmp_path / name)
    # TTY_COMPATIBLE tells rich whether stdout is a terminal.
    result = cli(["batch", path, *extra], served, env={"TTY_COMPATIBLE": str(int(terminal))})
    assert result.exit_code == 2
    assert message in result.stderr
    assert served.do(lambda: len(served.fake.requests)) == 0


def test_batch_of_a_header_only_csv_prints_a_summary_of_0_items(
    served: ServedFake, tmp_path: Path
) -> None:
    path = write(tmp_path, "o.csv", "order_id,captured_amount\n")
    human = cli(["batch", path], served)
    assert human.exit_code == 0, human.output
    assert re.search(r"total\s*\S\s*0\s", human.stdout), human.stdout
    assert f"Journal: {path}.journal.sqlite" in human.stdout
    as_json = cli(["batch", path, "--json"], served)
    assert as_json.exit_code == 0, as_json.output
    [summary] = json_lines(as_json.stdout)
    assert (summary["type"], summary["items"], summary["interrupted"]) == ("summary", 0, False)
    assert served.do(lambda: len(served.fake.requests)) == 0


def test_a_batch_read_from_a_stream_needs_a_named_journal(
    served: ServedFake, tmp_path: Path
) -> None:
    # `producer | klarna-om batch /dev/stdin` kept its journal at /dev/stdin.journal.sqlite:
    # lost at reboot, and shared by every batch read from a stream.
    order_id = served.add_order(1000)
    said = []
    for args, code in (([], 2), (["--journal", str(tmp_path / "j.sqlite")], 0)):
        read_end, write_end = os.pipe()
        os.write(write_end, f"order_id,captured_amount\n{order_id},1000\n".encode())
        os.close(write_end)
        try:
            result = cli(["batch", f"/dev/fd/{read_end}", "--format", "csv", *args], served)
        finally:
            os.close(read_end)
        assert result.exit_code == code, result.output
        said.append(result.stderr)
    assert "name its journal with --journal PATH" in said[0]
    assert served.booked(order_id) == 1


def test_batch_format_option_overrides_the_extension(served: ServedFake, tmp_path: Path) -> None:
    order_id = served.add_order(1000)
    path = write(tmp_path, "orders.txt", f'{{"order_id": "{order_id}", "captured_amount": 1000}}\n')
    result = cli(["batch", path, "--format", "jsonl", "--json"], served)
    assert result.exit_code == 0, result.output
    assert outcomes_by_order(result.stdout)[order_id]["status"] == "captured"


def test_batch_refuses_a_journal_that_holds_the_item_for_another_order(
    served: ServedFake, tmp_path: Path
) -> None:
    journal = tmp_path / "j.sqlite"

    async def begin_elsewhere() -> None:
        async with SQLiteJournal(journal) as opened:
            item = ItemRecord(
                item_key="X:ref", order_id="another-order", captured_amount=1000, fingerprint="f"
            )
            await opened.claim(item, "k")

    asyncio.run(begin_elsewhere())
    path = write(tmp_path, "X.csv", "order_id,captured_amount,reference\nX,1000,ref\n")
    result = cli(["batch", path, "--journal", str(journal)], served)
    assert result.exit_code == 1  # refused, with the reason, and nothing sent
    assert "journaled for order 'another-order', not 'X'" in result.stdout
    assert served.posts("X") == []  # (its order was read, for Klarna's time)


# -- demo ------------------------------------------------------------------------------------


def test_demo_captures_every_order_once_and_exits_0() -> None:
    result = cli(["demo", "--orders", "200", "--concurrency", "16"])
    assert result.exit_code == 0, result.output
    assert "Double-booking check: passed" in result.stdout
    assert "retries" in result.stdout
    assert "items/s" in result.stdout


def test_demo_json_prints_one_summary_object() -> None:
    result = cli(["demo", "--orders", "100", "--seed", "9", "--json"])
    assert result.exit_code == 0, result.output
    [summary] = json_lines(result.stdout)
    assert summary["double_booking_check"] == "passed"
    assert summary["captured"] + summary["refused"] == 100
    assert summary["refused"] == summary["over_captures"]
    assert summary["retries"] == summary["attempts"] - summary["items"]
    assert sum(summary["faults"].values()) > 0


def test_demo_with_many_faults_passes_the_check_and_exits_1_for_unknown_outcomes() -> None:
    # 90% of attempts fault, so some items exhaust their 10 attempts: unknown outcomes,
    # booked or not, which are no double bookings. (About 1 in 3 items; 30 all succeeding
    # would take odds of 1 in 400,000.)
    args = ["demo", "--orders", "30", "--seed", "7", "--fault-rate", "0.9", "--json"]
    result = cli(args)
    [summary] = json_lines(result.stdout)
    assert summary["double_booking_check"] == "passed", summary["problems"]
    assert summary["failed"] > 0
    assert result.exit_code == 1  # documented: not every item that fits was captured
    assert summary["booked"] == summary["captured"] + summary["unknown_booked"]


def demo_outcome(
    item: BatchItem, status: CaptureStatus, key: str, capture_id: str | None = None
) -> CaptureOutcome:
    return CaptureOutcome(
        order_id=item.order_id,
        item_key=item.item_key,
        status=status,
        idempotency_key=key,
        capture_id=capture_id,
    )


async def test_demo_check_reports_double_bookings_and_contradicted_outcomes(
    fake: FakeKlarna,
) -> None:
    plan = _plan(fake, 4, seed=1)
    assert not plan.over_captures
    doubled, denied, phantom, _no_outcome = plan.items
    async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as om:
        half = CaptureRequest(captured_amount=10)
        created = await om.captures.create(doubled.order_id, half)
        await om.captures.create(doubled.order_id, half)
        await om.captures.create(denied.order_id, half, idempotency_key="k-denied")
    outcomes = [
        demo_outcome(doubled, CaptureStatus.CAPTURED, "k", capture_id=created.capture_id),
        demo_outcome(denied, CaptureStatus.REFUSED, "k-denied"),
        demo_outcome(phantom, CaptureStatus.CAPTURED, "k-phantom", capture_id="no-such-capture"),
    ]
    check = DemoCheck.of(fake, plan, outcomes)
    assert not check.passed
    text = check.describe(4, 0)
    assert text.startswith("Double-booking check: FAILED")
    assert f"1 order(s) booked more than planned, e.g. {doubled.order_id}: 2 capture(s)" in text
    assert f"1 item(s) reported refused but booked, e.g. {denied.order_id}" in text
    assert f"1 item(s) reported captured but not booked, e.g. {phantom.order_id}" in text
    assert "3 outcome(s) for 4 items" in text


async def test_demo_check_passes_unknown_outcomes_booked_or_not(fake: FakeKlarna) -> None:
    plan = _plan(fake, 2, seed=1)
    lost_answer, never_booked = plan.items
    async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as om:
        await om.captures.create(lost_answer.order_id, lost_answer.request, idempotency_key="k1")
    outcomes = [
        demo_outcome(lost_answer, CaptureStatus.FAILED, "k1"),
        demo_outcome(never_booked, CaptureStatus.FAILED, "k2"),
    ]
    check = DemoCheck.of(fake, plan, outcomes)
    assert check.passed
    assert not check.all_captured  # so the demo exits 1
    assert "2 outcome(s) unknown (failed), 1 of them booked" in check.describe(2, 0)


# -- rendering -------------------------------------------------------------------------------


def test_the_progress_bar_runs_on_a_terminal_and_the_summary_follows() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    outcomes = [
        CaptureOutcome(
            order_id=f"o{i}",
            item_key=f"o{i}",
            status=status,
            idempotency_key="k",
            attempts=2,
            error=None if status is CaptureStatus.CAPTURED else BadLineError(i, "f", "bad [x]"),
        )
        for i, status in enumerate([CaptureStatus.CAPTURED] * 3 + [CaptureStatus.REFUSED] * 25)
    ]
    with BatchView(console, json_output=False, title="t", total=len(outcomes)) as view:
        for outcome in outcomes:
            view.report(outcome)
    view.finish(notes=["a note"])
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())
    assert "refused 25" in text  # the live counts
    assert "first 20 of 25" in text
    assert "line 4: f: bad [x]" in text  # file text is never read as markup
    assert "a note" in text
    assert view.tally.retries == 28


# -- the real console script, in subprocesses ------------------------------------------------


def subprocess_env(base_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLARNA_")}
    if base_url is not None:
        env.update(KLARNA_USERNAME=USERNAME, KLARNA_PASSWORD=PASSWORD, KLARNA_BASE_URL=base_url)
    return env


def run_module(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "klarna_om_async.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_module_runs_a_batch_as_a_subprocess(served: ServedFake, tmp_path: Path) -> None:
    good, over = served.add_order(1000), served.add_order(1000)
    path = write(tmp_path, "o.csv", f"order_id,captured_amount\n{good},1000\n{over},1001\n")
    done = run_module("batch", path, "--json", env=subprocess_env(served.fake.base_url))
    assert done.returncode == 1, done.stderr
    assert {o: v["status"] for o, v in outcomes_by_order(done.stdout).items()} == {
        good: "captured",
        over: "refused",
    }
    assert PASSWORD not in done.stdout + done.stderr
    assert "Warning" not in done.stderr


def run_into(stdout: int, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI as a subprocess writing its standard output to the file descriptor given."""
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "klarna_om_async.cli", *args],
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
    )


@contextlib.contextmanager
def closed_pipe() -> Iterator[int]:
    """The writing end of a pipe nobody reads: the first write fails (EPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        yield write_end
    finally:
        os.close(write_end)


def test_a_capture_whose_output_is_closed_exits_3_and_its_key_finishes_it(
    served: ServedFake,
) -> None:
    # `klarna-om capture ... | true`: Klarna booked it, and click's exit 1 ("refused")
    # invited a retry under a new key.
    order_id = served.add_order(10_000)
    env = subprocess_env(served.fake.base_url)
    with closed_pipe() as stdout:
        done = run_into(stdout, "capture", order_id, "--amount", "100", env=env)
    assert done.returncode == 3, done.stderr
    key_line, line = done.stderr.splitlines()
    assert line.startswith("Error: the output could not be written (Broken pipe)")
    assert served.booked(order_id) == 1
    key = key_line.removeprefix("idempotency key: ")
    again = cli(["capture", order_id, "--amount", "100", "--idempotency-key", key], served)
    assert again.exit_code == 0, again.output
    assert served.booked(order_id) == 1


@pytest.mark.parametrize("output", [["--json"], []], ids=["json", "table"])
def test_a_batch_whose_output_is_closed_exits_3_and_reruns_exactly_once(
    served: ServedFake, tmp_path: Path, output: list[str]
) -> None:
    # The table's writer (rich) exited 1 ("refused") in silence: a rerun without the
    # journal would capture everything again.
    orders = [served.add_order(1000) for _ in range(20)]
    path = capture_file(tmp_path, orders)
    env = subprocess_env(served.fake.base_url)
    with closed_pipe() as stdout:
        done = run_into(stdout, "batch", path, *output, "--concurrency", "4", env=env)
    assert done.returncode == 3, done.stderr
    line = done.stderr.splitlines()[-1]
    assert "the output could not be written (Broken pipe)" in line
    assert "without one, a rerun sends every item again" in line
    again = cli(["batch", path, "--json"], served)
    assert again.exit_code == 0, again.output
    assert [served.booked(order) for order in orders] == [1] * 20


def test_a_command_started_with_its_output_closed_sends_nothing(served: ServedFake) -> None:
    # `klarna-om capture ... --json >&-`: sent, and every word of it lost (exit 0).
    order_id = served.add_order(10_000)
    command = ["capture", order_id, "--amount", "100", "--json"]
    done = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "klarna_om_async.cli", *command],
        env=subprocess_env(served.fake.base_url),
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["Error: standard output is closed: nothing was sent"]
    assert served.booked(order_id) == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_a_json_capture_that_cannot_say_its_key_sends_nothing(served: ServedFake) -> None:
    order_id = served.add_order(10_000)
    env = subprocess_env(served.fake.base_url)
    with open("/dev/full", "w") as full:
        done = run_into(full.fileno(), "capture", order_id, "--amount", "100", "--json", env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "Error: the output could not be written (No space left on device); nothing was sent"
    ]
    assert served.booked(order_id) == 0


def test_the_console_script_is_installed() -> None:
    script = Path(sysconfig.get_path("scripts")) / "klarna-om"
    if not script.exists():
        pytest.skip("the package is not installed with its console script")
    done = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0
    assert done.stdout.startswith("klarna-om, version ")


def read_line(stream: io.TextIOWrapper | Any, timeout: float = 20) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "the subprocess printed nothing in time"
    line: str = stream.readline()
    return line


def test_fake_server_serves_seeded_orders_until_sigterm(tmp_path: Path) -> None:
    batch_file = tmp_path / "seed.csv"
    server = subprocess.Popen(
        [
            sys.executable,
            "-W",
            "error",
            "-m",
            "klarna_om_async.cli",
            "fake-server",
            "--port",
            "0",
            "--orders",
            "3",
            "--amount",
            "2500",
            "--write-batch",
            str(batch_file),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        info = orjson.loads(read_line(server.stdout))
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", info["base_url"])
        assert batch_file.read_text().splitlines() == [
            "order_id,captured_amount",
            *(f"{order_id},2500" for order_id in info["order_ids"]),
        ]
        env = {
            "KLARNA_USERNAME": info["username"],
            "KLARNA_PASSWORD": info["password"],
            "KLARNA_BASE_URL": info["base_url"],
        }
        result = CliRunner().invoke(main, ["batch", str(batch_file), "--json"], env=env)
        assert result.exit_code == 0, result.output
        assert {o["status"] for o in outcomes_by_order(result.stdout).values()} == {"captured"}
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=20)
    assert server.returncode == 0, stderr


def test_fake_server_prints_how_to_use_it(tmp_path: Path) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "klarna_om_async.cli", "fake-server", "--orders", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        first = read_line(server.stdout)
        # Printed in one write, so the other lines are there once the first one is.
        lines = [first, *(server.stdout.readline() for _ in range(4))]  # type: ignore[union-attr]
    finally:
        server.send_signal(signal.SIGINT)
        stdout, _ = server.communicate(timeout=20)
    assert lines[0].startswith("FakeKlarna serving on http://127.0.0.1:")
    assert "test-password" in lines[1]
    assert server.returncode == 0
    assert "FakeKlarna stopped." in stdout


def test_ctrl_c_stops_a_batch_and_the_rerun_finishes_it_exactly_once(
    served: ServedFake, tmp_path: Path
) -> None:
    orders = [served.add_order(1000) for _ in range(12)]
    # Booked at once, answered only much later: Ctrl-C catches items in flight after booking.
    # (The read of the first order that tells Klarna's time, before any send, is not delayed.)
    served.do(
        lambda: served.fake.inject(Delay(30, after_processing=True), times=None, method="POST")
    )
    path = write(
        tmp_path, "o.csv", "order_id,captured_amount\n" + "".join(f"{o},1000\n" for o in orders)
    )
    batch = subprocess.Popen(
        [sys.executable, "-m", "klarna_om_async.cli", "batch", path, "--concurrency", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(served.fake.base_url),
    )
    try:
        served.run(asyncio.wait_for(served.fake.wait_for_requests(5), timeout=25))
    finally:
        batch.send_signal(signal.SIGINT)
        _, stderr = batch.communicate(timeout=20)
    assert batch.returncode == 130, stderr
    assert "Interrupted: no new items were started" in stderr
    assert f"{path}.journal.sqlite" in stderr
    assert served.do(lambda: len(served.fake.requests)) == 5  # nothing started after Ctrl-C

    served.do(served.fake.clear_faults)
    rerun = cli(["batch", path, "--json"], served)
    assert rerun.exit_code == 0, rerun.output
    assert {o["status"] for o in outcomes_by_order(rerun.stdout).values()} == {"captured"}
    assert all(served.booked(order) == 1 for order in orders)


def journal_summary(path: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        async with SQLiteJournal(path) as journal:
            return {status.value: n for status, n in (await journal.summary()).items() if n}

    return asyncio.run(read())


def klarna_om_command() -> list[str]:
    """The installed console script when there is one (as users run it), else the module."""
    script = Path(sysconfig.get_path("scripts")) / "klarna-om"
    return [str(script)] if script.exists() else [sys.executable, "-m", "klarna_om_async.cli"]


def test_kill_9_mid_batch_then_a_rerun_books_every_order_exactly_once(
    served: ServedFake, tmp_path: Path
) -> None:
    orders = [served.add_order(1000) for _ in range(30)]
    # Orders 10-13 are booked but their answers never come: with 4 workers, the batch is
    # stuck there, 10 orders captured and 4 in flight, whatever the machine's speed.
    stuck = orders[10:14]
    for order in stuck:
        served.do(
            lambda order=order: served.fake.inject(
                Delay(30, after_processing=True), method="POST", path=f"/{order}/captures"
            )
        )
    path = write(
        tmp_path, "o.csv", "order_id,captured_amount\n" + "".join(f"{o},1000\n" for o in orders)
    )
    journal = f"{path}.journal.sqlite"
    batch = subprocess.Popen(
        [*klarna_om_command(), "batch", path, "--concurrency", "4", "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=subprocess_env(served.fake.base_url),
    )
    try:
        served.run(asyncio.wait_for(served.fake.wait_for_requests(14), timeout=25))
    finally:
        batch.kill()  # SIGKILL: no cleanup, no final journal write
        _, stderr = batch.communicate(timeout=20)
    assert batch.returncode == -signal.SIGKILL, stderr
    assert journal_summary(journal) == {"captured": 10, "in_flight": 4}

    rerun = cli(["batch", path, "--json"], served)
    assert rerun.exit_code == 0, rerun.output
    statuses = {o: v["status"] for o, v in outcomes_by_order(rerun.stdout).items()}
    assert statuses == {o: "skipped" if i < 10 else "captured" for i, o in enumerate(orders)}
    assert all(served.booked(order) == 1 for order in orders)
    # The in-flight orders were resent with the key the killed run recorded, so Klarna
    # replayed the booked capture instead of capturing again.
    assert all(len(set(served.posts(order))) == 1 for order in stuck)
    assert all(len(served.posts(order)) == 2 for order in stuck)
    assert journal_summary(journal) == {"captured": 30}


def test_two_batch_runs_on_one_journal_cannot_both_send(served: ServedFake, tmp_path: Path) -> None:
    orders = [served.add_order(10_000) for _ in range(6)]
    # The first run's first capture is booked but not answered: it holds the journal.
    served.do(lambda: served.fake.inject(Delay(30, after_processing=True), method="POST", times=1))
    path = write(
        tmp_path, "o.csv", "order_id,captured_amount\n" + "".join(f"{o},4000\n" for o in orders)
    )
    first = subprocess.Popen(
        [*klarna_om_command(), "batch", path, "--concurrency", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=subprocess_env(served.fake.base_url),
    )
    try:
        # (The first request reads an order for Klarna's time; the second is the capture.)
        served.run(asyncio.wait_for(served.fake.wait_for_requests(2), timeout=25))
        second = cli(["batch", path], served)
    finally:
        first.kill()
        first.communicate(timeout=20)
    assert second.exit_code == 2, second.output
    [line] = second.stderr.splitlines()
    assert "is in use by another run" in line
    assert served.do(lambda: len(served.fake.requests)) == 2  # the second run sent nothing

    rerun = cli(["batch", path, "--json"], served)  # the killed run's lock is gone
    assert rerun.exit_code == 0, rerun.output
    assert all(served.booked(order) == 1 for order in orders)


def test_a_rerun_of_an_edited_line_is_refused_naming_both_amounts(
    served: ServedFake, tmp_path: Path
) -> None:
    order_id = served.add_order(10_000)
    served.do(lambda: served.fake.inject(DropAfterProcessing(), method="POST", times=None))
    path = write(tmp_path, "o.csv", f"order_id,captured_amount\n{order_id},1000\n")
    first = cli(["batch", path, "--max-attempts", "2", "--json"], served)
    assert first.exit_code == 1
    assert outcomes_by_order(first.stdout)[order_id]["status"] == "failed"
    served.do(served.fake.clear_faults)

    Path(path).write_text(f"order_id,captured_amount\n{order_id},7000\n")
    edited = cli(["batch", path], served)

    assert edited.exit_code == 1
    assert "7000 now, 1000 in the journal" in edited.stdout
    assert "klarna-om reconcile" in edited.stdout
    amounts = served.do(lambda: [c.captured_amount for c in served.fake.captures(order_id)])
    assert amounts == [1000]


def test_reconcile_settles_expired_keys_then_the_rerun_finishes_exactly_once(
    served: ServedFake, tmp_path: Path
) -> None:
    booked_ref, never, no_ref = (served.add_order(10_000) for _ in range(3))
    path = write(
        tmp_path,
        "o.csv",
        f"order_id,captured_amount,reference\n{booked_ref},100,r1\n{never},100,r2\n{no_ref},100,\n",
    )
    journal = f"{path}.journal.sqlite"
    served.do(lambda: served.fake.inject(DropConnection(), method="POST", path=never, times=None))
    served.do(lambda: served.fake.inject(DropAfterProcessing(), method="POST", times=None))

    async def first_run_a_day_ago() -> None:
        a_day_ago = datetime.now(UTC) - timedelta(hours=25)
        policy = RetryPolicy(max_attempts=2, sleep=InstantSleep())
        async with (
            SQLiteJournal(journal, clock=lambda: a_day_ago) as opened,
            KlarnaOM(USERNAME, PASSWORD, base_url=served.fake.base_url, retry=policy) as om,
        ):
            items = [
                (booked_ref, CaptureRequest(captured_amount=100, reference="r1")),
                (never, CaptureRequest(captured_amount=100, reference="r2")),
                (no_ref, CaptureRequest(captured_amount=100)),
            ]
            # Without orders to read, the batch cannot check the journal's clock (a day
            # behind Klarna's here) against Klarna's: the keys are dated a day ago.
            outcomes = [o async for o in capture_many(om.captures, items, journal=opened)]
            assert {o.status for o in outcomes} == {CaptureStatus.FAILED}

    asyncio.run(first_run_a_day_ago())
    served.do(served.fake.clear_faults)

    result = cli(["reconcile", journal, "--json"], served)

    assert result.exit_code == 1, result.output  # one item needs review
    verdicts = {
        o["order_id"]: o["verdict"] for o in json_lines(result.stdout) if o["type"] != "summary"
    }
    assert verdicts == {booked_ref: "captured", never: "not_captured", no_ref: "needs_review"}
    rerun = cli(["batch", path, "--json"], served)
    assert rerun.exit_code == 1
    statuses = {o: v["status"] for o, v in outcomes_by_order(rerun.stdout).items()}
    assert statuses == {booked_ref: "skipped", never: "captured", no_ref: "needs_review"}
    assert [served.booked(o) for o in (booked_ref, never, no_ref)] == [1, 1, 1]
    # The review item still waits: reconcile said "none" and exited 0 ("nothing left").
    again = cli(["reconcile", journal, "--json"], served)
    assert again.exit_code == 1, again.output
    *listed, summary = json_lines(again.stdout)
    assert [(o["type"], o["order_id"]) for o in listed] == [("needs_review", no_ref)]
    assert (summary["items"], summary["needs_review_in_journal"]) == (0, 1)
    human = cli(["reconcile", journal], served)
    assert human.exit_code == 1
    assert "1 item(s) of the journal need review" in human.stdout
    assert "klarna-om reconcile JOURNAL --captured" in rerun_text(served, path)


def rerun_text(served: ServedFake, path: str) -> str:
    """What a batch rerun says of its items (human output)."""
    return cli(["batch", path], served).output


def test_reconcile_refuses_a_missing_or_foreign_journal(served: ServedFake, tmp_path: Path) -> None:
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    refused = cli(["reconcile", str(empty)], served)
    assert refused.exit_code == 2
    assert "is empty: it is no journal" in refused.stderr
    assert empty.stat().st_size == 0  # SQLite made it a journal
    missing = cli(["reconcile", str(tmp_path / "nope.sqlite")], served)
    assert missing.exit_code == 2
    assert "no journal at" in missing.stderr
    theirs = tmp_path / "theirs.sqlite"
    with sqlite3.connect(theirs) as conn:
        conn.execute("CREATE TABLE journal (id INTEGER PRIMARY KEY)")
    conn.close()
    batch_file = write(tmp_path, "x.csv", "order_id,captured_amount\n")
    for command in (["reconcile", str(theirs)], ["batch", batch_file, "--journal", str(theirs)]):
        result = cli(command, served)
        assert result.exit_code == 2, result.output
        [line] = result.stderr.splitlines()
        assert "is not a klarna-om journal" in line


# -- in-process pieces of fake-server, logging, and the connection ---------------------------


async def test_fake_server_announces_itself_and_stops_on_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = FakeKlarna()
    order_ids = fake.add_orders(2, amount=100)
    stop = asyncio.Event()
    serving = asyncio.create_task(
        _fakeserver._serve(fake, "127.0.0.1", 0, order_ids, "b.csv", json_output=False, stop=stop)
    )
    out = ""
    for _ in range(1000):  # the announcement follows the start, within a few loop turns
        out += capsys.readouterr().out
        if "export" in out:
            break
        await asyncio.sleep(0.01)
    assert f"2 authorized orders, e.g. {order_ids[0]}" in out
    assert "batch file: b.csv" in out
    stop.set()
    await serving
    assert "FakeKlarna stopped." in capsys.readouterr().out


async def test_fake_server_reports_a_port_in_use(fake: FakeKlarna) -> None:
    port = int(fake.base_url.rsplit(":", 1)[1])
    with pytest.raises(_options.InputError, match=f"cannot listen on 127.0.0.1:{port}"):
        await _fakeserver._serve(FakeKlarna(), "127.0.0.1", port, [], None, json_output=True)


def test_fake_server_on_a_port_in_use_leaves_the_batch_file_alone(
    served: ServedFake, tmp_path: Path
) -> None:
    port = served.fake.base_url.rsplit(":", 1)[1]
    batch_file = tmp_path / "mine.csv"
    batch_file.write_text("order_id,captured_amount\nkeep-me,1\n")
    result = cli(["fake-server", "--port", port, "--write-batch", str(batch_file)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert batch_file.read_text() == "order_id,captured_amount\nkeep-me,1\n"


def test_fake_server_reports_a_batch_file_it_cannot_write(tmp_path: Path) -> None:
    result = cli(["fake-server", "--write-batch", str(tmp_path / "no" / "such.csv")])
    assert result.exit_code == 2
    assert "cannot write" in result.stderr


def test_verbose_logs_each_retry_with_its_key(served: ServedFake) -> None:
    order_id = served.add_order(1000)
    served.do(lambda: served.fake.inject(RateLimited("0")))
    args = ["capture", order_id, "--amount", "1000", "--idempotency-key", "k-429"]
    quiet = cli(args, served)
    assert quiet.exit_code == 0
    assert quiet.stderr == "idempotency key: k-429\n"
    served.do(lambda: served.fake.inject(RateLimited("0")))
    loud = cli(["-v", *args], served)
    assert loud.exit_code == 0
    assert "RateLimitError" in loud.stderr
    assert "k-429" in loud.stderr


def test_the_connection_never_shows_the_password() -> None:
    connection = _options.Connection(
        username="u", password=PASSWORD, region=Region.EU, playground=False, base_url=None
    )
    assert PASSWORD not in repr(connection)


def test_reconcile_settles_an_item_that_needs_review_by_hand(
    served: ServedFake, tmp_path: Path
) -> None:
    a, b, c = served.add_order(1000), served.add_order(1000), served.add_order(1000)
    booked = served.do(lambda: served.fake.booked_captures)  # live list
    journal = str(tmp_path / "j.sqlite")

    async def items_in_doubt() -> None:
        policy = RetryPolicy(max_attempts=1)
        async with KlarnaOM(USERNAME, PASSWORD, base_url=served.fake.base_url, retry=policy) as om:
            await om.captures.create(a, CaptureRequest(captured_amount=100))
        async with SQLiteJournal(journal) as opened:
            for order in (a, b, c):
                item = ItemRecord(
                    item_key=order, order_id=order, captured_amount=100, fingerprint="f"
                )
                await opened.claim(item, f"key-{order}")
                status = JournalStatus.FAILED if order == c else JournalStatus.NEEDS_REVIEW
                await opened.finish(order, status, reconciled=True)

    asyncio.run(items_in_doubt())
    [capture] = booked
    bogus = cli(["reconcile", journal, "--captured", b, "NO-SUCH-CAPTURE"], served)
    assert bogus.exit_code == 2
    assert "has no capture 'NO-SUCH-CAPTURE'" in bogus.stderr
    other_order = cli(["reconcile", journal, "--captured", b, capture.capture_id], served)
    assert other_order.exit_code == 2
    twice = cli(["reconcile", journal, "--captured", a, "x", "--not-captured", a], served)
    assert twice.exit_code == 2
    assert "marked more than once" in twice.stderr
    unknown_item = cli(["reconcile", journal, "--not-captured", c], served)
    assert unknown_item.exit_code == 2  # only needs_review: its key may still settle it
    assert "is failed, not needs_review" in unknown_item.stderr
    assert journal_summary(journal) == {"needs_review": 2, "failed": 1}

    args = ["reconcile", journal, "--captured", a, capture.capture_id, "--not-captured", b]
    result = cli(args, served)
    assert result.exit_code == 0, result.output
    assert f"Settled {a}: captured as {capture.capture_id}." in result.stdout
    assert journal_summary(journal) == {"captured": 1, "refused": 1, "failed": 1}
    assert served.do(lambda: [r.method for r in served.fake.requests].count("POST")) == 1
    missing = cli(["reconcile", journal, "--not-captured", "zzz"], served)
    assert missing.exit_code == 2
    assert "has no item 'zzz'" in missing.stderr


def test_a_batch_line_with_a_bad_key_is_refused_and_never_journaled(
    served: ServedFake, tmp_path: Path
) -> None:
    good, bad = served.add_order(100), served.add_order(100)
    path = write(
        tmp_path,
        "b.jsonl",
        f'{{"order_id": "{good}", "captured_amount": 100}}\n'
        f'{{"order_id": "{bad}", "captured_amount": 100, "idempotency_key": "K\\n"}}\n',
    )
    result = cli(["batch", path, "--json"], served)
    assert result.exit_code == 1, result.output
    [refused] = [o for o in json_lines(result.stdout) if o.get("status") == "refused"]
    assert refused["line"] == 2
    assert "idempotency_key" in refused["error"]
    assert journal_summary(f"{path}.journal.sqlite") == {"captured": 1}
    assert (served.booked(good), served.requests_for(bad)) == (1, 0)


def test_capture_with_a_bad_key_is_one_line_and_exit_2(served: ServedFake) -> None:
    order_id = served.add_order(100)
    result = cli(["capture", order_id, "--amount", "100", "--idempotency-key", "INV-1\n"], served)
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "idempotency_key" in line
    assert served.requests_for(order_id) == 0


def test_a_blank_reference_cell_is_no_reference_across_reruns(
    served: ServedFake, tmp_path: Path
) -> None:
    order_id = served.add_order(10_000)
    path = write(tmp_path, "o.csv", f"order_id,captured_amount,reference\n{order_id},5000, \n")
    assert cli(["batch", path], served).exit_code == 0
    Path(path).write_text(f"order_id,captured_amount,reference\n{order_id},5000,\n")
    rerun = cli(["batch", path, "--json"], served)
    assert rerun.exit_code == 0, rerun.output
    assert outcomes_by_order(rerun.stdout)[order_id]["status"] == "skipped"
    assert served.booked(order_id) == 1


def test_a_json_line_nested_too_deep_is_one_refused_line(
    served: ServedFake, tmp_path: Path
) -> None:
    good = served.add_order(100)
    deep = '{"order_id": "x", "captured_amount": 1, "description": ' + "[" * 1000 + "]" * 1000
    path = write(
        tmp_path,
        "d.jsonl",
        f"{deep}}}\n" + f'{{"order_id": "{good}", "captured_amount": 100}}\n',
    )
    result = cli(["batch", path, "--json"], served)
    assert result.exit_code == 1, result.output
    lines = json_lines(result.stdout)
    [refused] = [o for o in lines if o.get("line") == 1]
    assert "nested too deeply" in refused["error"]
    assert served.booked(good) == 1


def reviewed(
    served: ServedFake,
    journal: str,
    order_id: str,
    request: CaptureRequest,
    items: list[tuple[str, str | None]],
    recorded: str | None = None,
) -> str:
    """Book ``request`` on the order; journal ``items`` (item_key, reference) of 5000 as
    needing review, but ``recorded``, captured by that capture. Returns its id."""

    async def setup() -> str:
        policy = RetryPolicy(max_attempts=1)
        async with KlarnaOM(USERNAME, PASSWORD, base_url=served.fake.base_url, retry=policy) as om:
            made = await om.captures.create(order_id, request)
        async with SQLiteJournal(journal) as opened:
            for key, ref in items:
                item = ItemRecord(
                    item_key=key,
                    order_id=order_id,
                    captured_amount=5000,
                    reference=ref,
                    fingerprint=key,
                )
                await opened.claim(item, f"key-{key}")
                if key == recorded:
                    await opened.finish(key, JournalStatus.CAPTURED, capture_id=made.capture_id)
                else:
                    await opened.finish(key, JournalStatus.NEEDS_REVIEW, reconciled=True)
        return made.capture_id

    return asyncio.run(setup())


def test_reconcile_captured_refuses_a_capture_of_another_item_or_reference(
    served: ServedFake, tmp_path: Path
) -> None:
    order_id = served.add_order(10_000)
    journal = str(tmp_path / "j.sqlite")
    request = CaptureRequest(captured_amount=5000, reference="rb")
    items = [(f"{order_id}:rb", "rb"), (order_id, None), (f"{order_id}:ra", "ra")]
    taken = reviewed(served, journal, order_id, request, items, recorded=f"{order_id}:rb")
    theirs = cli(["reconcile", journal, "--captured", order_id, taken], served)
    assert theirs.exit_code == 2
    assert f"is already item '{order_id}:rb'" in theirs.stderr
    assert journal_summary(journal) == {"captured": 1, "needs_review": 2}


def test_reconcile_captured_refuses_one_capture_given_to_two_items(
    served: ServedFake, tmp_path: Path
) -> None:
    # Two items recorded as one capture: the report would count money Klarna took once
    # twice, and the other item, never captured, as done. Two items (of item keys given in
    # the input) that ask for the same amount and reference both match the capture.
    order_id = served.add_order(10_000)
    journal = str(tmp_path / "j.sqlite")
    items: list[tuple[str, str | None]] = [(f"{order_id}:ra", None), (f"{order_id}:rb", None)]
    made = reviewed(served, journal, order_id, CaptureRequest(captured_amount=5000), items)
    marks = ["--captured", f"{order_id}:ra", made, "--captured", f"{order_id}:rb", f" {made}\t"]
    both = cli(["reconcile", journal, *marks], served)  # Klarna reads " X\t" as X
    assert both.exit_code == 2, both.output
    assert f"is already item '{order_id}:ra'" in both.stderr
    assert journal_summary(journal) == {"needs_review": 2}
    one = cli(["reconcile", journal, *marks[:3]], served)
    assert one.exit_code == 0, one.output
    again = cli(["reconcile", journal, *marks[3:]], served)
    assert again.exit_code == 2, again.output
    assert f"is already item '{order_id}:ra'" in again.stderr
    assert journal_summary(journal) == {"captured": 1, "needs_review": 1}


def test_reconcile_whose_journal_cannot_be_written_says_so_in_one_line(
    served: ServedFake, tmp_path: Path
) -> None:
    order_id = served.add_order(10_000)
    journal = str(tmp_path / "j.sqlite")
    items: list[tuple[str, str | None]] = [(f"{order_id}:a", None)]
    reviewed(served, journal, order_id, CaptureRequest(captured_amount=5000), items)
    fill_the_disk(journal, "BEFORE UPDATE ON journal")
    result = cli(["reconcile", journal, "--not-captured", f"{order_id}:a"], served)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    [line] = result.stderr.splitlines()
    assert f"the journal {journal} could not be written (database or disk is full)" in line
    assert journal_summary(journal) == {"needs_review": 1}


def test_reconcile_captured_with_klarna_unreachable_is_one_line(tmp_path: Path) -> None:
    journal = str(tmp_path / "j.sqlite")

    async def setup() -> None:
        async with SQLiteJournal(journal) as opened:
            item = ItemRecord(item_key="o", order_id="o", captured_amount=1, fingerprint="f")
            await opened.claim(item, "k")
            await opened.finish("o", JournalStatus.NEEDS_REVIEW, reconciled=True)

    asyncio.run(setup())
    env = {"KLARNA_USERNAME": USERNAME, "KLARNA_PASSWORD": PASSWORD}
    args = ["reconcile", journal, "--captured", "o", "c", "--max-attempts", "1"]
    result = CliRunner().invoke(main, [*args, "--base-url", "http://127.0.0.1:9"], env=env)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "nothing was settled" in result.stderr
    assert journal_summary(journal) == {"needs_review": 1}


@pytest.mark.parametrize(
    "args",
    [
        ["ship", "o-1", " ", "--company", "DHL", "--tracking-number", "1"],
        ["send-out", "..", "c-1"],
        ["get", "o-1", "."],
        ["list", " "],
        ["order", ".."],
        ["refund-get", "o-1", " "],
    ],
)
def test_a_blank_or_dot_id_is_one_json_error_before_any_key(
    served: ServedFake, args: list[str]
) -> None:
    result = cli([*args, "--json"], served)
    assert result.exit_code == 2
    [error] = json_lines(result.stdout)  # no request announced, and one error object
    assert (error["type"], error["exit_code"]) == ("error", 2)
    assert "idempotency key" not in result.stderr
    assert served.do(lambda: len(served.fake.requests)) == 0


def test_capture_json_echoes_the_trimmed_order_id(served: ServedFake) -> None:
    order_id = served.add_order(1000)
    result = cli(["capture", f" {order_id} ", "--amount", "1000", "--json"], served)
    assert result.exit_code == 0, result.output
    request, printed = json_lines(result.stdout)
    assert request["order_id"] == printed["order_id"] == order_id
    assert (printed["captured_amount"], printed["amount_verified"]) == (1000, True)
