"""Capture many orders concurrently: bounded workers, one outcome per item, optional journal.

Exactly-once rests on two things: every item's idempotency key is chosen (and journaled)
before its first attempt, and an item whose outcome is unknown is only ever retried with that
same key, so Klarna replays its first answer instead of capturing twice.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from typing import TypeAlias

import attrs

from ._keys import random_key
from .captures import CapturesService
from .errors import KlarnaError, ValidationError
from .journal import Journal, JournalEntry, JournalStatus
from .models import CaptureRequest
from .throttle import rate_limited

__all__ = (
    "BatchItem",
    "BatchProgress",
    "CaptureOutcome",
    "CaptureStatus",
    "ItemSource",
    "capture_many",
)


class CaptureStatus(enum.StrEnum):
    """How one batch item ended."""

    #: Klarna booked the capture (now, or in an earlier run whose answer was lost).
    CAPTURED = "captured"
    #: Refused before or by Klarna (validation, a duplicate in this batch, or a 4xx): nothing
    #: was captured for this item.
    REFUSED = "refused"
    #: Retries ran out and the outcome is unknown: rerun with the same key (journal does).
    FAILED = "failed"
    #: Not attempted: already captured in an earlier run (says the journal).
    SKIPPED = "skipped"


@attrs.frozen(kw_only=True)
class BatchItem:
    """One capture to make: an order and what to capture of it."""

    order_id: str
    request: CaptureRequest
    #: Fix the key yourself (e.g. ``deterministic_key(...)``) when you keep no journal.
    idempotency_key: str | None = None
    #: The item's identity in the journal; an order captured in several parts needs a
    #: distinct ``reference`` per part (the default key is ``order_id:reference``).
    item_key: str = attrs.field()

    @item_key.default
    def _default_item_key(self) -> str:
        reference = self.request.reference
        return f"{self.order_id}:{reference}" if reference else self.order_id


@attrs.frozen(kw_only=True)
class CaptureOutcome:
    """The result of one batch item; nothing about an item is ever silently dropped."""

    order_id: str
    item_key: str
    status: CaptureStatus
    #: The key the capture was (or would be) sent with: resend with it to retry safely.
    idempotency_key: str
    capture_id: str | None = None
    #: Why the item was refused or failed (``error.outcome_unknown`` says if money may have moved).
    error: Exception | None = None
    #: HTTP attempts made in this run.
    attempts: int = 0


@attrs.frozen
class BatchProgress:
    """Running totals of a batch, passed to ``on_progress`` after each outcome."""

    done: int = 0
    captured: int = 0
    refused: int = 0
    failed: int = 0
    skipped: int = 0

    def add(self, status: CaptureStatus) -> BatchProgress:
        """These totals with one more outcome of ``status``."""
        counts = attrs.asdict(self)
        counts[status.value] += 1
        counts["done"] += 1
        return BatchProgress(**counts)


ItemSource: TypeAlias = (
    Iterable[BatchItem | tuple[str, CaptureRequest]]
    | AsyncIterable[BatchItem | tuple[str, CaptureRequest]]
)


def _as_item(raw: BatchItem | tuple[str, CaptureRequest]) -> BatchItem:
    if isinstance(raw, BatchItem):
        return raw
    order_id, request = raw
    return BatchItem(order_id=order_id, request=request)


def _status_of(error: Exception) -> CaptureStatus:
    if isinstance(error, ValidationError | TypeError):
        return CaptureStatus.REFUSED  # nothing was sent
    if isinstance(error, KlarnaError) and not error.outcome_unknown:
        return CaptureStatus.REFUSED  # Klarna said no, or 429 until the end: nothing booked
    # Unknown, even for a 4xx: an earlier attempt whose answer was lost may have been booked.
    return CaptureStatus.FAILED


class _Run:
    """The shared state of one ``capture_many`` call, used by its worker tasks."""

    def __init__(
        self,
        captures: CapturesService,
        items: ItemSource,
        journal: Journal | None,
        known: dict[str, JournalEntry],
        outcomes: asyncio.Queue[CaptureOutcome | None],
    ) -> None:
        self.captures = captures
        self.journal = journal
        self.known = known
        self.outcomes = outcomes
        self.seen: set[str] = set()
        self.error: BaseException | None = None
        if isinstance(items, AsyncIterable):
            self._aiter: AsyncIterator[BatchItem | tuple[str, CaptureRequest]] | None = aiter(items)
            self._lock = asyncio.Lock()  # an async generator must not be advanced concurrently
        else:
            self._iter = iter(items)
            self._aiter = None

    async def _next_item(self) -> BatchItem | None:
        if self.error is not None:
            return None
        if self._aiter is None:
            raw = next(self._iter, None)
        else:
            async with self._lock:
                raw = await anext(self._aiter, None)
        return None if raw is None else _as_item(raw)

    async def work(self) -> None:
        """Take items until the source runs dry; put one outcome per item, then a None."""
        try:
            while (item := await self._next_item()) is not None:
                await self.outcomes.put(await self._capture(item))
        except Exception as error:  # a broken source or journal: stop taking new items
            if self.error is None:
                self.error = error
        await self.outcomes.put(None)

    async def _capture(self, item: BatchItem) -> CaptureOutcome:
        key_name = item.item_key
        prior = self.known.pop(key_name, None)
        if key_name in self.seen:
            return CaptureOutcome(
                order_id=item.order_id,
                item_key=key_name,
                # Refused, not skipped: the caller meant two captures or made a typo, and
                # a batch that "succeeds" would hide the part never captured.
                status=CaptureStatus.REFUSED,
                idempotency_key=item.idempotency_key or "",
                error=ValidationError(
                    "item_key",
                    f"{key_name!r} appears twice in this batch; give each part of a split"
                    " capture its own reference",
                ),
            )
        self.seen.add(key_name)
        if prior is not None and prior.status is JournalStatus.CAPTURED:
            return CaptureOutcome(
                order_id=item.order_id,
                item_key=key_name,
                status=CaptureStatus.SKIPPED,
                idempotency_key=prior.idempotency_key,
                capture_id=prior.capture_id,
            )
        if prior is not None and prior.status in (JournalStatus.IN_FLIGHT, JournalStatus.FAILED):
            key = prior.idempotency_key  # its first attempt may have been booked
        else:
            key = item.idempotency_key or random_key()  # new, or refused: nothing booked
        if self.journal is not None:
            await self.journal.begin(key_name, item.order_id, key)
        try:
            created = await self.captures.create(item.order_id, item.request, idempotency_key=key)
        except Exception as error:
            outcome = CaptureOutcome(
                order_id=item.order_id,
                item_key=key_name,
                status=_status_of(error),
                idempotency_key=key,
                error=error,
                attempts=getattr(error, "attempts", 0),
            )
        else:
            outcome = CaptureOutcome(
                order_id=item.order_id,
                item_key=key_name,
                status=CaptureStatus.CAPTURED,
                idempotency_key=key,
                capture_id=created.capture_id,
                attempts=created.attempts,
            )
        if self.journal is not None:
            await self.journal.finish(
                key_name,
                JournalStatus(outcome.status.value),
                capture_id=outcome.capture_id,
                error=None if outcome.error is None else str(outcome.error),
                attempts=outcome.attempts,
            )
        return outcome


async def capture_many(
    captures: CapturesService,
    items: ItemSource,
    *,
    concurrency: int = 32,
    rate_limit: float | None = None,
    journal: Journal | None = None,
    on_progress: Callable[[BatchProgress], None] | None = None,
) -> AsyncGenerator[CaptureOutcome, None]:
    """Capture every item with at most ``concurrency`` in flight; yield outcomes as they end.

    ``items`` is consumed lazily. With a ``journal``, items captured in an earlier run are
    skipped and items whose outcome was unknown are resent with their original key. If the
    consumer stops early, no new item is started; items already started keep their journal
    record (in flight, with their key) so the next run finishes them exactly once.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency!r}")
    known = await journal.load() if journal is not None else {}
    outcomes: asyncio.Queue[CaptureOutcome | None] = asyncio.Queue(maxsize=concurrency)
    run = _Run(captures, items, journal, known, outcomes)
    with rate_limited(rate_limit):
        workers = [asyncio.create_task(run.work()) for _ in range(concurrency)]
    progress = BatchProgress()
    try:
        running = len(workers)
        while running:
            outcome = await outcomes.get()
            if outcome is None:
                running -= 1
                continue
            if on_progress is not None:
                progress = progress.add(outcome.status)
                on_progress(progress)
            yield outcome
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    if run.error is not None:
        raise run.error
