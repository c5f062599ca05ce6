"""``klarna-om demo``: a batch against an in-process FakeKlarna with faults, then a check.

The check is the library's promise made visible: despite responses lost after Klarna booked
the capture, 503s and 429s, every order is booked at most once, every capture the client
reports as captured is booked, and none it reports as refused is. An outcome the client
reports as unknown (failed) may be booked or not: a rerun with its key finishes it (or, for an
over-capture, has it refused again).

Which attempts hit a fault is decided from ``--seed`` per order and attempt before the batch
starts, not drawn as requests arrive, so the same seed repeats the same outcome counts
however the concurrent requests interleave.
"""

from __future__ import annotations

import collections
import os
import random
import sys
import tempfile
from collections.abc import Iterable

import attrs
import click
from rich.console import Console

from ..batch import BatchItem, CaptureOutcome, CaptureStatus
from ..client import KlarnaOM
from ..config import MAX_CONCURRENCY, MAX_RATE_LIMIT, RetryPolicy
from ..models import CaptureRequest
from ..sqlite_journal import SQLiteJournal
from ..testing import DropAfterProcessing, FakeKlarna, Fault, RateLimited, ServerFailure
from ._options import (
    EXIT_OK,
    EXIT_SOME_NOT_CAPTURED,
    Interrupted,
    finite,
    json_option,
    run_interruptible,
)
from ._render import BatchView, cli_console
from ._runner import run_batch

__all__ = ("DemoCheck", "demo", "inject_demo_faults", "inject_planned_faults", "plan_faults")

#: Share of the fault rate per fault kind: lost answers, 503s, 429s.
_FAULT_MIX = ((DropAfterProcessing(), 0.3), (ServerFailure(503), 0.4), (RateLimited("0"), 0.3))
#: Per fault kind: its key in --json output, and its name for people.
_FAULT_NAMES: dict[type[Fault], tuple[str, str]] = {
    DropAfterProcessing: ("dropped_after_processing", "responses dropped after booking"),
    ServerFailure: ("503", "503 Service Unavailable"),
    RateLimited: ("429", "429 Too Many Requests (Retry-After: 0)"),
}
_OVER_CAPTURE_SHARE = 0.02
# Fast and patient: faults are frequent here, but no wait should be long.
_DEMO_RETRY = RetryPolicy(
    max_attempts=10, initial_delay=0.05, max_delay=0.5, deadline=30.0, retry_after_cap=1.0
)


def inject_demo_faults(fake: FakeKlarna, rate: float) -> None:
    """Make about ``rate`` of the capture POSTs fail: lost answers, 503s and 429s."""
    if rate <= 0:
        return
    escaped = 1.0
    for fault, share in _FAULT_MIX:
        # Each request tries the faults in turn, so later ones see only what escaped earlier.
        probability = min(rate * share / escaped, 1.0)
        fake.inject(fault, times=None, method="POST", path="/captures", probability=probability)
        escaped -= rate * share


def plan_faults(
    order_ids: Iterable[str], rate: float, seed: int, max_attempts: int
) -> dict[str, list[Fault]]:
    """Decide from ``seed`` which capture attempts of each order hit which fault.

    Each attempt of an order faults with chance ``rate`` (split over lost answers, 503s and
    429s as in ``_FAULT_MIX``) until one is let through or ``max_attempts`` faulted. The draws
    are made per order in the given order, so they do not depend on when requests arrive.
    """
    rng = random.Random(f"klarna-om-demo-faults-{seed}")
    planned: dict[str, list[Fault]] = {}
    for order_id in order_ids:
        faults: list[Fault] = []
        while len(faults) < max_attempts:
            draw = rng.random()
            if draw >= rate:
                break
            faults.append(_pick_fault(draw / rate))
        if faults:
            planned[order_id] = faults
    return planned


def _pick_fault(point: float) -> Fault:
    """The fault of ``_FAULT_MIX`` that ``point`` (in [0, 1)) falls on."""
    for fault, share in _FAULT_MIX:
        if point < share:
            return fault
        point -= share
    return _FAULT_MIX[-1][0]


def inject_planned_faults(fake: FakeKlarna, planned: dict[str, list[Fault]]) -> None:
    """Queue each order's planned faults for its capture POSTs, one attempt each, in order."""
    for order_id, faults in planned.items():
        # Each POST takes the first fault still queued for its own order: the sequence plays
        # out the same way whatever the other orders do meanwhile.
        path = f"/orders/{order_id}/captures"
        for fault in faults:
            fake.inject(fault, times=1, method="POST", path=path)


@attrs.frozen
class _Plan:
    items: list[BatchItem]
    over_captures: frozenset[str]


def _plan(fake: FakeKlarna, orders: int, seed: int) -> _Plan:
    rng = random.Random(seed)
    items, over = [], set()
    for index in range(orders):
        amount = rng.randrange(1_000, 100_000)
        order_id = fake.add_order(f"demo-{seed}-{index:06d}", amount=amount)
        captured = amount
        if rng.random() < _OVER_CAPTURE_SHARE:
            captured = amount + rng.randrange(1, 1_000)
            over.add(order_id)
        request = CaptureRequest(captured_amount=captured, reference=f"INV-{index:06d}")
        items.append(BatchItem(order_id=order_id, request=request))
    return _Plan(items, frozenset(over))


@attrs.frozen
class DemoCheck:
    """What the demo verifies once the batch is over.

    A failed outcome is unknown: its capture may or may not have been booked, and a rerun
    with its key would finish it exactly once (an over-capture's rerun can only be refused).
    So it fails the check neither way; only a double booking or a reported outcome the fake's
    ledger contradicts does.
    """

    problems: tuple[str, ...]
    booked: int
    captured: int
    #: Items whose outcome is unknown (failed), and how many of those the fake booked.
    unknown: int
    unknown_booked: int
    #: Items that fit their order but were not captured (refused or failed).
    not_captured: int
    #: Over-captures the client reports as refused.
    over_refused: int
    #: Over-captures whose outcome is unknown (failed): a rerun can only have them refused.
    over_unknown: int = 0

    @property
    def passed(self) -> bool:
        """True when no order was booked twice and no reported outcome contradicts the fake."""
        return not self.problems

    @property
    def all_captured(self) -> bool:
        """True when the check passed and every item that fits its order was captured."""
        return self.passed and not self.not_captured

    @classmethod
    def of(cls, fake: FakeKlarna, plan: _Plan, outcomes: list[CaptureOutcome]) -> DemoCheck:
        """Compare what the fake booked with what the client reported."""
        problems = []
        planned = collections.Counter(
            i.order_id for i in plan.items if i.order_id not in plan.over_captures
        )
        counts = {i.order_id: len(fake.captures(i.order_id)) for i in plan.items}
        over_booked = [(o, count) for o, count in counts.items() if count > planned[o]]
        if over_booked:
            order_id, count = over_booked[0]
            problems.append(
                f"{len(over_booked)} order(s) booked more than planned, e.g. {order_id}: "
                f"{count} capture(s) for {planned[order_id]} planned"
            )
        booked = {(c.order_id, c.capture_id) for c in fake.booked_captures}
        booked_keys = {c.idempotency_key for c in fake.booked_captures}
        by_status = {
            status: [o for o in outcomes if o.status is status] for status in CaptureStatus
        }
        phantom = [
            o for o in by_status[CaptureStatus.CAPTURED] if (o.order_id, o.capture_id) not in booked
        ]
        if phantom:
            problems.append(
                f"{len(phantom)} item(s) reported captured but not booked, "
                f"e.g. {phantom[0].order_id}"
            )
        denied = [o for o in by_status[CaptureStatus.REFUSED] if o.idempotency_key in booked_keys]
        if denied:
            problems.append(
                f"{len(denied)} item(s) reported refused but booked, e.g. {denied[0].order_id}"
            )
        if len(outcomes) != len(plan.items):
            problems.append(f"{len(outcomes)} outcome(s) for {len(plan.items)} items")
        unknown = by_status[CaptureStatus.FAILED]
        return cls(
            tuple(problems),
            booked=len(booked),
            captured=len(by_status[CaptureStatus.CAPTURED]),
            unknown=len(unknown),
            unknown_booked=sum(o.idempotency_key in booked_keys for o in unknown),
            not_captured=sum(
                o.status is not CaptureStatus.CAPTURED and o.order_id not in plan.over_captures
                for o in outcomes
            ),
            over_refused=sum(
                o.order_id in plan.over_captures for o in by_status[CaptureStatus.REFUSED]
            ),
            over_unknown=sum(o.order_id in plan.over_captures for o in unknown),
        )

    def describe(self, orders: int, over_captures: int) -> str:
        """One line for people: passed or failed, and why."""
        if not self.passed:
            return "Double-booking check: FAILED - " + "; ".join(self.problems)
        text = (
            f"Double-booking check: passed - {orders} orders, none booked twice; "
            f"all {self.captured} captured item(s) booked; "
            f"{self.over_refused} of {over_captures} over-captures refused."
        )
        fitting = self.unknown - self.over_unknown
        if fitting:
            text += (
                f" {fitting} outcome(s) unknown (failed), {self.unknown_booked} of them "
                "booked once: a rerun with their original keys would finish them exactly once."
            )
        if self.over_unknown:
            text += (
                f" {self.over_unknown} over-capture(s) ended unknown (failed), none booked: "
                "a rerun can only have them refused."
            )
        return text


@click.command()
@click.option(
    "--orders",
    type=click.IntRange(min=1),
    default=3000,
    show_default=True,
    help="Orders to capture.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=MAX_CONCURRENCY),
    default=64,
    show_default=True,
    help="Captures in flight at once.",
)
@click.option(
    "--seed",
    type=int,
    default=1,
    show_default=True,
    help="Seed of the orders, the over-captures and which attempts hit a fault.",
)
@click.option(
    "--fault-rate",
    type=click.FloatRange(0, 0.9),
    callback=finite,
    default=0.1,
    show_default=True,
    help="Share of capture attempts that hit a fault.",
)
@json_option
def demo(orders: int, concurrency: int, seed: int, fault_rate: float, json_output: bool) -> None:
    """Capture thousands of orders on an in-process fake Klarna with faults; no credentials.

    Starts FakeKlarna with ORDERS authorized orders, makes about --fault-rate of the capture
    attempts fail (answers lost after the capture was booked, 503s, 429s with Retry-After)
    and makes 2% of the items over-captures Klarna must refuse. Runs them all through the
    client with an SQLite journal in a temporary directory, prints the summary, and checks
    that no order was booked twice and that every captured (or refused) report matches
    what the fake booked. Unknown (failed) outcomes may be booked or not; the summary says
    how many were.

    \b
    Exit status: 0 when the check passes and every item that fits its order was
    captured; 1 otherwise.
    """
    console = cli_console()
    if not json_output:
        console.print(
            f"Capturing {orders} orders on an in-process FakeKlarna (seed {seed}); "
            f"about {fault_rate:.0%} of capture attempts hit a fault.",
            markup=False,
        )
    try:
        passed = run_interruptible(
            lambda: _demo(console, orders, concurrency, seed, fault_rate, json_output)
        )
    except Interrupted as interrupted:
        click.echo(f"Demo interrupted by {interrupted.signum.name}.", err=True)
        sys.exit(interrupted.exit_code)
    sys.exit(EXIT_OK if passed else EXIT_SOME_NOT_CAPTURED)


async def _demo(
    console: Console, orders: int, concurrency: int, seed: int, fault_rate: float, json_output: bool
) -> bool:
    outcomes: list[CaptureOutcome] = []
    # With --json the demo prints only its summary object, not one line per order; the
    # over-captures it refuses on purpose are counted, not listed.
    view = BatchView(
        console,
        json_output=json_output,
        title="klarna-om demo",
        total=orders,
        outcome_lines=False,
        list_problems=False,
    )

    def report(outcome: CaptureOutcome) -> None:
        outcomes.append(outcome)
        view.report(outcome)

    # The fake does no per-request logging, so it and the client share one event loop.
    async with FakeKlarna(seed=seed) as fake:
        plan = _plan(fake, orders, seed)
        order_ids = (item.order_id for item in plan.items)
        planned = plan_faults(order_ids, fault_rate, seed, _DEMO_RETRY.max_attempts)
        inject_planned_faults(fake, planned)
        with tempfile.TemporaryDirectory(prefix="klarna-om-demo-") as tmp:
            async with (
                KlarnaOM(
                    fake.username,
                    fake.password,
                    base_url=fake.base_url,
                    retry=_DEMO_RETRY,
                    timeout=10.0,
                    max_connections=max(100, concurrency),
                    # The fake has no rate limit: its 429s are injected faults, drawn per
                    # attempt whatever the pace. A client learning a pace from them would
                    # slow down by chance and let deadlines decide outcomes; a pace of its
                    # own (never reached here) keeps the seed's outcome the same every run.
                    rate_limit=MAX_RATE_LIMIT,
                ) as om,
                SQLiteJournal(os.path.join(tmp, "demo.journal.sqlite")) as journal,
            ):
                with view:
                    try:
                        await run_batch(
                            om,
                            iter(plan.items),
                            report=report,
                            concurrency=concurrency,
                            journal=journal,
                        )
                    finally:
                        view.tally.rate_limited = om.rate_limited_count
        check = DemoCheck.of(fake, plan, outcomes)
        faults: collections.Counter[type[Fault]] = collections.Counter(
            type(r.fault) for r in fake.requests if r.fault is not None
        )
        replayed = sum(r.replayed for r in fake.requests)
    _show(view, check, faults, replayed, len(plan.over_captures), orders)
    return check.all_captured


def _show(
    view: BatchView,
    check: DemoCheck,
    faults: collections.Counter[type[Fault]],
    replayed: int,
    over_captures: int,
    orders: int,
) -> None:
    # Most frequent first, ties in a fixed order: the same seed prints the same line.
    ordered = sorted(faults.items(), key=lambda kv: (-kv[1], _FAULT_NAMES[kv[0]][0]))
    injected = ", ".join(f"{count} x {_FAULT_NAMES[kind][1]}" for kind, count in ordered) or "none"
    view.finish(
        extra={
            "double_booking_check": "passed" if check.passed else "failed",
            "problems": list(check.problems),
            "booked": check.booked,
            "unknown_booked": check.unknown_booked,
            "over_captures_unknown": check.over_unknown,
            "over_captures": over_captures,
            "faults": {_FAULT_NAMES[kind][0]: count for kind, count in ordered},
            "replayed": replayed,
        },
        notes=[
            f"Faults injected: {injected}.",
            f"Resent with their original keys and answered from Klarna's idempotency store: "
            f"{replayed}.",
            check.describe(orders, over_captures),
        ],
    )
