"""The ``klarna-om`` command line: single captures, resumable batches, a fake server, a demo.

Installed as the ``klarna-om`` console script (``pip install "klarna-om-async[cli]"``); also
runnable as ``python -m klarna_om_async.cli``. See ``klarna-om --help``.
"""

from __future__ import annotations

import sys

#: What the ``[cli]`` extra installs; without them, ``klarna-om`` says how to get them.
_CLI_DEPENDENCIES = ("click", "rich")

try:
    from ._app import main
except ModuleNotFoundError as _missing:
    if (_missing.name or "").partition(".")[0] not in _CLI_DEPENDENCIES:
        raise
    _MISSING = _missing.name

    def main(*_args: object, **_kwargs: object) -> None:  # type: ignore[misc]
        """Say which extra the command line needs, in one line, and exit 2."""
        print(
            f"klarna-om: the command line needs the [cli] extra (missing module "
            f'{_MISSING!r}): pip install "klarna-om-async[cli]"',
            file=sys.stderr,
        )
        sys.exit(2)


__all__ = ("main",)
