"""The documentation site: every Python block of every page runs against FakeKlarna (or at
least compiles), every ``klarna-om`` command line it shows exists, and the site builds with
``mkdocs build --strict`` (no broken link, no public name missing from the API reference)."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from types import CodeType, ModuleType

import click
import pytest

import klarna_om_async
from klarna_om_async import KlarnaOM, RetryPolicy
from klarna_om_async.cli import main as cli_main
from klarna_om_async.testing import FakeKlarna, InstantSleep

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
# A block may be preceded by a mark: `compile-only` (it needs real Klarna or names the reader
# supplies) or `continue` (it goes on with the previous block's order instead of a new one).
BLOCK = re.compile(r"(?:<!-- docs: (?P<mark>\S+) -->\n)?```python\n(?P<code>.*?)```", re.DOTALL)
MARKS = {None, "compile-only", "continue"}
# Every block's order: authorized, 10000 minor units, as docs/index.md tells the reader.
ORDER_AMOUNT = 10000


def page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


def blocks(page: Path) -> list[tuple[str | None, str, int]]:
    """(mark, code, line) of each ``python`` block of ``page``, in order."""
    text = page.read_text(encoding="utf-8")
    return [
        (m["mark"], m["code"], text.count("\n", 0, m.start("code")) + 1)
        for m in BLOCK.finditer(text)
    ]


PAGES_WITH_CODE = [page for page in PAGES if blocks(page)]


def compiled(code: str, page: Path, line: int) -> CodeType:
    source = "\n" * (line - 1) + code  # tracebacks point at the page's own lines
    program: CodeType = compile(source, str(page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    return program


def test_the_pages_have_python_blocks_and_only_known_marks() -> None:
    assert {page_id(p) for p in PAGES_WITH_CODE} >= {
        "index.md",
        "getting-started.md",
        "guides/exactly-once.md",
        "guides/batch.md",
        "guides/lifecycle.md",
        "guides/rate-limits.md",
        "guides/observability.md",
        "guides/testing.md",
    }
    for page in PAGES:
        for mark, _code, line in blocks(page):
            assert mark in MARKS, f"{page_id(page)}:{line}: unknown mark {mark!r}"


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=page_id)
async def test_the_python_blocks_of_each_page_run_against_fake_klarna(
    page: Path, fake: FakeKlarna, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page's blocks run in order in one namespace, like a reader's session: ``om`` is a
    client of FakeKlarna, ``order_id`` a new authorized order for each block, and a
    ``KlarnaOM(...)`` the page makes without ``base_url`` talks to the same fake."""

    class PointedAtFake(KlarnaOM):
        def __init__(self, username: str, password: str, **options: object) -> None:
            if "base_url" not in options:
                username, password = fake.username, fake.password
                options = {k: v for k, v in options.items() if k not in ("region", "playground")}
                options["base_url"] = fake.base_url
            options.setdefault("retry", RetryPolicy(sleep=InstantSleep()))
            super().__init__(username, password, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(klarna_om_async, "KlarnaOM", PointedAtFake)
    monkeypatch.chdir(tmp_path)  # e.g. SQLiteJournal("captures.sqlite")
    async with PointedAtFake("api-username", "api-password") as om:
        namespace: dict[str, object] = {"__name__": "docs_example"}
        ran: set[str] = set()
        for mark, code, line in blocks(page):
            program = compiled(code, page, line)
            if mark == "compile-only":
                continue
            if mark != "continue":
                namespace["om"] = om
                namespace["order_id"] = fake.add_order(amount=ORDER_AMOUNT)
            result = eval(program, namespace)
            if result is not None:
                await result
            # A block that defines a pytest test is run as pytest would.
            for name, value in list(namespace.items()):
                if name.startswith("test_") and name not in ran:
                    assert inspect.iscoroutinefunction(value), name
                    ran.add(name)
                    await value()


def test_getting_started_shows_the_readmes_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    page = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    assert SHELL_BLOCK.findall(page)[0] == SHELL_BLOCK.findall(readme)[0]


# -- the command lines the pages show -----------------------------------------------------

COMMAND_LINE = re.compile(r"klarna-om ([a-z][a-z-]*)([^\n#]*)")
SHELL_BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)
SHELL_COMMENT = re.compile(r"(?:^|\s)#.*$", re.MULTILINE)
INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def options_of(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def command_lines() -> list[tuple[str, str, str]]:
    """(page, command, rest of the line) for every ``klarna-om COMMAND ...`` on the site."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        code = SHELL_BLOCK.findall(text) + INLINE_CODE.findall(SHELL_BLOCK.sub("", text))
        for snippet in code:
            snippet = SHELL_COMMENT.sub("", snippet)
            found += [(page_id(page), m[1], m[2]) for m in COMMAND_LINE.finditer(snippet)]
    return found


def test_every_command_line_in_the_docs_names_a_real_command_and_its_options() -> None:
    assert isinstance(cli_main, click.Group)
    shown = command_lines()
    assert len(shown) > 20
    everywhere = options_of(cli_main)  # connection flags and -v work after the command too
    for page, name, rest in shown:
        command = cli_main.commands.get(name)
        assert command is not None, f"{page}: klarna-om {name} is no command"
        flags = {token.split("=")[0] for token in rest.split() if token.startswith("--")}
        unknown = flags - options_of(command) - everywhere - {"--help"}
        assert not unknown, f"{page}: klarna-om {name} has no {sorted(unknown)}"


# -- the site builds -----------------------------------------------------------------------


def docs_tools_or_skip() -> None:
    """Skip without the docs tools (the `docs` extra), except in CI, where they must be."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("griffe") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but mkdocs/griffe are not installed: pip install -e '.[test]'")
        pytest.skip("the docs tools are not installed: pip install -e '.[docs]'")


def docs_module(name: str) -> ModuleType:
    """Import ``docs/{name}.py``, build code that is not in a package."""
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_is_in_the_api_reference_with_a_docstring() -> None:
    docs_tools_or_skip()
    assert docs_module("_hooks").problems(DOCS) == []


def test_the_reference_reads_rest_literal_blocks_and_roles_as_markdown() -> None:
    docs_tools_or_skip()
    markdown = docs_module("_griffe_rest").markdown
    assert markdown("Two ways in::\n\n    code\n") == "Two ways in:\n\n    code\n"
    assert markdown("Text.\n\n::\n\n    code\n") == "Text.\n\n\n\n    code\n"
    assert markdown("see :mod:`a.b` and :class:`C`") == "see `a.b` and `C`"
    assert markdown("a ``x::y`` stays") == "a ``x::y`` stays"


def test_the_site_builds_with_mkdocs_strict(tmp_path: Path) -> None:
    docs_tools_or_skip()
    # Not -q: mkdocs drops warnings below its log level before --strict counts them.
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "reference" / "client" / "index.html").is_file()
    changelog = (tmp_path / "changelog" / "index.html").read_text(encoding="utf-8")
    assert "Keep a Changelog" in changelog  # CHANGELOG.md included, not a stale copy
