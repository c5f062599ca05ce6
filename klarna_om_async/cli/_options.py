"""Options shared by the commands: where Klarna is, who we are, and how to report errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import attrs
import click

from ..client import KlarnaOM
from ..config import Region, RetryPolicy
from ..errors import KlarnaError, ValidationError

__all__ = (
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SOME_NOT_CAPTURED",
    "Connection",
    "InputError",
    "connection_options",
    "json_option",
    "run_single",
)

EXIT_OK = 0
EXIT_SOME_NOT_CAPTURED = 1
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")
_META_KEY = "klarna_om.connection"


class InputError(click.ClickException):
    """A usage or input problem found before anything was sent; exits with 2."""

    exit_code = EXIT_INPUT


@attrs.frozen(repr=False)
class Connection:
    """Where to send requests and with which credentials, from flags or the environment."""

    username: str | None
    password: str | None = attrs.field(eq=False)
    region: Region
    playground: bool
    base_url: str | None
    max_attempts: int = 5

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
        )

    def check(self) -> tuple[str, str]:
        """The username and password; ``InputError`` if either is missing."""
        if not self.username or not self.password:
            raise InputError(
                "no credentials: set KLARNA_USERNAME and KLARNA_PASSWORD, "
                "or pass --username and --password"
            )
        return self.username, self.password

    def client(self, *, deadline: float | None = None) -> KlarnaOM:
        """A ``KlarnaOM`` for this connection; ``InputError`` if credentials are missing.

        ``deadline`` bounds each call's retries in seconds (default: ``RetryPolicy``'s).
        """
        username, password = self.check()
        retry = RetryPolicy(max_attempts=self.max_attempts)
        if deadline is not None:
            retry = attrs.evolve(retry, deadline=deadline)
        try:
            return KlarnaOM(
                username,
                password,
                region=self.region,
                playground=self.playground,
                base_url=self.base_url,
                retry=retry,
            )
        except ValueError as error:  # e.g. a base URL that is not http(s)
            raise InputError(str(error)) from None


def _remember(ctx: click.Context, param: click.Parameter, value: object) -> object:
    # Collected in ctx.meta so commands need not repeat five parameters in their signatures.
    ctx.meta.setdefault(_META_KEY, {})[param.name] = value
    return value


def connection_options(command: _F) -> _F:
    """Add ``--username --password --region --playground --base-url`` (with env vars) and
    ``--max-attempts``."""
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
            "--max-attempts",
            type=click.IntRange(min=1),
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


def run_single(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run one API call's coroutine; a Klarna error becomes one line on stderr and exit 1."""
    try:
        return asyncio.run(make())
    except ValidationError as error:
        raise InputError(str(error)) from None
    except KlarnaError as error:
        # str() already says status, code, correlation id and, when the outcome is unknown,
        # the idempotency key that finishes it safely.
        raise click.ClickException(str(error)) from None
