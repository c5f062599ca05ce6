"""`klarna-om batch` fed by a stream (`producer | klarna-om batch /dev/stdin`), lines that
never end, and files that cannot be read on.

A stream's lines come when its writer writes them. Read on the event loop, a read waiting
for the next line held back everything else: the lines already read were not sent, and
Ctrl-C or SIGTERM were not handled until the writer wrote again (or closed the stream). A
stream's rows are read on a thread of their own instead, and its last line without an end
(its writer stopped in the middle) is refused. A line longer than ``MAX_LINE_BYTES`` (a
binary file, ``/dev/zero``) is refused as a bad line, read a piece at a time; an I/O error
ends the reading with the lines read before it done.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import orjson
import pytest
from test_cli import fill_the_disk, free_the_disk
from test_cli_signals import (
    ServedFake,
    cli,
    json_lines,
    kill_if_running,
    served,
    subprocess_env,
)

from klarna_om_async.cli import _batchfile
from klarna_om_async.cli._batchfile import (
    MAX_LINE_BYTES,
    BadLine,
    BadLineError,
    BatchFileError,
    BatchReadError,
    Line,
    OpenedLines,
    _csv_parse,
    _jsonl_row_of,
    _parsed,
    _text_lines,
)
from klarna_om_async.cli._reading import READ_AHEAD, READ_AHEAD_CHARS, read_rows

__all__ = ("served",)  # the fixture, imported for these tests

posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def batch_from_stdin(
    served: ServedFake,
    journal: Path,
    env: dict[str, str] | None = None,
    options: tuple[str, ...] = (),
) -> subprocess.Popen[str]:
    """`producer | klarna-om batch /dev/stdin`, the test as the producer (its stdin pipe)."""
    args = ["batch", "/dev/stdin", "--format", "csv", "--journal", str(journal), "--json"]
    args += options
    return subprocess.Popen(
        [sys.executable, "-W", "error", "-m", "klarna_om_async.cli", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(served.fake.base_url) | (env or {}),
    )


def printed_lines(stream: IO[str] | None) -> queue.Queue[str]:
    """Each line the subprocess prints, as it prints it (a thread reads them)."""
    assert stream is not None
    printed: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stream:
            printed.put(line)

    threading.Thread(target=read, daemon=True).start()
    return printed


@posix
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stream_s_lines_are_sent_while_its_writer_is_silent_and_a_signal_stops_it(
    served: ServedFake, tmp_path: Path, signum: signal.Signals
) -> None:
    orders = [served.add_order(1000) for _ in range(2)]
    command = batch_from_stdin(served, tmp_path / "stream.journal.sqlite")
    with command:
        try:
            assert command.stdin is not None
            command.stdin.write("order_id,captured_amount\n")
            command.stdin.writelines(f"{order},1000\n" for order in orders)
            command.stdin.flush()  # ... and the writer says nothing more, the stream open
            printed = printed_lines(command.stdout)
            # Both done and said before the stream says more.
            outcomes = [orjson.loads(printed.get(timeout=30)) for _ in orders]
            command.send_signal(signum)
            command.wait(timeout=30)  # while the stream is still open
            assert command.stderr is not None
            stderr = command.stderr.read()
        finally:
            kill_if_running(command)
    assert command.returncode == 128 + signum, stderr
    assert sorted(o["order_id"] for o in outcomes) == sorted(orders)
    assert {o["status"] for o in outcomes} == {"captured"}
    summary = orjson.loads(printed.get(timeout=30))
    assert (summary["captured"], summary["items"], summary["interrupted"]) == (2, 2, True)
    assert summary["resume_from_line"] == 4  # a stream cannot be read again: where to go on
    assert [served.booked(order) for order in orders] == [1, 1]


@posix
def test_a_stream_stopped_with_lines_in_flight_is_given_again_from_the_first_not_done(
    served: ServedFake, tmp_path: Path
) -> None:
    # Lines taken but not done (waiting for their turn at --rate 1) lie before the last line
    # the batch took: given only the lines after that one, the rerun left them uncaptured.
    orders = [served.add_order(1000) for _ in range(8)]
    lines = [f"{order},1000\n" for order in orders]  # line 2 onwards
    journal = tmp_path / "stream.journal.sqlite"
    options = ("--rate", "1", "--concurrency", "4")
    command = batch_from_stdin(served, journal, options=options)
    with command:
        try:
            assert command.stdin is not None
            command.stdin.write("order_id,captured_amount\n")
            command.stdin.writelines(lines)
            command.stdin.flush()  # ... and the stream stays open
            printed = printed_lines(command.stdout)
            assert orjson.loads(printed.get(timeout=30))["status"] == "captured"
            command.send_signal(signal.SIGINT)
            command.wait(timeout=30)
        finally:
            kill_if_running(command)
    while (said := orjson.loads(printed.get(timeout=30)))["type"] != "summary":
        pass
    resume = said["resume_from_line"]
    assert 2 < resume <= 1 + len(orders)
    again = batch_from_stdin(served, journal)
    rest = "order_id,captured_amount\n" + "".join(lines[resume - 2 :])
    _, stderr = again.communicate(rest, timeout=60)
    assert again.returncode == 0, stderr
    assert [served.booked(order) for order in orders] == [1] * len(orders)


def test_a_stream_stopped_before_its_first_line_is_given_again_from_the_line_after_its_header() -> (
    None
):
    # Nothing taken: the line to resume from was the header's, which a user then gave twice.
    async def main() -> tuple[int | None, int]:
        opened = OpenedLines(_bad, iter(()), header_line=2)
        async with read_rows(lambda _stop: contextlib.nullcontext(opened)) as rows:
            return rows.resume_line(), rows.first_line

    assert asyncio.run(main()) == (3, 3)


def test_a_stream_whose_journal_failed_is_given_again_whole(
    served: ServedFake, tmp_path: Path
) -> None:
    # The journal could not record line 2's outcome (a full disk): reported captured (Klarna
    # booked it) and counted done, so the line to resume from was 3, and line 2, in flight in
    # the journal, was never given again.
    orders = [served.add_order(1000) for _ in range(3)]
    stream = "order_id,captured_amount\n" + "".join(f"{o},1000\n" for o in orders)
    journal = tmp_path / "stream.journal.sqlite"
    fill_the_disk(str(journal), f"BEFORE UPDATE ON journal WHEN NEW.item_key = '{orders[0]}'")
    first = batch_from_stdin(served, journal, options=("--concurrency", "1"))
    printed, stderr = first.communicate(stream, timeout=60)
    assert first.returncode == 1, stderr
    *outcomes, summary = json_lines(printed)
    assert [(o["line"], o["status"]) for o in outcomes] == [(2, "captured")]
    assert summary["resume_from_line"] == 2
    free_the_disk(str(journal))
    again = batch_from_stdin(served, journal)
    printed, stderr = again.communicate(stream, timeout=60)
    assert again.returncode == 0, stderr
    assert [served.booked(order) for order in orders] == [1, 1, 1]


@posix
def test_a_stream_interrupted_after_its_journal_failed_is_given_again_whole(
    served: ServedFake, tmp_path: Path
) -> None:
    # Ctrl-C while the batch waited for its items in flight after the journal failed: the
    # failure went unsaid, and the line to resume from skipped the outcome it could not
    # record (reported captured, in flight in the journal).
    orders = [served.add_order(1000) for _ in range(4)]
    stream = "order_id,captured_amount\n" + "".join(f"{o},1000\n" for o in orders)
    journal = tmp_path / "stream.journal.sqlite"
    fill_the_disk(str(journal), f"BEFORE UPDATE ON journal WHEN NEW.item_key = '{orders[0]}'")
    command = batch_from_stdin(served, journal, options=("--rate", "1", "--concurrency", "4"))
    with command:
        try:
            assert command.stdin is not None
            command.stdin.write(stream)
            command.stdin.flush()
            printed = printed_lines(command.stdout)
            first = orjson.loads(printed.get(timeout=30))
            assert (first["line"], first["status"]) == (2, "captured")
            command.send_signal(signal.SIGINT)  # the others wait for their turn at --rate 1
            command.wait(timeout=30)
        finally:
            kill_if_running(command)
    while (said := orjson.loads(printed.get(timeout=30)))["type"] != "summary":
        pass
    assert said["resume_from_line"] == 2
    assert "could not be written (database or disk is full)" in said["stopped"]
    free_the_disk(str(journal))
    again = batch_from_stdin(served, journal)
    _, stderr = again.communicate(stream, timeout=60)
    assert again.returncode == 0, stderr
    assert [served.booked(order) for order in orders] == [1] * len(orders)


def test_a_batch_stopped_by_a_401_does_not_read_on_a_stream_that_stays_open(
    served: ServedFake, tmp_path: Path
) -> None:
    # It read the rest of the stream to count what it did not send: with a producer that
    # keeps the stream open, it never ended.
    orders = [served.add_order(1000) for _ in range(2)]
    env = {"KLARNA_PASSWORD": "wrong-pw"}
    command = batch_from_stdin(served, tmp_path / "stream.journal.sqlite", env)
    with command:
        try:
            assert command.stdin is not None
            command.stdin.write("order_id,captured_amount\n")
            command.stdin.writelines(f"{order},1000\n" for order in orders)
            command.stdin.flush()  # ... and the stream stays open
            command.wait(timeout=60)
            assert command.stdout is not None
            assert command.stderr is not None
            printed, stderr = command.stdout.read(), command.stderr.read()
        finally:
            kill_if_running(command)
    assert command.returncode == 1, stderr
    assert "(401); the rest of the source was not read; fix the credentials" in stderr
    *outcomes, summary = json_lines(printed)
    assert {o["status"] for o in outcomes} == {"refused"}
    assert (summary["not_sent"], summary["resume_from_line"]) == (None, 2)  # both refused
    assert "; the rest of the source was not read; " in summary["stopped"]
    assert [served.booked(order) for order in orders] == [0, 0]


@posix
def test_a_bad_line_of_a_stream_is_reported_at_once_and_a_cut_last_line_is_refused(
    served: ServedFake, tmp_path: Path
) -> None:
    good, cut = served.add_order(5000), served.add_order(5000)
    command = batch_from_stdin(served, tmp_path / "stream.journal.sqlite")
    with command:
        try:
            assert command.stdin is not None
            command.stdin.write(f"order_id,captured_amount\n{good},5000\n{good},lots\n")
            command.stdin.flush()
            printed = printed_lines(command.stdout)
            # Both said while the writer is silent: the bad line waits for no other item.
            said = sorted((o["line"], o["status"]) for o in map(orjson.loads, _take(printed, 2)))
            assert said == [(2, "captured"), (3, "refused")]
            command.stdin.write(f"{cut},50")  # the writer dies in the middle of "5000"
            command.stdin.close()
            command.wait(timeout=30)
        finally:
            kill_if_running(command)
    assert command.returncode == 1
    [last] = map(orjson.loads, _take(printed, 1))
    assert (last["line"], last["status"]) == (4, "refused")
    assert "the stream ended in the middle of this line" in last["error"]
    assert served.booked(cut) == 0  # not 50 of its 5000
    summary = orjson.loads(printed.get(timeout=30))
    assert (summary["captured"], summary["refused"]) == (1, 2)
    assert "resume_from_line" not in summary  # the stream ended: every line was taken


def _take(printed: queue.Queue[str], count: int) -> list[str]:
    return [printed.get(timeout=30) for _ in range(count)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_signal_stops_a_batch_waiting_for_its_stream_s_header(
    served: ServedFake, tmp_path: Path
) -> None:
    command = batch_from_stdin(served, tmp_path / "stream.journal.sqlite")
    with command:
        try:
            # Its signal handlers are in place, and it waits for the stream, once it reads
            # the stream on a second thread (it prints nothing until a line comes).
            tasks = Path(f"/proc/{command.pid}/task")
            idle = threading.Event()  # never set: a wait between looks
            while command.poll() is None and len(list(tasks.iterdir())) < 2:
                idle.wait(0.01)
            command.send_signal(signal.SIGTERM)
            command.wait(timeout=30)  # the writer never wrote, nor closed the stream
            assert command.stderr is not None
            stderr = command.stderr.read()
        finally:
            kill_if_running(command)
    assert command.returncode == 143, stderr
    assert "Interrupted" in stderr
    assert served.do(lambda: len(served.fake.requests)) == 0


def test_a_line_longer_than_the_limit_is_refused_and_the_lines_after_it_run(
    served: ServedFake, tmp_path: Path
) -> None:
    first, last = served.add_order(1000), served.add_order(1000)
    path = tmp_path / "long.csv"
    with path.open("w") as file:
        file.write(f"order_id,captured_amount\n{first},1000\n")
        file.write("x" * (MAX_LINE_BYTES + 10) + "\n")
        file.write(f"{last},1000\n")
    result = cli(["batch", str(path), "--json"], served)
    assert result.exit_code == 1, result.output
    by_line = {o["line"]: o for o in json_lines(result.output) if o["type"] == "outcome"}
    assert by_line[3]["status"] == "refused"
    assert by_line[3]["error"] == f"line 3: the line is longer than {MAX_LINE_BYTES} bytes"
    assert (by_line[2]["status"], by_line[4]["status"]) == ("captured", "captured")
    assert [served.booked(first), served.booked(last)] == [1, 1]


class _FailsAfter(io.RawIOBase):
    """``data``, until ``good`` bytes were read: then the disk fails (EIO)."""

    def __init__(self, data: bytes, good: int) -> None:
        self.data, self.good, self.at = data, good, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.at >= self.good:
            raise OSError(5, "Input/output error")
        n = min(len(buffer), 16, len(self.data) - self.at)
        buffer[:n] = self.data[self.at : self.at + n]
        self.at += n
        return n


def test_a_file_that_cannot_be_read_on_ends_the_run_with_the_lines_it_read_done(
    served: ServedFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    orders = [served.add_order(1000) for _ in range(8)]
    path = tmp_path / "disk.csv"
    path.write_text("order_id,captured_amount\n" + "".join(f"{o},1000\n" for o in orders))
    data = path.read_bytes()
    good = data.index(orders[4].encode())  # lines 2-5 can be read, line 6 cannot
    failing = lambda *_: io.BufferedReader(_FailsAfter(data, good), buffer_size=16)  # noqa: E731
    monkeypatch.setattr(_batchfile, "open", failing, raising=False)
    result = cli(["batch", str(path), "--json"], served)
    assert result.exit_code == 1, result.output
    lines = json_lines(result.stdout)
    assert sorted(o["line"] for o in lines if o["type"] == "outcome") == [2, 3, 4, 5]
    assert lines[-1]["captured"] == 4
    assert f"{path}: could not read line 6: Input/output error" in result.stderr
    assert "the lines after it were not read" in result.stderr

    # Failing at the header, nothing runs: an input error (2), as for a file not found.
    monkeypatch.setattr(_batchfile, "open", lambda *_: _FailsAfter(data, 0), raising=False)
    header = cli(["batch", str(path), "--json", "--journal", str(tmp_path / "h.sqlite")], served)
    assert header.exit_code == 2
    assert "could not read line 1: Input/output error" in header.stderr

    monkeypatch.undo()  # the disk is back: the rerun skips lines 2-5 and runs the rest
    rerun = cli(["batch", str(path), "--json"], served)
    assert rerun.exit_code == 0, rerun.output
    assert [served.booked(order) for order in orders] == [1] * len(orders)


class _Endless(io.RawIOBase):
    """A stream of NUL bytes that never ends (``/dev/zero``), recording each read's size."""

    def __init__(self, then: bytes = b"") -> None:
        self.sizes: list[int] = []
        self.left = 3 * MAX_LINE_BYTES  # ... then ``then``, then the end (for the test)
        self.then = then

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        self.sizes.append(len(buffer))
        if self.left:
            n = min(len(buffer), self.left)
            buffer[:n] = bytes(n)
            self.left -= n
            return n
        n = min(len(buffer), len(self.then))
        buffer[:n], self.then = self.then[:n], self.then[n:]
        return n


def test_a_line_without_end_is_read_a_piece_at_a_time() -> None:
    raw = _Endless(then=b"\nabc,1000\n")
    lines = _text_lines(io.BufferedReader(raw, buffer_size=65536), "utf-8")
    rows = list(_parsed(_jsonl_row_of, lines))
    assert len(rows) == 2
    assert isinstance(rows[0], BadLine)
    assert str(rows[0].error) == f"line 1: the line is longer than {MAX_LINE_BYTES} bytes"
    assert isinstance(rows[1], BadLine)
    assert rows[1].line == 2  # "abc,1000" is no JSON
    assert max(raw.sizes) <= MAX_LINE_BYTES + 2  # never the whole line at once


@pytest.mark.parametrize(
    ("size", "end", "longer"),
    [
        (MAX_LINE_BYTES, b"\r\n", False),  # the limit counts no line end
        (MAX_LINE_BYTES, b"\n", False),
        (MAX_LINE_BYTES, b"", False),  # the last line, without an end
        (MAX_LINE_BYTES + 1, b"\r\n", True),
        (MAX_LINE_BYTES + 1, b"\n", True),
        (MAX_LINE_BYTES + 1, b"", True),
    ],
)
def test_the_line_limit_counts_the_line_without_its_end(
    size: int, end: bytes, longer: bool
) -> None:
    after = b"next\n" if end else b""
    [(number, text), *rest] = _text_lines(io.BytesIO(b"x" * size + end + after), "utf-8")
    assert number == 1
    assert isinstance(text, ValueError) is longer
    assert [text for _, text in rest] == (["next"] if end else [])


@pytest.mark.parametrize(
    "raw",
    [
        b'{"order_id": "O1", "captured_amount": "lots", "description": "%s"}',
        b'{"order_id": "O1", "captured_amount": 100, "description": "%s", "x": 1}',
        b'{"order_id": "O1", "captured_amount": 100, "description": "%s"',
    ],
    ids=["type", "unknown field", "not JSON"],
)
def test_a_bad_line_holds_no_frame_that_parsed_it(raw: bytes) -> None:
    # The refusal's traceback (and the cattrs error it was raised in) held the frames that
    # parsed the line, with the line, until the collector came: a stream of refused 4 MiB
    # lines peaked at 435 MB, a file of them at 239 MB.
    lines = _text_lines(io.BytesIO(raw % (b"d" * 1000) + b"\n"), "utf-8")
    [row] = _parsed(_jsonl_row_of, lines)
    assert isinstance(row, BadLine)
    error = row.error
    assert (error.__traceback__, error.__context__, error.__cause__) == (None, None, None)


def test_a_header_longer_than_the_limit_refuses_the_file_at_once() -> None:
    raw = _Endless()
    raw.left = 10**15  # as good as /dev/zero
    lines = _text_lines(io.BufferedReader(raw, buffer_size=65536), "utf-8", stream=True)
    with pytest.raises(BatchFileError, match="line 1: cannot read the header: the line is long"):
        _csv_parse("/dev/zero", lines, None)
    assert sum(raw.sizes) <= MAX_LINE_BYTES + 2 + 65536  # the first line's worth, no more


def test_a_line_without_end_ends_the_reading_after_its_first_64_mib() -> None:
    raw = _Endless()
    raw.left = 10**15  # as good as /dev/zero
    lines = _text_lines(io.BufferedReader(raw, buffer_size=65536), "utf-8", path="/dev/zero")
    rows = _parsed(_jsonl_row_of, lines)
    first = next(rows)  # refused at once, before its rest is read
    assert isinstance(first, BadLine)
    assert "longer than" in str(first.error)
    with pytest.raises(BatchReadError, match="line 1 has no end in its first 64 MiB"):
        next(rows)
    assert sum(raw.sizes) <= 65 * 2**20


def test_only_a_stream_refuses_a_last_line_without_its_end() -> None:
    def last(stream: bool) -> str | ValueError:
        *_, (_, text) = _text_lines(io.BytesIO(b"h\nO1,50"), "utf-8", stream=stream)
        return text

    assert last(stream=False) == "O1,50"  # a file saved without a final line end
    assert "the stream ended in the middle of this line" in str(last(stream=True))


# -- read_rows: the reader thread ----------------------------------------------------------------


def _lines(made: list[int], text: str = "x") -> Iterator[Line]:
    """Lines without end, each noted in ``made`` as the reader thread reads it."""
    line = 0
    while True:
        line += 1
        made.append(line)
        yield line, text


def _bad(numbered: Line) -> BadLine:
    line = numbered[0]
    return BadLine(line, None, BadLineError(line, None, "test"))


def _opened(lines: Iterator[Line]) -> contextlib.nullcontext[OpenedLines]:
    return contextlib.nullcontext(OpenedLines(_bad, lines))


@pytest.mark.parametrize(
    ("text", "ahead"),
    [("x", READ_AHEAD), ("x" * (READ_AHEAD_CHARS // 8), 8)],
    ids=["lines", "characters"],
)
def test_the_reader_reads_at_most_read_ahead_lines_before_the_batch_takes_them(
    text: str, ahead: int
) -> None:
    made: list[int] = []

    async def main() -> None:
        async with read_rows(lambda _stop: _opened(_lines(made, text))) as rows:
            taken = 0
            async for row in rows:
                taken += 1
                assert isinstance(row, BadLine)
                assert row.line == taken
                # Made so far: those taken, those waiting, one held by the thread.
                assert len(made) <= taken + ahead + 1
                if taken == 3 * ahead:
                    break

    asyncio.run(main())


def test_the_reader_raises_a_file_error_on_entry_and_a_later_error_after_the_rows() -> None:
    @contextlib.contextmanager
    def broken_open(_stop: threading.Event) -> Iterator[OpenedLines]:
        raise BatchFileError("x.csv: line 1: cannot read the header")
        yield OpenedLines(_bad, iter(()))

    def failing() -> Iterator[Line]:
        yield 1, "x"
        raise OSError(5, "Input/output error")

    async def main() -> list[int]:
        with pytest.raises(BatchFileError, match="cannot read the header"):
            async with read_rows(broken_open):
                pass
        seen: list[int] = []

        async def read_all() -> None:
            async with read_rows(lambda _stop: _opened(failing())) as rows:
                async for row in rows:
                    assert isinstance(row, BadLine)
                    seen.append(row.line)

        with pytest.raises(OSError, match="Input/output error"):
            await read_all()
        return seen

    assert asyncio.run(main()) == [1]


def test_the_reader_stops_at_the_next_line_once_the_batch_takes_no_more() -> None:
    # Blank lines without end (`yes ""`): they give no row, so the thread would never come
    # to hand one over and see that no more are wanted.
    class Blank(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            buffer[: len(buffer)] = b"\n" * len(buffer)
            return len(buffer)

    def blank_lines(stop: threading.Event) -> contextlib.nullcontext[OpenedLines]:
        return contextlib.nullcontext(
            OpenedLines(_jsonl_row_of, _text_lines(Blank(), "utf-8", stop=stop))
        )

    async def main() -> threading.Thread:
        async with read_rows(blank_lines):
            [reader] = [t for t in threading.enumerate() if t.name == "klarna-om batch file"]
        return reader

    reader = asyncio.run(main())
    reader.join(timeout=30)
    assert not reader.is_alive()
