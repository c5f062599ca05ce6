"""The benchmark script runs end to end on a tiny N and writes its report (no timing checks)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_capture.py"


def test_a_quick_run_completes_and_writes_its_tables(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCH), "--quick", "-n", "50", "--repeats", "1"]
    command += ["--batch-sizes", "20,50", "--concurrencies", "1,4", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr

    report = (tmp_path / "RESULTS.md").read_text()
    for variant in ("raw aiohttp: POST capture", "`om.captures.create`", "SQLite journal"):
        assert variant in report
    # httpx comes with the `bench` extra; without it the report says it was skipped.
    assert "httpx" in report
    if importlib.util.find_spec("httpx") is None:
        assert "Skipped: httpx" in report
    assert "| 1 | raw aiohttp: POST capture |" in report  # the concurrency sweep
    assert "Python:" in report
    assert "aiohttp" in report

    (raw,) = tmp_path.glob("bench-*.json")
    runs = json.loads(raw.read_text())["runs"]
    assert {run["variant"] for run in runs} >= {"raw_create", "create", "many", "create_get"}
    assert all(run["cpu_s"] > 0 and run["peak_rss_mib"] > 0 for run in runs)
    paired = [run for run in runs if run.get("table") == "paired"]
    assert {run["variant"] for run in paired} >= {"create", "many", "many_journal", "create_get"}
    assert all(run["ratio"] == run["cpu_s"] / run["baseline_cpu_s"] for run in paired)
    assert "paired ratio" in report


def test_a_paced_run_sends_at_its_pace_and_judges_no_target(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCH), "--quick", "-n", "40", "--variants", "create"]
    command += ["--no-scaling", "--pace", "400", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr

    report = (tmp_path / "RESULTS.md").read_text()
    assert "Paced at 400 captures/s" in report
    assert re.search(r"≤ [\d.]+x (met|MISSED)", report) is None
    (raw,) = tmp_path.glob("bench-*.json")
    main = [run for run in json.loads(raw.read_text())["runs"] if "table" not in run]
    # Both stacks kept the pace: 40 captures 1/400 s apart span 97.5 ms (unpaced: ~10 ms);
    # the bound leaves room for timers that fire a clock tick early.
    assert {run["variant"] for run in main} == {"raw_create", "create"}
    assert all(run["wall_s"] >= 30 / 400 for run in main)


def test_unknown_variants_are_refused(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCH), "--variants", "nope", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "unknown variants" in done.stderr
    assert not (tmp_path / "RESULTS.md").exists()


THROUGHPUT = BENCH.with_name("bench_throughput.py")


def test_a_quick_throughput_run_writes_its_table(tmp_path: Path) -> None:
    """Known and unknown limit, the library and the CLI with and without its journal, against
    the rate-limited server; only that every run ends and is reported, never how fast."""
    command = [sys.executable, str(THROUGHPUT), "--quick", "-n", "120", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr

    report = (tmp_path / "THROUGHPUT.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| server |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    for column in ("wall / (N/R)", "429s per 1000", "not captured", "double bookings"):
        assert column in columns
    rows = [line for line in report.splitlines() if line.startswith("| fixed |")]
    assert len(rows) == 6  # known and unknown, times library, CLI, CLI with journal
    assert all(len(row.strip("|").split("|")) == len(columns) for row in rows)

    (raw,) = tmp_path.glob("throughput-*.json")
    runs = json.loads(raw.read_text())["runs"]
    assert {(run["limit"], run["client"]) for run in runs} == {
        (limit, client)
        for limit in ("known", "unknown")
        for client in ("library", "cli", "cli-journal")
    }
    for run in runs:
        assert not run.get("timed_out")
        assert run["returncode"] in (0, 1), run["stderr_tail"]  # 1: some items not captured
        assert run["stats"]["requests"] >= run["n"] - run["not_captured"]
        assert run["stats"]["double_bookings"] == 0


KEYS = ("k-1", "k-1", "k-2", "k-3", "k-4")


def test_the_limited_server_limits_replays_and_counts() -> None:
    """Same key, same answer; a second key for a booked reference is a double booking; the
    limit answers 429 with its headers; GET /stats counts it all."""
    server = BENCH.with_name("_limited_server.py")
    command = [sys.executable, str(server), "--rate", "2", "--latency", "0,0", "--lifetime", "30"]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            url = f"http://127.0.0.1:{int(process.stdout.readline().split()[1])}"

            def post(key: str) -> tuple[int, dict[str, str]]:
                request = urllib.request.Request(
                    f"{url}/ordermanagement/v1/orders/o-1/captures",
                    data=b'{"captured_amount": 100, "reference": "r-1"}',
                    headers={"Authorization": "Basic eDp5", "Klarna-Idempotency-Key": key},
                )
                try:
                    with urllib.request.urlopen(request, timeout=10) as answer:
                        return answer.status, dict(answer.headers)
                except urllib.error.HTTPError as error:
                    return error.code, dict(error.headers)

            answers = [post(key) for key in KEYS]
            with urllib.request.urlopen(f"{url}/stats", timeout=10) as answer:
                stats = json.loads(answer.read())
        finally:
            assert process.stdin is not None
            process.stdin.close()
            process.wait(timeout=10)
    statuses = [status for status, _ in answers]
    # A 1-second window may turn over between requests, so allow one more admission.
    assert statuses[0] == 201
    assert 429 in statuses
    assert answers[0][1]["Capture-Id"] == answers[1][1]["Capture-Id"] or statuses[1] == 429
    assert all("X-Ratelimit-Limit" in headers for _, headers in answers)
    assert all("Retry-After" in headers for status, headers in answers if status == 429)
    assert stats["requests"] == 5
    assert stats["rate_limited_429"] == statuses.count(429)
    assert stats["answered_201"] == statuses.count(201)
    booked_keys = {key for key, (status, _) in zip(KEYS, answers, strict=True) if status == 201}
    assert stats["double_bookings"] == len(booked_keys) - 1


def test_a_throughput_run_with_workers_shares_the_server_among_them(tmp_path: Path) -> None:
    """Two library clients at once, each with orders of its own, against one server: one
    row whose counts add both up; only that it ends and is reported, never how fast."""
    command = [sys.executable, str(THROUGHPUT), "--quick", "-n", "60", "--limits", "unknown"]
    command += ["--clients", "library", "--workers", "2", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr

    report = (tmp_path / "THROUGHPUT.md").read_text()
    (row,) = [line for line in report.splitlines() if line.startswith("| fixed |")]
    assert "`capture_many`, 2 workers" in row
    (raw,) = tmp_path.glob("throughput-*.json")
    (run,) = json.loads(raw.read_text())["runs"]
    assert run["workers"] == 2
    assert run["captured"] + run["not_captured"] == 60
    assert run["stats"]["double_bookings"] == 0
    assert run["stats"]["bookings"] == run["captured"]  # no order was captured by both
