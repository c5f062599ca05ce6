"""Exactly-once under any interleaving of batch runs, faults, kills, edits and expired keys.

A Hypothesis state machine drives one small batch (three orders of 10000, five items of
4000, some with a ``reference``) through runs that succeed, lose answers
(``DropAfterProcessing``), are never processed (``DropConnection``), are refused for reasons
that prove nothing (401, 429 until retries run out, a proxy's 403, 503), are killed mid-run
with captures booked and their answers still on the way, see one item's amount edited, see
Klarna forget every key (25 hours pass), are reconciled, or restart the "process" (a new
client and the journal file reopened). After every step it checks what FakeKlarna really
booked against the journal; at the end it settles everything with clean reruns and checks
that every item was captured (or needs review) exactly once. The same machine runs refunds
(``RefundJournalMachine``: the orders fully captured first, the items refunds through
``run_many``), with the same exactly-once rules.

Everything runs on one event loop per machine instance; the fake, the clients, the journal
and the loop are all closed in ``teardown``. ``KLARNA_OM_STATEFUL_EXAMPLES`` raises the
number of examples (``KLARNA_OM_STATEFUL_STEPS`` the steps of each) for a longer local hunt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import attrs
import orjson
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from klarna_om_async import (
    BatchAbortedError,
    BatchItem,
    CaptureOutcome,
    CaptureRequest,
    CaptureStatus,
    ClockSkewError,
    ItemConflictError,
    JournalEntry,
    JournalStatus,
    KlarnaOM,
    RateLimitError,
    RefundRequest,
    RetryPolicy,
    SQLiteJournal,
    Verdict,
)
from klarna_om_async.batch import ItemHeldBackError
from klarna_om_async.operations import Operation
from klarna_om_async.testing import (
    Delay,
    DropAfterProcessing,
    DropConnection,
    FakeKlarna,
    InstantSleep,
    NonJsonError,
    RateLimited,
    RecordedRequest,
    ServerFailure,
)

_T = TypeVar("_T")

HOUR = 3600.0
AUTHORIZED = 10000
AMOUNT = 4000
#: Amounts an edit may set; two items of one order never exceed its 10000 together.
EDITED_AMOUNTS = (3000, 4000, 5000)
ORDERS = ("order-a", "order-b", "order-c")
#: (order, reference): the item's identity at Klarna and in the journal.
ITEMS: tuple[tuple[str, str | None], ...] = (
    ("order-a", "a1"),
    ("order-a", None),  # no reference, next to a referenced part of the same order
    ("order-b", None),
    ("order-c", "c1"),
    ("order-c", "c2"),
)
#: How long a killed run's captures wait (after being booked) before their answers leave.
#: Far longer than the kill takes; short enough that closing the fake does not wait long.
KILL_DELAY = 0.25
UNKNOWN = frozenset({JournalStatus.IN_FLIGHT, JournalStatus.FAILED})
SETTLED = frozenset({JournalStatus.CAPTURED, JournalStatus.NEEDS_REVIEW})
UNSETTLED = UNKNOWN | {JournalStatus.NEEDS_REVIEW}
# How an item ends that is not sent because Klarna's time could not be learned (its order
# reads failed), by its journal status: as the journal holds it.
UNCHECKED = {
    None: CaptureStatus.REFUSED,
    JournalStatus.REFUSED: CaptureStatus.REFUSED,
    JournalStatus.IN_FLIGHT: CaptureStatus.FAILED,
    JournalStatus.FAILED: CaptureStatus.FAILED,
    JournalStatus.NEEDS_REVIEW: CaptureStatus.NEEDS_REVIEW,
    JournalStatus.CAPTURED: CaptureStatus.SKIPPED,
}
# How an item edited since it was journaled ends, by its journal status: never sent, and
# never "refused" while money may have moved under its key.
EDITED = {
    JournalStatus.IN_FLIGHT: CaptureStatus.FAILED,
    JournalStatus.FAILED: CaptureStatus.FAILED,
    JournalStatus.NEEDS_REVIEW: CaptureStatus.NEEDS_REVIEW,
    JournalStatus.CAPTURED: CaptureStatus.REFUSED,
    JournalStatus.REFUSED: CaptureStatus.REFUSED,
}

_EXAMPLES = int(os.environ.get("KLARNA_OM_STATEFUL_EXAMPLES", "40"))
_STEPS = int(os.environ.get("KLARNA_OM_STATEFUL_STEPS", "12"))


@attrs.define
class Item:
    """One line of the batch as the user currently has it."""

    order_id: str
    reference: str | None
    amount: int = AMOUNT
    operation: Operation = Operation.CAPTURE

    @property
    def key(self) -> str:
        return _item_key(self.order_id, self.reference, self.operation)

    def batch_item(self) -> BatchItem:
        if self.operation is Operation.REFUND:
            refund = RefundRequest(refunded_amount=self.amount, reference=self.reference)
            return BatchItem(order_id=self.order_id, request=refund)
        request = CaptureRequest(captured_amount=self.amount, reference=self.reference)
        return BatchItem(order_id=self.order_id, request=request)


@attrs.frozen
class Booked:
    """A capture or refund FakeKlarna booked, as the checks compare it."""

    order_id: str
    id: str
    reference: str | None
    amount: int
    idempotency_key: str | None


#: The path segment of each operation's POST, and its amount field.
SEGMENT = {Operation.CAPTURE: "captures", Operation.REFUND: "refunds"}
AMOUNT_FIELD = {Operation.CAPTURE: "captured_amount", Operation.REFUND: "refunded_amount"}


def _post_item(
    request: RecordedRequest, operation: Operation
) -> tuple[str, str | None, int] | None:
    """(order, reference, amount) of a capture (refund) POST, else None."""
    parts = request.path.rstrip("/").split("/")
    if request.method != "POST" or parts[-1] != SEGMENT[operation]:
        return None
    body = orjson.loads(request.body)
    return parts[-2], body.get("reference"), body[AMOUNT_FIELD[operation]]


def _item_key(order_id: str, reference: str | None, operation: Operation) -> str:
    key = f"{order_id}:{reference}" if reference else order_id
    return key if operation is Operation.CAPTURE else f"{operation.value}:{key}"


def _checked(method: Callable[..., None]) -> Callable[..., None]:
    """Mark the machine broken while a step runs, so teardown skips the final checks after
    a failure (and only closes everything)."""

    @functools.wraps(method)
    def step(self: JournalMachine, *args: Any, **kwargs: Any) -> None:
        self.broken = True
        method(self, *args, **kwargs)
        self.broken = False

    return step


fault_plan = st.sampled_from(
    [
        "none",
        "lost",  # booked, every answer lost (retries replay into the same drop)
        "lost-once",  # booked, first answer lost; the retry gets the replay
        "never",  # never processed, every attempt
        "never-once",
        "lost-then-429",  # booked and lost, then 429 until retries run out
        "never-then-proxy-403",
        "lost-then-proxy-403",  # booked and lost, then a refusal that proves nothing
        "503",
    ]
)


class JournalMachine(RuleBasedStateMachine):
    #: What the batch's items do.
    operation = Operation.CAPTURE

    def __init__(self) -> None:
        super().__init__()
        self.broken = True
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.mkdtemp(prefix="kom-journal-sm-")
        self.path = os.path.join(self.dir, "journal.sqlite")
        self.fake = FakeKlarna()
        self.om: KlarnaOM | None = None
        self.wrong_password: KlarnaOM | None = None
        self.journal: SQLiteJournal | None = None
        self.items = [Item(o, reference, operation=self.operation) for o, reference in ITEMS]
        self.log: list[str] = []  # what happened, for a failure's report
        self._await(self._start())
        self.broken = False

    # --- lifecycle ----------------------------------------------------------------------

    def _await(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coro)

    def _client(self, password: str) -> KlarnaOM:
        sleeps = InstantSleep()
        policy = RetryPolicy(max_attempts=3, jitter=lambda d: d, sleep=sleeps)
        return KlarnaOM(
            self.fake.username,
            password,
            base_url=self.fake.base_url,
            retry=policy,
            clock=sleeps.clock,  # 429s end at the deadline, which instant waits reach at once
        )

    async def _start(self) -> None:
        await self.fake.start()
        for order_id in ORDERS:
            self.fake.add_order(order_id, amount=AUTHORIZED)
        self.om = self._client(self.fake.password)
        self.wrong_password = self._client("wrong-password")
        self.journal = await SQLiteJournal(self.path, clock=self.fake.now).open()
        if self.operation is Operation.REFUND:  # the money to refund
            for order_id in ORDERS:
                await self.om.captures.create(order_id, CaptureRequest(captured_amount=AUTHORIZED))

    async def _close(self) -> None:
        closes: list[Callable[[], Coroutine[Any, Any, None]]] = [
            thing.close for thing in (self.om, self.wrong_password, self.journal) if thing
        ]
        for close in (*closes, self.fake.close):
            with contextlib.suppress(Exception):
                await close()

    def teardown(self) -> None:
        try:
            if not self.broken:
                self._await(self._settle_and_check())
        finally:
            try:
                self._await(self._close())
                self._await(self.loop.shutdown_asyncgens())
                self._await(self.loop.shutdown_default_executor())
            finally:
                self.loop.close()
                shutil.rmtree(self.dir, ignore_errors=True)

    # --- observation --------------------------------------------------------------------

    @property
    def _om(self) -> KlarnaOM:
        assert self.om is not None
        return self.om

    @property
    def _journal(self) -> SQLiteJournal:
        assert self.journal is not None
        return self.journal

    async def _entries(self) -> dict[str, JournalEntry]:
        return {e.item_key: e for e in await self._journal.entries()}

    def _booked(self) -> Sequence[Booked]:
        if self.operation is Operation.REFUND:
            return [
                Booked(r.order_id, r.refund_id, r.reference, r.refunded_amount, r.idempotency_key)
                for r in self.fake.booked_refunds
            ]
        return [
            Booked(c.order_id, c.capture_id, c.reference, c.captured_amount, c.idempotency_key)
            for c in self.fake.booked_captures
        ]

    def _many(self, client: KlarnaOM, concurrency: int) -> AsyncGenerator[CaptureOutcome, None]:
        """The batch: ``capture_many`` for captures (it must stay as it is), else ``run_many``."""
        items = [i.batch_item() for i in self.items]
        many = client.capture_many if self.operation is Operation.CAPTURE else client.run_many
        return many(items, journal=self._journal, concurrency=concurrency)

    def _booked_under(self, key: str) -> list[Booked]:
        return [c for c in self._booked() if c.idempotency_key == key]

    # --- runs ---------------------------------------------------------------------------

    async def _run(
        self, client: KlarnaOM, concurrency: int
    ) -> tuple[list[CaptureOutcome], tuple[str, ...]]:
        """Run the current batch: its outcomes, and the items a stopped batch never sent."""
        outcomes: list[CaptureOutcome] = []
        try:
            async for outcome in self._many(client, concurrency):
                outcomes.append(outcome)
        except BatchAbortedError as error:  # a batch that cannot work (a 401) stops early
            self.log.append(f"  stopped: {error}")
            return outcomes, error.not_sent
        return outcomes, ()

    async def _checked_run(
        self,
        client: KlarnaOM,
        concurrency: int,
        *,
        clean: bool,
        nothing_processed: bool = False,
        reads_fail: bool = False,
    ) -> list[CaptureOutcome]:
        """One complete run of the current batch, with the checks every run must pass."""
        before = await self._entries()
        expired = {k for k, e in before.items() if self._journal.key_expired(e)}
        # Orders where an earlier run left an item unknown or needing review: a new item of
        # such an order may be held back (it could be that item under a changed reference).
        unsettled_orders = {e.order_id for e in before.values() if e.status in UNSETTLED}
        booked_before = len(self._booked())
        first_request = len(self.fake.requests)
        outcomes, not_sent = await self._run(client, concurrency)
        self.log.append("  -> " + ", ".join(f"{o.item_key}={o.status.value}" for o in outcomes))
        after = await self._entries()
        requests = self.fake.requests[first_request:]
        posts = [p for r in requests if (p := _post_item(r, self.operation))]
        posted = {_item_key(order_id, ref, self.operation) for order_id, ref, _ in posts}
        by_key = {o.item_key: o for o in outcomes}
        assert len(by_key) == len(outcomes), "one outcome per item"
        assert not set(by_key) & set(not_sent)
        assert set(by_key) | set(not_sent) == {i.key for i in self.items}, "an item was lost"
        if not_sent:
            assert not clean, f"a clean run stopped: {not_sent}"
        for key in not_sent:
            assert before.get(key) == after.get(key), f"{key} was not sent but journaled"
            assert key not in posted, f"{key} was not sent but POSTed"
        for item in self.items:
            outcome = by_key.get(item.key)
            if outcome is None:
                continue
            old = before.get(item.key)
            edited = (
                old is not None
                and old.status is not JournalStatus.REFUSED
                and (old.captured_amount, old.reference) != (item.amount, item.reference)
            )
            if isinstance(outcome.error, ItemHeldBackError):
                # run_many holds an order's later items back once an earlier item of it in
                # this run ended failed, refused or needs review: never sent, never claimed.
                assert self.operation is not Operation.CAPTURE, (item, outcome)
                holds = {CaptureStatus.FAILED, CaptureStatus.REFUSED, CaptureStatus.NEEDS_REVIEW}
                assert any(
                    o.order_id == item.order_id and o.item_key != item.key and o.status in holds
                    for o in outcomes
                ), (item, outcome)
                assert item.key not in posted, f"held back {item.key} was sent"
                assert after.get(item.key) == old, (old, after.get(item.key))
                # The first item of the order that did not end done holds the rest back;
                # when it only met 429s, what it holds back is failed: never refused
                # because Klarna was busy.
                holder = next(
                    by_key[i.key]
                    for i in self.items
                    if i.order_id == item.order_id
                    and i.key in by_key
                    and by_key[i.key].status in holds
                    and not isinstance(by_key[i.key].error, ItemHeldBackError)
                )
                busy = isinstance(holder.error, RateLimitError) and not (
                    holder.error.outcome_unknown
                )
                fresh_status = CaptureStatus.FAILED if busy else CaptureStatus.REFUSED
                expected = {
                    None: fresh_status,
                    JournalStatus.REFUSED: fresh_status,
                    JournalStatus.IN_FLIGHT: CaptureStatus.FAILED,
                    JournalStatus.FAILED: CaptureStatus.FAILED,
                    JournalStatus.NEEDS_REVIEW: CaptureStatus.NEEDS_REVIEW,
                    JournalStatus.CAPTURED: CaptureStatus.SKIPPED,
                }[None if old is None else old.status]
                if edited:  # as a claim judges an edited item
                    assert old is not None
                    expected = EDITED[old.status]
                assert outcome.status is expected, (old, outcome)
                if old is not None and old.status is not JournalStatus.REFUSED:
                    assert outcome.idempotency_key == old.idempotency_key, (old, outcome)
                continue
            if edited:
                # An edited item is never sent (under any key), never skipped: refused, or
                # failed (unknown, its key named) while its earlier send is unknown.
                assert old is not None
                assert outcome.status is EDITED[old.status], (item, outcome)
                assert isinstance(outcome.error, ItemConflictError), outcome
                unsettled = old.status in UNSETTLED
                assert outcome.error.outcome_unknown is unsettled, outcome
                assert outcome.idempotency_key == old.idempotency_key, (old, outcome)
                assert item.key not in posted, f"edited {item.key} was sent"
                assert after[item.key] == old, (old, after[item.key])
                continue
            if isinstance(outcome.error, ClockSkewError):
                # Klarna's time could not be learned (its order reads met only 5xx, which
                # may be a proxy's): nothing claimed, nothing sent; reported as the journal
                # holds it (an edited item as a claim reports it: above).
                assert reads_fail, (item, outcome)
                assert item.key not in posted, f"{item.key} was sent by an unchecked clock"
                now = after.get(item.key)
                if old is not None and now != old:
                    # Claimed to resend its earlier run's key, then found unchecked: still
                    # unknown under that key, dated as it was.
                    assert old.status in UNKNOWN, (old, now)
                    assert now is not None, old
                    assert now.status is JournalStatus.FAILED, now
                    assert now.uncertain, now
                    assert (now.idempotency_key, now.key_sent_at) == (
                        old.idempotency_key,
                        old.key_sent_at,
                    ), (old, now)
                status = None if old is None else old.status
                assert outcome.status is UNCHECKED[status], (old, outcome)
                if status not in (None, JournalStatus.REFUSED):
                    assert outcome.idempotency_key == old.idempotency_key, (old, outcome)
                    assert outcome.error.outcome_unknown, outcome
                continue
            # An item that would take a new key: new, refused before, or unknown under a key
            # Klarna may have forgotten (reconciled in this run, and found never booked).
            reconciled = old is not None and old.status in UNKNOWN and item.key in expired
            fresh = old is None or old.status is JournalStatus.REFUSED or reconciled
            if fresh and isinstance(outcome.error, ItemConflictError):
                # Held back next to another run's unsettled item of the same order.
                assert item.order_id in unsettled_orders, (item, outcome)
                assert outcome.status is CaptureStatus.REFUSED, (item, outcome)
                assert item.key not in posted, f"held back {item.key} was sent"
                if reconciled:
                    assert after[item.key].status is JournalStatus.REFUSED, after[item.key]
                else:
                    assert after.get(item.key) == old, (old, after.get(item.key))
                continue
            assert not isinstance(outcome.error, ItemConflictError), (item, outcome)
            assert outcome.idempotency_key == after[item.key].idempotency_key, (outcome, after)
            if outcome.status in (CaptureStatus.CAPTURED, CaptureStatus.SKIPPED):
                [capture] = [c for c in self._booked() if c.id == outcome.created_id]
                assert (capture.order_id, capture.reference, capture.amount) == (
                    item.order_id,
                    item.reference,
                    item.amount,
                ), (item, capture)
                entry = after[item.key]
                assert entry.status is JournalStatus.CAPTURED, entry
                assert entry.capture_id == outcome.created_id
            if old is not None and old.status is JournalStatus.CAPTURED:
                assert outcome.status is CaptureStatus.SKIPPED, (item, outcome)
                assert outcome.created_id == old.capture_id
                assert item.key not in posted
            if old is not None and old.status is JournalStatus.NEEDS_REVIEW:
                assert outcome.status is CaptureStatus.NEEDS_REVIEW, (item, outcome)
                assert item.key not in posted
            if outcome.status is CaptureStatus.NEEDS_REVIEW:
                # A reference finds the item's capture by name: only a reference-less item
                # can be ambiguous.
                assert item.reference is None, (item, outcome)
                assert after[item.key].status is JournalStatus.NEEDS_REVIEW
            if outcome.status is CaptureStatus.REFUSED:
                assert after[item.key].status is JournalStatus.REFUSED, after[item.key]
                assert not self._booked_under(after[item.key].idempotency_key)
            if outcome.status is CaptureStatus.FAILED:
                assert after[item.key].status in UNKNOWN, after[item.key]
            if clean:
                assert outcome.status is not CaptureStatus.FAILED, (item, outcome)
                assert outcome.status is not CaptureStatus.REFUSED, (item, outcome)
        if nothing_processed:
            assert len(self._booked()) == booked_before, "a refused run booked something"
        self._check_transitions(before, after, expired)
        return outcomes

    def _check_transitions(
        self,
        before: dict[str, JournalEntry],
        after: dict[str, JournalEntry],
        expired: set[str],
    ) -> None:
        """An uncertain item keeps its key, and is never called refused, unless its key had
        expired and Klarna's order showed nothing booked under it."""
        for key, old in before.items():
            new = after[key]
            if old.status is JournalStatus.CAPTURED:
                assert (new.status, new.capture_id) == (old.status, old.capture_id), (old, new)
            if old.status is JournalStatus.NEEDS_REVIEW:
                assert new.status is JournalStatus.NEEDS_REVIEW, (old, new)
            if old.status not in UNKNOWN:
                continue
            left = new.idempotency_key != old.idempotency_key
            if left or new.status is JournalStatus.REFUSED:
                assert key in expired, f"{key}: unknown {old} became {new} with a live key"
                assert not self._booked_under(old.idempotency_key), (
                    f"{key}: key {old.idempotency_key} was abandoned but had booked"
                    f" {self._booked_under(old.idempotency_key)}"
                )

    # --- rules --------------------------------------------------------------------------

    @rule(concurrency=st.sampled_from([1, 5]))
    @_checked
    def clean_run(self, concurrency: int) -> None:
        self.log.append(f"clean run (concurrency {concurrency})")
        self._await(self._checked_run(self._om, concurrency, clean=True))

    @initialize(
        plans=st.tuples(fault_plan, fault_plan, fault_plan),
        reads_fail=st.just(False),
        concurrency=st.sampled_from([1, 5]),
    )
    @_checked
    def first_run(self, plans: tuple[str, str, str], reads_fail: bool, concurrency: int) -> None:
        """Every example starts with a run that leaves some items unknown (most often)."""
        self.faulty_run(plans, reads_fail, concurrency)

    @rule(
        plans=st.tuples(fault_plan, fault_plan, fault_plan),
        reads_fail=st.booleans(),
        concurrency=st.sampled_from([1, 5]),
    )
    @_checked
    def faulty_run(self, plans: tuple[str, str, str], reads_fail: bool, concurrency: int) -> None:
        """Each order's captures meet their own faults; reconciling reads may fail too."""
        self.log.append(
            f"faulty run {dict(zip(ORDERS, plans, strict=True))}"
            + (", order reads fail" if reads_fail else "")
        )
        if reads_fail:
            self.fake.inject(ServerFailure(503), method="GET", times=None)
        for order_id, plan in zip(ORDERS, plans, strict=True):
            path = f"/orders/{order_id}/{SEGMENT[self.operation]}"

            def inject(fault: Any, times: int | None = None, path: str = path) -> None:
                self.fake.inject(fault, method="POST", path=path, times=times)

            match plan:
                case "lost":
                    inject(DropAfterProcessing())
                case "lost-once":
                    inject(DropAfterProcessing(), times=1)
                case "never":
                    inject(DropConnection())
                case "never-once":
                    inject(DropConnection(), times=1)
                case "lost-then-429":
                    inject(DropAfterProcessing(), times=1)
                    inject(RateLimited(retry_after="1"))
                case "never-then-proxy-403":
                    inject(DropConnection(), times=1)
                    inject(NonJsonError(403, "<html>Forbidden</html>"))
                case "lost-then-proxy-403":
                    inject(DropAfterProcessing(), times=1)
                    inject(NonJsonError(403, "<html>Forbidden</html>"))
                case "503":
                    inject(ServerFailure(503))
        try:
            self._await(
                self._checked_run(self._om, concurrency, clean=False, reads_fail=reads_fail)
            )
        finally:
            self.fake.clear_faults()

    @rule(refusal=st.sampled_from(["401", "429", "proxy-403"]), concurrency=st.sampled_from([1, 5]))
    @_checked
    def refused_run(self, refusal: str, concurrency: int) -> None:
        """Every attempt is refused for a reason that proves nothing about earlier sends."""
        self.log.append(f"refused run ({refusal}, concurrency {concurrency})")
        client = self._om
        if refusal == "401":
            assert self.wrong_password is not None
            client = self.wrong_password
        elif refusal == "429":
            self.fake.inject(RateLimited(retry_after="1"), method="POST", times=None)
        else:
            self.fake.inject(NonJsonError(403, "<html>Forbidden</html>"), method="POST", times=None)
        try:
            self._await(self._checked_run(client, concurrency, clean=False, nothing_processed=True))
        finally:
            self.fake.clear_faults()

    @rule(
        delayed=st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any),
        after=st.integers(1, len(ITEMS)),
        concurrency=st.sampled_from([1, 2, 5]),
    )
    @_checked
    def killed_run(self, delayed: tuple[bool, bool, bool], after: int, concurrency: int) -> None:
        """kill -9 mid-run: captures booked, their answers still on the way (delayed after
        processing), and the run cancelled once ``after`` of them hang (or every worker
        does), so their journal rows stay in flight."""
        slow = [o for o, d in zip(ORDERS, delayed, strict=True) if d]
        self.log.append(
            f"killed run (delayed {slow}, kill after {after}, concurrency {concurrency})"
        )
        for order_id in slow:
            self.fake.inject(
                Delay(KILL_DELAY, after_processing=True),
                method="POST",
                path=f"/orders/{order_id}/{SEGMENT[self.operation]}",
                times=None,
            )
        try:
            self._await(self._killed_run(after, concurrency))
        finally:
            self.fake.clear_faults()

    async def _killed_run(self, after: int, concurrency: int) -> None:
        before = await self._entries()
        expired = {k for k, e in before.items() if self._journal.key_expired(e)}
        first_request = len(self.fake.requests)
        outcomes = self._many(self._om, concurrency)
        references = {i.key: i.reference for i in self.items}
        seen = 0
        finished = False
        following: asyncio.Future[CaptureOutcome] = asyncio.ensure_future(anext(outcomes))
        try:
            while True:
                arrival = asyncio.ensure_future(
                    self.fake.wait_for_requests(len(self.fake.requests) + 1)
                )
                waiting: set[asyncio.Future[Any]] = {following, arrival}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                arrival.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await arrival
                if following in done:
                    try:
                        outcome = following.result()
                    except StopAsyncIteration:
                        finished = True
                        break
                    seen += 1
                    if outcome.created_id is not None:
                        [capture] = [c for c in self._booked() if c.id == outcome.created_id]
                        assert (capture.order_id, capture.reference) == (
                            outcome.order_id,
                            references[outcome.item_key],
                        ), (outcome, capture)
                    following = asyncio.ensure_future(anext(outcomes))
                stuck = sum(isinstance(r.fault, Delay) for r in self.fake.requests[first_request:])
                # Kill once enough captures hang, or every worker hangs, or every item is
                # done or hanging: waiting longer would only wait for the delay.
                if stuck >= min(after, concurrency) or seen + stuck >= len(self.items):
                    break
        finally:
            if not following.done():
                following.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await following
            await outcomes.aclose()
        stuck = sum(isinstance(r.fault, Delay) for r in self.fake.requests[first_request:])
        self.log.append(f"  -> {seen} outcomes, {stuck} answers cut off, finished={finished}")
        self._check_transitions(before, await self._entries(), expired)

    @rule(index=st.integers(0, len(ITEMS) - 1), amount=st.sampled_from(EDITED_AMOUNTS))
    @_checked
    def edit_amount(self, index: int, amount: int) -> None:
        item = self.items[index]
        self.log.append(f"edit {item.key}: {item.amount} -> {amount}")
        item.amount = amount

    @rule(hours=st.sampled_from([12, 25]))
    @_checked
    def time_passes(self, hours: int) -> None:
        """After 25 hours (or two halves) Klarna has forgotten the keys and the journal
        reconciles unknown items instead of resending them."""
        self.log.append(f"{hours} hours pass")
        self.fake.advance_clock(hours * HOUR)

    @rule()
    @_checked
    def reconcile(self) -> None:
        self.log.append("om.reconcile(journal)")
        self._await(self._reconcile())

    async def _reconcile(self) -> None:
        before = await self._entries()
        expired = {k for k, e in before.items() if self._journal.key_expired(e)}
        results = await self._om.reconcile(self._journal)
        self.log.append("  -> " + ", ".join(f"{r.item_key}={r.verdict}" for r in results))
        assert {r.item_key for r in results} == {
            k for k, e in before.items() if e.status in UNKNOWN
        }
        after = await self._entries()
        for result in results:
            entry = after[result.item_key]
            if result.verdict is Verdict.CAPTURED:
                assert entry.status is JournalStatus.CAPTURED
                assert entry.capture_id == result.capture_id
            elif result.verdict is Verdict.NOT_CAPTURED:
                assert entry.status is JournalStatus.REFUSED
            elif result.verdict is Verdict.NEEDS_REVIEW:
                assert entry.status is JournalStatus.NEEDS_REVIEW
                assert entry.reference is None, entry
            else:
                assert entry.status in UNKNOWN, (result, entry)
        self._check_transitions(before, after, expired)

    @rule()
    @_checked
    def restart(self) -> None:
        """A new process: a new client (its key memory is gone) and the journal reopened."""
        self.log.append("restart")
        self._await(self._restart())

    async def _restart(self) -> None:
        await self._om.close()
        await self._journal.close()
        self.om = self.journal = None
        self.om = self._client(self.fake.password)
        self.journal = await SQLiteJournal(self.path, clock=self.fake.now).open()

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    @_checked
    def booked_exactly_as_journaled(self) -> None:
        self._await(self._check_invariants())

    async def _check_invariants(self) -> None:
        entries = await self._entries()
        booked = self._booked()
        # Each item (order, reference) is booked at most once.
        twice = {
            k: n for k, n in Counter((c.order_id, c.reference) for c in booked).items() if n > 1
        }
        assert not twice, f"booked twice: {twice}\n" + "\n".join(self.log)
        assert set(entries) <= {i.key for i in self.items}
        by_key = {e.idempotency_key: e for e in entries.values()}
        assert len(by_key) == len(entries), "two items share a key"
        # Every capture was booked under the current key of its item's entry, and that entry
        # does not claim nothing was booked.
        for capture in booked:
            entry = by_key.get(capture.idempotency_key or "")
            assert entry is not None, f"lost outcome: {capture} has no journal entry\n" + (
                "\n".join(self.log)
            )
            assert entry.status is not JournalStatus.REFUSED, (entry, capture)
            assert (entry.order_id, entry.reference, entry.captured_amount) == (
                capture.order_id,
                capture.reference,
                capture.amount,
            ), (entry, capture)
            assert entry.operation is self.operation, entry
        by_id = {c.id: c for c in booked}
        captured = [e for e in entries.values() if e.status is JournalStatus.CAPTURED]
        assert len({e.capture_id for e in captured}) == len(captured)
        for entry in captured:
            found = by_id.get(entry.capture_id or "")
            assert found is not None, f"{entry} names a capture the fake never booked"
            assert found.order_id == entry.order_id
            assert found.idempotency_key == entry.idempotency_key, (entry, found)
        for entry in entries.values():
            if entry.status is JournalStatus.NEEDS_REVIEW:
                assert entry.reference is None, entry
        # A key is only ever sent with one body: never an edited item under its old key.
        bodies: dict[str, set[tuple[str, str | None, int]]] = {}
        for request in self.fake.requests:
            post = _post_item(request, self.operation)
            if post is not None and request.idempotency_key is not None:
                bodies.setdefault(request.idempotency_key, set()).add(post)
        reused = {k: v for k, v in bodies.items() if len(v) > 1}
        assert not reused, f"a key was sent with different captures: {reused}"

    # --- the end ------------------------------------------------------------------------

    async def _settle_and_check(self) -> None:
        """Clean reruns until nothing is unknown; then every item is settled exactly once."""
        self.fake.clear_faults()
        # Items run_many held back in the last run: an earlier item of their order was
        # refused for good (edited after it was captured) or needs review. They wait for a
        # person, unknown ones under their key, and are judged by what holds them.
        held: set[str] = set()
        for _ in range(4):
            self.log.append("settle: clean run")
            outcomes = await self._checked_run(self._om, 5, clean=True)
            held = {o.item_key for o in outcomes if isinstance(o.error, ItemHeldBackError)}
            entries = await self._entries()
            unknown = [e for e in entries.values() if e.status in UNKNOWN]
            unknown = [e for e in unknown if e.item_key not in held]
            if not unknown and all(
                item.key in held or self._final(item, entries) for item in self.items
            ):
                break
            if unknown:
                self.log.append("settle: om.reconcile(journal)")
                await self._reconcile()
            # An edited item whose earlier send is unknown is refused until the edit is undone
            # (or reconciled once its key has expired): undo it, as a person would.
            for item in self.items:
                entry = entries.get(item.key)
                if entry is not None and entry.status in UNKNOWN:
                    assert entry.captured_amount is not None
                    item.amount = entry.captured_amount
        entries = await self._entries()
        unknown = [e for e in entries.values() if e.status in UNKNOWN and e.item_key not in held]
        assert not unknown, f"still unknown after clean reruns: {unknown}"
        await self._check_invariants()
        for item in self.items:
            if item.key in held:
                continue
            assert self._final(item, entries), (item, entries.get(item.key))
            entry = entries.get(item.key)
            mine = [
                c
                for c in self._booked()
                if (c.order_id, c.reference) == (item.order_id, item.reference)
            ]
            if entry is None or entry.status is JournalStatus.REFUSED:
                assert not mine, (entry, mine)
            elif entry.status is JournalStatus.CAPTURED:
                assert [c.id for c in mine] == [entry.capture_id], (entry, mine)
        by_key = {e.idempotency_key: e for e in entries.values()}
        for capture in self._booked():
            entry = by_key[capture.idempotency_key or ""]
            assert entry.status in SETTLED or entry.item_key in held, (entry, capture)

    @staticmethod
    def _final(item: Item, entries: dict[str, JournalEntry]) -> bool:
        """Whether ``item`` has reached an end clean reruns cannot change: captured or
        needing review (an edit after that is refused for good), or never journaled (or
        refused) and held back by an item of its order that needs review (a person settles
        that one first)."""
        entry = entries.get(item.key)
        if entry is None or entry.status is JournalStatus.REFUSED:
            held = any(
                e.order_id == item.order_id
                and e.item_key != item.key
                and e.status is JournalStatus.NEEDS_REVIEW
                for e in entries.values()
            )
            if entry is None or held:
                return held
        return entry.status in SETTLED


TestJournalStateMachine = JournalMachine.TestCase
TestJournalStateMachine.settings = settings(
    max_examples=_EXAMPLES,
    stateful_step_count=_STEPS,
    deadline=None,
    database=None,
    print_blob=True,
)


class RefundJournalMachine(JournalMachine):
    """The same runs, faults, kills, edits and expired keys, for a batch of refunds."""

    operation = Operation.REFUND


TestRefundJournalStateMachine = RefundJournalMachine.TestCase
TestRefundJournalStateMachine.settings = settings(
    max_examples=max(_EXAMPLES // 2, 1),
    stateful_step_count=_STEPS,
    deadline=None,
    database=None,
    print_blob=True,
)
