"""Where to send requests, with which credentials, and how patiently to retry them."""

from __future__ import annotations

import asyncio
import base64
import enum
from collections.abc import Awaitable, Callable

import attrs
import backoff

from .errors import ValidationError

__all__ = ("Credentials", "Region", "RetryPolicy", "base_url_for")


class Region(enum.StrEnum):
    """The Klarna region an account lives in; credentials only work in their own region."""

    EU = "eu"
    NA = "na"
    OC = "oc"


_HOSTS = {
    (Region.EU, False): "https://api.klarna.com",
    (Region.EU, True): "https://api.playground.klarna.com",
    (Region.NA, False): "https://api-na.klarna.com",
    (Region.NA, True): "https://api-na.playground.klarna.com",
    (Region.OC, False): "https://api-oc.klarna.com",
    (Region.OC, True): "https://api-oc.playground.klarna.com",
}


def base_url_for(region: Region | str, *, playground: bool) -> str:
    """The API host for a region, production or playground."""
    return _HOSTS[Region(region), playground]


@attrs.frozen(repr=False)
class Credentials:
    """Klarna API username and password; never shown in ``repr``, logs or exceptions."""

    username: str
    password: str = attrs.field(eq=False)

    def __attrs_post_init__(self) -> None:
        """Refuse what Basic auth cannot carry, or what is surely a copy-paste slip.

        Raises ``ValidationError`` (a ``ValueError``) naming the field, never showing the
        password: empty values, control characters (a trailing newline read from a file),
        and a ``:`` in the username.
        """
        for field, value in (("username", self.username), ("password", self.password)):
            if not isinstance(value, str) or not value:
                raise ValidationError(
                    field, "must be non-empty (the Klarna API username and password)"
                )
            if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
                raise ValidationError(
                    field, "contains a control character (a stray newline or tab?)"
                )
        if ":" in self.username:
            raise ValidationError("username", "cannot contain ':' (HTTP Basic auth)")

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password='***')"

    def authorization_header(self) -> str:
        """The ``Authorization: Basic ...`` value, built by hand (aiohttp deprecates BasicAuth)."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How failed attempts are retried; every retry reuses the call's idempotency key.

    Retried: connection errors, timeouts, 409, 429 and 5xx. Never retried: other 4xx, since
    the request itself must change. The wait before retry ``n`` (1-based) is drawn uniformly
    from ``[0, min(initial_delay * 2**(n-1), max_delay)]`` ("full jitter", as Klarna
    recommends); a ``Retry-After`` header replaces it, capped at ``retry_after_cap``. No
    attempt starts after ``deadline`` seconds from the first, so a call lasts at most about
    ``deadline`` plus one attempt's timeout.

    The defaults (5 attempts, 0.5 s doubling to 8 s, 60 s deadline) ride out a short Klarna
    or network hiccup while keeping a web request's worst case near a minute. Batch jobs may
    want more patience; interactive paths may want ``RetryPolicy(max_attempts=2)``.
    """

    max_attempts: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    initial_delay: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    max_delay: float = attrs.field(default=8.0, validator=attrs.validators.ge(0))
    deadline: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    retry_after_cap: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    #: Turns the exponential delay into the actual wait; ``lambda d: d`` makes tests exact.
    jitter: Callable[[float], float] = attrs.field(default=backoff.full_jitter, eq=False)
    #: How to wait; tests inject a recorder so the suite never really sleeps.
    sleep: Callable[[float], Awaitable[None]] = attrs.field(default=asyncio.sleep, eq=False)

    @classmethod
    def no_retries(cls) -> RetryPolicy:
        """One attempt only: every failure surfaces at once (with its idempotency key)."""
        return cls(max_attempts=1)
