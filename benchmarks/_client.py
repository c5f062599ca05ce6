"""One benchmark workload in a fresh process; prints one JSON line with what it measured.

    python benchmarks/_client.py VARIANT --url http://127.0.0.1:PORT -n 20000 -c 64

Every variant sends the same captures: order ``bench-{i}`` (``many_journal_uuid``: a UUID, as
Klarna's order ids are), the same headers and the same JSON body (the reference capture
request with a per-item ``reference``); each item's body is built per request (a dict for
the raw stacks, a ``CaptureRequest`` for the library), as an application would. A warm-up
round (its own orders) opens the connections and fills caches first; then the process CPU
time (all threads, so the journal's writer thread counts), the wall time and, at exit, the
peak RSS are taken.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import aiohttp

from klarna_om_async import KlarnaOM, SQLiteJournal, __version__
from klarna_om_async.models import CaptureRequest, OrderLine, OrderLineType, ShippingInfo

USERNAME, PASSWORD = "bench-user", "bench-password"
_ORDERS = "/ordermanagement/v1/orders/"
_AUTH = "Basic YmVuY2gtdXNlcjpiZW5jaC1wYXNzd29yZA=="  # bench-user:bench-password
_GET_HEADERS = {
    "Accept": "application/json",
    "User-Agent": f"klarna-om-async/{__version__}",
    "Authorization": _AUTH,
}
_POST_HEADERS = {**_GET_HEADERS, "Content-Type": "application/json"}

One = Callable[[int], Awaitable[None]]


def order_id(i: int) -> str:
    return f"bench-{i:07d}"


def klarna_order_id(i: int) -> str:
    """Order ``i``'s id as Klarna issues them: a UUID, random-looking (the same for the same
    ``i``). Where items land in the journal's indexes depends on it: ``bench-{i}`` ids follow
    each other, Klarna's are scattered."""
    digest = hashlib.blake2b(i.to_bytes(8, "big"), digest_size=16).digest()
    return str(uuid.UUID(bytes=digest, version=4))


def payload(i: int) -> dict[str, Any]:
    """The body as a raw-stack user builds it; the same JSON as ``model(i)`` serializes to."""
    return {
        "captured_amount": 6000,
        "description": "Shipped the full order",
        "reference": f"ref-{i}",
        "order_lines": [
            {
                "name": "Tomatoes",
                "quantity": 10,
                "unit_price": 600,
                "total_amount": 6000,
                "type": "physical",
                "reference": "123050",
                "quantity_unit": "kg",
                "tax_rate": 2500,
                "total_tax_amount": 1200,
            }
        ],
        "shipping_info": [
            {
                "shipping_company": "DHL US",
                "tracking_number": "1234567890",
                "return_shipping_company": "UPS",
                "return_tracking_number": "112233445566778899",
            }
        ],
    }


def model(i: int) -> CaptureRequest:
    return CaptureRequest(
        captured_amount=6000,
        description="Shipped the full order",
        reference=f"ref-{i}",
        order_lines=[
            OrderLine(
                name="Tomatoes",
                quantity=10,
                unit_price=600,
                total_amount=6000,
                type=OrderLineType.PHYSICAL,
                reference="123050",
                quantity_unit="kg",
                tax_rate=2500,
                total_tax_amount=1200,
            )
        ],
        shipping_info=[
            ShippingInfo(
                shipping_company="DHL US",
                tracking_number="1234567890",
                return_shipping_company="UPS",
                return_tracking_number="112233445566778899",
            )
        ],
    )


def encode(i: int) -> bytes:
    return json.dumps(payload(i), separators=(",", ":")).encode()


#: ``--pace``: captures per second, or None for as fast as the stack goes. The library paces
#: itself (``KlarnaOM(rate_limit=PACE)``); the raw stacks are paced by ``drive``.
PACE: float | None = None


async def drive(indices: range, concurrency: int, one: One, pace: float | None = None) -> None:
    """``concurrency`` tasks sending ``one(i)`` for every index, like a bounded worker pool;
    with ``pace``, each call waits for its slot on a 1/pace grid the workers share."""
    shared: Iterator[int] = iter(indices)
    loop = asyncio.get_running_loop()
    grid = [loop.time()]

    async def worker() -> None:
        for i in shared:
            if pace is not None:
                now = loop.time()
                slot = grid[0] = max(grid[0], now)
                grid[0] += 1 / pace
                if slot > now:
                    await asyncio.sleep(slot - now)
            await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


# --- the stacks -------------------------------------------------------------------------------


@asynccontextmanager
async def raw_aiohttp(
    url: str, concurrency: int, *, get: bool, defaults: bool = True
) -> AsyncIterator[One]:
    """aiohttp as its docs show it: the session's defaults (a 5-minute total timeout, which
    costs a loop timer per request), or, with ``defaults=False``, no timeout at all."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.client.DEFAULT_TIMEOUT if defaults else aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def create(i: int) -> str:
            headers = {**_POST_HEADERS, "Klarna-Idempotency-Key": str(uuid.uuid4())}
            async with session.post(
                f"{url}{_ORDERS}{order_id(i)}/captures", data=encode(i), headers=headers
            ) as answer:
                await answer.read()
                if answer.status != 201:
                    raise RuntimeError(f"unexpected {answer.status}")
                return answer.headers["Capture-Id"]

        async def create_get(i: int) -> None:
            capture_id = await create(i)
            async with session.get(
                f"{url}{_ORDERS}{order_id(i)}/captures/{capture_id}", headers=_GET_HEADERS
            ) as answer:
                data = json.loads(await answer.read())
                if answer.status != 200 or data["capture_id"] != capture_id:
                    raise RuntimeError(f"unexpected {answer.status}")

        async def create_only(i: int) -> None:
            await create(i)

        yield create_get if get else create_only


@asynccontextmanager
async def raw_httpx(url: str, concurrency: int) -> AsyncIterator[One]:
    import httpx  # type: ignore[import-not-found, unused-ignore]  # optional

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=20.0) as client:

        async def create(i: int) -> None:
            headers = {**_POST_HEADERS, "Klarna-Idempotency-Key": str(uuid.uuid4())}
            answer = await client.post(
                f"{url}{_ORDERS}{order_id(i)}/captures", content=encode(i), headers=headers
            )
            if answer.status_code != 201:
                raise RuntimeError(f"unexpected {answer.status_code}")
            answer.headers["Capture-Id"]

        yield create


Tracing = Literal["off", "middleware", "instrument"]


def client(url: str, concurrency: int, tracing: Tracing = "off") -> KlarnaOM:
    """The library's client; with ``tracing``, OpenTelemetry installed but no SDK configured
    (the API's no-op provider, as in a service that ships tracing and turns it off)."""
    if tracing == "off":
        return KlarnaOM(
            USERNAME, PASSWORD, base_url=url, max_connections=concurrency, rate_limit=PACE
        )
    from klarna_om_async.telemetry import instrument, otel_middleware

    if tracing == "middleware":
        return KlarnaOM(
            USERNAME,
            PASSWORD,
            base_url=url,
            max_connections=concurrency,
            middlewares=[otel_middleware()],
            rate_limit=PACE,
        )
    return instrument(
        KlarnaOM(USERNAME, PASSWORD, base_url=url, max_connections=concurrency, rate_limit=PACE)
    )


@asynccontextmanager
async def library(
    url: str, concurrency: int, *, get: bool, tracing: Tracing = "off"
) -> AsyncIterator[One]:
    async with client(url, concurrency, tracing) as om:

        async def create(i: int) -> None:
            await om.captures.create(order_id(i), model(i))

        async def create_get(i: int) -> None:
            oid = order_id(i)
            created = await om.captures.create(oid, model(i))
            capture = await om.captures.get(oid, created.capture_id)
            if capture.capture_id != created.capture_id:
                raise RuntimeError("unexpected capture")

        yield create_get if get else create


async def run_batch(
    om: KlarnaOM,
    indices: range,
    concurrency: int,
    journal: Any,
    order_ids: Callable[[int], str] = order_id,
) -> None:
    items = ((order_ids(i), model(i)) for i in indices)
    captured = 0
    async for outcome in om.capture_many(items, concurrency=concurrency, journal=journal):
        if outcome.capture_id is None:
            raise RuntimeError(f"item failed: {outcome}")
        captured += 1
    if captured != len(indices):
        raise RuntimeError(f"{captured} outcomes for {len(indices)} items")


# --- measuring --------------------------------------------------------------------------------

VARIANTS = (
    "raw_create",
    "raw_create_notimeout",
    "create",
    "many",
    "many_journal",
    "many_journal_normal",
    "many_journal_uuid",
    "raw_create_get",
    "create_get",
    "httpx_create",
    "create_otel_noop",
    "create_instrumented",
)


class Run:
    """``await run(indices)`` sends those captures; ``await run.renew()`` (untimed) readies
    the stack for another batch."""

    def __init__(self, send: Callable[[range], Awaitable[None]]) -> None:
        self.send = send

    def __call__(self, indices: range) -> Awaitable[None]:
        return self.send(indices)

    async def renew(self) -> None:
        """Nothing to renew for a stack that keeps no state between batches."""


class JournaledRun(Run):
    """capture_many with a fresh journal per batch (``renew``), so every slice starts from
    the same empty file and paired slices stay comparable."""

    def __init__(
        self,
        om: KlarnaOM,
        concurrency: int,
        folder: Path,
        durability: Literal["full", "normal"],
        order_ids: Callable[[int], str] = order_id,
    ) -> None:
        super().__init__(
            lambda indices: run_batch(om, indices, concurrency, self.journal, order_ids)
        )
        self.folder = folder
        self.durability = durability
        self.journal: SQLiteJournal | None = None

    async def renew(self) -> None:
        """Close the current journal and open an empty one."""
        if self.journal is not None:
            await self.journal.close()
        self.journal = SQLiteJournal(
            self.folder / f"journal-{time.monotonic_ns()}.sqlite", durability=self.durability
        )
        await self.journal.open()


@asynccontextmanager
async def runner(variant: str, url: str, concurrency: int) -> AsyncIterator[Run]:
    """A ``Run`` that sends captures through ``variant``'s stack."""
    if variant in ("many", "many_journal", "many_journal_normal", "many_journal_uuid"):
        with tempfile.TemporaryDirectory(prefix="klarna-om-bench-") as tmp:
            async with KlarnaOM(
                USERNAME, PASSWORD, base_url=url, max_connections=concurrency, rate_limit=PACE
            ) as om:
                if variant == "many":
                    yield Run(lambda indices: run_batch(om, indices, concurrency, None))
                    return
                durability: Literal["full", "normal"] = (
                    "normal" if variant == "many_journal_normal" else "full"
                )
                ids = klarna_order_id if variant == "many_journal_uuid" else order_id
                run = JournaledRun(om, concurrency, Path(tmp), durability, ids)
                await run.renew()
                try:
                    yield run
                finally:
                    if run.journal is not None:
                        await run.journal.close()
        return
    stack: Any
    if variant == "raw_create":
        stack = raw_aiohttp(url, concurrency, get=False)
    elif variant == "raw_create_notimeout":
        stack = raw_aiohttp(url, concurrency, get=False, defaults=False)
    elif variant == "raw_create_get":
        stack = raw_aiohttp(url, concurrency, get=True)
    elif variant == "create":
        stack = library(url, concurrency, get=False)
    elif variant == "create_get":
        stack = library(url, concurrency, get=True)
    elif variant == "httpx_create":
        stack = raw_httpx(url, concurrency)
    elif variant == "create_otel_noop":
        stack = library(url, concurrency, get=False, tracing="middleware")
    elif variant == "create_instrumented":
        stack = library(url, concurrency, get=False, tracing="instrument")
    else:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    # The library paces itself (its client's rate_limit); a raw stack is paced here.
    pace = PACE if variant.startswith(("raw_", "httpx_")) else None
    async with stack as one:
        yield Run(lambda indices: drive(indices, concurrency, one, pace))


async def measure(variant: str, url: str, n: int, concurrency: int, warmup: int) -> dict[str, Any]:
    async with runner(variant, url, concurrency) as run:
        await run(range(10_000_000, 10_000_000 + warmup))
        split = CpuSplit()
        wall, cpu = await timed(run(range(n)), split)
    return {
        "variant": variant,
        "n": n,
        "concurrency": concurrency,
        "wall_s": wall,
        "cpu_s": cpu,
        "loop_thread_cpu_s": split.thread_cpu,
        "gc_s": split.gc_seconds,
        "gc_collections": split.collections,
        "peak_rss_mib": peak_rss_mib(),
    }


class CpuSplit:
    """Where a timed run's CPU went: the event loop's thread (``time.thread_time``; the rest
    of the process CPU is other threads, e.g. the journal's writer) and the garbage
    collector's passes (``gc.callbacks``: their wall time, on whichever thread ran them)."""

    def __init__(self) -> None:
        self.thread_cpu = 0.0
        self.gc_seconds = 0.0
        self.collections = 0
        self._started = 0.0

    def _on_gc(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.gc_seconds += time.perf_counter() - self._started
            self.collections += 1

    def __enter__(self) -> CpuSplit:
        gc.callbacks.append(self._on_gc)
        self.thread_cpu = -time.thread_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.thread_cpu += time.thread_time()
        gc.callbacks.remove(self._on_gc)


async def paired(
    variant: str, baseline: str, url: str, n: int, concurrency: int, warmup: int, size: int
) -> dict[str, Any]:
    """``variant`` and ``baseline`` in one process, alternating slices of ``size`` captures.

    The machine's speed drifts over seconds (other tenants, frequency); slices a fraction of
    a second long, alternated and each stack going first in turn, share that drift, so the
    ratio of the two CPU totals is steadier than one of two separate runs.
    """
    cpu = {variant: 0.0, baseline: 0.0}
    async with runner(baseline, url, concurrency) as base, runner(variant, url, concurrency) as it:
        stacks = {baseline: base, variant: it}
        for run in stacks.values():
            await run(range(10_000_000, 10_000_000 + warmup))
        for number, start in enumerate(range(0, n, size)):
            indices = range(start, min(start + size, n))
            order = (baseline, variant) if number % 2 == 0 else (variant, baseline)
            for name in order:
                await stacks[name].renew()
                _, spent = await timed(stacks[name](indices))
                cpu[name] += spent
    return {
        "variant": variant,
        "baseline": baseline,
        "n": n,
        "concurrency": concurrency,
        "cpu_s": cpu[variant],
        "baseline_cpu_s": cpu[baseline],
        "ratio": cpu[variant] / cpu[baseline],
        "peak_rss_mib": peak_rss_mib(),  # of both stacks together
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def timed(work: Awaitable[None], split: CpuSplit | None = None) -> tuple[float, float]:
    """Wall and process CPU seconds of ``work``, after a full collection (not counted);
    ``split`` also records where the CPU went."""
    gc.collect()
    with split or contextlib.nullcontext():
        wall0, cpu0 = time.perf_counter(), time.process_time()
        await work
        return time.perf_counter() - wall0, time.process_time() - cpu0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--url", required=True)
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the run here")
    parser.add_argument(
        "--paired-with", metavar="BASELINE", choices=VARIANTS, help="measure against BASELINE"
    )
    parser.add_argument("--slice", type=int, default=1000, help="captures per paired slice")
    parser.add_argument("--pace", type=float, help="captures per second (default: unpaced)")
    args = parser.parse_args(argv)
    global PACE
    PACE = args.pace
    if not args.url.startswith("http://127.0.0.1:"):
        raise SystemExit("the benchmark only talks to a server on 127.0.0.1")
    coro: Awaitable[dict[str, Any]]
    if args.paired_with:
        coro = paired(
            args.variant,
            args.paired_with,
            args.url,
            args.n,
            args.concurrency,
            args.warmup,
            args.slice,
        )
    else:
        coro = measure(args.variant, args.url, args.n, args.concurrency, args.warmup)
    if args.profile:
        import cProfile

        with cProfile.Profile() as profile:
            result = asyncio.run(coro)
        profile.dump_stats(args.profile)
    else:
        result = asyncio.run(coro)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
