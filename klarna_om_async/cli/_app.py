"""The ``klarna-om`` click group, with every command registered on it."""

from __future__ import annotations

import logging

import click

from .._version import __version__
from ._batchcmd import batch
from ._commands import SINGLE_COMMANDS
from ._demo import demo
from ._fakeserver import fake_server
from ._reconcilecmd import reconcile

__all__ = ("main",)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="klarna-om")
@click.option("-v", "--verbose", is_flag=True, help="Log every retry (with its key) to stderr.")
def main(verbose: bool) -> None:
    """Capture Klarna orders: one at a time, or thousands from a file, exactly once.

    Try `klarna-om demo` first: it needs no credentials. Other commands read credentials
    from KLARNA_USERNAME, KLARNA_PASSWORD, KLARNA_REGION (eu, na, oc) and
    KLARNA_PLAYGROUND (1/true), or from --username, --password, --region and --playground;
    --base-url (KLARNA_BASE_URL) sends to any server, e.g. a running `klarna-om fake-server`.
    Amounts are integer minor units (1050 = 10.50). --json prints JSON, one object per line.
    capture, ship and send-out print their idempotency key before sending: if they are
    interrupted, rerun them with --idempotency-key KEY to finish exactly once.

    \b
    Exit status:
      0    success; in a batch, every item captured or skipped
      1    a Klarna error; in a batch, some items refused or failed
      2    usage or input errors
      130  interrupted (Ctrl-C, SIGINT)
      143  terminated (SIGTERM)
    """
    _configure_logging(verbose)


class _EchoHandler(logging.Handler):
    """Writes log lines through click, to whatever stderr is current (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _configure_logging(verbose: bool) -> None:
    logger = logging.getLogger("klarna_om_async")
    # Retries are routine in a batch: without -v only errors reach the terminal.
    logger.setLevel(logging.INFO if verbose else logging.ERROR)
    if not any(isinstance(handler, _EchoHandler) for handler in logger.handlers):
        logger.addHandler(_EchoHandler())
        logger.propagate = False


for _command in (*SINGLE_COMMANDS, batch, reconcile, fake_server, demo):
    main.add_command(_command)
