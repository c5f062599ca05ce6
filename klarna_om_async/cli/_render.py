"""Output: JSON lines for scripts, rich tables and a live progress bar for people."""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Self

import click
import orjson
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from .._convert import converter
from ..batch import CaptureOutcome, CaptureStatus
from ..errors import IdempotencyKeyReusedError, KlarnaError, NeedsReviewError, ValidationError
from ..journal import JournalStatus
from ..models import Capture, Order, Refund
from ..operations import Operation
from ._batchfile import BadLineError
from ._runner import Tally

__all__ = (
    "BatchView",
    "cli_error_text",
    "echo_json",
    "error_json",
    "outcome_json",
    "result_text",
    "resume_note",
    "show_capture",
    "show_captures",
    "show_order",
    "show_refund",
    "show_refunds",
    "to_plain",
)

#: The library's logger, which -v turns up.
_LOGGER = "klarna_om_async"
#: How many refused or failed items the human summary lists; --json lists them all.
_PROBLEMS_SHOWN = 20


def to_plain(value: object) -> object:
    """A model (or list of models) as JSON-ready values, in Klarna's field names."""
    return converter.unstructure(value)


class _Console(Console):
    """rich's Console, on standard output, whose broken pipe is the command's to handle:
    rich's own handling exits 1 ("refused") in silence, after Klarna may have booked."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def cli_console() -> Console:
    """A Console on standard output (made per command: click's test runner swaps stdout)."""
    return _Console(highlight=False)


def echo_json(value: object) -> None:
    """Print one JSON object on its own line; click flushes it at once."""
    click.echo(orjson.dumps(value).decode())


_lost: list[bool] = []


def lose_stdout() -> None:
    """Send what is still written to standard output (at exit too) to /dev/null: it failed
    (a closed pipe, a full disk), and every further write would fail again."""
    _lost.append(True)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())


def stdout_lost() -> bool:
    """Whether standard output failed (see :func:`lose_stdout`)."""
    return bool(_lost)


def outcome_json(outcome: CaptureOutcome) -> dict[str, object]:
    """One batch outcome as the JSON object ``--json`` prints for it."""
    error = outcome.error
    result: dict[str, object] = {
        "type": "outcome",
        "order_id": outcome.order_id,
        "item_key": outcome.item_key,
        "operation": outcome.operation.value,
        # "captured" for every operation Klarna booked (scripts rely on it); "result" says
        # it in the operation's words: "refunded", "released", ...
        "status": outcome.status.value,
        "result": result_text(outcome),
        "capture_id": outcome.capture_id,
        "idempotency_key": outcome.idempotency_key or None,
        "attempts": outcome.attempts,
        "error": None if error is None else _problem_text(error),
    }
    if outcome.operation is Operation.REFUND:
        result["refund_id"] = outcome.refund_id
    line = error.line if isinstance(error, BadLineError) else outcome.line
    if line is not None:
        result["line"] = line
    return result


def result_text(outcome: CaptureOutcome) -> str:
    """The outcome's status in its operation's words: "refunded" for a booked refund."""
    if outcome.status is CaptureStatus.CAPTURED:
        return outcome.operation.done
    return outcome.status.value


_PYTHON_HINT = re.compile(r" The outcome is unknown\b.*\Z", re.DOTALL)


def cli_error_text(error: KlarnaError, *, rerun: str | None = None) -> str:
    """``str(error)`` in the terms of the command line: an unknown outcome's hint names
    ``--idempotency-key KEY`` (or ``rerun``, what to do instead), not Python syntax."""
    text = _PYTHON_HINT.sub("", str(error)).rstrip()
    if not error.outcome_unknown:
        return text
    key = error.idempotency_key
    if rerun is None and key:
        rerun = (
            f"rerun the same command with --idempotency-key {key} (within 24 hours) "
            "to finish it exactly once"
        )
    return f"{text} The outcome is unknown: it may have taken effect; {rerun or 'check it'}."


def error_json(error: KlarnaError, *, exit_code: int) -> dict[str, object]:
    """The ``{"type": "error", ...}`` object ``--json`` prints on stdout for ``error``; for
    a reused key, with the ``location`` of what the earlier request created."""
    extra = {"location": error.location} if isinstance(error, IdempotencyKeyReusedError) else {}
    return {
        "type": "error",
        "error": type(error).__name__,
        "message": cli_error_text(error),
        "outcome_unknown": error.outcome_unknown,
        "idempotency_key": error.idempotency_key,
        "correlation_id": getattr(error, "correlation_id", None),
        "status": getattr(error, "status", None),
        "error_code": getattr(error, "error_code", None),
        "attempts": error.attempts,
        **extra,
        "exit_code": exit_code,
    }


# --- single commands -------------------------------------------------------------------------


def _fields(console: Console, title: str, rows: Sequence[tuple[str, object]]) -> None:
    # Titles are Text, as the values: an id like "x[red]y" is not rich markup.
    table = Table(title=Text(title), show_header=False, title_justify="left")
    table.add_column("field", style="bold", no_wrap=True)
    # fold, never "…": an id cut short is useless for the next command.
    table.add_column("value", overflow="fold")
    for name, value in rows:
        if value is not None:
            table.add_row(name, Text(str(value)))
    console.print(table)


def show_capture(console: Console, capture: Capture) -> None:
    """One capture as a field/value table."""
    shipments = [
        " ".join(
            str(part)
            for part in (s.shipping_company, s.shipping_method, s.tracking_number, s.tracking_uri)
            if part is not None
        )
        for s in capture.shipping_info or ()
    ]
    _fields(
        console,
        f"Capture {capture.capture_id}",
        [
            ("capture_id", capture.capture_id),
            ("klarna_reference", capture.klarna_reference),
            ("captured_amount", capture.captured_amount),
            ("captured_at", capture.captured_at),
            ("reference", capture.reference),
            ("description", capture.description),
            ("refunded_amount", capture.refunded_amount),
            ("order_lines", len(capture.order_lines or ())),
            ("shipping_info", "; ".join(shipments) or None),
        ],
    )


def show_captures(console: Console, order_id: str, captures: Sequence[Capture]) -> None:
    """An order's captures as one table."""
    if not captures:
        console.print(f"Order {order_id} has no captures.")
        return
    table = Table(title=Text(f"Captures of order {order_id}"), title_justify="left")
    # The capture id is what the next command needs: never cut, never wrapped; the other
    # columns give way on a narrow terminal.
    id_width = max(len(capture.capture_id or "") for capture in captures)
    table.add_column("capture_id", no_wrap=True, min_width=max(id_width, len("capture_id")))
    table.add_column("amount", justify="right", no_wrap=True)
    for column in ("captured_at", "reference", "shipments"):
        table.add_column(column, overflow="fold")
    for capture in captures:
        # Text: values from Klarna or a file are never read as rich markup.
        table.add_row(
            Text(capture.capture_id or ""),
            str(capture.captured_amount),
            _when(capture.captured_at),
            Text(capture.reference or ""),
            str(len(capture.shipping_info or ())),
        )
    console.print(table)


def _utc(stamp: str) -> str:
    return stamp.removesuffix("+00:00") + "Z" if stamp.endswith("+00:00") else stamp


def _when(moment: datetime | None) -> str:
    return _utc(moment.isoformat(timespec="seconds")) if moment else ""


def show_refund(console: Console, refund: Refund) -> None:
    """One refund as a field/value table."""
    _fields(
        console,
        f"Refund {refund.refund_id}",
        [
            ("refund_id", refund.refund_id),
            ("refunded_amount", refund.refunded_amount),
            ("refunded_at", refund.refunded_at),
            ("reference", refund.reference),
            ("description", refund.description),
            ("order_lines", len(refund.order_lines or ())),
        ],
    )


def show_refunds(console: Console, order_id: str, refunds: Sequence[Refund]) -> None:
    """An order's refunds as one table (ids never cut, like the captures')."""
    table = Table(title=Text(f"Refunds of order {order_id}"), title_justify="left")
    id_width = max(len(refund.refund_id or "") for refund in refunds)
    table.add_column("refund_id", no_wrap=True, min_width=max(id_width, len("refund_id")))
    table.add_column("amount", justify="right", no_wrap=True)
    for column in ("refunded_at", "reference"):
        table.add_column(column, overflow="fold")
    for refund in refunds:
        table.add_row(
            Text(refund.refund_id or ""),
            str(refund.refunded_amount),
            _when(refund.refunded_at),
            Text(refund.reference or ""),
        )
    console.print(table)


def show_order(console: Console, order: Order) -> None:
    """An order's status and amounts, then its captures and its refunds."""
    _fields(
        console,
        f"Order {order.order_id}",
        [
            ("status", order.status),
            ("fraud_status", order.fraud_status),
            ("currency", order.purchase_currency),
            ("order_amount", order.order_amount),
            ("captured_amount", order.captured_amount),
            ("refunded_amount", order.refunded_amount),
            ("remaining_authorized_amount", order.remaining_authorized_amount),
            ("expires_at", order.expires_at),
            ("merchant_reference1", order.merchant_reference1),
        ],
    )
    if order.captures:
        show_captures(console, order.order_id or "", order.captures)
    if order.refunds:
        show_refunds(console, order.order_id or "", order.refunds)


# --- batches ---------------------------------------------------------------------------------

_STATUS_STYLE = {
    CaptureStatus.CAPTURED: "green",
    CaptureStatus.REFUSED: "yellow",
    CaptureStatus.FAILED: "red",
    CaptureStatus.SKIPPED: "dim",
    CaptureStatus.NEEDS_REVIEW: "magenta",
}
# Outcomes that leave an item not captured: listed after the summary, and exit status 1.
_NOT_DONE = frozenset({CaptureStatus.REFUSED, CaptureStatus.FAILED, CaptureStatus.NEEDS_REVIEW})


def _lines(n: int) -> str:
    return f"{n:,} line" if n == 1 else f"{n:,} lines"


def resume_note(
    journal: str,
    counts: Mapping[JournalStatus, int],
    done: Mapping[Operation, int] | None = None,
) -> str | None:
    """What a rerun will do with what ``journal`` already holds; None for a new journal.

    ``done``: the booked items per operation; only captures (or not given) reads "captured".
    """
    if not any(counts.values()):
        return None
    resend = counts.get(JournalStatus.IN_FLIGHT, 0) + counts.get(JournalStatus.FAILED, 0)
    booked = _lines(counts.get(JournalStatus.CAPTURED, 0))
    if done and set(done) != {Operation.CAPTURE}:
        split = ", ".join(f"{n:,} {operation.done}" for operation, n in done.items() if n)
        already = f"{booked} already done ({split}; skipped)"
    else:
        already = f"{booked} already captured (skipped)"
    parts = [already, f"{resend:,} to resend with their keys"]
    if refused := counts.get(JournalStatus.REFUSED, 0):
        parts.append(f"{refused:,} refused before, to try again with new keys")
    if review := counts.get(JournalStatus.NEEDS_REVIEW, 0):
        parts.append(f"{review:,} needing review (not sent)")
    return f"Resuming from the journal {journal}: {', '.join(parts)}."


def _problem_text(error: BaseException | None) -> str:
    if isinstance(error, ValidationError) and error.field == "item_key":
        # The journal's "item key" is order_id:reference; a person knows the two columns.
        return f"order_id and reference {error.reason}"
    if isinstance(error, NeedsReviewError):
        # Never sent again: a rerun would only report it again.
        return cli_error_text(
            error,
            rerun="check the order in the Klarna merchant portal, then settle the item with"
            " klarna-om reconcile JOURNAL --captured ITEM_KEY ID or --not-captured ITEM_KEY",
        )
    if isinstance(error, KlarnaError):
        # A rerun of the batch resends the item with its journaled key by itself.
        return cli_error_text(error, rerun="rerun the same batch command to finish it")
    return str(error)


class BatchView:
    """What a batch shows while it runs and when it ends, in JSON or for people.

    With ``--json`` every outcome is printed (and flushed) as it ends, then a summary
    object; this is a convenience, the journal is the durable record. Otherwise a live
    progress bar runs when stdout is a terminal, and a summary table is printed at the end.
    """

    def __init__(
        self,
        console: Console,
        *,
        json_output: bool,
        title: str,
        total: int | None = None,
        outcome_lines: bool | None = None,
        list_problems: bool = True,
    ) -> None:
        self.tally = Tally()
        self._console = console
        self._json = json_output
        # One JSON line per outcome; by default whenever the output is JSON.
        self._lines = json_output if outcome_lines is None else outcome_lines
        self._title = title
        self._problems: list[CaptureOutcome] = []
        self._list_problems = list_problems
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._saved_logging: tuple[list[logging.Handler], bool] | None = None
        if not json_output and console.is_terminal:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=console,
            )
            self._task = self._progress.add_task(title, total=total, counts="", rate="")

    def __enter__(self) -> Self:
        if self._progress is not None:
            self._progress.start()
            self._log_above_the_bar()
        return self

    def _log_above_the_bar(self) -> None:
        # A line written to the terminal behind rich's back breaks the live bar; a handler
        # on the bar's own console prints each log line above it instead.
        logger = logging.getLogger(_LOGGER)
        self._saved_logging = (list(logger.handlers), logger.propagate)
        for handler in self._saved_logging[0]:
            logger.removeHandler(handler)
        logger.addHandler(RichHandler(console=self._console, show_path=False, markup=False))
        logger.propagate = False

    def _restore_logging(self) -> None:
        if self._saved_logging is None:
            return
        logger = logging.getLogger(_LOGGER)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        handlers, logger.propagate = self._saved_logging
        for handler in handlers:
            logger.addHandler(handler)
        self._saved_logging = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.tally.stop()
        if self._progress is not None:
            self._progress.stop()
            self._restore_logging()

    def report(self, outcome: CaptureOutcome) -> None:
        """Count one outcome and show it."""
        self.tally.add(outcome)
        if self._lines:
            echo_json(outcome_json(outcome))
        if outcome.status in _NOT_DONE and len(self._problems) < _PROBLEMS_SHOWN:
            self._problems.append(outcome)
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task, advance=1, counts=self._counts(), rate=f"{self.tally.per_second:.0f}/s"
            )

    def _counts(self) -> str:
        return " ".join(
            f"[{_STATUS_STYLE[status]}]{status.value} {count}[/]"
            for status, count in self.tally.counts.items()
            if count
        )

    def finish(
        self, *, notes: Sequence[str] = (), extra: Mapping[str, object] | None = None
    ) -> None:
        """Print the summary: a JSON object with ``extra``, or tables followed by ``notes``."""
        if self._json:
            echo_json({"type": "summary", **self.tally.as_dict(), **(extra or {})})
            return
        self._console.print(self._summary_table())
        if self._problems and self._list_problems:
            self._print_problems()
        for note in notes:
            # soft_wrap: a path or key in a note must survive intact for copy and grep.
            self._console.print(note, markup=False, soft_wrap=True)

    def _summary_table(self) -> Table:
        tally = self.tally
        table = Table(title=self._title, title_justify="left")
        table.add_column("")
        table.add_column("items", justify="right")
        for status, count in tally.counts.items():
            style = _STATUS_STYLE[status]
            if status is CaptureStatus.CAPTURED and tally.operations - {Operation.CAPTURE}:
                # Not only captures: what was done, in each operation's words.
                for operation in Operation:
                    if operation in tally.done:
                        table.add_row(f"[{style}]{operation.done}[/]", str(tally.done[operation]))
                if not tally.done:
                    table.add_row(f"[{style}]done[/]", "0")
                continue
            table.add_row(f"[{style}]{status.value}[/]", str(count))
        table.add_row("total", str(tally.items), end_section=True)
        table.add_row("HTTP attempts", str(tally.attempts))
        table.add_row("retries", str(tally.retries))
        table.add_row("429s (rate limited)", str(tally.rate_limited))
        table.add_row("time", f"{tally.elapsed:.2f} s")
        table.add_row("throughput", f"{tally.per_second:.0f} items/s")
        return table

    def _print_problems(self) -> None:
        not_done = sum(self.tally.counts[status] for status in _NOT_DONE)
        shown = len(self._problems)
        more = f" (first {shown} of {not_done}; --json lists all)" if not_done > shown else ""
        title = "Not captured" if self.tally.operations <= {Operation.CAPTURE} else "Not done"
        self._console.print(f"{title}{more}:", markup=False, soft_wrap=True)
        for outcome in self._problems:
            # Plain wrapped lines, not a table: the whole error (its correlation id and any
            # idempotency key to retry with) must survive a narrow terminal.
            line = Text("- ")
            if outcome.line is not None:
                line.append(f"line {outcome.line}: ")
            line.append(outcome.order_id or "(no order id)", style="bold")
            line.append(" ")
            if outcome.operation is not Operation.CAPTURE:
                line.append(f"{outcome.operation.value} ")
            line.append(outcome.status.value, style=_STATUS_STYLE[outcome.status])
            line.append(f": {_problem_text(outcome.error)}")
            self._console.print(line, soft_wrap=True)
