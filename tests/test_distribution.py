"""The sdist carries what the test-suite needs, the licence and the project's URLs."""

from __future__ import annotations

import email.parser
import importlib.util
import subprocess
import sys
import tarfile
import tomllib
from email.message import Message
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOME = "https://github.com/klarna-om-async/klarna-om-async"
URL_NAMES = ("Homepage", "Documentation", "Changelog", "Issues")
# Directories the test-suite reads from the source tree (tests/test_examples.py loads
# examples/, tests/test_benchmarks.py runs benchmarks/).
SUITE_DIRS = ("klarna_om_async", "tests", "examples", "benchmarks", "docs")


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_licence_file_is_mit_and_declared() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 klarna-om-async developers" in text
    project = pyproject()["project"]
    assert isinstance(project, dict)
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]


def test_the_project_urls_share_one_home() -> None:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    urls = project["urls"]
    assert sorted(urls) == sorted(URL_NAMES)
    assert urls["Homepage"] == HOME
    assert all(url.startswith(HOME) for url in urls.values())


def shipped(directory: str) -> set[str]:
    """Files under ``directory`` that belong in a distribution (no caches, no results)."""
    found = set()
    for path in (ROOT / directory).rglob("*"):
        relative = path.relative_to(ROOT)
        if not path.is_file() or "__pycache__" in relative.parts or path.suffix == ".pyc":
            continue
        if relative.parts[:2] == ("benchmarks", "results") or path.suffix == ".sqlite":
            continue
        found.add(relative.as_posix())
    return found


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build", reason="needs `build` (in the [test] extra) to make an sdist")
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    [archive] = out.glob("*.tar.gz")
    return archive


def members(archive: Path) -> tuple[str, set[str]]:
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    return top, {name.removeprefix(f"{top}/") for name in names if name != top}


def test_the_sdist_holds_everything_the_test_suite_reads(sdist: Path) -> None:
    _, files = members(sdist)
    for name in (
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "pyproject.toml",
        "PKG-INFO",
        "mkdocs.yml",
    ):
        assert name in files
    for directory in SUITE_DIRS:
        expected = shipped(directory)
        assert expected, directory
        assert expected <= files, f"missing from the sdist: {sorted(expected - files)}"
    assert "examples/web_service.py" in files
    assert "benchmarks/bench_capture.py" in files
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in files)


def metadata(archive: Path) -> Message:
    top, _ = members(archive)
    with tarfile.open(archive) as tar:
        extracted = tar.extractfile(f"{top}/PKG-INFO")
        assert extracted is not None
        return email.parser.Parser().parsestr(extracted.read().decode())


def test_the_sdist_metadata_names_the_licence_and_the_urls(sdist: Path) -> None:
    meta = metadata(sdist)
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    urls = dict(url.split(", ", 1) for url in meta.get_all("Project-URL") or [])
    assert sorted(urls) == sorted(URL_NAMES)
    assert urls["Homepage"] == HOME


def test_twine_check_passes_on_the_sdist(sdist: Path) -> None:
    if importlib.util.find_spec("twine") is None:
        pytest.skip("twine is not installed (pip install twine)")
    command = [sys.executable, "-m", "twine", "check", "--strict", str(sdist)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_coverage_measures_the_package_wherever_it_is_installed() -> None:
    # From an unpacked sdist the tests import the installed package, not ./klarna_om_async:
    # a directory as coverage source would then measure 0% and fail the floor.
    tool = pyproject()["tool"]
    assert isinstance(tool, dict)
    assert tool["coverage"]["run"]["source_pkgs"] == ["klarna_om_async"]
    assert "source" not in tool["coverage"]["run"]
    assert "--cov=" not in tool["pytest"]["ini_options"]["addopts"]
