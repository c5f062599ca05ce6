"""How close a batch comes to the rate limit's floor, N / R seconds, against a slow server.

    python benchmarks/bench_throughput.py            # the full matrix (about two hours)
    python benchmarks/bench_throughput.py --quick    # a smoke run (N=300, R=200, 50-100 ms; ~16 s)
    python benchmarks/bench_throughput.py -n 3000 --rates 200 --servers fixed --clients library

A rate-limited Klarna-like server (``_limited_server.py``: 150-350 ms per capture, at most R
requests a second, 429 beyond) runs in its own process on 127.0.0.1, a fresh one per run so
no run inherits another's window or counters. Each run sends N captures of distinct orders
through one client, in its own process:

- ``library``: ``om.capture_many`` with default settings (``_throughput_client.py``);
- ``cli``: ``klarna-om batch FILE.csv --no-journal``;
- ``cli-journal``: ``klarna-om batch FILE.csv`` with its (default, fsynced) SQLite journal.

With the limit *known*, R is passed to the client (``rate_limit=R``; ``--rate R`` for the CLI);
*unknown*, nothing is, and the client must find the pace from 429s and the server's headers.
Known-limit runs use only the servers that send ``X-Ratelimit-*`` (the ``-bare`` variants
exist to test learning without them). Reported per run: wall / (N/R) (the batch's own clock:
from the call to the last outcome, or the CLI's summary), 429s per 1000 requests and double
bookings (the server's counters), and items not captured.

Writes a Markdown report (``benchmarks/THROUGHPUT.md``; ``--quick`` writes
``benchmarks/results/THROUGHPUT-quick.md``; ``--append`` adds the run as a section of its own
to the report already there, so a part of the matrix can be rerun without losing the rest) and
the raw runs as JSON under ``benchmarks/results/`` (git-ignored), rewritten after every run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_capture import cpu_split, log, machine, pin, serving

HERE = Path(__file__).resolve().parent
SERVER = HERE / "_limited_server.py"
CLIENT = HERE / "_throughput_client.py"

#: name -> (description, the server's flags)
SERVERS: dict[str, tuple[str, list[str]]] = {
    "fixed": ("fixed 1-s windows", ["--window", "fixed"]),
    "bucket": ("token bucket (burst R)", ["--window", "bucket"]),
    "fixed-bare": (
        "fixed 1-s windows, no `Retry-After`, no `X-Ratelimit-*`",
        ["--window", "fixed", "--no-retry-after", "--no-ratelimit-headers"],
    ),
    "bucket-bare": (
        "token bucket, no `Retry-After`, no `X-Ratelimit-*`",
        ["--window", "bucket", "--no-retry-after", "--no-ratelimit-headers"],
    ),
    "fixed-noretry": (
        "fixed 1-s windows, `X-Ratelimit-*` but no `Retry-After`",
        ["--window", "fixed", "--no-retry-after"],
    ),
    "bucket-noretry": (
        "token bucket, `X-Ratelimit-*` but no `Retry-After`",
        ["--window", "bucket", "--no-retry-after"],
    ),
}
CLIENTS = {
    "library": "`capture_many`",
    "cli": "`klarna-om batch --no-journal`",
    "cli-journal": "`klarna-om batch` (journal)",
}
LIMITS = ("known", "unknown")
#: The targets of issue 9: (wall / floor, 429s per 1000) by whether the limit is known.
TARGETS = {"known": (1.05, 1.0), "unknown": (1.10, 20.0)}
COLUMNS = (
    "server",
    "R",
    "limit",
    "N",
    "client",
    "concurrency",
    "wall (s)",
    "wall / (N/R)",
    "429s per 1000",
    "not captured",
    "double bookings",
    "max in flight",
    "target",
)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _names(choices: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(choices)}"
            )
        return names

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=300, R=200, 50-100 ms, fixed")
    parser.add_argument("-n", "--captures", type=_ints, help="batch sizes (3000,10000)")
    parser.add_argument("--rates", type=_ints, help="server limits R per second (200,50)")
    parser.add_argument("--limits", type=_names(LIMITS), default=list(LIMITS), help="known,unknown")
    parser.add_argument(
        "--servers",
        type=_names(list(SERVERS)),
        help=f"server variants ({', '.join(SERVERS)}; default fixed,bucket,fixed-bare; "
        "quick fixed)",
    )
    parser.add_argument(
        "--clients", type=_names(list(CLIENTS)), default=list(CLIENTS), help=", ".join(CLIENTS)
    )
    parser.add_argument(
        "--concurrency", type=int, help="override the library's and the CLI's default"
    )
    parser.add_argument(
        "--latency", help="LOW,HIGH seconds per capture (0.15,0.35; quick 0.05,0.1)"
    )
    parser.add_argument("--seed", type=int, default=9, help="the server's latency seed")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="library client processes sharing the server's limit, each with N/workers "
        "captures of its own orders (workers of one merchant; 1)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the whole matrix")
    parser.add_argument(
        "--run-timeout", type=float, help="kill a run after this (default 4 x N/R + 120 s)"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the server and the client to CPUs"
    )
    parser.add_argument("--out", type=Path, help="write THROUGHPUT.md and the JSON here")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add this run to THROUGHPUT.md as a section of its own (its command, machine and "
        "table) instead of rewriting the file",
    )
    args = parser.parse_args(argv)
    args.captures = args.captures or ([300] if args.quick else [3_000, 10_000])
    args.rates = args.rates or ([200] if args.quick else [200, 50])
    args.servers = args.servers or (["fixed"] if args.quick else ["fixed", "bucket", "fixed-bare"])
    args.latency = args.latency or ("0.05,0.1" if args.quick else "0.15,0.35")
    if min(args.captures) < 1 or min(args.rates) < 1 or args.repeats < 1 or args.workers < 1:
        parser.error("batch sizes, rates, repeats and workers must be at least 1")
    if args.workers > 1 and args.clients != ["library"]:
        parser.error("--workers runs library clients only: add --clients library")
    if args.workers > min(args.captures):
        parser.error(f"--workers {args.workers} is more than the batch size {min(args.captures)}")
    if args.out is not None:
        args.markdown, args.raw_dir = args.out / "THROUGHPUT.md", args.out
    elif args.quick:
        args.markdown, args.raw_dir = HERE / "results" / "THROUGHPUT-quick.md", HERE / "results"
    else:
        args.markdown, args.raw_dir = HERE / "THROUGHPUT.md", HERE / "results"
    return args


def configurations(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    for repeat in range(args.repeats):
        for n in args.captures:
            for rate in args.rates:
                for server_name in args.servers:
                    for limit in args.limits:
                        if limit == "known" and server_name.endswith("-bare"):
                            continue  # headers only matter to a client learning the limit
                        for client in args.clients:
                            yield {
                                "repeat": repeat,
                                "n": n,
                                "rate": rate,
                                "server": server_name,
                                "limit": limit,
                                "client": client,
                            }


# --- processes --------------------------------------------------------------------------------


@contextmanager
def server(
    args: argparse.Namespace, name: str, rate: int, lifetime: float, cpus: set[int] | None
) -> Iterator[str]:
    """A fresh limited server in its own process; it stops when we close its stdin."""
    command = [sys.executable, str(SERVER), "--rate", str(rate), "--latency", args.latency]
    command += ["--seed", str(args.seed), "--lifetime", str(lifetime), *SERVERS[name][1]]
    with serving(command, cpus) as url:
        yield url


def server_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/stats", timeout=10) as answer:
        stats: dict[str, Any] = json.loads(answer.read())
    return stats


def write_csv(folder: Path, n: int) -> Path:
    """The CLI's batch file: N captures of distinct orders (the library's order ids)."""
    path = folder / f"batch-{n}.csv"
    if not path.exists():
        with path.open("w") as out:
            out.write("order_id,captured_amount,reference,description\n")
            for i in range(n):
                out.write(f"bench-{i:07d},6000,ref-{i},Shipped the full order\n")
    return path


def client_command(
    args: argparse.Namespace,
    config: dict[str, Any],
    url: str,
    folder: Path,
    timeout: float,
    worker: int = 0,
) -> list[str]:
    known = config["limit"] == "known"
    if config["client"] == "library":
        share, first = config["n"] // args.workers, worker * (config["n"] // args.workers)
        if worker == args.workers - 1:
            share = config["n"] - first  # the last worker takes the remainder
        command = [sys.executable, str(CLIENT), "--url", url, "-n", str(share)]
        command += ["--timeout", str(timeout), "--first", str(first)]
        # Workers that know the limit split it, as a merchant running several would.
        command += ["--rate", str(config["rate"] / args.workers)] if known else []
    else:
        csv = write_csv(folder, config["n"])
        command = [sys.executable, "-m", "klarna_om_async.cli", "batch", str(csv), "--json"]
        command += ["--base-url", url]
        command += ["--rate", str(config["rate"])] if known else []
        if config["client"] == "cli":
            command.append("--no-journal")
        else:
            journal = folder / f"journal-{time.monotonic_ns()}.sqlite"
            command += ["--journal", str(journal)]
    if args.concurrency is not None:
        command += ["--concurrency", str(args.concurrency)]
    return command


def parse_cli(stdout: str) -> dict[str, Any]:
    """Statuses from the outcome lines; the batch's own time from the summary line."""
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    summary: dict[str, Any] = {}
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("type") == "outcome":
            statuses[record["status"]] = statuses.get(record["status"], 0) + 1
            if record.get("error"):
                reason = str(record["error"]).split(":", 1)[0][:60]
                errors[reason] = errors.get(reason, 0) + 1
        elif record.get("type") == "summary":
            summary = record
    return {
        "wall_s": summary.get("seconds"),
        "captured": statuses.get("captured", 0),
        "statuses": statuses,
        "errors": errors,
        "attempts": summary.get("attempts"),
        "concurrency": "default (CLI)",
    }


def run_clients(
    commands: list[list[str]], folder: Path, timeout: float, cpus: Any
) -> list[tuple[int, str, str, bool]]:
    """Run the client processes at once; each one's (exit status, stdout, stderr, whether it
    was killed for taking longer than ``timeout``). Their output goes to files, so no pipe
    fills while another process is waited for."""
    env = {**os.environ, "KLARNA_USERNAME": "bench-user", "KLARNA_PASSWORD": "bench-password"}
    deadline = time.monotonic() + timeout
    running = []
    try:
        for number, command in enumerate(commands):
            out = (folder / f"client-{number}.out").open("w+")
            err = (folder / f"client-{number}.err").open("w+")
            process = subprocess.Popen(
                command, stdout=out, stderr=err, text=True, env=env, cwd=HERE
            )
            running.append((process, out, err))
            pin(process.pid, cpus)
        ended = []
        for process, out, err in running:
            timed_out = False
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                timed_out = True
            out.seek(0)
            err.seek(0)
            ended.append((process.returncode, out.read(), err.read(), timed_out))
        return ended
    finally:
        for process, out, err in running:
            if process.poll() is None:
                process.kill()
                process.wait()
            out.close()
            err.close()


def merge_library_runs(ended: list[tuple[int, str, str, bool]]) -> dict[str, Any]:
    """One result for the library's client processes: the wall time from the first one's call
    to the last one's last outcome, and their counts added up (of those that reported: a
    worker that failed counts as capturing nothing)."""
    parsed = []
    for returncode, stdout, _, _ in ended:
        lines = stdout.strip().splitlines()
        if lines and returncode == 0:
            parsed.append(json.loads(lines[-1]))
    if len(ended) == 1 or not parsed:
        return parsed[0] if parsed else {"workers": len(ended)}
    first = min(run["started_at"] for run in parsed)
    merged: dict[str, Any] = dict(parsed[0])
    merged["wall_s"] = max(run["started_at"] + run["wall_s"] - first for run in parsed)
    del merged["n"]  # the run's N stands: a worker that failed captured none of its share
    for name in ("cpu_s", "captured", "attempts"):
        merged[name] = sum(run[name] for run in parsed)
    for name in ("statuses", "errors"):
        totals: dict[str, int] = {}
        for run in parsed:
            for key, count in run[name].items():
                totals[key] = totals.get(key, 0) + count
        merged[name] = totals
    merged["aborted"] = "; ".join(run["aborted"] for run in parsed if run["aborted"]) or None
    merged["workers"] = len(ended)
    return merged


def one_run(
    args: argparse.Namespace, config: dict[str, Any], folder: Path, cpus: tuple[Any, Any]
) -> dict[str, Any]:
    n, rate = config["n"], config["rate"]
    floor = n / rate
    timeout = args.run_timeout or 4 * floor + 120
    result: dict[str, Any] = dict(config, floor_s=floor)
    with server(args, config["server"], rate, timeout + 60, cpus[0]) as url:
        workers = args.workers if config["client"] == "library" else 1
        commands = [
            client_command(args, config, url, folder, timeout, worker) for worker in range(workers)
        ]
        started = time.perf_counter()
        ended = run_clients(commands, folder, timeout, cpus[1])
        result["process_wall_s"] = time.perf_counter() - started
        result["timed_out"] = any(timed_out for _, _, _, timed_out in ended)
        result["returncode"] = next((code for code, _, _, _ in ended if code), 0)
        stderr = "".join(stderr for _, _, stderr, _ in ended)
        result["stderr_lines"] = stderr.count("\n")
        result["stderr_tail"] = stderr[-1500:]
        if config["client"] == "library":
            parsed = merge_library_runs(ended)
        else:
            parsed = parse_cli(ended[0][1])
        result.update(parsed)
        result["server"] = config["server"]  # the client's own keys never shadow the config
        result["stats"] = server_stats(url)
    if result.get("wall_s") is None:
        result["wall_s"] = result["process_wall_s"]
        result["wall_from"] = "process"
    result["ratio"] = result["wall_s"] / floor
    result["not_captured"] = n - result.get("captured", 0)
    return result


def describe(result: dict[str, Any]) -> str:
    stats = result["stats"]
    return (
        f"{result['server']:>13} R={result['rate']:<4} {result['limit']:>7} "
        f"N={result['n']:<6} {result['client']:>11}: wall {result['wall_s']:7.1f} s "
        f"= {result['ratio']:.2f} x floor, {stats['per_1000_429']:6.1f} 429s/1000, "
        f"{result['not_captured']} not captured, {stats['double_bookings']} double"
    )


# --- the report -------------------------------------------------------------------------------


def verdict(result: dict[str, Any]) -> str:
    wall_target, per_1000_target = TARGETS[result["limit"]]
    missed = []
    if result["ratio"] > wall_target:
        missed.append("wall")
    if result["stats"]["per_1000_429"] > per_1000_target:
        missed.append("429s")
    if result["not_captured"]:
        missed.append("not captured")
    if result["stats"]["double_bookings"]:
        missed.append("double bookings")
    return "met" if not missed else "missed: " + ", ".join(missed)


def workers(run: dict[str, Any]) -> str:
    return f", {run['workers']} workers" if run.get("workers", 1) > 1 else ""


def report(args: argparse.Namespace, runs: list[dict[str, Any]], seconds: float) -> str:
    low, _, high = args.latency.partition(",")
    lines = [
        "# Throughput against a rate limit",
        "",
        f"`python benchmarks/bench_throughput.py {' '.join(args.argv)}`".replace(" `", "`"),
        "",
        *machine(args),
        "",
        "Each run: a fresh rate-limited server (`_limited_server.py`, its own process on "
        f"127.0.0.1, {float(low) * 1000:.0f}-{float(high or low) * 1000:.0f} ms per capture, "
        f"seed {args.seed}, at most R admitted per second, 429 beyond, `Retry-After` and "
        "`X-Ratelimit-*` unless the server says otherwise) and one client process sending N "
        "captures of distinct orders. *wall* is the batch's own time (from the call to the "
        "last outcome; the CLI's summary), *floor* N/R seconds; 429s and double bookings "
        "are the server's counts; *not captured* is N minus the items whose outcome was "
        "`captured`. *known*: R is passed to the client (`rate_limit=R`, `--rate R`); "
        "*unknown*: it is not. Targets (issue 9): known, wall/floor ≤ 1.05 and ≤ 1 429 per "
        "1000; unknown, ≤ 1.10 and ≤ 20; none not captured, no double bookings. Fixed windows "
        "are aligned on the clock's seconds, so a run whose first window is already under way "
        "can finish up to 1 s under N/R (a ratio below 1 on a short run); the token bucket "
        "starts full (R), which buys at most 1 s too."
        + (
            f" *{args.workers} workers*: that many client processes at once, each with N/"
            f"{args.workers} captures of orders of its own, sharing the server's R (workers of "
            "one merchant; *known*: each is given R/workers); *wall* runs from the first one's "
            "call to the last one's last outcome. Issue 9's targets are for one client."
            if args.workers > 1
            else ""
        ),
        "",
        "Servers: " + "; ".join(f"*{name}*: {SERVERS[name][0]}" for name in args.servers) + ".",
        "",
        f"The whole run took {seconds / 60:.1f} minutes.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        stats = run["stats"]
        wall = f"{run['wall_s']:.1f}" + (" (timed out)" if run.get("timed_out") else "")
        lines.append(
            f"| {run['server']} | {run['rate']} | {run['limit']} | {run['n']:,} "
            f"| {CLIENTS[run['client']]}{workers(run)} | {run.get('concurrency', '?')} | {wall} "
            f"| {run['ratio']:.2f} | {stats['per_1000_429']:.0f} | {run['not_captured']:,} "
            f"| {stats['double_bookings']} | {stats['max_in_flight']} | {verdict(run)} |"
        )
    failures = [run for run in runs if run["not_captured"]]
    if failures:
        lines += ["", "Why items were not captured (outcome statuses; error types):", ""]
        for run in failures:
            lines.append(
                f"- {run['server']} R={run['rate']} {run['limit']} N={run['n']} "
                f"{run['client']}: {run.get('statuses')}; {run.get('errors')}"
                + (f"; aborted: {run['aborted']}" if run.get("aborted") else "")
                + (f"; exit {run['returncode']}" if run.get("returncode") else "")
            )
    return "\n".join(lines) + "\n"


def _stop(signum: int, _frame: object) -> None:
    # As Ctrl-C does: the run's clean-ups end its client and server processes (a SIGTERM's
    # default would leave them running until their own timeouts).
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    split = cpu_split(not args.no_pin)
    cpus: tuple[Any, Any] = split if split is not None else (None, None)
    args.pinning = (
        f"server pinned to CPU {sorted(cpus[0])}, client to CPUs {sorted(cpus[1])}"
        if split is not None
        else "client and server share the CPUs (not pinned)"
    )
    args.raw_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    raw = args.raw_dir / f"throughput-{stamp}.json"
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="klarna-om-throughput-") as tmp:
        for config in configurations(args):
            result = one_run(args, config, Path(tmp), cpus)
            runs.append(result)
            log(describe(result))
            raw.write_text(json.dumps({"argv": args.argv, "runs": runs}, indent=1))
    seconds = time.monotonic() - started
    markdown = report(args, runs, seconds)
    if args.append and args.markdown.exists():
        title = f"## Also run: {', '.join(args.servers)}; limit {', '.join(args.limits)}"
        section = markdown.replace("# Throughput against a rate limit", title, 1)
        markdown = args.markdown.read_text().rstrip("\n") + "\n\n" + section
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(markdown)
    raw.write_text(json.dumps({"argv": args.argv, "seconds": seconds, "runs": runs}, indent=1))
    print(markdown)
    log(f"wrote {args.markdown} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
