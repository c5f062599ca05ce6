"""Faults the fake can inject into a request, and the FIFO queue that hands them out."""

from __future__ import annotations

import random
import re
from typing import TypeAlias

import attrs

__all__ = (
    "Delay",
    "DropAfterProcessing",
    "DropConnection",
    "Fault",
    "FaultQueue",
    "NonJsonError",
    "RateLimited",
    "ServerFailure",
)


@attrs.frozen
class DropConnection:
    """Close the connection without answering, before the request is processed."""


@attrs.frozen
class DropAfterProcessing:
    """Process the request (book the capture or refund, store the idempotent answer), then
    close the connection without answering: the client cannot know the booking happened."""


def _non_negative(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class Delay:
    """Sleep ``seconds`` before processing, or after processing but before answering.

    The sleep before processing holds the request's idempotency key, so a concurrent request
    with the same key gets 409 ``CONFLICT`` meanwhile.
    """

    seconds: float = attrs.field(validator=_non_negative)
    after_processing: bool = False


def _server_status(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 500 <= value <= 599:
        raise ValueError(f"{attribute.name} must be a 5xx status, got {value!r}")


@attrs.frozen
class ServerFailure:
    """Answer with a Klarna-shaped 5xx error without processing the request."""

    status: int = attrs.field(default=503, validator=_server_status)
    #: Defaults to ``INTERNAL_SERVER_ERROR`` for 500 and ``TEMPORARILY_UNAVAILABLE`` otherwise.
    error_code: str | None = None


@attrs.frozen
class RateLimited:
    """Answer 429 ``TOO_MANY_REQUESTS`` without processing; ``Retry-After`` unless ``None``."""

    retry_after: str | None = "1"


@attrs.frozen
class NonJsonError:
    """Answer like a proxy would: an error status with a non-JSON body, nothing processed."""

    status: int = 502
    body: str = "<html>Bad Gateway</html>"
    content_type: str = "text/html"


#: Any fault ``FakeKlarna.inject`` accepts: drop before or after processing, delay, an error
#: status (5xx, 429) or a non-JSON error page.
Fault: TypeAlias = (
    DropConnection | DropAfterProcessing | Delay | ServerFailure | RateLimited | NonJsonError
)


@attrs.define
class _Entry:
    fault: Fault
    remaining: int | None
    method: str | None
    path: str | re.Pattern[str] | None
    probability: float = 1.0

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        if self.path is None:
            return True
        if isinstance(self.path, str):
            return self.path in path
        return self.path.search(path) is not None


class FaultQueue:
    """Injected faults in injection order; each request consumes the first one it matches."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._entries: list[_Entry] = []
        # Seeded by the fake's owner, so a probabilistic run can be replayed exactly.
        self._rng = rng if rng is not None else random.Random()

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self,
        fault: Fault,
        *,
        times: int | None,
        method: str | None,
        path: str | re.Pattern[str] | None,
        probability: float = 1.0,
    ) -> None:
        """Queue ``fault`` for the next ``times`` matching requests (``None``: every one).

        With ``probability`` below 1, each matching request takes the fault only with that
        chance; a request that escapes it goes on to the next queued fault it matches.
        """
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None, got {times!r}")
        if not 0 < probability <= 1:
            raise ValueError(f"probability must be in (0, 1], got {probability!r}")
        upper = method.upper() if method is not None else None
        self._entries.append(_Entry(fault, times, upper, path, probability))

    def take(self, method: str, path: str) -> Fault | None:
        """Consume and return the first fault matching this request, if any."""
        for index, entry in enumerate(self._entries):
            if entry.matches(method, path):
                if entry.probability < 1 and self._rng.random() >= entry.probability:
                    continue
                if entry.remaining is not None:
                    entry.remaining -= 1
                    if entry.remaining == 0:
                        del self._entries[index]
                return entry.fault
        return None

    def clear(self) -> None:
        """Forget every queued fault."""
        self._entries.clear()
