"""The benchmark script runs end to end on a tiny N and writes its report (no timing checks)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
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


def test_unknown_variants_are_refused(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCH), "--variants", "nope", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "unknown variants" in done.stderr
    assert not (tmp_path / "RESULTS.md").exists()
