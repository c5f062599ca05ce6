"""One scaling run in a fresh process: ``capture_many`` over N generated items; one JSON line.

    python benchmarks/_scaling_client.py none --url http://127.0.0.1:PORT -n 100000
    python benchmarks/_scaling_client.py journal --url ... -n 100000 --journal DIR/j.sqlite
    python benchmarks/_scaling_client.py journal ... --trace 90000      # where memory goes
    python benchmarks/_scaling_client.py cli --url ... --csv FILE.csv --trace 90000

Items come from a generator (order ``bench-{i}``, the reference capture request of
``_client.model``), as a real batch streams them, through ``om.capture_many`` with its
default concurrency. ``journal`` opens an ``SQLiteJournal`` at ``--journal`` (default
durability): a fresh file makes a first run, the file of an earlier run a rerun (every item
skipped). Pointed at a closed port, a batch stops after a few items with
``BatchAbortedError`` and reads the rest of the source without sending (``not_sent`` in the
output). Measured from the call to the last outcome: wall and process CPU time (all
threads, so the journal's writer counts); the resident set at every tenth of the outcomes
(``/proc/self/statm``, with SQLite's own heap) and the peak (``ru_maxrss``) at exit.

``--trace K`` is for diagnosis (tracemalloc slows the run several times): tracemalloc
snapshots at the (K/10)-th and the K-th outcome, and their difference by line and by call
stack (what grew, in bytes per item), and every container holding at least K/2 entries at
the K-th outcome, named by what holds it (e.g. ``_Run.seen``). ``cli`` runs ``klarna-om
batch CSV --json`` in this process (only with ``--trace``; the measured CLI rows of
``bench_scaling.py`` run the real command), its outputs sent to /dev/null.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import gc
import json
import os
import resource
import sys
import time
import tracemalloc
import types
from array import array
from collections.abc import Callable, Iterator
from typing import Any

from _client import PASSWORD, USERNAME, model, order_id

from klarna_om_async import BatchAbortedError, KlarnaOM, SQLiteJournal

_PAGE = os.sysconf("SC_PAGE_SIZE")
_CONTAINERS = (
    set,
    frozenset,
    dict,
    list,
    tuple,
    array,
    collections.deque,
    collections.OrderedDict,
)


def _sqlite_memory_used() -> Callable[[], int] | None:
    """``sqlite3_memory_used()`` of the SQLite library this Python links, when reachable."""
    try:
        import _sqlite3

        function = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    except (ImportError, OSError, AttributeError):
        return None
    function.restype = ctypes.c_int64
    function.argtypes = []
    return function


SQLITE_MEMORY = _sqlite_memory_used()


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sample(done: int) -> dict[str, float]:
    point = {"done": done, "rss_mib": round(rss_mib(), 2)}
    if SQLITE_MEMORY is not None:
        point["sqlite_mib"] = round(SQLITE_MEMORY() / 2**20, 2)
    return point


class Watch:
    """Called after every outcome: samples the RSS at every tenth, traces at ``--trace``."""

    def __init__(self, n: int, trace_at: int | None) -> None:
        self.n = n
        self.done = 0
        self.marks = {max(1, n * tenth // 10) for tenth in range(1, 11)}
        self.samples: list[dict[str, float]] = []
        self.trace_at = trace_at
        self.first_at = None if trace_at is None else max(1, trace_at // 10)
        self.first: tracemalloc.Snapshot | None = None
        self.diagnosis: dict[str, Any] | None = None

    def __call__(self) -> None:
        self.done += 1
        if self.done in self.marks:
            self.samples.append(sample(self.done))
        if self.done == self.first_at:
            gc.collect()
            self.first = tracemalloc.take_snapshot()
        if self.done == self.trace_at:
            self.diagnosis = diagnose(self, self.first_at or 0, self.done)


# --- diagnosis --------------------------------------------------------------------------------


def _frames(trace: tracemalloc.Traceback, depth: int = 6) -> list[str]:
    return [f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}" for frame in trace][
        :depth
    ]


def diagnose(watch: Watch, first_at: int, now_at: int) -> dict[str, Any]:
    """What grew since ``watch.first`` (bytes per item), and the big containers now."""
    result: dict[str, Any] = {
        "at": now_at,
        "since": first_at,
        "rss_mib": round(rss_mib(), 2),
        "traced_mib": round(tracemalloc.get_traced_memory()[0] / 2**20, 2),
    }
    if SQLITE_MEMORY is not None:
        result["sqlite_mib"] = round(SQLITE_MEMORY() / 2**20, 2)
    result.update(growth(watch, first_at, now_at))
    # Once the snapshots are gone: their lists of traces would be big containers too.
    result["big_containers"] = big_containers(max(1, now_at // 2))
    return result


def growth(watch: Watch, first_at: int, now_at: int) -> dict[str, Any]:
    """The allocation sites that grew since ``watch.first`` (which this drops), per item."""
    first, watch.first = watch.first, None
    if first is None:
        return {}
    gc.collect()
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
    ]
    snapshot = tracemalloc.take_snapshot().filter_traces(ignore)
    first = first.filter_traces(ignore)
    items = max(1, now_at - first_at)
    by_line = snapshot.compare_to(first, "lineno")
    result: dict[str, Any] = {
        "growth_by_line": [
            {
                "where": _frames(stat.traceback, 1)[0],
                "bytes_per_item": round(stat.size_diff / items, 1),
                "blocks_per_item": round(stat.count_diff / items, 3),
                "now_mib": round(stat.size / 2**20, 2),
            }
            for stat in by_line[:25]
            if stat.size_diff > 0
        ]
    }
    if tracemalloc.get_traceback_limit() > 1:
        by_stack = snapshot.compare_to(first, "traceback")
        result["growth_by_stack"] = [
            {
                "stack": _frames(stat.traceback, 12),
                "bytes_per_item": round(stat.size_diff / items, 1),
                "now_mib": round(stat.size / 2**20, 2),
            }
            for stat in by_stack[:12]
            if stat.size_diff > 0
        ]
    return result


def _owner_name(holder: object, held: object) -> str:
    """How ``holder`` refers to ``held``: ``Class.attribute``, ``function:variable``, ..."""
    frame = None
    for attribute in ("cr_frame", "gi_frame", "ag_frame"):
        frame = getattr(holder, attribute, None) or frame
    if isinstance(holder, types.FrameType):
        frame = holder
    if frame is not None:
        names = [name for name, value in frame.f_locals.items() if value is held]
        return f"{frame.f_code.co_qualname}:{','.join(names) or '?'} (local)"
    if isinstance(holder, dict):
        keys = [repr(key) for key, value in holder.items() if value is held][:3]
        for owner in gc.get_referrers(holder):
            if getattr(owner, "__dict__", None) is holder:
                return f"{type(owner).__module__}.{type(owner).__qualname__}.{','.join(keys)}"
        return f"dict[{','.join(keys)}]"
    attributes = []
    for name in dir(type(holder)):
        with contextlib.suppress(Exception):
            if getattr(holder, name) is held:
                attributes.append(name)
    with contextlib.suppress(TypeError):
        attributes += [name for name, value in vars(holder).items() if value is held]
    kind = f"{type(holder).__module__}.{type(holder).__qualname__}"
    return f"{kind}.{','.join(sorted(set(attributes))) or '?'}"


def _deep_size(container: Any) -> int:
    """The container and its elements (one level: keys and values, not what they hold)."""
    size = sys.getsizeof(container)
    if isinstance(container, array):
        return size  # its elements are packed in it
    elements: Iterator[Any] = (
        (part for pair in container.items() for part in pair)
        if isinstance(container, dict)
        else iter(container)
    )
    for element in elements:
        size += sys.getsizeof(element)
    return size


def big_containers(threshold: int) -> list[dict[str, Any]]:
    """Every container of at least ``threshold`` entries reachable from a tracked object."""
    found: dict[int, dict[str, Any]] = {}
    gc.collect()
    # Every container worth naming is held by something tracked: look at what each holds.
    for holder in gc.get_objects():
        if type(holder).__module__ == "tracemalloc":
            continue
        for held in gc.get_referents(holder):
            if id(held) in found or type(held) not in _CONTAINERS:
                continue
            if len(held) < threshold:
                continue
            sample_element = next(iter(held), None)
            found[id(held)] = {
                "type": type(held).__name__,
                "entries": len(held),
                "mib": round(_deep_size(held) / 2**20, 2),
                "bytes_per_entry": round(_deep_size(held) / len(held), 1),
                "element": repr(sample_element)[:80],
                "held_by": _owner_name(holder, held),
            }
    return sorted(found.values(), key=lambda c: -c["mib"])


# --- the runs ---------------------------------------------------------------------------------


async def library(args: argparse.Namespace, watch: Watch) -> dict[str, Any]:
    statuses: collections.Counter[str] = collections.Counter()
    stopped: dict[str, int] = {}
    async with KlarnaOM(USERNAME, PASSWORD, base_url=args.url) as om:
        journal = None
        if args.mode == "journal":
            journal = await SQLiteJournal(args.journal).open()
        try:
            items = ((order_id(i), model(i)) for i in range(args.n))
            watch.samples.append(sample(0))
            gc.collect()
            wall0, cpu0 = time.perf_counter(), time.process_time()
            try:
                async for outcome in om.capture_many(items, journal=journal):
                    statuses[outcome.status.value] += 1
                    watch()
            except BatchAbortedError as error:  # the server is unreachable (mode abort)
                watch.samples.append(sample(watch.done))  # while the error holds its list
                stopped = {
                    "not_sent": getattr(error, "not_sent_count", len(error.not_sent)),
                    "not_sent_listed": len(error.not_sent),
                }
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        finally:
            if journal is not None:
                await journal.close()
    return {"wall_s": wall, "cpu_s": cpu, "statuses": dict(statuses), **stopped}


def cli(args: argparse.Namespace, watch: Watch) -> dict[str, Any]:
    """``klarna-om batch CSV --json`` in this process, with ``watch`` on every outcome."""
    from klarna_om_async.cli import _render
    from klarna_om_async.cli import main as cli_main

    report = _render.BatchView.report
    statuses: collections.Counter[str] = collections.Counter()

    def watched(self: _render.BatchView, outcome: Any) -> None:
        report(self, outcome)
        statuses[outcome.status.value] += 1
        watch()

    _render.BatchView.report = watched  # type: ignore[method-assign]
    os.environ.update(KLARNA_USERNAME=USERNAME, KLARNA_PASSWORD=PASSWORD)
    command = ["batch", args.csv, "--json", "--base-url", args.url]
    watch.samples.append(sample(0))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        try:
            cli_main(command, standalone_mode=False)
            code: Any = 0
        except SystemExit as exit_:
            code = exit_.code
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "statuses": dict(statuses), "exit_code": code}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("none", "journal", "cli"))
    parser.add_argument("--url", required=True)
    parser.add_argument("-n", type=int, help="items (cli: the CSV's rows)")
    parser.add_argument("--journal", help="the SQLite journal file (mode journal)")
    parser.add_argument("--csv", help="the batch file (mode cli)")
    parser.add_argument("--trace", type=int, metavar="K", help="diagnose at the K-th outcome")
    parser.add_argument(
        "--trace-frames", type=int, default=1, help="frames per traced allocation (1)"
    )
    args = parser.parse_args(argv)
    if not args.url.startswith("http://127.0.0.1:"):
        raise SystemExit("the benchmark only talks to a server on 127.0.0.1")
    if args.mode == "journal" and not args.journal:
        parser.error("mode journal needs --journal FILE")
    if args.mode == "cli":
        if not args.csv or args.trace is None:
            parser.error("mode cli needs --csv FILE and --trace K")
        if args.n is None:
            with open(args.csv, "rb") as rows:
                args.n = sum(1 for _ in rows) - 1
    if args.n is None:
        parser.error("-n is required")
    if args.trace is not None:
        tracemalloc.start(args.trace_frames)
    watch = Watch(args.n, args.trace)
    result = cli(args, watch) if args.mode == "cli" else asyncio.run(library(args, watch))
    result.update(
        mode=args.mode,
        n=args.n,
        peak_rss_mib=peak_rss_mib(),
        rss_samples=watch.samples,
        traced=args.trace is not None,
    )
    if watch.diagnosis is not None:
        result["diagnosis"] = watch.diagnosis
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
