"""The ``klarna-om`` click group, with every command registered on it."""

from __future__ import annotations

import errno
import logging
import sys
from typing import Any

import click

from .._version import __version__
from ._batchcmd import batch
from ._commands import SINGLE_COMMANDS
from ._demo import demo
from ._fakeserver import fake_server
from ._lifecycle import LIFECYCLE_COMMANDS
from ._options import EXIT_UNKNOWN_OUTCOME, InputError, connection_options
from ._reconcilecmd import reconcile
from ._render import echo_json, lose_stdout, stdout_lost

__all__ = ("main",)


class _Group(click.Group):
    """The ``klarna-om`` group: with ``--json``, a usage or input error is a JSON object too."""

    def invoke(self, ctx: click.Context) -> Any:
        # The command's own arguments: its name is not among them, and "--json" is no name.
        wants_json = "--json" in ctx.args
        try:
            if sys.stdout is None:  # started with it closed: every result would be lost
                raise InputError("standard output is closed: nothing was sent")
            return super().invoke(ctx)
        except click.ClickException as error:
            if wants_json and not stdout_lost() and sys.stdout is not None:
                try:
                    echo_json(
                        {
                            "type": "error",
                            "error": "usage" if isinstance(error, click.UsageError) else "input",
                            "message": error.format_message(),
                            "outcome_unknown": False,
                            "idempotency_key": None,
                            "correlation_id": None,
                            "status": None,
                            "error_code": None,
                            "exit_code": error.exit_code,
                        }
                    )
                except OSError:  # a closed pipe, a full disk: the error goes to stderr anyway
                    lose_stdout()
            raise
        except OSError as error:
            if not _stdout_failed(error):
                raise
            # Klarna may have done what was asked: "refused" (click's exit 1) would invite
            # a retry under a new key. The key was printed (on stderr) before sending.
            click.echo(
                f"Error: the output could not be written ({error.strerror}), so the result is"
                " not shown: rerun the command to see it (a call that changes an order with"
                " --idempotency-key KEY, the key printed above; a batch only with the journal"
                " it used: without one, a rerun sends every item again)",
                err=True,
            )
            sys.exit(EXIT_UNKNOWN_OUTCOME)


def _stdout_failed(error: OSError) -> bool:
    """Whether ``error`` is standard output failing (a closed pipe, a full disk)."""
    if error.errno not in (errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EDQUOT):
        return False
    # The stream the failed write went to: click.echo's ``file``, or a rich Console's.
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = {} if tb is None else tb.tb_frame.f_locals
    stream = where.get("file", getattr(where.get("self"), "file", None))
    if stream is None or stream is not sys.stdout:
        return False
    lose_stdout()
    return True


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="klarna-om")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Log every retry (with its key) to stderr; also accepted after the command name.",
)
@connection_options
def main(verbose: bool) -> None:
    """Capture and refund Klarna orders exactly once: one at a time, or captures by the
    thousand from a file.

    Try `klarna-om demo` first: it needs no credentials. Other commands read credentials
    from KLARNA_USERNAME, KLARNA_PASSWORD, KLARNA_REGION (eu, na, oc) and
    KLARNA_PLAYGROUND (1/true), or from --username, --password, --region and --playground;
    --base-url (KLARNA_BASE_URL) sends to any server, e.g. a running `klarna-om fake-server`;
    --proxy URL sends through an HTTP proxy. These connection flags and -v go before or after
    the command name.
    Amounts are integer minor units (1050 = 10.50). --json prints JSON, one object per line.
    capture, refund, ship and send-out print their idempotency key before sending: if they
    are interrupted, rerun them with --idempotency-key KEY to finish exactly once; never
    give a key to another call. The other commands that change an order print their key
    too (release, extend, cancel, acknowledge, update-authorization, references,
    ship-order, extend-due-date). cancel and release ask first; --yes skips the question,
    and is required when stdin is not a terminal.

    \b
    Exit status:
      0    success; in a batch, every item captured or skipped
      1    Klarna refused, or replayed an earlier request's answer for a reused key, or
           you answered no (nothing happened); in a batch, some items refused or failed
      2    usage or input errors (nothing was sent)
      3    outcome unknown: the call may have taken effect; rerun it with
           --idempotency-key KEY (the key it printed) to finish it exactly once;
           also when the output could not be written (a closed pipe, a full disk)
      130  interrupted (Ctrl-C, SIGINT)
      143  terminated (SIGTERM)
    """
    _configure_logging(verbose)


def _verbose_after_command(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        _configure_logging(True)
    return value


class _EchoHandler(logging.Handler):
    """Writes log lines through click, to whatever stderr is current (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _configure_logging(verbose: bool) -> None:
    logger = logging.getLogger("klarna_om_async")
    # Retries are routine in a batch: without -v only errors reach the terminal.
    # The group's -v is applied first; a command's -v, parsed after it, can only raise it.
    logger.setLevel(logging.INFO if verbose else logging.ERROR)
    if not any(isinstance(handler, _EchoHandler) for handler in logger.handlers):
        logger.addHandler(_EchoHandler())
        logger.propagate = False


for _command in (*SINGLE_COMMANDS, *LIFECYCLE_COMMANDS, batch, reconcile, fake_server, demo):
    if not any("--verbose" in param.opts for param in _command.params):
        _command.params.append(
            click.Option(
                ["-v", "--verbose"],
                is_flag=True,
                expose_value=False,
                callback=_verbose_after_command,
                help="Log every retry (with its key) to stderr; same as `klarna-om -v`.",
            )
        )
    main.add_command(_command)
