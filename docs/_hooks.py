"""MkDocs hook: warn (so ``--strict`` fails) when a public name is missing from the API
reference or has no docstring."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import griffe

log = logging.getLogger(f"mkdocs.plugins.{__name__}")

# Modules whose __all__ is public API, and the services reached through ``om.*``.
PUBLIC_MODULES = ("klarna_om_async", "klarna_om_async.testing", "klarna_om_async.telemetry")
SERVICES = (
    "klarna_om_async.captures.CapturesService",
    "klarna_om_async.orders.OrdersService",
    "klarna_om_async.refunds.RefundsService",
)
# Documented by the module page that renders them, or plain data with no docstring to have.
NOT_RENDERED_ALONE = {"klarna_om_async.__version__"}
# Public names known to lack a docstring, waiting for one in the code (each must be removed
# here once it has one: the hook warns about a stale entry too).
UNDOCUMENTED: set[str] = set()
DIRECTIVE = re.compile(r"^::: (\S+)", re.MULTILINE)


def public_names(package: griffe.Module) -> list[str]:
    """Every public name: each public module's ``__all__`` and the services."""
    names = []
    for module_path in PUBLIC_MODULES:
        module = package if module_path == package.path else package[module_path.split(".", 1)[1]]
        names += [f"{module_path}.{name}" for name in module.exports or ()]
    return [*names, *SERVICES]


def rendered(docs_dir: Path) -> set[str]:
    """The identifiers of every ``::: identifier`` in the reference pages."""
    found: set[str] = set()
    for page in (docs_dir / "reference").glob("*.md"):
        found.update(DIRECTIVE.findall(page.read_text(encoding="utf-8")))
    return found


def problems(docs_dir: Path) -> list[str]:
    """What the reference is missing: names it does not render, and names without docs."""
    package = griffe.load(
        "klarna_om_async",
        search_paths=[str(docs_dir.parent)],
        extensions=griffe.load_extensions("griffe_sphinx"),
    )
    assert isinstance(package, griffe.Module)
    directives = rendered(docs_dir)
    found = []
    for path in public_names(package):
        module = path.rsplit(".", 1)[0]
        if path not in NOT_RENDERED_ALONE and not {path, module} & directives:
            found.append(f"{path} is public but no reference page renders it (::: {path})")
        obj = package[path.split(".", 1)[1]]
        target = obj.final_target if isinstance(obj, griffe.Alias) else obj
        if path in UNDOCUMENTED:
            if target.docstring:
                found.append(f"{path} has a docstring now: remove it from UNDOCUMENTED")
        elif path not in NOT_RENDERED_ALONE and not target.docstring:
            found.append(f"{path} has no docstring")
        if target.is_class:
            for name, member in target.members.items():
                member = member.final_target if isinstance(member, griffe.Alias) else member
                if not name.startswith("_") and member.is_function and not member.docstring:
                    found.append(f"{path}.{name} has no docstring")
    return found


def on_config(config: Any) -> None:
    """Include snippets (the changelog) from the repository root, wherever mkdocs runs."""
    root = str(Path(config["config_file_path"]).resolve().parent)
    config["mdx_configs"].setdefault("pymdownx.snippets", {})["base_path"] = [root]


def on_pre_build(config: Any) -> None:
    """Log one warning per problem: ``mkdocs build --strict`` then fails."""
    for problem in problems(Path(config["docs_dir"])):
        log.warning("API reference: %s", problem)
