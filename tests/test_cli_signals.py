"""Idempotency keys said up front, and SIGINT (Ctrl-C) or SIGTERM, at the `klarna-om` command.

`capture`, `ship` and `send-out` print the key they send before sending it. A signal cancels
the running command: it says how to finish the call exactly once (rerun with the key) and
exits 130 after SIGINT, 143 after SIGTERM; a batch prints its summary first. The commands run
as real subprocesses (signals) or in-process (click's runner), against a FakeKlarna serving
from its own loop in a background thread, over loopback.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson
import pytest
from click.testing import CliRunner, Result
from test_cli import PASSWORD, USERNAME
from test_cli import ServedFake as _ServedFake

from klarna_om_async import CaptureRequest, CaptureStatus, KlarnaOM, RetryPolicy, SQLiteJournal
from klarna_om_async.batch import capture_many
from klarna_om_async.cli import main
from klarna_om_async.cli._options import Interrupted, run_interruptible
from klarna_om_async.cli._render import BatchView
from klarna_om_async.testing import Delay, DropAfterProcessing

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

KEY_LINE = "idempotency key: "


class ServedFake(_ServedFake):
    """test_cli's threaded FakeKlarna, with what these tests ask of it."""

    def wait_for_requests(self, count: int) -> None:
        self.run(asyncio.wait_for(self.fake.wait_for_requests(count), timeout=25))

    def keys_sent(self, path_end: str) -> list[str | None]:
        """Idempotency keys of the POSTs received whose path ends with ``path_end``."""
        return self.do(
            lambda: [
                r.idempotency_key
                for r in self.fake.requests
                if r.method == "POST" and r.path.endswith(path_end)
            ]
        )

    def capture_ids(self, order_id: str) -> list[str]:
        return self.do(lambda: [c.capture_id for c in self.fake.captures(order_id)])


@pytest.fixture
def served() -> Iterator[ServedFake]:
    served = ServedFake()
    try:
        yield served
    finally:
        served.close()


def cli(args: list[str], served: ServedFake) -> Result:
    """Invoke `klarna-om` in-process against the fake."""
    env = {
        "KLARNA_USERNAME": USERNAME,
        "KLARNA_PASSWORD": PASSWORD,
        "KLARNA_BASE_URL": served.fake.base_url,
        "KLARNA_REGION": None,
        "KLARNA_PLAYGROUND": None,
    }
    result = CliRunner().invoke(main, args, env=env)
    assert "Traceback" not in result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def subprocess_env(base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLARNA_")}
    env.update(KLARNA_USERNAME=USERNAME, KLARNA_PASSWORD=PASSWORD, KLARNA_BASE_URL=base_url)
    return env


def start(
    args: list[str], base_url: str, stdout: int | IO[Any] = subprocess.PIPE
) -> subprocess.Popen[str]:
    """Start `python -W error -m klarna_om_async.cli ARGS` (the console script's code)."""
    return subprocess.Popen(
        [sys.executable, "-W", "error", "-m", "klarna_om_async.cli", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(base_url),
    )


def read_line(stream: IO[str] | None, timeout: float = 20) -> str:
    """The next line the subprocess prints on ``stream``; fails if none comes in time."""
    assert stream is not None
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "the subprocess printed nothing in time"
    return stream.readline()


def stop(command: subprocess.Popen[str], signum: signal.Signals) -> tuple[str, str]:
    """Send ``signum``, wait for the exit; the rest of stdout and of stderr."""
    command.send_signal(signum)
    command.wait(timeout=30)
    assert command.stdout is not None
    assert command.stderr is not None
    return command.stdout.read(), command.stderr.read()


def kill_if_running(command: subprocess.Popen[str]) -> None:
    if command.poll() is None:
        command.kill()
        command.wait(timeout=30)


def write_batch(tmp_path: Path, orders: list[str], amount: int = 1000) -> str:
    path = tmp_path / "o.csv"
    path.write_text("order_id,captured_amount\n" + "".join(f"{o},{amount}\n" for o in orders))
    return str(path)


# -- the key, said before it is sent -----------------------------------------------------------


def said_key(result: Result, command_name: str, json_output: bool) -> str:
    """The key a command said it would send: its first stderr line, or its request object."""
    assert result.exit_code == 0, result.output
    if not json_output:
        first, *_ = result.stderr.splitlines()
        assert first.startswith(KEY_LINE)
        return first.removeprefix(KEY_LINE)
    assert result.stderr == ""
    request, _outcome = json_lines(result.stdout)
    assert (request["type"], request["command"]) == ("request", command_name)
    key: str = request["idempotency_key"]
    return key


@pytest.mark.parametrize("json_output", [False, True], ids=["human", "json"])
def test_money_moving_commands_say_a_new_uuid4_key_first_and_send_exactly_it(
    served: ServedFake, json_output: bool
) -> None:
    order_id = served.add_order()
    flags = ["--json"] if json_output else []
    captured = cli(["capture", order_id, "--amount", "4000", *flags], served)
    capture_key = said_key(captured, "capture", json_output)
    [capture_id] = served.capture_ids(order_id)
    ship = ["ship", order_id, capture_id, "--company", "DHL", "--tracking-number", "T-1"]
    ship_key = said_key(cli([*ship, *flags], served), "ship", json_output)
    sent_out = cli(["send-out", order_id, capture_id, *flags], served)
    send_out_key = said_key(sent_out, "send-out", json_output)

    said = [capture_key, ship_key, send_out_key]
    assert [uuid.UUID(key).version for key in said] == [4, 4, 4]
    assert len(set(said)) == 3
    sent = [served.keys_sent(end) for end in ("/captures", "/shipping-info", "/trigger-send-out")]
    assert sent == [[key] for key in said]


def test_a_given_key_is_said_and_sent_as_it_is(served: ServedFake) -> None:
    order_id = served.add_order()
    result = cli(["capture", order_id, "--amount", "100", "--idempotency-key", "mine-1"], served)
    assert result.exit_code == 0, result.output
    assert result.stderr == f"{KEY_LINE}mine-1\n"
    assert served.keys_sent(f"{order_id}/captures") == ["mine-1"]


def test_an_invalid_capture_says_no_key_and_sends_nothing(served: ServedFake) -> None:
    order_id = served.add_order()
    result = cli(["capture", order_id, "--amount", "-5"], served)
    assert result.exit_code == 2
    assert KEY_LINE not in result.output
    assert served.do(lambda: len(served.fake.requests)) == 0


# -- Ctrl-C and SIGTERM during a single command ------------------------------------------------


def test_ctrl_c_during_capture_exits_130_and_the_printed_key_finishes_it_exactly_once(
    served: ServedFake,
) -> None:
    order_id = served.add_order(10_000)
    # Klarna books the capture at once but answers only after 30 s: Ctrl-C comes in between.
    served.do(lambda: served.fake.inject(Delay(30, after_processing=True), method="POST"))
    command = start(["capture", order_id, "--amount", "4000"], served.fake.base_url)
    with command:
        try:
            served.wait_for_requests(1)
            # Said before the answer came: a user who must give up still has the key.
            key_line = read_line(command.stderr)
            stdout, stderr = stop(command, signal.SIGINT)
        finally:
            kill_if_running(command)
    key = key_line.removeprefix(KEY_LINE).strip()
    assert key_line == f"{KEY_LINE}{key}\n"
    assert command.returncode == 130, stderr
    assert stderr == f"outcome unknown: rerun with --idempotency-key {key}\n"
    assert stdout == ""
    assert served.keys_sent(f"{order_id}/captures") == [key]
    [booked] = served.capture_ids(order_id)  # booked, though the command never heard of it

    rerun = cli(
        ["capture", order_id, "--amount", "4000", "--idempotency-key", key, "--json"], served
    )

    assert rerun.exit_code == 0, rerun.output
    assert json_lines(rerun.stdout)[-1]["capture_id"] == booked  # Klarna replayed it
    assert served.capture_ids(order_id) == [booked]  # exactly one capture


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
@pytest.mark.parametrize("command_name", ["capture", "ship", "send-out"])
def test_a_signal_during_a_money_moving_command_prints_an_error_object_naming_the_key(
    served: ServedFake, command_name: str, signum: signal.Signals
) -> None:
    order_id = served.add_order(10_000)
    first = cli(["capture", order_id, "--amount", "1000", "--json"], served)
    capture_id = json_lines(first.stdout)[-1]["capture_id"]
    args, path = {
        "capture": (["capture", order_id, "--amount", "2000"], "/captures"),
        "ship": (
            ["ship", order_id, capture_id, "--company", "DHL", "--tracking-number", "T-9"],
            "/shipping-info",
        ),
        "send-out": (["send-out", order_id, capture_id], "/trigger-send-out"),
    }[command_name]
    served.do(
        lambda: served.fake.inject(Delay(30, after_processing=True), method="POST", path=path)
    )
    command = start([*args, "--json"], served.fake.base_url)
    with command:
        try:
            served.wait_for_requests(3)  # the capture above sent 2: its POST and read-back
            request = orjson.loads(read_line(command.stdout))
            stdout, stderr = stop(command, signum)
        finally:
            kill_if_running(command)
    key = request["idempotency_key"]
    assert request == {
        "type": "request",
        "command": command_name,
        "order_id": order_id,
        **({} if command_name == "capture" else {"capture_id": capture_id}),
        "idempotency_key": key,
    }
    assert command.returncode == 128 + signum, stderr
    assert json_lines(stdout) == [
        {
            "type": "error",
            "error": "interrupted",
            "signal": signum.name,
            "outcome_unknown": True,
            "idempotency_key": key,
        }
    ]
    assert stderr == f"outcome unknown: rerun with --idempotency-key {key}\n"

    rerun = cli([*args, "--idempotency-key", key], served)

    assert rerun.exit_code == 0, rerun.output
    [sent, resent] = served.keys_sent(path)[-2:]
    assert sent == resent == key
    [capture, *more] = served.do(lambda: served.fake.captures(order_id))
    # The interrupted call took effect once, and its rerun did not repeat it.
    assert (len(more), len(capture.shipping_info), capture.send_outs) == {
        "capture": (1, 0, 0),
        "ship": (0, 1, 0),
        "send-out": (0, 0, 1),
    }[command_name]


def test_sigterm_stops_a_read_command_with_143(served: ServedFake) -> None:
    order_id = served.add_order()
    served.do(lambda: served.fake.inject(Delay(30), method="GET"))
    command = start(["order", order_id, "--json"], served.fake.base_url)
    with command:
        try:
            served.wait_for_requests(1)
            stdout, stderr = stop(command, signal.SIGTERM)
        finally:
            kill_if_running(command)
    assert command.returncode == 143, stderr
    assert stderr == "interrupted by SIGTERM\n"
    assert json_lines(stdout) == [
        {"type": "error", "error": "interrupted", "signal": "SIGTERM", "outcome_unknown": False}
    ]


# -- SIGTERM and a second Ctrl-C during a batch ------------------------------------------------


def test_sigterm_stops_a_batch_like_ctrl_c_and_the_rerun_finishes_it_exactly_once(
    served: ServedFake, tmp_path: Path
) -> None:
    orders = [served.add_order(1000) for _ in range(12)]
    # Booked at once, answered much later; the read of the first order that tells Klarna's
    # time (before anything is sent) is answered at once.
    served.do(
        lambda: served.fake.inject(Delay(30, after_processing=True), times=None, method="POST")
    )
    path = write_batch(tmp_path, orders)
    command = start(["batch", path, "--concurrency", "4", "--json"], served.fake.base_url)
    with command:
        try:
            served.wait_for_requests(5)
            stdout, stderr = stop(command, signal.SIGTERM)
        finally:
            kill_if_running(command)
    assert command.returncode == 143, stderr
    assert "Interrupted: no new items were started" in stderr
    assert f"{path}.journal.sqlite" in stderr
    [summary] = json_lines(stdout)
    assert (summary["type"], summary["interrupted"]) == ("summary", True)
    assert served.do(lambda: len(served.fake.requests)) == 5  # nothing started after SIGTERM

    served.do(served.fake.clear_faults)
    rerun = cli(["batch", path, "--json"], served)
    assert rerun.exit_code == 0, rerun.output
    assert [len(served.capture_ids(order)) for order in orders] == [1] * len(orders)


class Relay:
    """A TCP relay in front of the fake. ``client_closed`` is set when the client first closes
    a connection: how a test sees a CLI process start cancelling its requests (the fake
    itself keeps sleeping on a request whose client went away)."""

    def __init__(self, target_port: int) -> None:
        self.client_closed = asyncio.Event()
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    async def _relay(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            fake, to_fake = await asyncio.open_connection("127.0.0.1", self._target_port)
            answers = asyncio.create_task(_copy(fake, to_client))
            try:
                await _copy(client, to_fake)
                self.client_closed.set()
            finally:
                answers.cancel()
                await asyncio.wait([answers])
                to_fake.close()
        finally:
            to_client.close()
            self._tasks.discard(task)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass  # closed by a reset: as good as an end of file here


def full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is full: a write to it blocks until the other end reads."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for size in (65536, 1):  # big writes first, then the last bytes one at a time
        try:
            while True:
                os.write(write_fd, b"\n" * size)
        except BlockingIOError:
            pass
    os.set_blocking(write_fd, True)
    return read_fd, write_fd


def read_to_end(fd: int, timeout: float = 25) -> str:
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, "the subprocess wrote nothing in time"
        if not (chunk := os.read(fd, 65536)):
            return b"".join(chunks).decode()
        chunks.append(chunk)


def test_a_second_ctrl_c_while_a_batch_winds_down_keeps_its_summary_and_exit_130(
    served: ServedFake, tmp_path: Path
) -> None:
    orders = [served.add_order(1000) for _ in range(8)]
    # Booked at once, answered much later; the read of the first order that tells Klarna's
    # time (before anything is sent) is answered at once.
    served.do(
        lambda: served.fake.inject(Delay(30, after_processing=True), times=None, method="POST")
    )
    path = write_batch(tmp_path, orders)
    relay = Relay(int(served.fake.base_url.rsplit(":", 1)[1]))
    base_url = served.run(relay.start())
    # The batch's stdout is full until the test reads it: the batch cannot finish winding
    # down (print its summary) before the second Ctrl-C has arrived.
    read_fd, write_fd = full_pipe()
    try:
        command = start(["batch", path, "--concurrency", "4", "--json"], base_url, write_fd)
        os.close(write_fd)
        with command:
            try:
                served.wait_for_requests(5)
                command.send_signal(signal.SIGINT)
                # The first Ctrl-C is being handled: requests in flight are being cancelled.
                served.run(asyncio.wait_for(relay.client_closed.wait(), timeout=25))
                command.send_signal(signal.SIGINT)
                stdout = read_to_end(read_fd)
                command.wait(timeout=30)
            finally:
                kill_if_running(command)
            assert command.stderr is not None
            stderr = command.stderr.read()
    finally:
        os.close(read_fd)
        served.run(relay.close())
    assert command.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "Interrupted: no new items were started" in stderr
    [summary] = json_lines(stdout)
    assert (summary["type"], summary["interrupted"]) == ("summary", True)
    assert served.do(lambda: len(served.fake.requests)) == 5

    served.do(served.fake.clear_faults)
    rerun = cli(["batch", path, "--json"], served)
    assert rerun.exit_code == 0, rerun.output
    assert [len(served.capture_ids(order)) for order in orders] == [1] * len(orders)


def test_help_lists_143_for_sigterm() -> None:
    runner = CliRunner()
    assert "143  terminated (SIGTERM)" in runner.invoke(main, ["--help"]).stdout
    assert "143 terminated (SIGTERM)" in runner.invoke(main, ["batch", "--help"]).stdout


# -- in this process: signals at exact points, and the helper itself --------------------------


class StrayTerm(Exception):
    """SIGTERM reached the test's own handler: run_interruptible did not take it."""


@pytest.fixture
def own_signal_handlers() -> Iterator[None]:
    """A SIGTERM that escapes the code under test fails the test instead of ending pytest;
    the process's handlers are put back afterwards."""

    def stray(signum: int, frame: object) -> None:
        raise StrayTerm

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, stray)
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@pytest.mark.usefixtures("own_signal_handlers")
def test_a_second_ctrl_c_inside_the_batchs_cleanup_leaves_its_summary_interrupted(
    served: ServedFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In this process, so that each Ctrl-C lands at an exact point: the first as the first
    # outcome is shown, the second while the cancelled batch closes its view. A
    # KeyboardInterrupt there would replace the cancellation, and the summary would say
    # "interrupted": false.
    orders = [served.add_order(1000) for _ in range(3)]
    for stuck in orders[1:]:
        served.do(
            lambda stuck=stuck: served.fake.inject(
                Delay(30, after_processing=True), path=f"/{stuck}/captures"
            )
        )
    path = write_batch(tmp_path, orders)
    report, close = BatchView.report, BatchView.__exit__

    def report_then_ctrl_c(view: BatchView, outcome: Any) -> None:
        report(view, outcome)
        os.kill(os.getpid(), signal.SIGINT)

    def ctrl_c_then_close(view: BatchView, *exc_info: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        close(view, *exc_info)

    monkeypatch.setattr(BatchView, "report", report_then_ctrl_c)
    monkeypatch.setattr(BatchView, "__exit__", ctrl_c_then_close)

    result = cli(["batch", path, "--concurrency", "3", "--json"], served)

    assert result.exit_code == 130, result.output
    *outcomes, summary = json_lines(result.stdout)
    assert [o["order_id"] for o in outcomes] == orders[:1]
    assert (summary["type"], summary["captured"], summary["interrupted"]) == ("summary", 1, True)
    assert "Interrupted: no new items were started" in result.stderr


@pytest.mark.usefixtures("own_signal_handlers")
def test_an_interrupted_batch_counts_items_whose_outcome_was_being_recorded(
    served: ServedFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C while the second item's outcome is being recorded: the write stands (the rerun
    # skips the item), but the outcome was dropped, and the summary said 1 captured of the 2
    # Klarna booked.
    orders = [served.add_order(1000) for _ in range(3)]
    path = write_batch(tmp_path, orders)
    finish = SQLiteJournal.finish
    calls = 0

    async def finish_then_ctrl_c(journal: SQLiteJournal, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        written = asyncio.ensure_future(finish(journal, *args, **kwargs))
        if calls < 2:
            return await written
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.Event().wait()  # cancelled by the batch's stop; the write goes on
        return await written

    monkeypatch.setattr(SQLiteJournal, "finish", finish_then_ctrl_c)
    result = cli(["batch", path, "--concurrency", "1", "--json"], served)

    assert result.exit_code == 130, result.output
    *outcomes, summary = json_lines(result.stdout)
    assert [o["order_id"] for o in outcomes] == orders[:1]
    assert (summary["captured"], summary["unlisted_done"]) == (1, 1)
    assert [served.booked(order) for order in orders] == [1, 1, 0]
    monkeypatch.undo()
    rerun = cli(["batch", path, "--json"], served)
    statuses = [o["status"] for o in json_lines(rerun.stdout)[:-1]]
    assert sorted(statuses) == ["captured", "skipped", "skipped"]
    assert [served.booked(order) for order in orders] == [1, 1, 1]


@pytest.mark.usefixtures("own_signal_handlers")
def test_run_interruptible_cancels_on_sigterm_and_ignores_signals_until_exit() -> None:
    cleaned_up = []

    async def work() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            cleaned_up.append(True)

    with pytest.raises(Interrupted) as raised:
        run_interruptible(work)
    assert raised.value.exit_code == 143
    assert cleaned_up == [True]
    # The command exits next: a second signal must not cut that short.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.usefixtures("own_signal_handlers")
def test_run_interruptible_puts_the_handlers_back_when_no_signal_came() -> None:
    before = [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)]

    async def work() -> str:
        return "done"

    assert run_interruptible(work) == "done"
    assert [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)] == before


def test_run_interruptible_runs_in_a_thread_without_taking_signals() -> None:
    # Signals reach only the main thread: elsewhere (an app calling the CLI from a worker
    # thread) the command still runs, with the process's handlers left alone.
    async def work() -> str:
        return "done"

    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(run_interruptible(work)))
    worker.start()
    worker.join(timeout=30)
    assert results == ["done"]


@pytest.mark.usefixtures("own_signal_handlers")
@pytest.mark.parametrize(
    ("command_name", "json_output"), [("ship", True), ("order", False)], ids=["ship", "order"]
)
def test_sigterm_in_this_process_cancels_the_call_and_reports_it(
    served: ServedFake, command_name: str, json_output: bool
) -> None:
    order_id = served.add_order()
    assert cli(["capture", order_id, "--amount", "10"], served).exit_code == 0
    [capture_id] = served.capture_ids(order_id)
    args = {
        "ship": ["ship", order_id, capture_id, "--company", "DHL", "--tracking-number", "1"],
        "order": ["order", order_id],
    }[command_name]
    served.do(lambda: served.fake.inject(Delay(30, after_processing=True)))
    # SIGTERM once the request has arrived (and is answered only in 30 s); the capture
    # above sent 2: its POST and its read-back.
    sender = threading.Thread(
        target=lambda: (served.wait_for_requests(3), os.kill(os.getpid(), signal.SIGTERM))
    )
    sender.start()
    try:
        result = cli([*args, *(["--json"] if json_output else [])], served)
    finally:
        sender.join(timeout=30)

    assert result.exit_code == 143
    if command_name == "ship":
        [key] = served.keys_sent("/shipping-info")
        assert json_lines(result.stdout)[-1] == {
            "type": "error",
            "error": "interrupted",
            "signal": "SIGTERM",
            "outcome_unknown": True,
            "idempotency_key": key,
        }
        assert result.stderr == f"outcome unknown: rerun with --idempotency-key {key}\n"
    else:
        assert (result.stdout, result.stderr) == ("", "interrupted by SIGTERM\n")


# -- Ctrl-C during reconcile -------------------------------------------------------------------


def test_ctrl_c_during_reconcile_shows_the_items_it_settled(
    served: ServedFake, tmp_path: Path
) -> None:
    # They were recorded in the journal but never shown: the run printed only "Interrupted".
    orders = sorted(served.add_order(10_000) for _ in range(3))  # reconciled in this order
    journal = str(tmp_path / "j.sqlite")

    async def lost_answers_a_day_ago() -> None:
        a_day_ago = datetime.now(UTC) - timedelta(hours=25)
        policy = RetryPolicy(max_attempts=1)
        async with (
            SQLiteJournal(journal, clock=lambda: a_day_ago) as opened,
            KlarnaOM(USERNAME, PASSWORD, base_url=served.fake.base_url, retry=policy) as om,
        ):
            items = [(o, CaptureRequest(captured_amount=100, reference="r")) for o in orders]
            # Without orders to read, the batch cannot check the journal's clock (a day
            # behind Klarna's here) against Klarna's: the keys are dated a day ago.
            async for outcome in capture_many(om.captures, items, journal=opened):
                assert outcome.status is CaptureStatus.FAILED

    served.do(lambda: served.fake.inject(DropAfterProcessing(), method="POST", times=None))
    asyncio.run(lost_answers_a_day_ago())
    served.do(served.fake.clear_faults)
    slow = f"/ordermanagement/v1/orders/{orders[2]}"
    served.do(lambda: served.fake.inject(Delay(30), method="GET", path=slow))
    before = served.do(lambda: len(served.fake.requests))
    command = start(["reconcile", journal, "--json", "--concurrency", "1"], served.fake.base_url)
    with command:
        try:
            # One order at a time: when the last one is read, the first two are settled.
            served.wait_for_requests(before + 3)
            out, err = stop(command, signal.SIGINT)
        finally:
            kill_if_running(command)
    assert command.returncode == 130, err
    assert [(o["order_id"], o["verdict"]) for o in json_lines(out)] == [
        (orders[0], "captured"),
        (orders[1], "captured"),
    ]
    assert err.splitlines()[-1] == "Interrupted: items not yet reconciled are left as they were."
