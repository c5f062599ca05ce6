"""Options shared by the commands: where Klarna is, who we are, and how to report errors."""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import aiohttp
import attrs
import click
import yarl
from click.core import ParameterSource

from ..client import KlarnaOM, _env_proxy, check_base_url
from ..config import Credentials, Region, RetryPolicy, base_url_for
from ..errors import KlarnaError, ValidationError
from ..journal import JournalError
from ..sqlite_journal import SQLiteJournal
from ._render import cli_error_text, echo_json, error_json

__all__ = (
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SOME_NOT_CAPTURED",
    "EXIT_TERMINATED",
    "EXIT_UNKNOWN_OUTCOME",
    "Connection",
    "InputError",
    "Interrupted",
    "connection_options",
    "json_option",
    "open_journal",
    "run_interruptible",
    "run_single",
)

EXIT_OK = 0
EXIT_SOME_NOT_CAPTURED = 1
EXIT_INPUT = 2
# Distinct from 1 ("Klarna said no, nothing happened"): a script must not treat a call that
# may have been booked like a refusal. It reruns with the same --idempotency-key instead.
EXIT_UNKNOWN_OUTCOME = 3
# After a signal, 128 + its number, as a shell reports a process the signal killed.
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # SIGTERM

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")
_META_KEY = "klarna_om.connection"
_EXPLICIT_KEY = "klarna_om.connection.explicit"


class InputError(click.ClickException):
    """A usage or input problem found before anything was sent; exits with 2."""

    exit_code = EXIT_INPUT


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped a command: its coroutine was cancelled and has cleaned up."""

    def __init__(self, signum: signal.Signals) -> None:
        super().__init__(f"interrupted by {signum.name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """130 after SIGINT (Ctrl-C), 143 after SIGTERM."""
        return EXIT_TERMINATED if self.signum == signal.SIGTERM else EXIT_INTERRUPTED


@attrs.frozen(repr=False)
class Connection:
    """Where to send requests and with which credentials, from flags or the environment."""

    username: str | None
    password: str | None = attrs.field(eq=False)
    region: Region
    playground: bool
    base_url: str | None
    max_attempts: int = 5
    proxy: str | None = None

    def __repr__(self) -> str:
        return f"Connection(username={self.username!r}, base_url={self.base_url!r})"

    @classmethod
    def from_context(cls) -> Connection:
        """The connection options given to the current command."""
        given = click.get_current_context().meta.get(_META_KEY, {})
        return cls(
            username=given.get("username"),
            password=given.get("password"),
            region=Region(given.get("region") or Region.EU),
            playground=bool(given.get("playground")),
            base_url=given.get("base_url"),
            max_attempts=given.get("max_attempts") or 5,
            proxy=given.get("proxy") or None,
        )

    def check(self) -> tuple[str, str]:
        """The username and password; ``InputError`` if either is missing or unusable, or
        the base URL or proxy is: before a command says a key or sends anything."""
        if not self.username or not self.password:
            raise InputError(
                "no credentials: set KLARNA_USERNAME and KLARNA_PASSWORD, "
                "or pass --username and --password"
            )
        try:
            Credentials(self.username, self.password)
            if self.base_url is not None:
                check_base_url(self.base_url)
            if self.proxy is None:  # the environment's proxy, which the client would take
                url = self.base_url or base_url_for(self.region, playground=self.playground)
                _env_proxy(yarl.URL(url))
        except ValueError as error:
            raise InputError(str(error)) from None
        _check_base_url(self.base_url)
        if self.proxy is not None:
            _check_proxy(self.proxy)
        return self.username, self.password

    @contextlib.asynccontextmanager
    async def client(
        self, *, deadline: float | None = None, rate_limit: float | None = None
    ) -> AsyncIterator[KlarnaOM]:
        """A ``KlarnaOM`` for this connection, open for the ``async with`` block;
        ``InputError`` if credentials are missing or the base URL or proxy is unusable.

        ``deadline`` bounds each call's retries in seconds (default: ``RetryPolicy``'s).
        ``rate_limit`` paces every request of the client (``KlarnaOM(rate_limit=)``).
        With ``--proxy``, the client borrows a session that sends through that proxy.
        """
        username, password = self.check()
        retry = RetryPolicy(max_attempts=self.max_attempts)
        if deadline is not None:
            retry = attrs.evolve(retry, deadline=deadline)
        _check_base_url(self.base_url)
        session = None if self.proxy is None else _proxy_session(self.proxy)
        try:
            try:
                om = KlarnaOM(
                    username,
                    password,
                    region=self.region,
                    playground=self.playground,
                    base_url=self.base_url,
                    retry=retry,
                    session=session,
                    rate_limit=rate_limit,
                )
            except ValueError as error:  # e.g. a base URL that is not http(s)
                raise InputError(str(error)) from None
            async with om:
                yield om
        finally:
            if session is not None:
                await session.close()


# Where KlarnaOM puts the API's paths: a base URL that already ends so would double them.
_API_PREFIX = "/ordermanagement/"


def _check_base_url(base_url: str | None) -> None:
    """Refuse a base URL that includes the API path, which every request would repeat."""
    if base_url is None:
        return
    try:
        parsed = yarl.URL(base_url)
    except ValueError as error:  # e.g. "http://[::1"
        raise InputError(f"--base-url {base_url!r} is not a URL: {error}") from None
    at = parsed.path.find(_API_PREFIX.rstrip("/"))
    if parsed.host and at >= 0:
        root = str(parsed.with_path(parsed.path[:at] or "/")).rstrip("/")
        raise InputError(
            f"--base-url {base_url} includes the API path {parsed.path[at:]!r}, which "
            f"klarna-om adds to every request (it would send .../ordermanagement/v1/"
            f"ordermanagement/v1/...): give the server's root, e.g. --base-url {root}"
        )


def _check_proxy(proxy: str) -> None:
    try:
        parsed = yarl.URL(proxy)
        host = parsed.host
    except ValueError:  # e.g. "http://[::1"
        host = None
    if host is None or parsed.scheme not in ("http", "https"):
        raise InputError(f"--proxy must be an http(s) URL such as http://proxy:3128, got {proxy!r}")


def _proxy_session(proxy: str) -> aiohttp.ClientSession:
    """A session that sends every request through ``proxy``; lent to ``KlarnaOM``."""
    _check_proxy(proxy)
    # As KlarnaOM's own session: no total timeout (each attempt has its own), and no pool
    # limit below the concurrency a batch asks for (its --concurrency bounds the requests).
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
        proxy=proxy,
    )


def _remember(ctx: click.Context, param: click.Parameter, value: object) -> object:
    # Collected in ctx.meta so commands need not repeat five parameters in their signatures.
    # ctx.meta is shared by the group and its command, which both take these options: a
    # default (or the environment) on one never overrides a flag given to the other.
    given = ctx.meta.setdefault(_META_KEY, {})
    explicit = ctx.meta.setdefault(_EXPLICIT_KEY, set())
    if ctx.get_parameter_source(param.name or "") is ParameterSource.COMMANDLINE:
        given[param.name] = value
        explicit.add(param.name)
    elif param.name not in explicit:
        given[param.name] = value
    return value


def connection_options(command: _F) -> _F:
    """Add ``--username --password --region --playground --base-url`` (with env vars),
    ``--proxy`` and ``--max-attempts``; they go before or after the command name."""
    options = (
        click.option(
            "--username",
            envvar="KLARNA_USERNAME",
            metavar="NAME",
            callback=_remember,
            expose_value=False,
            help="Klarna API username [env: KLARNA_USERNAME].",
        ),
        click.option(
            "--password",
            envvar="KLARNA_PASSWORD",
            metavar="SECRET",
            callback=_remember,
            expose_value=False,
            help="Klarna API password [env: KLARNA_PASSWORD]; prefer the env var.",
        ),
        click.option(
            "--region",
            envvar="KLARNA_REGION",
            type=click.Choice([region.value for region in Region], case_sensitive=False),
            callback=_remember,
            expose_value=False,
            help="Region of the account: eu (default), na or oc [env: KLARNA_REGION].",
        ),
        click.option(
            "--playground",
            envvar="KLARNA_PLAYGROUND",
            is_flag=True,
            default=False,
            callback=_remember,
            expose_value=False,
            help="Use Klarna's playground (test) hosts [env: KLARNA_PLAYGROUND=1/true].",
        ),
        click.option(
            "--base-url",
            envvar="KLARNA_BASE_URL",
            metavar="URL",
            callback=_remember,
            expose_value=False,
            help="Send to this server instead (e.g. a running `klarna-om fake-server`); "
            "overrides --region/--playground [env: KLARNA_BASE_URL].",
        ),
        click.option(
            "--proxy",
            metavar="URL",
            callback=_remember,
            expose_value=False,
            help="Send every request through this HTTP proxy, e.g. http://proxy:3128 "
            "(without it, HTTPS_PROXY/HTTP_PROXY/NO_PROXY apply).",
        ),
        click.option(
            "--max-attempts",
            type=click.IntRange(min=1, max=100),  # as RetryPolicy.max_attempts
            default=5,
            show_default=True,
            callback=_remember,
            expose_value=False,
            help="HTTP attempts per call before giving up; every retry reuses the call's "
            "idempotency key.",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


def json_option(command: _F) -> _F:
    """Add ``--json``: machine-readable output, one JSON object per line."""
    return click.option(
        "--json",
        "json_output",
        is_flag=True,
        help="Print JSON instead of tables: one object per line.",
    )(command)


def run_interruptible(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """``asyncio.run(make())``, where SIGINT or SIGTERM cancel the task: ``Interrupted``.

    The first signal cancels the task, so its ``finally`` blocks run (a batch stops its
    workers, closes its journal and prints its summary). Later signals change nothing, from
    then until the process exits: no ``KeyboardInterrupt`` lands in that cleanup or in the
    exit, so the summary and the exit status are the first signal's. Where the loop cannot
    take signals (Windows, or not the main thread), Ctrl-C still ends in ``Interrupted``
    through asyncio's own handling, and SIGTERM keeps its default action.
    """
    received: list[signal.Signals] = []

    async def main() -> _T:
        task = asyncio.current_task()

        def stop(signum: signal.Signals) -> None:
            if not received and task is not None:
                task.cancel()
            received.append(signum)

        with _signals_call(stop, ignore_after=received):
            return await make()

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if not received:
            raise
        raise Interrupted(received[0]) from None
    except KeyboardInterrupt:  # asyncio's SIGINT handling, where ours is not installed
        raise Interrupted(signal.SIGINT) from None


@contextlib.contextmanager
def _signals_call(
    stop: Callable[[signal.Signals], None], *, ignore_after: list[signal.Signals]
) -> Iterator[None]:
    """Within the running loop, SIGINT and SIGTERM call ``stop(signum)``. On the way out,
    the previous handlers come back, unless ``ignore_after`` holds a signal: then both
    signals are ignored, as the command is about to exit with that signal's status."""
    loop = asyncio.get_running_loop()
    installed: list[tuple[signal.Signals, Any]] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        try:
            loop.add_signal_handler(signum, stop, signum)
        except (NotImplementedError, RuntimeError):  # Windows; a thread other than main
            break
        installed.append((signum, previous))
    try:
        yield
    finally:
        for signum, previous in installed:
            loop.remove_signal_handler(signum)
            if ignore_after:
                signal.signal(signum, signal.SIG_IGN)
            elif previous is not None:  # e.g. asyncio.run's SIGINT handler, which it resets
                signal.signal(signum, previous)


def run_single(
    make: Callable[[], Coroutine[Any, Any, _T]],
    *,
    json_output: bool = False,
    idempotency_key: str | None = None,
) -> _T:
    """Run one API call's coroutine; a Klarna error becomes one line on stderr (and, with
    ``json_output``, an error object on stdout), then exit 3 if the outcome is unknown, else 1.

    SIGINT or SIGTERM cancel the call and exit 130 or 143 after one line on stderr (and,
    with ``json_output``, an error object on stdout). For a call that moves money, given
    its ``idempotency_key``, the line says the outcome is unknown and how to finish it.
    """
    try:
        return run_interruptible(make)
    except Interrupted as interrupted:
        _report_interrupted(interrupted, json_output, idempotency_key)
        sys.exit(interrupted.exit_code)
    except ValidationError as error:
        if json_output:
            echo_json(error_json(error, exit_code=EXIT_INPUT))
        raise InputError(str(error)) from None
    except KlarnaError as error:
        exit_code = EXIT_UNKNOWN_OUTCOME if error.outcome_unknown else EXIT_SOME_NOT_CAPTURED
        if json_output:
            echo_json(error_json(error, exit_code=exit_code))
        click.echo(f"Error: {cli_error_text(error)}", err=True)
        sys.exit(exit_code)


def _report_interrupted(
    interrupted: Interrupted, json_output: bool, idempotency_key: str | None
) -> None:
    # The request may have reached Klarna and been booked: only the key can tell.
    outcome_unknown = idempotency_key is not None
    if json_output:
        error: dict[str, object] = {
            "type": "error",
            "error": "interrupted",
            "signal": interrupted.signum.name,
            "outcome_unknown": outcome_unknown,
        }
        if outcome_unknown:
            error["idempotency_key"] = idempotency_key
        echo_json(error)
    if outcome_unknown:
        click.echo(f"outcome unknown: rerun with --idempotency-key {idempotency_key}", err=True)
    else:
        click.echo(f"interrupted by {interrupted.signum.name}", err=True)


def journal_fault(error: sqlite3.Error) -> bool:
    """Whether ``error`` is the journal file's state (full, unwritable, locked, corrupt), not
    a bug (a programming error), which keeps its traceback."""
    return isinstance(error, sqlite3.OperationalError | sqlite3.IntegrityError) or (
        type(error) is sqlite3.DatabaseError
    )


def finite(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    """A click callback refusing nan, which ``click.FloatRange`` lets through (every
    comparison with nan is False)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number")
    return value


def damaged(journal: str, error: BaseException) -> str | None:
    """What to do about a journal file SQLite finds damaged (``error`` says so), else None."""
    if type(error) is not sqlite3.DatabaseError:  # its subclasses: locked, full, a bug...
        return None
    # A new journal would send its items again under new keys: the rows must be saved.
    return (
        f"the journal {journal} is damaged ({error}); nothing more was sent: restore it from"
        " a backup (SQLite's .recover may save some of its rows); without one, check these"
        " orders at Klarna before sending their items again: under a new journal they would"
        " be sent again under new keys"
    )


async def open_journal(journal: SQLiteJournal) -> SQLiteJournal:
    """``await journal.open()``; a journal that cannot be used is an ``InputError`` (exit 2)."""
    try:
        return await journal.open()
    except JournalError as error:  # in use by another run, or not a journal
        raise InputError(str(error)) from None
    except (sqlite3.Error, OSError) as error:
        why = damaged(journal.path, error) or f"cannot open the journal {journal.path}: {error}"
        raise InputError(why) from None
