"""Run many operations concurrently: bounded workers, one outcome per item, optional journal.

One engine for every money-moving operation: an item's ``request`` names what it does
(capture, refund, release, extend, cancel; see :mod:`klarna_om_async.operations`), and the
journal records the operation with the item. ``capture_many`` is this engine restricted to
captures; ``run_many`` runs any mix.

Exactly-once rests on the journal: it decides each item's idempotency key before the first
attempt (and records it durably), keeps an item whose outcome is unknown on that same key so
Klarna replays its first answer instead of capturing twice, refuses an item that changed
since it was journaled, and has an item whose key Klarna may have forgotten reconciled
against the order instead of resent.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import hashlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeAlias

import attrs
import orjson

from ._convert import to_json
from ._keys import check_idempotency_key, fresh_key, key_time_left, random_key
from ._klarna_clock import KlarnaClock, clock_skew, in_utc
from ._seen import SeenSet
from .captures import CapturesService
from .config import MAX_CONCURRENCY, MIN_BUSY_WAIT, check_count
from .errors import (
    AuthenticationError,
    ClockSkewError,
    IdempotencyKeyReusedError,
    ItemConflictError,
    KlarnaAPIError,
    KlarnaConnectionError,
    KlarnaError,
    NeedsReviewError,
    RateLimitError,
    ValidationError,
)
from .journal import (
    DEFAULT_KEY_MAX_AGE,
    Claim,
    ClaimAction,
    ItemRecord,
    Journal,
    JournalEntry,
    JournalStatus,
    _conflict,
    _end_run,
    _finish_change,
    _start_run,
)
from .models import CaptureRequest, RefundRequest
from .operations import (
    Operation,
    OperationRequest,
    Services,
    amount_of,
    operation_of,
    operation_or_none,
    reference_of,
    send,
)
from .orders import OrdersService
from .reconcile import DEFAULT_CLOCK_SKEW, Verdict, order_shows, reconcile_entry
from .throttle import ThrottleRefusal, rate_limited

__all__ = (
    "DEFAULT_CONCURRENCY",
    "MAX_CLOCK_SKEW",
    "NOT_SENT_LISTED",
    "BatchAbortedError",
    "BatchItem",
    "BatchListener",
    "BatchOutcome",
    "BatchProgress",
    "BatchStart",
    "BatchWatch",
    "CaptureOutcome",
    "CaptureStatus",
    "ItemHeldBackError",
    "ItemSource",
    "batch_listeners",
    "capture_many",
    "current_batch",
    "request_fingerprint",
    "run_many",
)


class CaptureStatus(enum.StrEnum):
    """How one batch item ended, whatever its operation (the journal stores these values)."""

    #: Klarna booked it (now, or in an earlier run whose answer was lost): for a refund,
    #: refunded; a release, released; and so on (``Operation.done`` says the word).
    CAPTURED = "captured"
    #: Refused before or by Klarna (validation, a duplicate in this batch, a 4xx): nothing was
    #: captured under this item's key. Also an item changed since the journal recorded it
    #: done: nothing was sent now; its error names what the journal holds under its key.
    REFUSED = "refused"
    #: The outcome is unknown, or Klarna stayed busy (429) until the deadline: rerun with the
    #: same key (the journal does). Also an item changed since its send under its key, whose
    #: outcome is unknown: not sent now; reconcile (or restore the line) before rerunning.
    FAILED = "failed"
    #: Not attempted: already captured in an earlier run (says the journal).
    SKIPPED = "skipped"
    #: Reconciliation could not decide whether it was captured: never sent; a person decides.
    NEEDS_REVIEW = "needs_review"


#: Items in a row that could not connect (nothing sent) before a batch stops.
UNREACHABLE_ITEMS = 3

#: How many held-back orders keep the detail of what held them (the line and item); the
#: rest are still held, with a shorter message (a million failures must not hold a million).
HELD_LISTED = 10_000

#: How an item ends that holds its order's later items back in ``run_many``.
_HOLDS = frozenset({CaptureStatus.FAILED, CaptureStatus.REFUSED, CaptureStatus.NEEDS_REVIEW})


#: How many of the items a stopped batch did not send ``BatchAbortedError.not_sent`` names.
NOT_SENT_LISTED = 1000

#: How far a journal's clock may be from Klarna's before a journaled batch stops sending
#: (``ClockSkewError``): the error reconciliation allows (its ``clock_skew``).
MAX_CLOCK_SKEW = DEFAULT_CLOCK_SKEW


class BatchAbortedError(KlarnaError):
    """A batch stopped early on a failure that would hit every item; rerun once it is fixed.

    Raised by ``capture_many`` after it has yielded the outcome of every item it started.
    ``cause`` is the error that stopped it: an ``AuthenticationError`` (401: every item would
    be refused), the ``KlarnaConnectionError`` of the last of ``UNREACHABLE_ITEMS`` items in
    a row that could not connect (nothing sent), or a ``ClockSkewError`` (the journal's clock
    is more than ``MAX_CLOCK_SKEW`` from Klarna's; that item was not sent). A plain iterable
    (a list, a file read on the loop) was then read to its end without sending anything:
    ``not_sent_count`` counts those items and ``not_sent`` names the first
    ``NOT_SENT_LISTED`` of them (by ``item_key``; a batch of a million items must not hold a
    million names). An async iterable is read no further (``not_sent_count`` is None,
    ``not_sent`` empty): its reads may wait without end (a stream whose producer never
    closes it, a queue consumer), so a read in progress is cancelled, and what it did not
    yield stays with its source (a source read once should lose nothing to a cancelled
    read, as ``asyncio.Queue.get`` does; a read handed to a thread, ``run_in_executor``,
    loses what the thread takes after the cancellation).
    Items not sent were never claimed in the journal, so a rerun of the same source sends
    them as new items, each exactly once, and skips the items already captured.
    """

    def __init__(
        self,
        cause: KlarnaError,
        not_sent: tuple[str, ...],
        not_sent_count: int | None = None,
        *,
        source_read: bool = True,
    ) -> None:
        #: The failure that stopped the batch.
        self.cause = cause
        #: ``item_key`` of the first ``NOT_SENT_LISTED`` items the batch did not send, in
        #: source order (empty when the source was not read to its end).
        self.not_sent = not_sent
        #: How many items the batch did not send; None when the rest of the source (an async
        #: iterable) was not read.
        self.not_sent_count: int | None = (
            None if not source_read else len(not_sent) if not_sent_count is None else not_sent_count
        )
        unsent = (
            "the rest of the source was not read"
            if self.not_sent_count is None
            else f"{self.not_sent_count} items not sent"
        )
        super().__init__(f"stopped: {self.reason}; {unsent}; {self.advice}")

    @property
    def reason(self) -> str:
        """Why the batch stopped, in a few words."""
        if isinstance(self.cause, AuthenticationError):
            return "Klarna refused the credentials (401)"
        if isinstance(self.cause, ClockSkewError):
            return self.cause.measured
        cause = str(self.cause).rstrip(".")
        return f"{UNREACHABLE_ITEMS} items in a row could not connect: {cause}"

    @property
    def advice(self) -> str:
        """What to do before the rerun."""
        if isinstance(self.cause, AuthenticationError):
            return "fix the credentials and rerun"
        if isinstance(self.cause, ClockSkewError):
            return self.cause.advice
        return "check the base URL, proxy and network, then rerun"


class ItemHeldBackError(ItemConflictError):
    """A batch item not sent because an earlier item of its order in this run did not end
    done (its outcome is unknown, it was refused, or it needs review).

    ``run_many`` runs one order's items in turn: "capture the last part, then release the
    rest" must never release while that capture is unknown or refused. The item is not
    claimed in the journal (no key is spent); rerun once the earlier item is settled.
    ``outcome_unknown`` is True only when this item's own earlier send (in an earlier run)
    is still unknown under ``idempotency_key``.
    """

    def __init__(
        self, message: str, *, item_key: str, idempotency_key: str | None, unknown: bool = False
    ) -> None:
        super().__init__(message, item_key=item_key, idempotency_key=idempotency_key)
        self._unknown = unknown

    @property
    def outcome_unknown(self) -> bool:
        """True when this item's own earlier send is still unknown (see the class)."""
        return self._unknown


def _where(item: BatchItem) -> str:
    """Where ``item`` is, for a message: its line (if any) and ``item_key``."""
    where = f"item_key {item.item_key!r}"
    return where if item.line is None else f"line {item.line}, {where}"


def _reason(value: object) -> str | None:
    """``hold``'s answer: None, or a reason to hold the item back (a non-empty string)."""
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    raise TypeError(
        f"hold must return None or a non-empty reason string, got {value!r}"
        " (an async hold is not supported)"
    )


def _trimmed(value: str) -> str:
    # Only strings are trimmed; anything else is left for the endpoint to refuse by name.
    return value.strip() if isinstance(value, str) else value


def _optional_key(_item: object, _attribute: object, key: str | None) -> None:
    if key is not None:
        check_idempotency_key(key)


@attrs.frozen(kw_only=True)
class BatchItem:
    """One operation to run on an order; the ``request``'s type names the operation.

    ``CaptureRequest`` captures, ``RefundRequest`` refunds, and the markers
    ``ReleaseRemainingAuthorization()``, ``ExtendAuthorizationTime()`` and ``CancelOrder()``
    release, extend and cancel (see :mod:`klarna_om_async.operations`).
    """

    #: Surrounding whitespace is trimmed, as on every input path: " X" is the item "X".
    order_id: str = attrs.field(converter=_trimmed)
    request: OperationRequest
    #: Fix the key yourself (e.g. ``deterministic_key(...)``) when you keep no journal;
    #: 1 to 255 printable ASCII characters (``ValidationError`` otherwise).
    idempotency_key: str | None = attrs.field(default=None, validator=_optional_key)
    #: The item's identity in the journal; an order captured in several parts needs a
    #: distinct ``reference`` per part. The default is ``order_id`` or ``order_id:reference``
    #: for a capture (as always), ``operation:order_id[:reference]`` for the others (e.g.
    #: ``refund:o1:RMA-7``), so a refund of an order captured in the same journal is its own
    #: item.
    item_key: str = attrs.field()

    #: Where the item came from (e.g. its line in a batch file), handed back on its outcome.
    line: int | None = attrs.field(default=None, eq=False)

    @item_key.default
    def _default_item_key(self) -> str:
        # A blank reference is none, and " box" is "box": one capture, one item, whatever
        # the spaces a spreadsheet left. Anything that is no operation is refused when run;
        # its key is made as a capture's always was.
        operation = operation_or_none(self.request)
        if operation is None or operation is Operation.CAPTURE:
            # Anything else is refused when run, on its own outcome.
            reference = _reference(getattr(self.request, "reference", None))
            return f"{self.order_id}:{reference}" if reference else self.order_id
        reference = _reference(reference_of(self.request))
        key = f"{operation.value}:{self.order_id}"
        return f"{key}:{reference}" if reference else key

    @property
    def operation(self) -> Operation:
        """What the item does, from its request's type (``TypeError`` for another type)."""
        return operation_of(self.request)


@attrs.frozen(kw_only=True)
class CaptureOutcome:
    """The result of one batch item, of any operation; nothing is ever silently dropped.

    ``status`` ``captured`` means Klarna booked the item's operation, whichever it is (the
    value stays "captured": journals and scripts rely on it; ``operation.done`` gives the
    word, e.g. "refunded").
    """

    order_id: str
    item_key: str
    status: CaptureStatus
    #: The key the item was (or would be) sent with: resend with it to retry safely.
    idempotency_key: str
    #: The capture made, for a capture item.
    capture_id: str | None = None
    #: Why the item was refused or failed (``error.outcome_unknown`` says if money may have moved).
    error: Exception | None = None
    #: HTTP attempts made in this run.
    attempts: int = 0
    #: The item's ``line`` (e.g. in a batch file), if it had one.
    line: int | None = attrs.field(default=None, eq=False)
    #: What the item did (capture for an item whose request is no operation).
    operation: Operation = Operation.CAPTURE
    #: The refund made, for a refund item.
    refund_id: str | None = None

    @property
    def created_id(self) -> str | None:
        """The id the item created: ``capture_id`` or ``refund_id`` (None for the others)."""
        return self.refund_id if self.operation is Operation.REFUND else self.capture_id


#: ``CaptureOutcome`` under the name that fits every operation.
BatchOutcome: TypeAlias = CaptureOutcome


@attrs.frozen
class BatchProgress:
    """Running totals of a batch, passed to ``on_progress`` after each outcome."""

    done: int = 0
    captured: int = 0
    refused: int = 0
    failed: int = 0
    skipped: int = 0
    needs_review: int = 0

    def add(self, status: CaptureStatus) -> BatchProgress:
        """These totals with one more outcome of ``status``."""
        counts = attrs.asdict(self)
        counts[status.value] += 1
        counts["done"] += 1
        return BatchProgress(**counts)


@attrs.frozen(eq=False)
class BatchStart:
    """A batch as it starts, as :data:`batch_listeners` see it."""

    #: The services the batch sends through (whose client runs it).
    services: Services
    #: The one operation the batch accepts (``capture_many``: capture), or None (``run_many``).
    only: Operation | None
    #: Items in flight at most.
    concurrency: int
    journal: Journal | None


class BatchWatch(Protocol):
    """What a batch listener watches one batch with (see :data:`batch_listeners`)."""

    def outcome(self, outcome: CaptureOutcome) -> None:
        """Called with each item's outcome as it is yielded."""

    def ended(self, error: BaseException | None) -> None:
        """Called once when the batch ends: ``error`` is what ended it, if anything did
        (``BatchAbortedError``, the source's or journal's error, ``GeneratorExit`` when the
        consumer stopped early, ``CancelledError``), or None when every item ended."""


#: Called with a ``BatchStart`` as each batch starts; returns a ``BatchWatch`` or None.
BatchListener: TypeAlias = Callable[[BatchStart], BatchWatch | None]

#: Hooks for observers of batches (``klarna_om_async.telemetry.instrument`` adds one).
#: Empty by default, and then a batch does no work for them: with no listener, or none that
#: returns a watch, nothing is called per item and :data:`current_batch` is never set. A
#: listener must not raise; it runs in the task that iterates the batch.
batch_listeners: list[BatchListener] = []

#: The watches of the batch whose worker runs the current code (empty outside any watched
#: batch): set in the batch's worker tasks only, never in the task that iterates the batch.
#: ``telemetry`` reads it to make each item's call span the root of a trace of its own,
#: linked to the batch's span.
current_batch: contextvars.ContextVar[tuple[BatchWatch, ...]] = contextvars.ContextVar(
    "klarna_om_async.batch.current_batch", default=()
)


ItemSource: TypeAlias = (
    Iterable[BatchItem | tuple[str, OperationRequest]]
    | AsyncIterable[BatchItem | tuple[str, OperationRequest]]
)


def _as_item(raw: BatchItem | tuple[str, OperationRequest]) -> BatchItem:
    if isinstance(raw, BatchItem):
        return raw
    order_id, request = raw
    return BatchItem(order_id=order_id, request=request)


#: Captures in flight by default: enough to reach Klarna's 200 requests/s at 150-400 ms per
#: capture (R x latency, with room), while the client's pace (or the batch's ``rate_limit``)
#: keeps the rate. More in flight costs only memory and sockets.
DEFAULT_CONCURRENCY = 128


def request_fingerprint(order_id: str, request: OperationRequest) -> str:
    """A digest of what decides the money an item moves: operation, order, amount,
    reference, lines. A capture's digest is the one journals have always kept (it names no
    operation), so journals written before operations were recorded keep matching."""
    if isinstance(request, CaptureRequest):
        lines = request.order_lines
        payload = orjson.dumps([order_id, request.captured_amount, request.reference])
    elif isinstance(request, RefundRequest):
        lines = request.order_lines
        payload = orjson.dumps(
            [Operation.REFUND.value, order_id, request.refunded_amount, request.reference]
        )
    else:
        lines = None
        payload = orjson.dumps([operation_of(request).value, order_id])
    if lines:
        payload += to_json(lines)
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def _status_of(error: Exception) -> CaptureStatus:
    if isinstance(error, KlarnaError) and error.earlier_attempt_unknown:
        # An earlier send under the key may have booked (a ValidationError for a key reused
        # with another request too: helper-91), whatever this attempt met.
        return CaptureStatus.FAILED
    if isinstance(error, ValidationError | TypeError):
        return CaptureStatus.REFUSED  # nothing was sent
    if isinstance(error, RateLimitError):
        # Busy until the deadline: nothing was refused; a rerun sends it (with the same key).
        return CaptureStatus.FAILED
    if isinstance(error, KlarnaError) and not error.outcome_unknown:
        return CaptureStatus.REFUSED  # Klarna said no: nothing booked
    # Unknown, even for a 4xx: an earlier attempt whose answer was lost may have been booked.
    return CaptureStatus.FAILED


class _Unrecorded(Exception):
    """The journal failed after a sent item's answer (recording or confirming it): the
    ``outcome`` is reported, then the run stops."""

    def __init__(self, outcome: CaptureOutcome, error: BaseException) -> None:
        super().__init__(outcome, error)
        self.outcome = outcome
        self.error = error


def _stop_if_cancelled() -> None:
    """Raise ``CancelledError`` if this worker is being cancelled.

    A part (a journal, a source) that swallowed the cancellation must not make the worker
    start an item after the batch stopped, or wait on a queue nobody reads any more.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _unfinished(item: BatchItem, error: BaseException) -> CaptureOutcome:
    """The outcome of ``item`` when a part of the batch (its journal, hold) failed while
    running it, before any answer of Klarna's to this run: unknown (``failed``), for the
    journal may hold it from an earlier run; the rerun with the journal finishes it."""
    cause = error if isinstance(error, Exception) else RuntimeError(repr(error))
    return _outcome(item, CaptureStatus.FAILED, item.idempotency_key or "", error=cause)


async def _with_journaled_key(outcome: CaptureOutcome, journal: Journal) -> CaptureOutcome:
    """``outcome`` with the key its item holds in ``journal`` from an earlier run, if any
    (and if the journal can still be read); a refused item's key is done with."""
    with contextlib.suppress(Exception):
        for entry in await journal.entries(item_key=outcome.item_key):
            if entry.status is not JournalStatus.REFUSED:
                return attrs.evolve(outcome, idempotency_key=entry.idempotency_key)
    return outcome


@attrs.define
class _OrderLock:
    lock: asyncio.Lock = attrs.Factory(asyncio.Lock)
    users: int = 0


class _Run:
    """The shared state of one ``capture_many``/``run_many`` call, used by its worker tasks."""

    def __init__(
        self,
        services: Services,
        items: ItemSource,
        journal: Journal | None,
        outcomes: asyncio.Queue[CaptureOutcome | None],
        *,
        only: Operation | None = None,
        in_order: bool = False,
        hold: Callable[[BatchItem], str | None] | None = None,
    ) -> None:
        self.services = services
        self.orders = services.orders
        self.journal = journal
        self.outcomes = outcomes
        #: The one operation this run accepts (``capture_many``), or None for any.
        self.only = only
        #: One order's items run one at a time, in source order (``run_many``).
        self.in_order = in_order
        #: The caller's reason to hold an item back, if any (``run_many``'s ``hold``).
        self.hold = hold
        # Compact sets: a batch of a million items must not hold a million strings.
        self.seen = SeenSet()
        self.seen_keys = SeenSet()
        # Names this run's claims: items of an order another run left unknown are held back.
        self.run_id = random_key()
        # One order's reconciliations run in turn, so none takes a capture another was given.
        # An order's lock lives only while someone holds or awaits it.
        self.reconciling: dict[str, _OrderLock] = {}
        # With ``in_order``: the order's items in turn (a refund after its capture).
        self.sending: dict[str, _OrderLock] = {}
        # With ``in_order``: orders whose earlier item in this run did not end done; their
        # later items are held back. What held the first ``HELD_LISTED`` of them, by order.
        self.held = SeenSet()
        self.held_by: dict[str, str] = {}
        #: Orders held back only because Klarna was busy (429s until the deadline).
        self.held_busy = SeenSet()
        self.error: BaseException | None = None
        # The worker tasks, each added as it starts (see _raised_by_a_part).
        self._workers: set[asyncio.Task[Any]] = set()
        #: Set when the batch must stop early (see ``BatchAbortedError``).
        self.abort: KlarnaError | None = None
        self._unreachable = 0
        # Klarna's time, as the client's answers tell it, and the journal's clock, to check
        # it against (see _claim); one read of an order at a time to learn Klarna's; why it
        # could not be learned.
        self._klarna_clock: KlarnaClock | None = getattr(self.orders, "klarna_clock", None)
        self._journal_clock: Callable[[], datetime] | None = getattr(journal, "clock", None)
        self._learning_time = asyncio.Lock()
        self._no_time: ClockSkewError | None = None
        # Reads of Klarna's time begun, and the number of the last that told it (-1: none).
        self._reads = 0
        self._last_read = -1
        if isinstance(items, AsyncIterable):
            self._aiter: AsyncIterator[BatchItem | tuple[str, OperationRequest]] | None = aiter(
                items
            )
            self._lock = asyncio.Lock()  # an async generator must not be advanced concurrently
            self._dry = False  # the async source said it has no more items
            # The worker waiting for the async source's next item, if any; and the one whose
            # wait the batch cut short as it stopped (see _stop_reading).
            self._reading: asyncio.Task[Any] | None = None
            self._cut: asyncio.Task[Any] | None = None
        else:
            self._iter = iter(items)
            self._aiter = None

    def _stopped(self) -> bool:
        return self.error is not None or self.abort is not None

    def _raised_by_a_part(self, error: BaseException) -> bool:
        """Whether a part of the batch (its source, journal or hold) raised ``error`` itself.

        Only in one of this run's workers, running in its own task, and not while that is
        being cancelled, whatever a part made of the cancellation (the batch's end waits
        for its workers, and one that waited to put an outcome in the full queue was never
        done); never ``KeyboardInterrupt`` or ``SystemExit``, which stop it at once. Not in
        a worker's coroutine closed from elsewhere (its loop gone: ``GeneratorExit``).
        Anything else (an ``Exception``, a stray ``CancelledError`` or ``GeneratorExit``,
        another ``BaseException``) stops the run and is raised at its end: a worker that
        died of it put no end-of-work mark, and the batch waited for it forever.
        """
        if isinstance(error, KeyboardInterrupt | SystemExit):
            return False
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no loop runs: a worker's coroutine is being closed
            return False
        return task in self._workers and not task.cancelling()

    async def _next_item(self) -> BatchItem | None:
        if self._stopped():
            return None
        if self._aiter is None:
            # A plain iterator's next item without a coroutine: this runs once per item.
            raw = next(self._iter, None)
        else:
            async with self._lock:
                if self._stopped():  # while this worker waited for its turn at the source
                    return None
                self._reading = task = asyncio.current_task()
                try:
                    raw = await anext(self._aiter, None)
                except (asyncio.CancelledError, Exception):
                    # Cut: the batch stopped while the source had nothing yet (a source may
                    # turn the cancellation into an error of its own). Nothing else is read.
                    if self._uncut(task):
                        return None
                    raise
                finally:
                    self._reading = None
                if self._cut is task:
                    # The source took the cut for its end (not run dry), or swallowed it and
                    # made an item, which is run as below.
                    self._uncut(task)
                elif raw is None:
                    self._dry = True
            # An item the source made as the run stopped is run all the same, as one taken
            # before it: a source read once must not lose it. (A wait for an item it has not
            # made yet is cut short: see _stop_reading.)
            _stop_if_cancelled()
        return None if raw is None else _as_item(raw)

    async def work(self) -> None:
        """Take items until the source runs dry; put one outcome per item, then a None."""
        outcomes = self.outcomes
        # Added here, not by whoever made the task: an eager task (Python 3.12+) runs this
        # before create_task returns, and may fail at once.
        if (task := asyncio.current_task()) is not None:
            self._workers.add(task)
        item: BatchItem | None = None  # the item being run, until its outcome is out
        try:
            while (item := await self._next_item()) is not None:
                if self.in_order:
                    # Taken in source order with no await before the lock is asked for, so
                    # the (FIFO) lock hands an order's items out in source order.
                    async with _locked(self.sending, item.order_id):
                        try:
                            outcome = await self._run_item(item)
                        except BaseException:
                            # No outcome, or none journaled (a broken journal or hold, a
                            # cancellation): the order's items waiting for this lock must
                            # not go either.
                            if self.held.add(item.order_id) and len(self.held_by) < HELD_LISTED:
                                self.held_by[item.order_id] = (
                                    f"an earlier item of order {item.order_id} ({_where(item)})"
                                    " ended without its outcome in the journal"
                                )
                            raise
                        self._hold(item, outcome)
                else:
                    outcome = await self._run_item(item)
                item = None
                self._watch(outcome)
                if outcomes.full():
                    _stop_if_cancelled()
                    await outcomes.put(outcome)
                else:
                    outcomes.put_nowait(outcome)  # no coroutine when there is room
        except BaseException as error:  # a broken source or journal: stop taking new items
            if not self._raised_by_a_part(error):
                raise  # this worker is cancelled, or the process is stopping
            stop: BaseException = error
            if isinstance(error, _Unrecorded):
                # Sent and answered, but not journaled (the journal keeps it in flight with
                # its key, so a rerun resends that key): the caller still learns what Klarna
                # did, or a summary would undercount the money moved.
                await outcomes.put(error.outcome)
                stop = error.error
            elif item is not None:
                # Its journal or hold failed before it was sent: an item read from a source
                # read once must still reach the caller, with the key an earlier run may
                # have sent it under (the one that makes a retry safe).
                unfinished = _unfinished(item, error)
                if not unfinished.idempotency_key and self.journal is not None:
                    unfinished = await _with_journaled_key(unfinished, self.journal)
                await outcomes.put(unfinished)
            if self.error is None:
                self.error = stop
                self._stop_reading()
        # Every worker ends with a None, or the batch waits for it forever.
        _stop_if_cancelled()
        await outcomes.put(None)

    def _watch(self, outcome: CaptureOutcome) -> None:
        """Stop taking items after a failure that every item would meet."""
        error = outcome.error
        if isinstance(error, AuthenticationError | ClockSkewError):
            self.abort = self.abort or error
            self._stop_reading()
        elif isinstance(error, KlarnaConnectionError) and not error.outcome_unknown:
            self._unreachable += 1
            if self._unreachable >= UNREACHABLE_ITEMS:
                self.abort = self.abort or error
                self._stop_reading()
        elif outcome.attempts:
            self._unreachable = 0  # Klarna answered (or may have): the host is reachable

    def _stop_reading(self) -> None:
        """Cut short a worker's wait for the async source's next item: the batch stopped.

        A source's read may wait without end (a stream whose producer is silent, a queue
        consumer); the batch waited for it, then ran the item it made. The wait is
        cancelled instead (``CancelledError`` at the source's ``await``, as ``aclose()``
        does): what the source had not yet made stays with it.
        """
        reading = self._reading if self._aiter is not None else None
        if reading is not None and reading is not asyncio.current_task() and self._cut is None:
            self._cut = reading
            reading.cancel()

    def _uncut(self, task: asyncio.Task[Any] | None) -> bool:
        """Take back the cut of ``task``'s wait; whether nothing else cancels it."""
        if task is None or self._cut is not task:
            return False
        self._cut = None
        return not task.uncancel()

    def not_sent(self) -> tuple[tuple[str, ...], int] | None:
        """Read the rest of the source without sending: the first ``item_key``s and the count.

        None for an async source not yet run dry: it is not read further, as its reads may
        wait without end (see ``BatchAbortedError``).
        """
        if self._aiter is not None:
            return None if not self._dry else ((), 0)
        keys: list[str] = []
        count = 0
        while (raw := next(self._iter, None)) is not None:
            count += 1
            if len(keys) < NOT_SENT_LISTED:
                try:
                    keys.append(_as_item(raw).item_key)
                except (TypeError, ValueError, AttributeError):
                    keys.append(repr(raw)[:80])
        return tuple(keys), count

    def _duplicate(self, item: BatchItem) -> CaptureOutcome | None:
        """Refuse an item whose key or idempotency key an earlier item of this batch has."""
        key_name = item.item_key
        key = item.idempotency_key
        if key is None:
            if self.seen.add(key_name):
                return None  # the common case: one lookup
        elif key_name not in self.seen:
            if self.seen_keys.add(key):
                self.seen.add(key_name)
                return None
            # Klarna would replay the first item's answer for the second: one capture, two
            # "captured" reports. This item_key stays unmarked: a later item of it with a key
            # of its own is taken.
            why = (
                f"{key!r} is given to two items of this batch; each {_operation_name(item)}"
                " needs its own key"
            )
            error = ValidationError("idempotency_key", why)
            return _outcome(item, CaptureStatus.REFUSED, "", error=error)
        # Refused, not skipped: the caller meant two captures or made a typo, and a batch
        # that "succeeds" would hide the part never captured.
        operation = operation_or_none(item.request) or Operation.CAPTURE
        why = f"{key_name!r} appears twice in this batch; " + (
            f"give each part of a split {operation.value} its own reference"
            if operation in (Operation.CAPTURE, Operation.REFUND)
            else f"an order is {operation.done} once"  # these take no reference
        )
        return _outcome(item, CaptureStatus.REFUSED, "", error=ValidationError("item_key", why))

    def _unaccepted(self, item: BatchItem, operation: Operation | None) -> CaptureOutcome | None:
        """Refuse an item this run cannot run (not an operation, or not the run's one).

        ``operation`` is ``operation_or_none(item.request)``, looked up once per item.
        """
        if operation is None:
            try:
                operation = item.operation  # raises the TypeError that names the types
            except TypeError as error:
                return _outcome(item, CaptureStatus.REFUSED, "", error=error)
        if self.only is not None and operation is not self.only:
            other = TypeError(
                f"capture_many runs captures only; run a {operation.value} (a"
                f" {type(item.request).__name__}) with om.run_many"
            )
            return _outcome(item, CaptureStatus.REFUSED, "", error=other)
        return None

    def _hold(self, item: BatchItem, outcome: CaptureOutcome) -> None:
        """Hold back the order's later items if ``outcome`` did not end done."""
        if outcome.status not in _HOLDS or not self.held.add(item.order_id):
            return  # done, or already held (the first cause is the one named)
        error = outcome.error
        if isinstance(error, RateLimitError) and not error.outcome_unknown:
            self.held_busy.add(item.order_id)
        if len(self.held_by) < HELD_LISTED:
            self.held_by[item.order_id] = (
                f"an earlier item of order {item.order_id} ({_where(item)}) ended"
                f" {outcome.status.value}"
            )

    async def _run_item(self, item: BatchItem) -> CaptureOutcome:
        refused = self._duplicate(item)
        if refused is not None:
            return refused
        operation = operation_or_none(item.request)
        refused = self._unaccepted(item, operation)
        if refused is not None:
            return refused
        assert operation is not None  # refused above otherwise
        # After the duplicate checks, so a held item still takes its item_key and key.
        hold = None if self.hold is None else _reason(self.hold(item))
        if hold is not None and self.held.add(item.order_id) and len(self.held_by) < HELD_LISTED:
            # Whatever the journal says of this item (even done), its order waits with it.
            self.held_by[item.order_id] = (
                f"an earlier item of order {item.order_id} ({_where(item)}) was held back: {hold}"
            )
        if self.in_order and item.order_id in self.held and hold is None:
            why = self.held_by.get(item.order_id) or (
                f"an earlier item of order {item.order_id} did not end done"
            )
            busy = item.order_id in self.held_busy
            return await _held_back_outcome(item, why, self.journal, busy=busy)
        if hold is not None:
            return await _held_back_outcome(item, hold, self.journal)
        journal = self.journal
        if journal is None:
            if item.idempotency_key is not None:
                return await self._send(item, item.idempotency_key, operation)
            return await self._send(item, random_key(), operation, fresh=True)
        try:
            record = _record(item, operation)
        except (TypeError, AttributeError, ValueError) as error:  # a malformed request
            return _outcome(item, CaptureStatus.REFUSED, "", error=error)
        claim = await self._claim(item, record, journal)
        if isinstance(claim, CaptureOutcome):
            return claim
        if claim.action is ClaimAction.RECONCILE:
            outcome = await self._reconcile(item, claim, journal)
            if outcome is not None:
                return outcome
            # Proven never booked: the item takes a new key and is sent.
            claim = await self._claim(item, record, journal)
            if isinstance(claim, CaptureOutcome):
                return claim
        return await self._act(item, claim, journal)

    async def _act(self, item: BatchItem, claim: Claim, journal: Journal) -> CaptureOutcome:
        entry = claim.entry
        key = entry.idempotency_key
        match claim.action:
            case ClaimAction.SEND:
                # A key the journal just made is new to Klarna; one the item brought, or an
                # earlier run sent, may not be.
                fresh = item.idempotency_key is None and not entry.uncertain
                outcome = await self._send(
                    item, key, item.operation, _time_left(claim), fresh=fresh
                )
                if entry.uncertain and isinstance(outcome.error, KlarnaError):
                    # An earlier run's send under this key may have booked it: whatever
                    # this send met, the outcome is unknown (its error must say so).
                    outcome.error.earlier_attempt_unknown = True
                status = JournalStatus(outcome.status.value)
                try:
                    recorded = await journal.finish(
                        item.item_key,
                        status,
                        capture_id=outcome.created_id,
                        error=None if outcome.error is None else str(outcome.error),
                        attempts=outcome.attempts,
                    )
                except BaseException as failure:
                    if not self._raised_by_a_part(failure):
                        raise
                    # Reported as the journal would have recorded it.
                    change = _finish_change(entry.status, entry.uncertain, status, False)
                    if change is not None and change[0] is not status:
                        outcome = attrs.evolve(outcome, status=CaptureStatus(change[0].value))
                    raise _Unrecorded(outcome, failure) from failure
                if (
                    recorded is JournalStatus.FAILED
                    and outcome.status is CaptureStatus.REFUSED
                    and item.operation in _PROVEN_BY_ORDER
                ):
                    # Klarna refuses a release or cancel repeated after it took effect; the
                    # order's state says whether the earlier, uncertain send did.
                    try:
                        done = await self._confirm(item, journal)
                    except BaseException as failure:
                        if not self._raised_by_a_part(failure):
                            raise
                        unknown = attrs.evolve(outcome, status=CaptureStatus.FAILED)
                        raise _Unrecorded(unknown, failure) from failure
                    if done is not None:
                        return attrs.evolve(done, attempts=outcome.attempts)
                # The journal knows more than this run: a refusal after an uncertain send
                # proves nothing, so it stays failed (unknown).
                if recorded is status:
                    return outcome  # as this run saw it (the common case: nothing to copy)
                return attrs.evolve(outcome, status=CaptureStatus(recorded.value))
            case ClaimAction.SKIP:
                return _outcome(item, CaptureStatus.SKIPPED, key, created_id=entry.capture_id)
            case ClaimAction.REVIEW:
                evidence = entry.error or "needs review"
                error = NeedsReviewError(evidence, order_id=item.order_id, idempotency_key=key)
                return _outcome(item, CaptureStatus.NEEDS_REVIEW, key, error=error)
            case _:  # CONFLICT (RECONCILE was handled by the caller)
                return _conflict_outcome(item, claim)

    async def _claim(
        self, item: BatchItem, record: ItemRecord, journal: Journal
    ) -> Claim | CaptureOutcome:
        """``journal``'s claim of ``item``, by a clock checked against Klarna's (see
        ``_checked_claim``); the item's outcome instead when it cannot be made."""
        try:
            # Klarna's time first: a read cut short (Ctrl-C) leaves nothing claimed, and so no
            # key dated by a clock that may be off.
            unknown = await self._klarna_time(item)
            if unknown is not None:
                return await _unclaimed_outcome(item, unknown, journal, record)
            return await self._checked_claim(item, record, journal)
        except ValidationError as error:
            # Its order id can be neither sent nor read for Klarna's time: refused, as its
            # send would be (helper-87: a first item's bad id stopped a batch whose clock is
            # right), or as the journal holds it.
            return await _unclaimed_outcome(item, error, journal, record)

    async def _checked_claim(
        self, item: BatchItem, record: ItemRecord, journal: Journal
    ) -> Claim | CaptureOutcome:
        """``journal``'s claim of ``item``; the item's outcome instead when the journal's
        clock, which dates the claim, is more than ``MAX_CLOCK_SKEW`` from Klarna's.

        The journal judges by such dates whether Klarna still remembers an item's key (an
        earlier run's key is resent only while it is young, else reconciled), and which of
        an order's captures could be the key's. So the clock is checked before the claim
        against Klarna's time as the client's latest answer tells it (HTTP ``Date``, moved
        on by the client's clock), and nothing is claimed by a clock that is off: a claim
        cut short (Ctrl-C, a crash) would keep its date. A clock that seems off is checked
        again against a fresh answer (the last one may be old: a machine that slept)
        before the batch stops. A claim that sends or reconciles is checked once more when
        it returns; a claim to send is then recorded refused (failed, if an earlier run sent
        its key) before the clock is read again.
        """
        for _ in range(2):  # once more when the clock moved while the journal claimed
            off = None if self._clock_fits() else await self._klarna_time(item, fresh=True)
            if off is not None:
                return await _unclaimed_outcome(item, off, journal, record)
            reads = self._reads
            claim = await journal.claim(
                record, item.idempotency_key or random_key(), run_id=self.run_id
            )
            _stop_if_cancelled()
            if claim.action not in _DATED:
                return claim
            if self._claim_fits(claim):
                if not (claim.action is ClaimAction.SEND and claim.entry.uncertain):
                    return claim
                # An earlier run's key resent: whether Klarna still remembers it rests on the
                # journal's clock now, so it is checked against a read begun after the claim.
                # The last answer may predate a pause that held this machine's clocks too (a
                # snapshot restored): both then agree, and a key Klarna forgot looks young
                # (helper-87: booked twice); so may one arriving after it (helper-89).
                began = self.services.clock()
                late = await self._klarna_time(item, since=reads)
                if late is None:
                    if claim.key_time_left is None:
                        return claim
                    # The key aged while Klarna's time was read (429s, 5xx: helper-90 sent
                    # it past key_max_age, booked twice), by the client's clock or, if more
                    # (a pause held the client's: helper-91), the journal's, just checked.
                    spent = self.services.clock() - began
                    if self._journal_clock is not None:
                        aged = in_utc(self._journal_clock()) - claim.entry.updated_at
                        spent = max(spent, aged.total_seconds())
                    return attrs.evolve(claim, key_time_left=claim.key_time_left - spent)
                seen = late
            else:
                seen = self._clock_error()  # as found at the claim, for the message
            entry = claim.entry
            status = _unsettled_status(entry)
            if claim.action is ClaimAction.SEND:
                # An earlier run's send stays unknown (failed), with what it met.
                why = "not sent: the journal's clock seemed off Klarna's"
                recorded = await journal.finish(
                    item.item_key,
                    JournalStatus.REFUSED,
                    error=entry.error if entry.uncertain and entry.error else why,
                )
                status = CaptureStatus(recorded.value)
            off = await self._klarna_time(item, fresh=True)
            if off is not None:
                break
        else:
            # Right by a fresh answer, off again at the claim, twice: a clock that keeps
            # jumping.
            off = seen
        off.idempotency_key = entry.idempotency_key
        # An earlier run sent the key: a resend's entry says so, a reconciliation's is the
        # earlier run's unknown entry itself (helper-87: a crash's leftover said "not sent").
        off.earlier_attempt_unknown = entry.uncertain or claim.action is ClaimAction.RECONCILE
        return _outcome(item, status, entry.idempotency_key, error=off)

    def _clock_error(self) -> ClockSkewError:
        """Why the journal's clock cannot date a key, as last measured (a new error for
        each item: each carries its own key)."""
        if self._no_time is not None:
            failure = self._no_time
            return ClockSkewError(
                skew=None, klarna_time=None, idempotency_key=None, failure=failure.failure
            )
        klarna_now = None if self._klarna_clock is None else self._klarna_clock.now()
        return ClockSkewError(skew=self._skew(), klarna_time=klarna_now, idempotency_key=None)

    async def _klarna_time(
        self, item: BatchItem, *, fresh: bool = False, since: int | None = None
    ) -> ClockSkewError | None:
        """Learn Klarna's time by reading ``item``'s order (one read at a time); why the
        journal's clock cannot date a key, if it cannot.

        Before a run's first claim (neither ``fresh`` nor ``since``): read unless an answer
        told Klarna's time; only a read that gets no answer, or no time, is an error (it
        sets ``_no_time``: no later call reads again, and the batch stops). For a clock
        that seemed off (``fresh``): read unless the clock fits by then (another item's
        read came first; an answer read after a machine slept may carry a time from
        before, and only a read of its own tells); an error unless the clock fits the time
        read. ``since``, a count of reads begun (``_reads``): read unless a read begun after
        that count told the time; an error unless one did and the clock fits it.
        """
        clock, orders = self._klarna_clock, self.orders
        if clock is None or orders is None or self._journal_clock is None:
            return None
        if not fresh and since is None and clock.now() is not None:
            return None
        dated = clock.dated
        async with self._learning_time:
            if since is not None:
                stale = self._last_read < since
            elif fresh:
                stale = not self._clock_fits()
            else:
                stale = clock.dated <= dated  # no other item's read came first
            if self._no_time is None and stale:
                read, dated = self._reads, clock.dated
                self._reads += 1
                failure = await self._read_order_for_time(item, orders)
                if failure is not None or clock.dated == dated:  # no answer, or none dated
                    self._no_time = ClockSkewError(
                        skew=None, klarna_time=None, idempotency_key=None, failure=failure
                    )
                else:
                    self._last_read = read
        if since is not None:
            fits = self._last_read >= since and self._clock_fits()
        else:
            fits = self._clock_fits() if fresh else self._no_time is None
        return None if fits else self._clock_error()

    async def _read_order_for_time(
        self, item: BatchItem, orders: OrdersService
    ) -> KlarnaError | None:
        """Read ``item``'s order; the error that kept Klarna's own answer from coming, if
        none came. A 5xx may be a proxy's, with its own clock; any other answer is Klarna's
        (a 404 or 429 too), and tells its time."""
        while True:
            try:
                await orders.get(item.order_id)
            except RateLimitError as error:
                if not getattr(error, "refused_by_throttle", False) or error.attempts:
                    # Klarna's 429, or the pace held back a retry after Klarna answered
                    # (helper-90: taken for no answer, it stopped a healthy batch).
                    return None
                # Held back unsent by the client's pace: it waits its turn, as a send does.
                if await self._wait_turn(error, None):
                    continue
                return error
            except ValidationError:
                raise  # the item's own fault, nothing sent: see _claim
            except KlarnaAPIError as error:
                return None if error.status < 500 else error
            except KlarnaError as error:
                return error
            return None

    def _claim_fits(self, claim: Claim) -> bool:
        """Whether the journal's clock now, and the time a claim to send was made at (its
        entry's ``updated_at``), are within ``MAX_CLOCK_SKEW`` of Klarna's: the claim
        judged the key's age by the latter (helper-87: a clock off for the claim's reading
        alone got a key Klarna forgot resent)."""
        if not self._clock_fits():
            return False
        if (
            claim.action is not ClaimAction.SEND
            or self._klarna_clock is None
            or self._journal_clock is None  # a journal without a clock is not checked
        ):
            return True
        skew = clock_skew(claim.entry.updated_at, self._klarna_clock.now())
        return skew is not None and abs(skew) <= MAX_CLOCK_SKEW

    def _clock_fits(self) -> bool:
        """Whether the journal's clock is within ``MAX_CLOCK_SKEW`` of Klarna's (True when
        neither is known to the batch: a journal without a clock, a batch without orders)."""
        if self._klarna_clock is None or self._journal_clock is None:
            return True
        skew = self._skew()
        return skew is not None and abs(skew) <= MAX_CLOCK_SKEW

    def _skew(self) -> timedelta | None:
        """The journal's clock minus Klarna's now; None while no answer told Klarna's."""
        if self._klarna_clock is None or self._journal_clock is None:
            return None
        return clock_skew(self._journal_clock(), self._klarna_clock.now())

    async def _confirm(self, item: BatchItem, journal: Journal) -> CaptureOutcome | None:
        """The outcome of an uncertain release/cancel the order proves done; None otherwise."""
        if self.orders is None:
            return None
        entries = await journal.entries(order_id=item.order_id)
        [entry] = [e for e in entries if e.item_key == item.item_key]
        # Judged as what the item is, whatever the journal read back (a journal that keeps
        # no operation says "capture"); the key was just sent, so nothing gets a new key.
        entry = attrs.evolve(entry, operation=item.operation)
        async with _locked(self.reconciling, item.order_id):
            result = await reconcile_entry(self.orders, journal, entry)
        if result.verdict is not Verdict.CAPTURED:
            return None
        return _outcome(item, CaptureStatus.CAPTURED, entry.idempotency_key)

    async def _reconcile(
        self, item: BatchItem, claim: Claim, journal: Journal
    ) -> CaptureOutcome | None:
        """Settle an item whose key may be forgotten; None when it proved never booked."""
        entry = claim.entry
        key = entry.idempotency_key
        if entry.operation is not item.operation:
            # The journal keeps no operation (it reads this item back as another one): the
            # order would be searched for the wrong thing, "not done" found, and the item
            # sent again under a new key. Nothing is sent; the item stays unknown.
            conflict = ItemConflictError(
                f"item {item.item_key!r} is a {item.operation.value}, but the journal reads it"
                f" back as a {entry.operation.value}: this journal does not record operations,"
                f" so the outcome of key {key} (unknown, older than its key_max_age) cannot be"
                " judged safely; check the order, settle the item by hand"
                " (journal.finish(item_key, status, reconciled=True)), and keep operations in a"
                " journal that records them (SQLiteJournal, MemoryJournal)",
                item_key=item.item_key,
                idempotency_key=key,
            )
            return _outcome(item, CaptureStatus.REFUSED, key, error=conflict)
        if self.orders is None:
            error = KlarnaError(
                "the outcome is unknown and the key older than the journal's key_max_age;"
                " reconcile the journal (om.reconcile) before resending"
            )
            error.idempotency_key = key
            return _outcome(item, CaptureStatus.FAILED, key, error=error)
        async with _locked(self.reconciling, item.order_id):
            result = await reconcile_entry(self.orders, journal, entry)
        match result.verdict:
            case Verdict.CAPTURED:
                return _outcome(item, CaptureStatus.CAPTURED, key, created_id=result.capture_id)
            case Verdict.NEEDS_REVIEW:
                error = NeedsReviewError(
                    result.evidence, order_id=item.order_id, idempotency_key=key
                )
                return _outcome(item, CaptureStatus.NEEDS_REVIEW, key, error=error)
            case Verdict.NOT_CAPTURED:
                return None
            case _:  # the order could not be read: still unknown
                return _outcome(item, CaptureStatus.FAILED, key, error=result.error)

    async def _send(
        self,
        item: BatchItem,
        key: str,
        operation: Operation,
        time_left: float | None = None,
        *,
        fresh: bool = False,
    ) -> CaptureOutcome:
        """Send ``item`` under ``key``, retried for at most ``time_left`` seconds (None: a
        key new to this send) before Klarna may have forgotten the key: an earlier run may
        have sent it hours ago. The item then ends unknown, and a rerun reconciles it.
        ``fresh``: the key was never sent before (the batch made it), so an error that
        says nothing of an earlier send (a 429, a 401) leaves the outcome known."""
        request = item.request
        captures = self.services.captures
        created_id: str | None
        clock = self.services.clock
        expires = None if time_left is None else clock() + time_left
        try:
            while True:
                # For this attempt only: the worker's task has a context of its own, where
                # the item source and the read-backs run too. (Set back below, not reset: a
                # coroutine closed outside its task could not reset it.)
                key_time_left.set(None if expires is None else expires - clock())
                fresh_key.set(key if fresh else None)
                try:
                    if type(request) is CaptureRequest and captures is not None:
                        # The common case, sent as ``send`` sends it, without its dispatch.
                        created = await captures.create(item.order_id, request, idempotency_key=key)
                        created_id, attempts = created.capture_id, created.attempts
                    else:
                        sent = await send(self.services, item.order_id, request, key)
                        created_id, attempts = sent.created_id, sent.attempts
                    break
                except RateLimitError as error:
                    if not await self._wait_turn(error, expires):
                        raise
        except Exception as error:
            return _outcome(
                item,
                _status_of(error),
                key,
                error=error,
                attempts=getattr(error, "attempts", 0),
                operation=operation,
            )
        finally:
            key_time_left.set(None)
            fresh_key.set(None)
        outcome = _outcome(
            item,
            CaptureStatus.CAPTURED,
            key,
            created_id=created_id,
            attempts=attempts,
            operation=operation,
        )
        if item.idempotency_key is not None:
            if operation in _PROVEN_BY_ORDER:
                return await self._read_back(item, outcome)
            if outcome.created_id is not None:
                return await self._read_created(item, outcome)
        return outcome

    async def _wait_turn(self, error: RateLimitError, expires: float | None) -> bool:
        """Wait for the item's turn at the client's pace, if ``error`` held it back unsent.

        The throttle refuses a call whose pace slot (or 429 pause) lies past its deadline,
        sending nothing. In a batch whose workers outnumber what the pace lets through
        within a deadline (a pace learned low under a 429 storm, a ``--rate`` far below the
        concurrency) that failed most items unsent at once. The item waits instead (half
        the wait it was told, at least ``MIN_BUSY_WAIT``, then asks again), as long as its
        key may be sent (``expires``, on the client's clock). False: not such a refusal, or
        the key's time is up; the error is the item's outcome.
        """
        if not isinstance(error, ThrottleRefusal) or error.attempts:
            return False
        services = self.services
        wait = max((error.retry_after or 0.0) / 2, MIN_BUSY_WAIT)
        before = services.clock()
        if self._stopped() or (expires is not None and before + wait >= expires):
            return False  # (a batch that stops sends nothing more: a 401, Klarna unreachable)
        await services.sleep(wait)
        # A sleep that lets no time pass (a test's stand-in) would ask again for ever.
        return services.clock() - before >= wait / 2 and not self._stopped()

    async def _read_created(self, item: BatchItem, outcome: CaptureOutcome) -> CaptureOutcome:
        """Confirm a capture/refund created under a key the caller gave is this item's.

        Klarna replays by key alone: a key used before on the same order for another amount
        (or reference) gets that request's 201, and nothing is done for this call. Only the
        created capture or refund read back tells. That earlier request may have been this
        item before it was edited (booked then) or another one (nothing done for this item):
        the item needs review. A key the journal (or the batch) made is this item's own and
        needs no read.
        """
        key, created_id, request = outcome.idempotency_key, outcome.created_id, item.request
        assert created_id is not None  # only created items are read back
        noun = "refund" if item.operation is Operation.REFUND else "capture"
        try:
            if isinstance(request, RefundRequest) and self.services.refunds is not None:
                refund = await self.services.refunds.get(item.order_id, created_id)
                found = (refund.refunded_amount, refund.reference)
                asked = (request.refunded_amount, request.reference)
            elif isinstance(request, CaptureRequest) and self.services.captures is not None:
                capture = await self.services.captures.get(item.order_id, created_id)
                found = (capture.captured_amount, capture.reference)
                asked = (request.captured_amount, request.reference)
            else:  # pragma: no cover - the send went through that service
                return outcome
        except KlarnaError as error:
            return _unconfirmed(
                outcome,
                f"Klarna answered 201 to the {noun} of order {item.order_id} under the given"
                f" key {key} ({noun} {created_id}), but reading it back to check that it is"
                f" this item's failed ({error}); the outcome is unknown: rerun (the same key)"
                " to check it",
            )
        # References as the item's identity reads them: " A " is "A", a blank one none.
        if found[0] == asked[0] and _reference(found[1]) == _reference(asked[1]):
            return outcome
        evidence = (
            f"Klarna holds {_described(noun, created_id, *found)} under the given key {key},"
            f" not the {_described(noun, None, *asked)} asked: the key was used before, for"
            " this item before it was edited (then it is booked: put its amount and reference"
            " back in the item) or for another request (then nothing was done for this item:"
            " give it a new key)"
        )
        review = NeedsReviewError(evidence, order_id=item.order_id, idempotency_key=key)
        unsure = attrs.evolve(outcome, capture_id=None, refund_id=None)
        return attrs.evolve(unsure, status=CaptureStatus.NEEDS_REVIEW, error=review)

    async def _read_back(self, item: BatchItem, outcome: CaptureOutcome) -> CaptureOutcome:
        """Confirm a release/cancel answered 204 under a key the caller gave, by the order.

        Klarna replays by key alone, and a 204 cannot say whose it is: a key the caller gave
        may have been used before for another order or by another process. A key the
        journal (or the batch) made is this item's own and needs no read-back.
        """
        key = outcome.idempotency_key
        orders = self.orders
        assert orders is not None  # the send went through it
        try:
            order = await orders.get(item.order_id)
        except KlarnaError as error:
            return _unconfirmed(
                outcome,
                f"Klarna answered 204 to the {item.operation.value} of order {item.order_id}"
                f" under the given key {key}, but the order could not be read to confirm it"
                f" ({error}); the outcome is unknown: rerun (the same key) to confirm it",
            )
        done, evidence = order_shows(item.operation, order)
        if done:
            return outcome
        return _replayed(
            outcome,
            f"Klarna answered 204 to the {item.operation.value} of order {item.order_id}, but"
            f" {evidence}: the given idempotency key {key} was used before for another request"
            " (another order or process), whose answer Klarna replayed; nothing was done to"
            " this order",
            status=204,
            path=_PATHS[item.operation],
        )


def _reference(value: object) -> str | None:
    """A reference as an item's identity reads it: " A " is "A", a blank one (or anything
    but a string) none."""
    return (value.strip() or None) if isinstance(value, str) else None


def _described(noun: str, created_id: str | None, amount: int | None, reference: str | None) -> str:
    named = "" if created_id is None else f" {created_id}"
    return f"{noun}{named} of {amount}" + (
        "" if _reference(reference) is None else f" with reference {reference!r}"
    )


def _unconfirmed(outcome: CaptureOutcome, why: str) -> CaptureOutcome:
    """``outcome`` as unknown (``failed``): Klarna answered, but the check of what that
    answer is could not be made."""
    unread = KlarnaError(why)
    unread.idempotency_key = outcome.idempotency_key
    unread.earlier_attempt_unknown = True
    return attrs.evolve(outcome, status=CaptureStatus.FAILED, error=unread)


def _replayed(outcome: CaptureOutcome, why: str, *, status: int, path: str) -> CaptureOutcome:
    """``outcome`` refused: Klarna replayed another request's answer to the POST to
    ``…/orders/{order_id}/{path}`` (``status``), and did nothing for this item."""
    reused = IdempotencyKeyReusedError(why, status=status, location="")
    reused.bind(
        method="POST",
        url=f"/ordermanagement/v1/orders/{outcome.order_id}/{path}",
        idempotency_key=outcome.idempotency_key,
        attempts=outcome.attempts,
    )
    refused = attrs.evolve(outcome, capture_id=None, refund_id=None)  # none is this item's
    return attrs.evolve(refused, status=CaptureStatus.REFUSED, error=reused)


def _time_left(claim: Claim) -> float | None:
    """Seconds the claim's key may still be sent (None: a key new to this send).

    A journal of one's own that does not say is taken to keep keys for the default
    ``key_max_age``, by this machine's clock (a time without a zone read as UTC or as local
    time, whichever leaves less); a key it resends (``uncertain``) without saying when it
    was first sent has no time left: Klarna may have forgotten it.
    """
    if claim.key_time_left is not None:
        return claim.key_time_left
    sent = claim.entry.key_sent_at
    if sent is None:
        return 0.0 if claim.entry.uncertain else None
    if sent.tzinfo is None:
        sent = min(sent.replace(tzinfo=UTC), sent.astimezone(UTC))
    return (sent + DEFAULT_KEY_MAX_AGE - datetime.now(UTC)).total_seconds()


#: Claims whose decision read the journal's clock, or whose date it keeps: checked against
#: Klarna's (see ``_Run._claim``).
_DATED = frozenset({ClaimAction.SEND, ClaimAction.RECONCILE})

#: Operations whose effect the order's state proves (see ``reconcile.judge``).
_PROVEN_BY_ORDER = frozenset({Operation.RELEASE, Operation.CANCEL})
#: Their endpoints under the order, to name the call a replayed 204 answered.
_PATHS = {Operation.RELEASE: "release-remaining-authorization", Operation.CANCEL: "cancel"}


@contextlib.asynccontextmanager
async def _locked(table: dict[str, _OrderLock], order_id: str) -> AsyncIterator[None]:
    """Hold ``order_id``'s lock in ``table``; forget it once nobody holds or awaits it."""
    held = table.setdefault(order_id, _OrderLock())
    held.users += 1
    try:
        async with held.lock:
            yield
    finally:
        held.users -= 1
        if not held.users:
            del table[order_id]


async def _held_back_outcome(
    item: BatchItem, why: str, journal: Journal | None, *, busy: bool = False
) -> CaptureOutcome:
    """The outcome of ``item``, held back (not sent, not claimed) because of ``why``.

    ``refused`` with an ``ItemHeldBackError`` (``failed`` when ``busy``: what holds it
    back only met 429s, and an item is never refused because Klarna was busy), unless the
    journal already holds the item as it is: then it keeps what the journal says
    (``failed`` under its key while its own earlier send is unknown, ``needs_review``, or
    ``skipped`` when it was done in an earlier run). An item changed since it was
    journaled is refused, as a claim would refuse it.
    """
    message = f"held back: {why}; rerun after it is settled"
    entry = None if journal is None else await _entry_of(journal, item)
    key = item.idempotency_key or ""
    status = CaptureStatus.FAILED if busy else CaptureStatus.REFUSED
    unknown = False
    if entry is not None and entry.status is not JournalStatus.REFUSED:
        key = entry.idempotency_key
        conflict = _conflict(entry, _record(item, item.operation))
        if conflict is not None:
            # As a claim judges it, busy or not: refused, unless its own earlier send is
            # unknown (then money may have moved under its key: failed, unknown).
            unknown = conflict.outcome_unknown
            status = _unsettled_status(entry) if unknown else CaptureStatus.REFUSED
            message += f"; it also changed since it was journaled ({entry.status.value})"
            if unknown:
                review = entry.status is JournalStatus.NEEDS_REVIEW
                what = "needs review" if review else "is unknown"
                message += f", and the outcome of its earlier send under key {key} {what}"
        elif entry.status is JournalStatus.CAPTURED:
            return _outcome(item, CaptureStatus.SKIPPED, key, created_id=entry.capture_id)
        elif entry.status is JournalStatus.NEEDS_REVIEW:
            status, unknown = CaptureStatus.NEEDS_REVIEW, True
            message += f"; this item itself needs review ({entry.error or 'see the journal'})"
        else:
            status, unknown = CaptureStatus.FAILED, True
            message += f"; this item's own earlier send is unknown under key {key}"
    error = ItemHeldBackError(
        message, item_key=item.item_key, idempotency_key=key or None, unknown=unknown
    )
    return _outcome(item, status, key, error=error)


def _conflict_outcome(item: BatchItem, claim: Claim) -> CaptureOutcome:
    """The outcome of ``item``, whose claim is a ``CONFLICT``: refused, or unknown under its
    key when its own earlier send is."""
    entry = claim.entry
    key = entry.idempotency_key
    conflict = ItemConflictError(
        claim.reason or "conflict", item_key=item.item_key, idempotency_key=key
    )
    if claim.outcome_unknown:
        # Changed since its send under this key, whose outcome is unknown: not sent now, but
        # money may have moved under the key (not "refused").
        conflict.earlier_attempt_unknown = True
        return _outcome(item, _unsettled_status(entry), key, error=conflict)
    return _outcome(item, CaptureStatus.REFUSED, key, error=conflict)


async def _unclaimed_outcome(
    item: BatchItem, error: ClockSkewError | ValidationError, journal: Journal, record: ItemRecord
) -> CaptureOutcome:
    """The outcome of ``item``, not claimed (nothing sent) because of ``error``: refused,
    or as the journal holds it when an earlier run sent it (under that key). An item that
    changed since it was journaled is reported as a claim reports it (helper-87: an edited
    amount was reported done), and an item done in an earlier run is skipped."""
    entry = await _entry_of(journal, item)
    if entry is None or entry.status is JournalStatus.REFUSED:
        return _outcome(item, CaptureStatus.REFUSED, item.idempotency_key or "", error=error)
    conflict = _conflict(entry, record)
    if conflict is not None:
        return _conflict_outcome(item, conflict)
    error.idempotency_key = entry.idempotency_key
    if entry.status is JournalStatus.CAPTURED:
        return _outcome(
            item, CaptureStatus.SKIPPED, entry.idempotency_key, created_id=entry.capture_id
        )
    error.earlier_attempt_unknown = True
    return _outcome(item, _unsettled_status(entry), entry.idempotency_key, error=error)


def _record(item: BatchItem, operation: Operation) -> ItemRecord:
    """What the journal keeps of ``item`` to recognise it in a later run."""
    return ItemRecord(
        item_key=item.item_key,
        order_id=item.order_id,
        captured_amount=amount_of(item.request),
        reference=reference_of(item.request),
        fingerprint=request_fingerprint(item.order_id, item.request),
        operation=operation,
    )


def _unsettled_status(entry: JournalEntry) -> CaptureStatus:
    """How an item reports a journaled send whose outcome is not settled."""
    if entry.status is JournalStatus.NEEDS_REVIEW:
        return CaptureStatus.NEEDS_REVIEW
    return CaptureStatus.FAILED


async def _entry_of(journal: Journal, item: BatchItem) -> JournalEntry | None:
    # By item_key alone: an item moved to another order is still the journaled one.
    entries = await journal.entries(item_key=item.item_key)
    return entries[0] if entries else None


def _operation_name(item: BatchItem) -> str:
    try:
        return item.operation.value
    except TypeError:
        return "capture"


def _outcome(
    item: BatchItem,
    status: CaptureStatus,
    key: str,
    *,
    created_id: str | None = None,
    error: Exception | None = None,
    attempts: int = 0,
    operation: Operation | None = None,
) -> CaptureOutcome:
    """``item``'s outcome; ``operation`` is ``item.operation`` when the caller knows it."""
    if operation is None:
        try:
            operation = item.operation
        except TypeError:
            operation = Operation.CAPTURE
    refund = operation is Operation.REFUND
    return CaptureOutcome(
        order_id=item.order_id,
        item_key=item.item_key,
        status=status,
        idempotency_key=key or item.idempotency_key or "",
        capture_id=None if refund else created_id,
        error=error,
        attempts=attempts,
        line=item.line,
        operation=operation,
        refund_id=created_id if refund else None,
    )


def capture_many(
    captures: CapturesService,
    items: ItemSource,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    rate_limit: float | None = None,
    journal: Journal | None = None,
    on_progress: Callable[[BatchProgress], None] | None = None,
    orders: OrdersService | None = None,
) -> AsyncGenerator[CaptureOutcome, None]:
    """Capture every item with at most ``concurrency`` in flight; yield outcomes as they end.

    ``items`` is consumed lazily. With a ``journal``, each item is claimed from the journal
    first: items captured in an earlier run are skipped, items whose outcome was unknown are
    resent with their original key, items that changed since they were journaled are
    refused, and unknown items whose key Klarna may have forgotten are reconciled by reading
    the order through ``orders`` (see :mod:`klarna_om_async.reconcile`). If the consumer
    stops early, no new item is started; items already started keep their journal record (in
    flight, with their key) so the next run finishes them exactly once. An item whose
    outcome was being recorded as the batch stopped is recorded all the same; it is not
    yielded, and the next run yields it ``skipped`` (with its ``capture_id``).

    A batch that cannot work stops early: after a 401 (``AuthenticationError``), or after
    ``UNREACHABLE_ITEMS`` items in a row could not connect (nothing sent), no new item is
    started; the items already started end and are yielded, the rest of the source is read
    without sending (never claimed in the journal), and ``BatchAbortedError`` is raised naming
    them (not raised when no item was left). ``concurrency``: 1..10,000; ``rate_limit``: None
    or finite, 0 < rate_limit <= 10,000 requests per second (``ValidationError`` otherwise,
    before anything starts).

    Items whose request is not a ``CaptureRequest`` are refused (``TypeError`` on the
    outcome, nothing sent): other operations run with :func:`run_many`.

    Yields ``CaptureOutcome`` values (amounts stay ``int`` minor units on each item's
    ``CaptureRequest``); a single item's Klarna error is on its outcome, never raised.
    Raises ``ValidationError`` (bad ``concurrency``/``rate_limit``), ``BatchAbortedError``
    (stopped early, see above), and what the item source or the journal raise. A journal
    that fails stops the batch like a broken source; an item Klarna answered whose outcome
    it could not record is still yielded, as Klarna answered it (the journal keeps it in
    flight under its key, which the next run resends), and one it failed on before any
    answer is yielded ``failed`` with the journal's error.
    https://docs.klarna.com/api/ordermanagement/#operation/captureOrder
    """
    services = Services(captures=captures, orders=orders)
    return _engine(
        services, items, journal, concurrency, rate_limit, on_progress, only=Operation.CAPTURE
    )


def run_many(
    services: Services,
    items: ItemSource,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    rate_limit: float | None = None,
    journal: Journal | None = None,
    on_progress: Callable[[BatchProgress], None] | None = None,
    hold: Callable[[BatchItem], str | None] | None = None,
) -> AsyncGenerator[CaptureOutcome, None]:
    """Run every item, whatever its operation, as :func:`capture_many` runs captures.

    Each item's ``request`` names its operation (see :class:`BatchItem`); the journal
    records it with the item and applies the same exactly-once rules to every operation.
    One order's items run one at a time, in source order (a refund after the capture it
    gives back, a release after the last capture); different orders run concurrently.
    Once an item ends failed (unknown), refused or needs review, its order's later items
    in this run are held back: not sent, not claimed in the journal, ``refused`` with an
    ``ItemHeldBackError`` naming that item (or as the journal holds them: ``failed`` under
    their key when their own earlier send is unknown). A release or cancel never follows
    an unknown capture of its order. A release or cancel sent under a key the caller gave
    (``BatchItem.idempotency_key``) is confirmed by reading the order back: Klarna replays a
    key's 204 to any request, so an order that shows no release (cancel) makes it
    ``refused`` with an ``IdempotencyKeyReusedError`` naming the key.
    ``services`` holds the services to send through (``om.captures``, ``om.refunds``,
    ``om.orders``); ``orders`` also reads orders to reconcile. ``hold(item)``, if given (a
    plain function, called on the event loop: keep it quick), is asked about each item
    after the batch's duplicate checks: a reason (a non-empty one-line string) holds the
    item back as above (``ItemHeldBackError`` naming the reason), and its order's later
    items with it, whatever the journal says of the item; None lets it go. Anything else it
    returns, or raises, stops the batch (the item is yielded ``failed`` with the error, and
    the order's later items are not sent).

    Raises ``ValidationError`` (bad ``concurrency``/``rate_limit``), ``BatchAbortedError``
    (stopped early), and what the item source or the journal raise (after yielding an
    answered item the journal could not record, as :func:`capture_many`); an item's own
    error is on its outcome.
    https://docs.klarna.com/api/ordermanagement/
    """
    if inspect.iscoroutinefunction(hold):
        raise TypeError("hold must be a plain function returning None or a reason, not async")
    return _engine(
        services, items, journal, concurrency, rate_limit, on_progress, in_order=True, hold=hold
    )


async def _engine(
    services: Services,
    items: ItemSource,
    journal: Journal | None,
    concurrency: int,
    rate_limit: float | None,
    on_progress: Callable[[BatchProgress], None] | None,
    *,
    only: Operation | None = None,
    in_order: bool = False,
    hold: Callable[[BatchItem], str | None] | None = None,
) -> AsyncGenerator[CaptureOutcome, None]:
    """The one engine behind ``capture_many`` and ``run_many``."""
    check_count("concurrency", concurrency, high=MAX_CONCURRENCY)
    if journal is not None:
        await _start_run(journal)
    watches: tuple[BatchWatch, ...] = ()
    ended: BaseException | None = None
    try:
        if batch_listeners:
            start = BatchStart(
                services=services, only=only, concurrency=concurrency, journal=journal
            )
            watches = tuple(
                watch
                for listener in tuple(batch_listeners)
                if (watch := listener(start)) is not None
            )
        outcomes: asyncio.Queue[CaptureOutcome | None] = asyncio.Queue(maxsize=concurrency)
        run = _Run(services, items, journal, outcomes, only=only, in_order=in_order, hold=hold)
        # The workers copy the context as they are made: the batch is theirs, not the caller's.
        token = current_batch.set(watches) if watches else None
        try:
            with rate_limited(rate_limit):
                workers = [asyncio.create_task(run.work()) for _ in range(concurrency)]
        finally:
            if token is not None:
                current_batch.reset(token)
        progress = BatchProgress()
        try:
            running = len(workers)
            while running:
                # No coroutine when an outcome is waiting (as in a busy batch).
                outcome = await outcomes.get() if outcomes.empty() else outcomes.get_nowait()
                if outcome is None:
                    running -= 1
                    continue
                if on_progress is not None:
                    progress = progress.add(outcome.status)
                    on_progress(progress)
                for watch in watches:
                    watch.outcome(outcome)
                yield outcome
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if run.error is not None:
            raise run.error
        if run.abort is not None:
            rest = run.not_sent()
            if rest is None:
                raise BatchAbortedError(run.abort, (), source_read=False)
            not_sent, count = rest
            if count:  # every item has its outcome otherwise: nothing to stop
                raise BatchAbortedError(run.abort, not_sent, count)
    except BaseException as error:
        ended = error
        raise
    finally:
        if journal is not None:
            _end_run(journal)
        for watch in reversed(watches):
            watch.ended(ended)
