"""Where to send requests, with which credentials, and how patiently to retry them."""

from __future__ import annotations

import asyncio
import base64
import enum
import math
from collections.abc import Awaitable, Callable

import attrs
import backoff

from .errors import ValidationError

__all__ = (
    "MAX_CONCURRENCY",
    "MAX_RATE_LIMIT",
    "MAX_SECONDS",
    "MIN_BUSY_WAIT",
    "MIN_RATE_LIMIT",
    "Credentials",
    "Region",
    "RetryPolicy",
    "base_url_for",
    "check_count",
    "check_seconds",
)

#: Upper bound of ``concurrency`` and ``max_connections``: far above what Klarna's rate
#: limits let through, low enough that a typo cannot start a billion tasks.
MAX_CONCURRENCY = 10_000
#: Upper bound of ``rate_limit`` (requests per second); Klarna allows 200/s in production.
MAX_RATE_LIMIT = 10_000.0
#: The slowest pace: one request per 100 s (slower is a typo, and would stall a batch).
MIN_RATE_LIMIT = 0.01
#: The shortest wait between two retries of a call that met a 429: never a tight loop.
MIN_BUSY_WAIT = 0.1
#: Upper bound of every duration option (timeouts, delays, deadlines): one day.
MAX_SECONDS = 86_400.0


def check_count(name: str, value: object, *, low: int = 1, high: int = MAX_CONCURRENCY) -> int:
    """``value`` if it is an int in ``low..high``, else ``ValidationError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(name, f"must be a whole number from {low} to {high}, got {value!r}")
    return value


def check_seconds(
    name: str,
    value: object,
    *,
    positive: bool = True,
    high: float = MAX_SECONDS,
    unit: str = "seconds",
) -> float:
    """``value`` if it is a finite number in range, else ``ValidationError`` naming ``name``.

    In range: ``0 < value <= high`` (``0 <= value`` when not ``positive``). nan, infinities
    and booleans are refused.
    """
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    low_ok = number is not None and (number > 0 if positive else number >= 0)
    if number is None or not math.isfinite(number) or not low_ok or number > high:
        bound = "greater than 0" if positive else "at least 0"
        raise ValidationError(
            name, f"must be a finite number {bound} and at most {high:g} {unit}, got {value!r}"
        )
    return float(number)


def check_rate_limit(value: object) -> float:
    """A rate in requests per second: ``MIN_RATE_LIMIT`` to ``MAX_RATE_LIMIT``, else
    ``ValidationError`` naming ``rate_limit``."""
    rate = check_seconds("rate_limit", value, high=MAX_RATE_LIMIT, unit="requests per second")
    if rate < MIN_RATE_LIMIT:
        raise ValidationError(
            "rate_limit", f"must be at least {MIN_RATE_LIMIT} requests per second, got {value!r}"
        )
    return rate


def _seconds(*, positive: bool) -> Callable[[object, attrs.Attribute[float], float], None]:
    def check(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
        check_seconds(attribute.name, value, positive=positive)

    return check


def _attempts(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    check_count(attribute.name, value, high=100)


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
    ``deadline`` plus one attempt's timeout. A call under an idempotency key also stops
    resending it 23 hours after its first attempt (Klarna forgets a key 24 hours after its
    first use, and would then book a resend again); in a batch with a journal, once the key
    is older than the journal's ``key_max_age``, however long ago an earlier run sent it. A
    call retrying a key you sent in an earlier call cannot know when that was: keep its
    ``deadline`` within what is left of the key's 24 hours.

    A 429 is not a failed attempt: the merchant is busy, and the call waits its turn. 429s do
    not use up ``max_attempts``; only ``deadline`` bounds them (``no_retries()`` still
    surfaces the first one), and two 429 retries are at least ``initial_delay`` apart.

    Every number is checked when the policy is made (``ValidationError``, a ``ValueError``,
    naming the field): finite, and within the bounds given on each field.

    The defaults (5 attempts, 0.5 s doubling to 8 s, 60 s deadline) ride out a short Klarna
    or network hiccup while keeping a web request's worst case near a minute. Batch jobs may
    want more patience; interactive paths may want ``RetryPolicy(max_attempts=2)``.
    """

    #: 1 to 100 attempts that fail other than with a 429.
    max_attempts: int = attrs.field(default=5, validator=_attempts)
    #: Seconds, 0 to 86400 (one day), finite; likewise ``max_delay`` and ``retry_after_cap``.
    initial_delay: float = attrs.field(default=0.5, validator=_seconds(positive=False))
    max_delay: float = attrs.field(default=8.0, validator=_seconds(positive=False))
    #: Seconds, greater than 0 and at most 86400.
    deadline: float = attrs.field(default=60.0, validator=_seconds(positive=True))
    retry_after_cap: float = attrs.field(default=30.0, validator=_seconds(positive=False))
    #: Turns the exponential delay into the actual wait; ``lambda d: d`` makes tests exact.
    jitter: Callable[[float], float] = attrs.field(default=backoff.full_jitter, eq=False)
    #: How to wait; tests inject a recorder so the suite never really sleeps.
    sleep: Callable[[float], Awaitable[None]] = attrs.field(default=asyncio.sleep, eq=False)

    @classmethod
    def no_retries(cls) -> RetryPolicy:
        """One attempt only: every failure surfaces at once (with its idempotency key)."""
        return cls(max_attempts=1)
