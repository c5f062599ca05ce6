"""The ``klarna-om`` command line: single captures, resumable batches, a fake server, a demo.

Installed as the ``klarna-om`` console script (``pip install "klarna-om-async[cli]"``); also
runnable as ``python -m klarna_om_async.cli``. See ``klarna-om --help``.
"""

from ._app import main

__all__ = ("main",)
