"""``klarna-om batch FILE``: run every line of a CSV or JSON Lines file, resumably.

Each line captures (the default), refunds, releases the remaining authorization, extends
the authorization time, or cancels, as its ``operation`` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Literal

import attrs
import click

from ..batch import DEFAULT_CONCURRENCY, BatchAbortedError, CaptureOutcome, CaptureStatus
from ..journal import JournalEntry, JournalStatus
from ..sqlite_journal import SQLiteJournal
from ._batchfile import (
    CSV_COLUMNS,
    BatchFileError,
    BatchFormat,
    BatchReadError,
    OpenedLines,
    Row,
    count_lines,
    detect_format,
    is_stream,
    open_batch,
    open_lines,
)
from ._options import (
    EXIT_OK,
    EXIT_SOME_NOT_CAPTURED,
    Connection,
    InputError,
    Interrupted,
    connection_options,
    damaged,
    finite,
    journal_fault,
    json_option,
    open_journal,
    run_interruptible,
)
from ._reading import StreamRows, read_rows
from ._render import BatchView, cli_console, resume_note
from ._runner import run_batch

__all__ = ("batch",)

# Seconds per item; a batch job can afford more patience than an interactive call.
_BATCH_DEADLINE = 120.0

_HELP = f"""Run every line of FILE (CSV or JSON Lines), many at a time, exactly once.

Each line's operation says what it does: capture (the default), refund,
release (the remaining authorization), extend (the authorization time) or
cancel. One order's lines run one at a time, in file order.

\b
CSV (.csv): a header line, then one operation per line. Columns:
  order_id          required
  operation         optional; empty: capture
  captured_amount   a capture's amount, integer minor units (1050 = 10.50);
                    a required column unless there is an operation column
  refunded_amount   a refund's amount, integer minor units
  {", ".join(CSV_COLUMNS[2:5])}
  {", ".join(CSV_COLUMNS[5:9])}
                    optional; any shipping column adds one shipping_info entry
                    to a capture; release, extend and cancel take none of these

\b
JSON Lines (.jsonl, .ndjson): one object per line with order_id, an optional
operation and idempotency_key, and Klarna's fields: for a capture
captured_amount, reference, description, order_lines, shipping_info,
shipping_delay; for a refund refunded_amount, reference, description,
order_lines; nothing more for release, extend and cancel. Example:
  {{"order_id": "abc", "captured_amount": 6000, "reference": "INV-1"}}
  {{"order_id": "abc", "operation": "refund", "refunded_amount": 2500}}

Blank lines are skipped. A line that cannot become an operation is not sent: it
is reported as refused with its line number, and the other lines go on.

The journal (default: FILE.journal.sqlite, unless --no-journal; required with
--journal for a stream such as /dev/stdin) records each
item's idempotency key before it is sent. Rerun the same command after a crash,
Ctrl-C, SIGTERM or failures: items done are skipped, and items whose outcome was
unknown are resent with their original keys, so nothing is captured or refunded
twice. An order captured (or refunded) in several parts needs a distinct
reference per line.

\b
Exit status: 0 all done or skipped; 1 some refused or failed (see the
summary, or --json); 2 usage or input errors; 130 interrupted (Ctrl-C);
143 terminated (SIGTERM). Either signal stops the batch as Ctrl-C does: no new
items, then the summary.
"""


@attrs.frozen
class _Settings:
    path: str
    fmt: BatchFormat
    journal: str | None
    durability: Literal["full", "normal"]
    concurrency: int
    rate: float | None
    json_output: bool
    encoding: str = "utf-8"
    delimiter: str | None = None


@click.command(help=_HELP)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice([fmt.value for fmt in BatchFormat]),
    help="File format; by default from the extension (.csv, .jsonl, .ndjson).",
)
@click.option(
    "--encoding",
    default="utf-8",
    show_default=True,
    help="Text encoding of FILE, e.g. cp1252 or latin-1 for files from older Excel "
    "(a UTF-8 byte order mark is accepted).",
)
@click.option(
    "--delimiter",
    help="CSV column separator, e.g. ';' [default: recognised from the header: "
    "',', ';', tab or '|'].",
)
@click.option(
    "--journal",
    type=click.Path(dir_okay=False),
    help="SQLite journal that makes reruns exactly-once [default: FILE.journal.sqlite].",
)
@click.option(
    "--no-journal",
    is_flag=True,
    help="Keep no journal: a rerun may capture again items whose answer was lost.",
)
@click.option(
    "--journal-durability",
    "durability",
    type=click.Choice(["full", "normal"]),
    default="full",
    show_default=True,
    help="full: fsync each journal write, so a power loss never loses a key that was sent; "
    "normal: faster, survives a crash of this process but not of the machine.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=10_000),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Items in flight at once (1 to 10000).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.01, max=10_000),
    callback=finite,
    help="At most this many requests per second (Klarna allows 200/s in production, "
    "50/s in the playground; at most 10000) [default: no limit].",
)
@connection_options
@json_option
def batch(
    file: str,
    fmt: str | None,
    encoding: str,
    delimiter: str | None,
    journal: str | None,
    no_journal: bool,
    durability: Literal["full", "normal"],
    concurrency: int,
    rate: float | None,
    json_output: bool,
) -> None:
    if journal is not None and no_journal:
        raise click.UsageError("--journal and --no-journal exclude each other")
    if journal is None and not no_journal and _stream(file):
        # Beside /dev/stdin (or /dev/fd/N) a journal would be lost at reboot, and every
        # stream's batch would share it.
        raise InputError(
            f"{file} is not a file but a stream (a pipe, /dev/stdin): name its journal with"
            " --journal PATH (and the same PATH on every rerun)"
        )
    try:
        settings = _Settings(
            path=file,
            fmt=detect_format(file, fmt),
            journal=None if no_journal else (journal or file + ".journal.sqlite"),
            durability=durability,
            concurrency=concurrency,
            rate=rate,
            json_output=json_output,
            encoding=encoding,
            delimiter={"\\t": "\t", "tab": "\t"}.get(delimiter or "", delimiter),
        )
    except BatchFileError as error:
        raise InputError(str(error)) from None
    connection = Connection.from_context()
    connection.check()  # missing credentials: fail before touching the journal
    try:
        all_done = run_interruptible(lambda: _run(settings, connection))
    except Interrupted as interrupted:  # SIGINT or SIGTERM; the summary is printed
        where = f"the journal {settings.journal}" if settings.journal else "no journal"
        click.echo(
            "Interrupted: no new items were started. Items already started are recorded in "
            f"{where}; rerun the same command to finish them with their original keys.",
            err=True,
        )
        sys.exit(interrupted.exit_code)
    sys.exit(EXIT_OK if all_done else EXIT_SOME_NOT_CAPTURED)


async def _run(settings: _Settings, connection: Connection) -> bool:
    console = cli_console()
    show_progress = console.is_terminal and not settings.json_output
    view = BatchView(
        console,
        json_output=settings.json_output,
        title="klarna-om batch",
        total=_total(settings) if show_progress else None,
    )
    interrupted = completed = False
    stopped: BatchAbortedError | None = None
    # The file could not be read on, after some of it ran.
    unread: BatchReadError | None = None
    # The journal's failures: a write mid-batch (a full disk, an I/O error), or its close.
    journal_failed: list[sqlite3.Error | OSError] = []
    # Items the journal holds done, as the batch began and as it ended (see _unlisted).
    done: list[int] = []
    rows: Iterable[Row] | AsyncIterable[Row] = ()
    # Items the journal holds unknown (from earlier runs) that this input did not have: how
    # many, and the first of them.
    left: tuple[int, list[JournalEntry]] = (0, [])
    try:
        async with (
            _rows(settings) as rows,
            # --rate is the merchant's limit: the client's pace, which then also overrides
            # the (lower) pace it would take from Klarna's X-Ratelimit-Limit.
            connection.client(deadline=_BATCH_DEADLINE, rate_limit=settings.rate) as om,
            _journal(settings, journal_failed, done) as journal,
        ):
            with view:
                outcomes = _Outcomes(rows, view.report)
                try:
                    await run_batch(
                        om,
                        rows,
                        report=outcomes.report,
                        concurrency=settings.concurrency,
                        journal=journal,
                    )
                    if journal is not None:
                        left = await outcomes.unknown_left(journal)
                except BatchAbortedError as error:  # it cannot work: said once, below
                    stopped = error
                except BatchReadError as error:  # the items it read ran: said below
                    unread = error
                except sqlite3.Error as error:
                    if not journal_fault(error):
                        raise  # a bug, not the journal's state: shown as one
                    journal_failed.append(error)
                finally:
                    view.tally.rate_limited = om.rate_limited_count
        completed = True
    except BatchFileError as error:
        raise InputError(str(error)) from None
    except (asyncio.CancelledError, KeyboardInterrupt):
        # Cancelled by SIGINT or SIGTERM. KeyboardInterrupt only where asyncio handles
        # Ctrl-C itself (Windows): a second Ctrl-C there lands inside this cleanup.
        interrupted = True
        raise
    finally:
        # No summary when the file or the journal could not be opened: nothing ran. A file
        # without rows did run, and its summary shows 0 items.
        failed = _journal_failed(settings, journal_failed[0]) if journal_failed else None
        if completed or view.tally.items or interrupted:
            unlisted = _unlisted(view, done) if interrupted and not journal_failed else 0
            # A stream cannot be read again: from which line to give it again.
            resume = (
                rows.resume_line(whole=bool(journal_failed))
                if isinstance(rows, StreamRows)
                else None
            )
            _finish(
                view,
                settings,
                interrupted=interrupted,
                stopped=stopped,
                failed=failed,
                unlisted=unlisted,
                resume=resume if unread is None else None,  # said with the read error
                first_line=rows.first_line if isinstance(rows, StreamRows) else 1,
                left=left,
            )
    if stopped is not None:
        click.echo(str(stopped), err=True)
        return False
    if unread is not None:
        click.echo(
            f"{unread}; the lines after it were not read. Rerun the same command once that"
            " is fixed: the lines done are skipped.",
            err=True,
        )
        return False
    if failed is not None:
        click.echo(failed, err=True)
        return False
    return view.tally.all_done and not left[0]


class _Outcomes:
    """The batch's ``report``, also noting the items whose outcome stays unknown, and telling
    a stream's rows which of its lines ended done."""

    def __init__(
        self, rows: Iterable[Row] | AsyncIterable[Row], report: Callable[[CaptureOutcome], None]
    ) -> None:
        self._report = report
        self._stream = rows if isinstance(rows, StreamRows) else None
        self._unknown: set[str] = set()  # item keys; as many as failed, not one per item

    def report(self, outcome: CaptureOutcome) -> None:
        if self._stream is not None:
            self._stream.finished(outcome.line, outcome.status in _DONE)
        if outcome.status in _UNKNOWN:
            self._unknown.add(outcome.item_key)
        self._report(outcome)

    async def unknown_left(self, journal: SQLiteJournal) -> tuple[int, list[JournalEntry]]:
        """The items ``journal`` holds with an unknown outcome that this run did not report
        (how many, the first): an earlier run's, whose lines this input lacks (an edited
        file, a stream given again from too late a line). Nothing else settles them, and the
        run ended "all done"."""
        return await journal.unknown_except(self._unknown)


_DONE = frozenset({CaptureStatus.CAPTURED, CaptureStatus.SKIPPED})
_UNKNOWN = frozenset({CaptureStatus.FAILED, CaptureStatus.NEEDS_REVIEW})


def _journal_failed(settings: _Settings, error: sqlite3.Error | OSError) -> str:
    # Every claim that returned was durable before its item was sent; an item whose outcome
    # could not be recorded stays in flight, and the rerun resends its key (Klarna replays).
    assert settings.journal is not None  # only a journal fails
    if why := damaged(settings.journal, error):
        return why[0].upper() + why[1:]
    return (
        f"The journal {settings.journal} could not be written ({error}); no item was started"
        " after that. Items started are recorded in it (in flight where their outcome could"
        " not be written): once it can be written (a full disk, another program holding it),"
        " rerun the same command to finish them with their original keys."
    )


@contextlib.asynccontextmanager
async def _rows(settings: _Settings) -> AsyncIterator[Iterable[Row] | AsyncIterable[Row]]:
    """The file's rows; ``BatchFileError`` (on entry) when the file as a whole is unusable."""
    path, fmt, encoding, delimiter = (
        settings.path,
        settings.fmt,
        settings.encoding,
        settings.delimiter,
    )
    if _stream(path):
        # A stream's reads wait for its writer: on a thread of their own, or a silent
        # writer would stall the whole batch (see _reading). Its rows are made on the loop.
        def lines(stop: threading.Event) -> AbstractContextManager[OpenedLines]:
            return open_lines(path, fmt, encoding=encoding, delimiter=delimiter, stop=stop)

        async with read_rows(lines) as read:
            yield read
    else:
        # A file's reads never wait long: on the loop, where they cost least (handing rows
        # over from a thread cost a rerun a third more CPU).
        with open_batch(path, fmt, encoding=encoding, delimiter=delimiter) as rows:
            yield rows


def _stream(path: str) -> bool:
    try:
        return is_stream(path)
    except OSError:
        return False  # open_batch says why it cannot be read


def _total(settings: _Settings) -> int | None:
    # A cheap streamed count, only to give the progress bar a total; minus the CSV header.
    try:
        lines = count_lines(settings.path)
    except OSError:
        return None  # no total then; open_batch reports why the file cannot be read
    return None if lines is None else max(lines - (settings.fmt is BatchFormat.CSV), 0)


def _unlisted(view: BatchView, done: list[int]) -> int:
    """Items done in this run but not listed: an interrupted batch drops the outcome of an
    item whose journal write was under way, and the write stands (the rerun skips it)."""
    if len(done) != 2:
        return 0  # the journal could not be read at the end
    before, after = done
    return max(after - before - view.tally.counts[CaptureStatus.CAPTURED], 0)


@contextlib.asynccontextmanager
async def _journal(
    settings: _Settings, failed: list[sqlite3.Error | OSError], done: list[int]
) -> AsyncIterator[SQLiteJournal | None]:
    """The batch's journal, opened; a failure to close it (its last fsync) goes to ``failed``,
    and its count of items done, at open and (interrupted only) before it closes, to
    ``done``."""
    if settings.journal is None:
        yield None
        return
    journal = await open_journal(SQLiteJournal(settings.journal, durability=settings.durability))
    try:
        try:
            summary, by_operation = await journal.summary(), await journal.done_by_operation()
        except sqlite3.Error as error:
            if not journal_fault(error):
                raise
            path = settings.journal
            raise InputError(damaged(path, error) or f"cannot read {path}: {error}") from None
        done.append(summary[JournalStatus.CAPTURED])
        if note := resume_note(settings.journal, summary, by_operation):
            click.echo(note, err=True)
        yield journal
    except (asyncio.CancelledError, KeyboardInterrupt):
        # Interrupted while the batch waited for the items in flight after the journal
        # failed: said, and outcomes reported may not be recorded (see _run's resume).
        if journal.write_failure is not None and not failed:
            failure = journal.write_failure
            if isinstance(failure, sqlite3.Error | OSError):
                failed.append(failure)
        # Read only then (it counts the whole journal): see _unlisted.
        if not failed:
            with contextlib.suppress(sqlite3.Error):  # then _unlisted says nothing
                done.append((await journal.summary())[JournalStatus.CAPTURED])
        raise
    finally:
        try:
            await journal.close()
        except (sqlite3.Error, OSError) as error:  # close() says why; the summary comes first
            failed.append(error)


def _finish(
    view: BatchView,
    settings: _Settings,
    *,
    interrupted: bool,
    stopped: BatchAbortedError | None = None,
    failed: str | None = None,
    unlisted: int = 0,
    resume: int | None = None,
    first_line: int = 1,
    left: tuple[int, Sequence[JournalEntry]] = (0, ()),
) -> None:
    """Print the summary. ``resume``: a stream stopped before its end, the first line to
    give the batch again (``first_line``: its first after the header)."""
    notes = [f"Journal: {settings.journal}"] if settings.journal else []
    if failed is not None:
        notes.append(failed)
    if stopped is not None and stopped.not_sent_count is not None:
        notes.append(
            f"Stopped early: {stopped.not_sent_count} items were not sent (not claimed in the"
            " journal); the rerun sends them."
        )
    if resume is not None:
        header = " (after its header line)" if settings.fmt is BatchFormat.CSV else ""
        again = (
            "the whole stream again"
            if resume == first_line
            else f"the stream's lines from line {resume:,} on again{header}"
        )
        notes.append(
            f"{'Stopped early: the' if stopped else 'The'} stream was not read to its end (the"
            f" lines read ahead are dropped): give the batch {again}"
            + (
                ", with this journal: the lines done are skipped, the others finished exactly once."
                if settings.journal
                else "."
            )
        )
    unknown_left, left_first = left
    if unknown_left:
        first = left_first[0]
        notes.append(
            f"{unknown_left:,} items the journal holds with an unknown outcome (money may have"
            f" moved) were not run from this input (their lines are missing, or could not be"
            f" read), e.g. order {first.order_id} (item_key {first.item_key!r}): give the"
            " batch their lines again with this journal (each is finished with its own key);"
            " one that needs review is settled with klarna-om reconcile."
        )
    if view.tally.counts[CaptureStatus.FAILED]:
        notes.append(
            "Some outcomes are unknown (failed): "
            + ("rerun the same command" if resume is None else "give the stream again (above)")
            + " to finish them exactly once with their original idempotency keys."
        )
    if view.tally.counts[CaptureStatus.NEEDS_REVIEW]:
        notes.append(
            "Some items need review: Klarna's order does not show whether they were booked "
            "as asked (a key that expired, or a key of yours Klarna holds for another "
            "request). They are never sent again; check each order in the Klarna merchant "
            "portal (the evidence is listed above), then settle each with klarna-om "
            "reconcile."
        )
    if interrupted:
        notes.append("Interrupted: the summary covers the items finished so far.")
    if unlisted:
        items = "1 more item was" if unlisted == 1 else f"{unlisted:,} more items were"
        notes.append(
            f"{items} done as the batch stopped: Klarna answered and the journal recorded"
            " them, but they are not listed above; the rerun lists them as skipped."
        )
    extra: dict[str, object] = {"journal": settings.journal, "interrupted": interrupted}
    if unlisted:
        extra.update(unlisted_done=unlisted)
    if stopped is not None:
        extra.update(stopped=str(stopped), not_sent=stopped.not_sent_count)
    if resume is not None:
        extra.update(resume_from_line=resume)
    if unknown_left:
        extra.update(
            unknown_not_in_input=unknown_left,
            unknown_not_in_input_first=[entry.item_key for entry in left_first],
        )
    if failed is not None:
        extra.update(stopped=failed)
    view.finish(notes=notes, extra=extra)
