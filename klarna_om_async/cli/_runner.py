"""Run a batch file's rows through ``run_many`` and count what happened to them."""

from __future__ import annotations

import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
)

import attrs

from .._seen import SeenSet
from ..batch import (
    HELD_LISTED,
    BatchItem,
    CaptureOutcome,
    CaptureStatus,
)
from ..client import KlarnaOM
from ..journal import Journal
from ..operations import Operation, operation_or_none
from ._batchfile import BadLine, Row

__all__ = ("Tally", "bad_line_outcome", "run_batch")


@attrs.define
class Tally:
    """Running totals of a batch run: outcomes per status, HTTP attempts, elapsed time."""

    counts: dict[CaptureStatus, int] = attrs.field(factory=lambda: dict.fromkeys(CaptureStatus, 0))
    #: Items Klarna booked (status ``captured``), by operation, in the order first seen.
    done: dict[Operation, int] = attrs.field(factory=dict)
    #: Every operation an outcome had (a bad line counts as a capture).
    operations: set[Operation] = attrs.field(factory=set)
    #: HTTP attempts made in this run, over all items.
    attempts: int = 0
    #: Items that made at least one attempt.
    sent: int = 0
    #: 429 answers Klarna gave the run's client (``KlarnaOM.rate_limited_count``).
    rate_limited: int = 0
    started: float = attrs.field(factory=time.monotonic)
    #: Set when the run ends, so the summary's rate stops moving.
    finished: float | None = None

    def stop(self) -> None:
        """Freeze the elapsed time: the run is over."""
        if self.finished is None:
            self.finished = time.monotonic()

    def add(self, outcome: CaptureOutcome) -> None:
        """Count one outcome."""
        self.counts[outcome.status] += 1
        self.operations.add(outcome.operation)
        if outcome.status is CaptureStatus.CAPTURED:
            self.done[outcome.operation] = self.done.get(outcome.operation, 0) + 1
        self.attempts += outcome.attempts
        self.sent += outcome.attempts > 0

    @property
    def items(self) -> int:
        """Outcomes counted so far."""
        return sum(self.counts.values())

    @property
    def retries(self) -> int:
        """Attempts beyond each sent item's first: what faults and rate limits cost."""
        return self.attempts - self.sent

    @property
    def elapsed(self) -> float:
        """Seconds since the run started (until it finished)."""
        end = self.finished if self.finished is not None else time.monotonic()
        return max(end - self.started, 1e-9)

    @property
    def per_second(self) -> float:
        """Items completed per second."""
        return self.items / self.elapsed

    @property
    def all_done(self) -> bool:
        """True when every item was done (captured, refunded, ...) or skipped (exit code 0)."""
        done = self.counts[CaptureStatus.CAPTURED] + self.counts[CaptureStatus.SKIPPED]
        return done == self.items

    def as_dict(self) -> dict[str, object]:
        """The totals as plain JSON values."""
        return {
            **{status.value: count for status, count in self.counts.items()},
            "done": {operation.value: count for operation, count in self.done.items()},
            "items": self.items,
            "attempts": self.attempts,
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "seconds": round(self.elapsed, 3),
            "items_per_second": round(self.per_second, 1),
        }


def bad_line_outcome(bad: BadLine) -> CaptureOutcome:
    """The outcome of a line that was not sent: refused, naming its line number."""
    return CaptureOutcome(
        order_id=bad.order_id or "",
        item_key=f"line {bad.line}",
        status=CaptureStatus.REFUSED,
        idempotency_key="",
        error=bad.error,
    )


#: Operations never sent after a line that could not be read, whatever order that line
#: names (it may have meant this one): they end the authorization, or give money back
#: against captures that line may have meant to add.
_WAIT_FOR_BAD_LINES = frozenset({Operation.REFUND, Operation.RELEASE, Operation.CANCEL})


async def run_batch(
    om: KlarnaOM,
    rows: Iterable[Row] | AsyncIterable[Row],
    *,
    report: Callable[[CaptureOutcome], None],
    concurrency: int,
    journal: Journal | None = None,
) -> None:
    """Run every good row, report every outcome (bad lines as refused), in end order.

    ``rows`` (or an async iterator of them: see ``_reading``) is consumed lazily by
    ``run_many``'s workers; bad lines never reach it, so nothing is sent for them, and
    their outcomes are reported as the batch takes them: at once, for a stream's writer
    may say nothing more for a long while, or a signal end the run, before another item
    ends. A bad line holds its order's later lines back, as ``run_many`` holds back an order's
    later items after one that did not end done: they are reported refused, never sent
    (a release must not follow a capture line that could not be read). A bad line may name
    another order than it means (columns shifted by a missing value or an open quote, bytes
    not in the file's encoding), so after any bad line every later refund, release and
    cancel is held back too, and then its order's later lines with it.
    """
    # Orders whose later lines wait (all of them), and for the first HELD_LISTED why.
    waiting = SeenSet()
    why_waiting: dict[str, str] = {}
    first_bad: int | None = None  # the first bad line
    # Why a line read so far must wait, by line: decided as it is read (a bad line read
    # later must not hold an earlier line), applied by run_many after its duplicate checks.
    holds: dict[int, str] = {}

    def wait(order_id: str, why: str) -> None:
        # add() first: every such order is remembered, only some reasons kept.
        if waiting.add(order_id) and len(why_waiting) < HELD_LISTED:
            why_waiting[order_id] = why

    def admit(row: Row) -> BatchItem | None:
        # The row as an item to run (with why it must wait, if it must), or None for a
        # bad line, reported.
        nonlocal first_bad
        if isinstance(row, BadLine):
            report(bad_line_outcome(row))
            if first_bad is None:
                first_bad = row.line
            if row.order_id is not None:
                wait(row.order_id, f"(line {row.line}) could not be read")
            return None
        line = row.line if row.line is not None else -1
        if row.order_id in waiting:
            reason = why_waiting.get(row.order_id, "could not be read")
            holds[line] = f"an earlier item of order {row.order_id} {reason}"
        elif (
            first_bad is not None
            and (operation := operation_or_none(row.request)) in _WAIT_FOR_BAD_LINES
        ):
            assert operation is not None
            holds[line] = (
                f"line {first_bad} could not be read, and the order it names may be"
                f" misread; a {operation.value} waits until it is fixed"
            )
        return row

    def good_rows() -> Iterator[BatchItem]:
        assert isinstance(rows, Iterable)
        for row in rows:
            if (item := admit(row)) is not None:
                yield item

    async def good_rows_read() -> AsyncIterator[BatchItem]:
        assert isinstance(rows, AsyncIterable)
        async for row in rows:
            if (item := admit(row)) is not None:
                yield item

    def hold(item: BatchItem) -> str | None:
        return holds.pop(item.line if item.line is not None else -1, None)

    items = good_rows_read() if isinstance(rows, AsyncIterable) else good_rows()
    outcomes = om.run_many(items, concurrency=concurrency, journal=journal, hold=hold)
    try:
        async for outcome in outcomes:
            report(outcome)
    finally:
        # On Ctrl-C (cancellation) the generator's cleanup must cancel its workers now,
        # while the journal is still open, not whenever the generator is collected.
        await outcomes.aclose()
        if isinstance(items, AsyncGenerator):
            await items.aclose()
