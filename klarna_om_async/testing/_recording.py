"""What the fake received: one record per request, in arrival order."""

from __future__ import annotations

import attrs
import orjson
from multidict import CIMultiDictProxy

from ._faults import Fault

__all__ = ("RecordedRequest",)


@attrs.define(eq=False)
class RecordedRequest:
    """One request the fake received, with how it was answered."""

    method: str
    #: The decoded request path, without the query string.
    path: str
    #: Case-insensitive, as received.
    headers: CIMultiDictProxy[str]
    body: bytes
    idempotency_key: str | None
    #: ``time.monotonic()`` when the request reached the fake.
    received_at: float
    #: The injected fault this request consumed, if any.
    fault: Fault | None = None
    #: The status the fake answered with; ``None`` while running or when the fake dropped it.
    status: int | None = None
    #: ``True`` when the answer was replayed from the idempotency store.
    replayed: bool = False

    def json(self) -> object:
        """The body parsed as JSON."""
        return orjson.loads(self.body)
