"""Time and peak RSS of a batch from 1,000 to 1,000,000 items: journal or not, first run and rerun.

    python benchmarks/bench_scaling.py                  # 1k,10k,100k,1M (~30 minutes, 2 cores)
    python benchmarks/bench_scaling.py --quick          # 1k,10k (about two minutes)
    python benchmarks/bench_scaling.py --sizes 1000,100000 --modes journal,journal-rerun
    python benchmarks/bench_scaling.py --diagnose 100000  # also: where the memory goes (+10 min)
    python benchmarks/bench_scaling.py --from-json benchmarks/results/scaling-STAMP.json

The issue-9 targets: a batch of any size runs in bounded memory (peak RSS under 150 MiB at
1,000,000 items, with and without the journal, first run and rerun: a rerun must not load
the journal) and in time linear in its size. A minimal Klarna-like server (``_server.py``,
which keeps no per-capture state) runs in its own process on 127.0.0.1; every run is a fresh
client process, so its peak RSS (``ru_maxrss``, from ``wait4``) is its own. Modes:

- ``none``: ``om.capture_many(items)`` with the library's defaults, items from a generator
  as a real batch streams them (``_scaling_client.py``; the reference capture request with
  one order line and one shipment);
- ``journal`` / ``journal-rerun``: the same with an ``SQLiteJournal`` (default durability):
  a fresh file, then the same file again (every item skipped);
- ``cli`` / ``cli-rerun``: ``klarna-om batch FILE.csv --json`` with its default journal
  (``FILE.csv.journal.sqlite``), first run and rerun; the CSV (order, amount, reference,
  description, one shipment) is written once per size; the outcome lines are read as they
  come, which is also when the client's RSS is sampled (``/proc/PID/status``);
- ``cli-nojournal`` (not run by default): ``klarna-om batch FILE.csv --json --no-journal``;
- ``abort`` / ``cli-abort``: the library (no journal) and the CLI (a journal of its own)
  pointed at a closed port: after a few items that cannot connect the batch stops, and the
  rest of the source is read without sending (``BatchAbortedError``); only its memory is
  judged, its time being mostly the first items' retries.

Reported per run: the batch's own seconds (from the call to the last outcome; the CLI's
summary), items/s, CPU µs/item (library: the process's CPU over the batch, all threads;
CLI: the process's CPU minus that of the same command on an empty file, i.e. without the
start-up), peak RSS, and how fast the RSS grew (bytes per item, from the 10th to the 90th
percent of the outcomes). Sizes up to 10,000 run ``--small-repeats`` rounds (3), reported as
medians. Per mode: linear if CPU µs/item at the largest size is within 1.5x of that at
10,000 (or the smallest size) -- CPU, not wall time, which on a shared machine moves with
the other tenants' load (both ratios are shown) -- and peak RSS under 150 MiB at every size.
``--diagnose N`` adds, per mode, tracemalloc's allocation growth in bytes per item (by line)
and the containers holding at least 0.45 N entries, at 90% of an N-item batch.

Writes Markdown (``benchmarks/SCALING.md``; ``--quick``: ``benchmarks/results/
SCALING-quick.md``) and the raw runs as JSON under ``benchmarks/results/`` (git-ignored),
rewritten after every run; ``--from-json`` writes the Markdown again from such a JSON. Each
run records a digest of the package's sources, since a long run may outlive an edit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from bench_capture import cpu_split, log, machine, pin

HERE = Path(__file__).resolve().parent
SERVER = HERE / "_server.py"
CLIENT = HERE / "_scaling_client.py"
PACKAGE = HERE.parent / "klarna_om_async"

#: mode -> (what it is, the outcome every item must have, the mode that must run first);
#: "stopped": the batch stops early (the server is unreachable), every item is accounted for
#: by an outcome or as not sent, and its time is mostly the retries' backoff (not judged).
MODES: dict[str, tuple[str, str, str | None]] = {
    "none": ("`capture_many`, no journal", "captured", None),
    "journal": ("`capture_many`, SQLite journal, first run", "captured", None),
    "journal-rerun": ("`capture_many`, SQLite journal, rerun", "skipped", "journal"),
    "cli": ("`klarna-om batch FILE.csv`, first run", "captured", None),
    "cli-rerun": ("`klarna-om batch FILE.csv`, rerun", "skipped", "cli"),
    "cli-stream-rerun": (
        "`klarna-om batch /dev/stdin` fed by `cat FILE.csv`, rerun",
        "skipped",
        "cli",
    ),
    "cli-nojournal": ("`klarna-om batch FILE.csv --no-journal`", "captured", None),
    "abort": ("`capture_many`, server unreachable: stops early", "stopped", None),
    "cli-abort": ("`klarna-om batch FILE.csv`, server unreachable", "stopped", None),
}
DEFAULT_MODES = ("none", "journal", "journal-rerun", "cli", "cli-rerun", "abort", "cli-abort")
RSS_TARGET_MIB = 150.0
LINEAR_TARGET = 1.5
LINEAR_REFERENCE = 10_000
_PIPE_BYTES = 1 << 20  # Linux's default limit for an unprivileged pipe
CREDENTIALS = {"KLARNA_USERNAME": "bench-user", "KLARNA_PASSWORD": "bench-password"}


def _ints(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def _modes(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in MODES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(MODES)}"
        )
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 1000,10000")
    parser.add_argument("--sizes", type=_ints, help="batch sizes (1000,10000,100000,1000000)")
    parser.add_argument("--modes", type=_modes, default=list(DEFAULT_MODES), help=", ".join(MODES))
    parser.add_argument(
        "--small-repeats",
        type=int,
        default=3,
        help=f"rounds of the sizes up to {LINEAR_REFERENCE:,}, the reference of linearity (3)",
    )
    parser.add_argument(
        "--diagnose",
        type=int,
        metavar="N",
        help="also trace an N-item batch of every mode (tracemalloc; several times slower)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the server and the client to CPUs"
    )
    parser.add_argument("--out", type=Path, help="write SCALING.md and the JSON here")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="RAW",
        help="only write the Markdown again from RAW, the JSON of an earlier run",
    )
    args = parser.parse_args(argv)
    args.sizes = sorted(
        set(args.sizes or ([1_000, 10_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]))
    )
    if min(args.sizes) < 1 or args.small_repeats < 1:
        parser.error("sizes and repeats must be at least 1")
    for mode in list(args.modes):
        first = MODES[mode][2]
        if first is not None and first not in args.modes:
            args.modes.insert(args.modes.index(mode), first)  # a rerun needs its first run
    if args.out is not None:
        args.markdown, args.raw_dir = args.out / "SCALING.md", args.out
    elif args.quick:
        args.markdown, args.raw_dir = HERE / "results" / "SCALING-quick.md", HERE / "results"
    else:
        args.markdown, args.raw_dir = HERE / "SCALING.md", HERE / "results"
    return args


# --- processes --------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(cpus: set[int] | None) -> Iterator[tuple[str, int]]:
    """``_server.py`` in its own process: (its base URL, its pid) while it runs."""
    # Its stdin is closed by us (or by our death): the server then exits by itself.
    command = [sys.executable, str(SERVER)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pin(process.pid, cpus)
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the server did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}", process.pid
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def proc_status_mib(pid: int, field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of a running process, in MiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def write_csv(folder: Path, n: int) -> Path:
    """The CLI's batch file: N captures of distinct orders (the library's order ids)."""
    path = folder / f"batch-{n}.csv"
    with path.open("w") as out:
        out.write("order_id,captured_amount,reference,description,shipping_company,")
        out.write("tracking_number\n")
        for i in range(n):
            out.write(f"bench-{i:07d},6000,ref-{i},Shipped the full order,DHL US,1234567890\n")
    return path


class Child:
    """A client process: started pinned, reaped with ``wait4`` for its own peak RSS and CPU."""

    def __init__(
        self,
        command: list[str],
        cpus: set[int] | None,
        stderr: IO[str],
        env: dict[str, str] | None = None,
    ) -> None:
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            cwd=HERE,
            bufsize=_PIPE_BYTES,
        )
        pin(self.process.pid, cpus)
        # The CLI writes a line per outcome: a roomy pipe keeps it from waiting on this
        # process (which shares the loaded machine) whenever we are not scheduled.
        assert self.process.stdout is not None
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self.process.stdout.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)

    @property
    def pid(self) -> int:
        return self.process.pid

    def lines(self) -> Iterator[str]:
        assert self.process.stdout is not None
        yield from self.process.stdout

    def reap(self) -> dict[str, Any]:
        _, status, usage = os.wait4(self.process.pid, 0)
        self.process.returncode = os.waitstatus_to_exitcode(status)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return {
            "returncode": self.process.returncode,
            "process_wall_s": time.perf_counter() - self.started,
            "process_cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
            # Waits for I/O (a full pipe, fsync) vs. preemptions (the CPU was busy elsewhere).
            "voluntary_switches": usage.ru_nvcsw,
            "involuntary_switches": usage.ru_nivcsw,
        }

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            self.reap()


def library_run(
    url: str, mode: str, n: int, folder: Path, cpus: set[int] | None, stderr: IO[str]
) -> dict[str, Any]:
    command = [sys.executable, str(CLIENT), "--url", url, "-n", str(n)]
    if mode in ("none", "abort"):
        command.insert(2, "none")
    else:
        command[2:2] = ["journal", "--journal", str(folder / "library.journal.sqlite")]
    child = Child(command, cpus, stderr)
    try:
        output = list(child.lines())
        usage = child.reap()
    finally:
        child.kill()
    if usage["returncode"] != 0 or not output:
        return {**usage, "error": f"exit {usage['returncode']}"}
    result: dict[str, Any] = json.loads(output[-1])
    result["client_peak_rss_mib"] = result.pop("peak_rss_mib")
    result.update(usage)
    return result


def cli_command(url: str, csv: Path, mode: str) -> list[str]:
    if mode == "cli-stream-rerun":
        # The same file's lines through a pipe (read on the CLI's reader thread), under the
        # journal the file by its path keeps. The shell waits for both, so its CPU is theirs.
        command = [sys.executable, "-m", "klarna_om_async.cli", "batch", "/dev/stdin"]
        command += ["--format", "csv", "--journal", str(csv) + ".journal.sqlite"]
        command += ["--json", "--base-url", url]
        return ["sh", "-c", 'cat "$0" | "$@"', str(csv), *command]
    command = [sys.executable, "-m", "klarna_om_async.cli", "batch", str(csv), "--json"]
    command += ["--base-url", url]
    if mode == "cli-nojournal":
        command.append("--no-journal")
    elif mode == "cli-abort":  # not the default journal, which the cli modes use
        command += ["--journal", str(csv.with_name(csv.name + ".abort.sqlite"))]
    return command


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (a port just bound and released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def cli_run(
    url: str, mode: str, n: int, csv: Path, cpus: set[int] | None, stderr: IO[str]
) -> dict[str, Any]:
    """The real command; its outcome lines read as they come, the RSS sampled by tenths."""
    env = {**os.environ, **CREDENTIALS}
    child = Child(cli_command(url, csv, mode), cpus, stderr, env)
    marks = {max(1, n * tenth // 10) for tenth in range(1, 11)}
    samples = [{"done": 0, "rss_mib": proc_status_mib(child.pid, "VmRSS")}]
    statuses: dict[str, int] = {}
    summary: dict[str, Any] = {}
    done = 0
    try:
        for line in child.lines():
            if line.startswith('{"type":"outcome"'):
                start = line.index('"status":"') + 10
                status = line[start : line.index('"', start)]
                statuses[status] = statuses.get(status, 0) + 1
                done += 1
                if done in marks:
                    samples.append({"done": done, "rss_mib": proc_status_mib(child.pid, "VmRSS")})
            elif line.startswith('{"type":"summary"'):
                summary = json.loads(line)
        usage = child.reap()
    finally:
        child.kill()
    return {
        "wall_s": summary.get("seconds"),
        "statuses": statuses,
        "summary": summary,
        "rss_samples": samples,
        **usage,
    }


def run_one(
    args: argparse.Namespace, url: str, mode: str, n: int, folder: Path, csv: Path | None
) -> dict[str, Any]:
    digest = source_digest()  # other work may change the package while a long run goes on
    if mode.endswith("abort"):
        url = closed_port_url()
    with tempfile.TemporaryFile("w+") as stderr:
        if mode.startswith("cli"):
            assert csv is not None
            result = cli_run(url, mode, n, csv, args.client_cpus, stderr)
            startup = args.cli_startup[mode != "cli-nojournal"]
            result["cpu_s"] = max(result["process_cpu_s"] - startup, 0.0)
        else:
            result = library_run(url, mode, n, folder, args.client_cpus, stderr)
        stderr.seek(0)
        tail = stderr.read()[-2000:]
    result.update(
        mode=mode, n=n, digest=digest, finished=f"{datetime.datetime.now(datetime.UTC):%H:%M:%S}"
    )
    expected = MODES[mode][1]
    got = result.get("statuses", {}).get(expected, 0)
    if expected == "stopped":  # every item has an outcome or is counted as not sent
        not_sent = result.get("not_sent", result.get("summary", {}).get("not_sent", 0))
        result["not_sent"] = not_sent
        got = sum(result.get("statuses", {}).values()) + not_sent
    if result.get("wall_s") is None and "error" not in result:
        result["error"] = f"no summary (exit {result.get('returncode')})"
    if got != n and "error" not in result:
        result["error"] = f"{got} of {n} {expected}: {result.get('statuses')}"
    if expected == "stopped" and not result.get("not_sent") and "error" not in result:
        result["error"] = f"did not stop early: {result.get('statuses')}"
    if "error" in result:
        result["stderr_tail"] = tail
        return result
    result["items_per_s"] = n / result["wall_s"]
    result["wall_us_per_item"] = result["wall_s"] / n * 1e6
    result["cpu_us_per_item"] = result["cpu_s"] / n * 1e6
    result["rss_growth_bytes_per_item"] = rss_growth(result.get("rss_samples", []))
    return result


def rss_growth(samples: list[dict[str, Any]]) -> float | None:
    """Bytes of RSS per item from the first tenth of the outcomes to the ninth: the CLI's
    last sample, read from outside, may come after the batch let go of its memory."""
    points = [s for s in samples if s.get("done") and s.get("rss_mib") is not None][:9]
    if len(points) < 2 or points[-1]["done"] == points[0]["done"]:
        return None
    grown = (points[-1]["rss_mib"] - points[0]["rss_mib"]) * 2**20
    return float(grown / (points[-1]["done"] - points[0]["done"]))


def cli_startup(args: argparse.Namespace, url: str, folder: Path) -> dict[bool, float]:
    """CPU seconds of the CLI on an empty file, with and without its journal."""
    empty = folder / "empty.csv"
    empty.write_text("order_id,captured_amount\n")
    startup = {}
    for journal in (True, False):
        best = float("inf")
        for attempt in range(3):
            for stale in folder.glob("empty.csv.journal.sqlite*"):
                stale.unlink()
            with tempfile.TemporaryFile("w+") as stderr:
                mode = "cli" if journal else "cli-nojournal"
                run = cli_run(url, mode, 0, empty, args.client_cpus, stderr)
            if run["returncode"] != 0:
                raise RuntimeError(f"the CLI failed on an empty file (attempt {attempt})")
            best = min(best, run["process_cpu_s"])
        startup[journal] = best
    return startup


def describe(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"{result['mode']:>14} n={result['n']:<8} FAILED: {result['error']}"
    growth = result["rss_growth_bytes_per_item"]
    return (
        f"{result['mode']:>14} n={result['n']:<8} {result['wall_s']:8.1f} s "
        f"{result['items_per_s']:8.0f}/s {result['cpu_us_per_item']:7.1f} us CPU/item "
        f"{result['peak_rss_mib']:7.1f} MiB peak"
        + ("" if growth is None else f" {growth:7.1f} B/item")
    )


# --- diagnosis --------------------------------------------------------------------------------


def diagnose(args: argparse.Namespace, url: str, folder: Path, n: int) -> list[dict[str, Any]]:
    """Every mode once more, traced at 90% of an n-item batch (see ``_scaling_client``)."""
    at = max(1, n * 9 // 10)
    csv = write_csv(folder, n)
    journal = folder / "library.journal.sqlite"
    results = []
    for mode in args.modes:
        command = [sys.executable, str(CLIENT), "--url", url, "-n", str(n), "--trace", str(at)]
        if mode == "none":
            command.insert(2, "none")
        elif mode.startswith("journal"):
            command[2:2] = ["journal", "--journal", str(journal)]
        elif mode in ("cli", "cli-rerun"):
            command[2:2] = ["cli", "--csv", str(csv)]
        else:
            continue  # cli-nojournal: the library's no-journal trace and the CLI's cover it
        started = time.monotonic()
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=HERE,
            check=False,
            timeout=max(1800, n / 50),
        )
        if done.returncode != 0:
            results.append({"mode": mode, "n": n, "error": done.stderr[-2000:]})
            log(f"[diagnose] {mode} failed:\n{done.stderr[-2000:]}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["mode"] = mode
        results.append(result)
        log(f"[diagnose] {mode} n={n} traced in {time.monotonic() - started:.0f} s")
    return results


# --- the report -------------------------------------------------------------------------------


_MEDIANS = (
    "wall_s",
    "items_per_s",
    "wall_us_per_item",
    "cpu_us_per_item",
    "rss_growth_bytes_per_item",
)


def combined(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, size): medians over its rounds, the highest peak RSS; failed if
    any round failed."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["mode"], run["n"]), []).append(run)
    rows = []
    for (mode, n), group in groups.items():
        failed = [run for run in group if "error" in run]
        if failed:
            rows.append({"mode": mode, "n": n, "error": failed[0]["error"]})
            continue
        row = dict(group[-1], rounds=len(group))
        for key in _MEDIANS:
            values = [run[key] for run in group if run.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        row["peak_rss_mib"] = max(run["peak_rss_mib"] for run in group)
        rows.append(row)
    return rows


def verdicts(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mode: is time linear, and is the peak RSS under the target at every size?"""
    found = {}
    rows = combined(runs)
    for mode in args.modes:
        mine = {r["n"]: r for r in rows if r["mode"] == mode and "error" not in r}
        failed = [r["n"] for r in rows if r["mode"] == mode and "error" in r]
        verdict: dict[str, Any] = {"failed": failed}
        if mine:
            largest = max(mine)
            smaller = [n for n in mine if n < largest]
            reference = (
                LINEAR_REFERENCE if LINEAR_REFERENCE in smaller else min(smaller, default=None)
            )
            verdict["max_rss"] = max(r["peak_rss_mib"] for r in mine.values())
            verdict["rss_missed_at"] = [
                n for n, r in sorted(mine.items()) if r["peak_rss_mib"] >= RSS_TARGET_MIB
            ]
            if reference is not None and MODES[mode][1] != "stopped":
                base, top = mine[reference], mine[largest]
                verdict.update(
                    reference=reference,
                    largest=largest,
                    wall_ratio=top["wall_us_per_item"] / base["wall_us_per_item"],
                    cpu_ratio=top["cpu_us_per_item"] / max(base["cpu_us_per_item"], 1e-9),
                )
        found[mode] = verdict
    return found


def _linear_text(mode: str, verdict: dict[str, Any]) -> str:
    """Judged by CPU per item, which other tenants of a shared machine barely move; the wall
    time is shown beside it."""
    if MODES[mode][1] == "stopped":
        return "not judged (stops early)"
    if "wall_ratio" not in verdict:
        return "n/a (one size)"
    wall, cpu = verdict["wall_ratio"], verdict["cpu_ratio"]
    if cpu > LINEAR_TARGET:
        return "MISSED"
    if wall > LINEAR_TARGET:
        return f"ok by CPU (wall {wall:.2f}x)"
    return "ok"


def source_digest() -> str:
    """A digest of the package's sources: which state of the library was measured."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def report(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    traces: list[dict[str, Any]],
    extra: dict[str, Any],
) -> str:
    lines = [
        "# A batch from 1,000 to 1,000,000 items: time and memory",
        "",
        f"`python benchmarks/bench_scaling.py {' '.join(args.argv)}`".replace(" `", "`"),
        "",
        *[
            f"- Date: {extra['date']}" if line.startswith("- Date:") and "date" in extra else line
            for line in machine(args)
        ],
        f"- klarna_om_async sources: sha256 {extra['digest']} (of the `.py` files)",
        "",
        "Every run is a fresh client process against the minimal server (`_server.py`, its own "
        "process on 127.0.0.1, no per-capture state), all items of distinct orders, the "
        "library's default concurrency. *seconds*: the batch's own time, from the call to the "
        "last outcome (the CLI's summary); *CPU µs/item*: the client's CPU time over the batch, "
        "all threads (CLI: the process's CPU minus that of the same command on an empty file, "
        f"{extra['cli_startup'][True]:.2f} s with the journal, "
        f"{extra['cli_startup'][False]:.2f} s without); *peak RSS*: the client process's "
        "`ru_maxrss` (from `wait4`); *RSS growth*: bytes of resident memory per item from the "
        "10th to the 90th percent of the outcomes (sampled in the process, or for the CLI "
        "from `/proc` as its outcome lines arrive). A rerun runs the same items on the first "
        "run's journal: every item is skipped. The CLI prints one `--json` line per outcome, "
        "which the benchmark reads as it comes. The server's own peak RSS was "
        f"{extra['server_peak_mib']:.0f} MiB. The whole run took "
        f"{extra['seconds'] / 60:.1f} minutes.",
        "",
    ]
    rows = combined(runs)
    rounds = max((row.get("rounds", 1) for row in rows), default=1)
    if rounds > 1:
        lines += [
            f"Sizes up to {LINEAR_REFERENCE:,} ran {rounds} rounds (each with fresh journals); "
            "their rows show the medians, and the highest peak RSS.",
            "",
        ]
    digests = sorted({r["digest"] for r in runs if "digest" in r})
    changed = len(digests) > 1 or digests not in ([], [extra["digest"]])
    if changed:
        lines += [
            "The package's sources changed during the run; *sources* names the state each "
            "run measured (sha256 of the `.py` files).",
            "",
        ]
    lines += [
        "| mode | items | seconds | items/s | CPU µs/item | peak RSS MiB | RSS growth B/item |"
        + (" sources |" if changed else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---|" if changed else ""),
    ]
    for mode in args.modes:
        for run in sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["n"]):
            if "error" in run:
                lines.append(f"| {MODES[mode][0]} | {run['n']:,} | failed: {run['error']} ||||")
                continue
            # A stopped batch has a few outcomes, too few to measure growth per item.
            growth = None if MODES[mode][1] == "stopped" else run["rss_growth_bytes_per_item"]
            items = f"{run['n']:,}" + (
                f" ({run['not_sent']:,} not sent)" if run.get("not_sent") else ""
            )
            lines.append(
                f"| {MODES[mode][0]} | {items} | {run['wall_s']:.1f} "
                f"| {run['items_per_s']:,.0f} | {run['cpu_us_per_item']:.1f} "
                f"| {run['peak_rss_mib']:.1f} | {'' if growth is None else f'{growth:.1f}'} |"
                + (f" {run.get('digest', '')} |" if changed else "")
            )
    lines += [
        "",
        f"## Targets: time linear (µs/item at the largest size within {LINEAR_TARGET}x of "
        f"that at {LINEAR_REFERENCE:,}, or the smallest size), peak RSS under "
        f"{RSS_TARGET_MIB:.0f} MiB",
        "",
        "Linearity is judged by CPU µs/item: the client is CPU-bound, and on a shared machine "
        "the wall time of a run moves with the other tenants' load (in the JSON, "
        "`involuntary_switches` counts how often the client was preempted), while its CPU "
        "time barely does. The wall ratio is shown beside it.",
        "",
        "| mode | sizes compared | wall µs/item ratio | CPU µs/item ratio | linear "
        "| max peak RSS MiB | RSS |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for mode, verdict in verdicts(args, runs).items():
        if "max_rss" not in verdict:
            lines.append(f"| {MODES[mode][0]} | every run failed | | | MISSED | | MISSED |")
            continue
        compared = (
            f"{verdict['largest']:,} vs {verdict['reference']:,}" if "reference" in verdict else ""
        )
        ratios = (
            f"| {verdict['wall_ratio']:.2f}x | {verdict['cpu_ratio']:.2f}x"
            if "wall_ratio" in verdict
            else "| |"
        )
        missed = verdict["rss_missed_at"]
        rss = "ok" if not missed else "MISSED at " + ", ".join(f"{n:,}" for n in missed)
        failed = verdict["failed"]
        linear = _linear_text(mode, verdict) + (
            f"; failed at {', '.join(f'{n:,}' for n in failed)}" if failed else ""
        )
        lines.append(
            f"| {MODES[mode][0]} | {compared} {ratios} | {linear} "
            f"| {verdict['max_rss']:.1f} | {rss} |"
        )
    if traces:
        lines += diagnosis_section(traces)
    return "\n".join(lines) + "\n"


def diagnosis_section(traces: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Where the memory goes (tracemalloc)",
        "",
        "Each mode once more in a traced process (the CLI run in-process); snapshots at 10% "
        "and at 90% of the batch. *Growth* is the difference between the two, per item "
        "between them, by the line that allocated; *containers* are those holding at least "
        "half as many entries as items done (sizes: the container and its entries, one "
        "level deep). SQLite's own heap (`sqlite3_memory_used`) is not traced.",
    ]
    for trace in traces:
        diagnosis = trace.get("diagnosis")
        lines += ["", f"### {MODES[trace['mode']][0]}, {trace['n']:,} items", ""]
        if diagnosis is None:
            lines.append(f"failed: {trace.get('error', 'no diagnosis')[-500:]}")
            continue
        lines.append(
            f"At item {diagnosis['at']:,}: RSS {diagnosis['rss_mib']:.1f} MiB, traced "
            f"{diagnosis['traced_mib']:.1f} MiB"
            + (
                f", SQLite heap {diagnosis['sqlite_mib']:.1f} MiB."
                if "sqlite_mib" in diagnosis
                else "."
            )
        )
        growth = [g for g in diagnosis.get("growth_by_line", []) if g["bytes_per_item"] >= 1]
        if growth:
            lines += ["", "| allocated at | bytes/item | blocks/item | MiB at 90% |"]
            lines.append("|---|---:|---:|---:|")
            for g in growth[:12]:
                where = g["where"].replace(str(HERE.parent) + "/", "")
                lines.append(
                    f"| `{where}` | {g['bytes_per_item']:.1f} | {g['blocks_per_item']:.3f} "
                    f"| {g['now_mib']:.2f} |"
                )
        else:
            lines += ["", "No allocation site grew by a byte per item or more."]
        containers = diagnosis.get("big_containers", [])
        if containers:
            lines += ["", "| container | held by | entries | MiB | bytes/entry |"]
            lines.append("|---|---|---:|---:|---:|")
            for c in containers[:8]:
                lines.append(
                    f"| {c['type']} | `{c['held_by']}` | {c['entries']:,} | {c['mib']:.1f} "
                    f"| {c['bytes_per_entry']:.0f} |"
                )
        else:
            lines += ["", "No container holds that many entries."]
    return lines


# --- main -------------------------------------------------------------------------------------


def rerender(args: argparse.Namespace) -> int:
    """The Markdown of an earlier run, from its JSON (with that run's sizes and modes)."""
    source = args.from_json
    saved = json.loads(source.read_text())
    markdown_path = args.markdown
    args = parse_args(saved["argv"])
    args.argv, args.markdown = saved["argv"], markdown_path
    args.pinning = saved.get("pinning", "pinning not recorded")
    extra = {key: value for key, value in saved.items() if key not in ("runs", "traces")}
    stamp = source.stem.rpartition("-")[2]  # scaling-YYYYmmddTHHMMSSZ
    with contextlib.suppress(ValueError):
        started = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ")
        extra.setdefault("date", f"{started:%Y-%m-%d %H:%M} UTC (start)")
    extra["cli_startup"] = {key in (True, "true"): v for key, v in extra["cli_startup"].items()}
    for run in saved["runs"]:
        if "rss_samples" in run and "error" not in run:
            run["rss_growth_bytes_per_item"] = rss_growth(run["rss_samples"])
    markdown = report(args, saved["runs"], saved.get("traces", []), extra)
    args.markdown.write_text(markdown)
    print(markdown)
    log(f"wrote {args.markdown} from {source}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        return rerender(args)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    split = cpu_split(not args.no_pin)
    server_cpus: set[int] | None = None
    args.client_cpus = None
    args.pinning = "client and server share the CPUs (not pinned)"
    if split is not None:
        server_cpus, args.client_cpus = split
        args.pinning = (
            f"server pinned to CPU {sorted(server_cpus)}, clients to CPUs {sorted(split[1])}"
        )
    args.raw_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    raw = args.raw_dir / f"scaling-{stamp}.json"
    extra: dict[str, Any] = {
        "digest": source_digest(),
        "pinning": args.pinning,
        "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC (start)",
    }
    runs: list[dict[str, Any]] = []
    traces: list[dict[str, Any]] = []

    def save() -> None:
        raw.write_text(
            json.dumps({"argv": args.argv, **extra, "runs": runs, "traces": traces}, indent=1)
        )

    with (
        serving(server_cpus) as (url, server_pid),
        tempfile.TemporaryDirectory(prefix="klarna-om-scaling-") as tmp,
    ):
        extra["cli_startup"] = args.cli_startup = cli_startup(args, url, Path(tmp))
        log(f"CLI start-up CPU: {args.cli_startup}")
        for n in args.sizes:
            # Short runs are the noisiest, and the smaller one is linearity's reference.
            rounds = args.small_repeats if n <= LINEAR_REFERENCE else 1
            for round_ in range(rounds):
                folder = Path(tmp) / f"{n}-{round_}"
                folder.mkdir()
                cli = any(m.startswith("cli") for m in args.modes)
                csv = write_csv(folder, n) if cli else None
                for mode in args.modes:
                    if round_ and MODES[mode][1] == "stopped":
                        continue  # not judged by time: once is enough
                    result = run_one(args, url, mode, n, folder, csv)
                    result["round"] = round_
                    runs.append(result)
                    log(describe(result))
                    save()
                for path in folder.iterdir():  # a million items' journals take a GB of disk
                    path.unlink()
        if args.diagnose:
            folder = Path(tmp) / "diagnose"
            folder.mkdir()
            traces = diagnose(args, url, folder, args.diagnose)
        extra["server_peak_mib"] = proc_status_mib(server_pid, "VmHWM") or 0.0
    extra["seconds"] = time.monotonic() - started
    save()
    markdown = report(args, runs, traces, extra)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(markdown)
    print(markdown)
    log(f"wrote {args.markdown} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
