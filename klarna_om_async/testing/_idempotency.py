"""Klarna's idempotency: the first completed answer per key is replayed; only the key matters."""

from __future__ import annotations

from collections.abc import Callable

import attrs
from aiohttp import web
from multidict import CIMultiDict

__all__ = ("REPLAYED_HEADER", "IdempotencyStore")

#: Set to ``"true"`` on answers replayed from the idempotency store (the fake's own marker;
#: Klarna does not document one).
REPLAYED_HEADER = "Klarna-Idempotent-Replayed"


@attrs.frozen
class _Stored:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float

    def replay(self) -> web.Response:
        headers = CIMultiDict(self.headers)
        headers[REPLAYED_HEADER] = "true"
        return web.Response(status=self.status, body=self.body or None, headers=headers)


class IdempotencyStore:
    """Answers per key for ``ttl`` seconds, and the keys whose first request is still running."""

    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._clock = clock
        self._answers: dict[str, _Stored] = {}
        self._running: set[str] = set()

    def replay(self, key: str) -> web.Response | None:
        """A copy of the stored answer for ``key``, or ``None`` when there is none (any more)."""
        stored = self._answers.get(key)
        if stored is None:
            return None
        if self._clock() - stored.stored_at >= self._ttl:
            del self._answers[key]
            return None
        return stored.replay()

    def claim(self, key: str) -> bool:
        """Mark ``key`` as running; ``False`` when another request already holds it."""
        if key in self._running:
            return False
        self._running.add(key)
        return True

    def release(self, key: str) -> None:
        """The request holding ``key`` is done, answered or not."""
        self._running.discard(key)

    def store(self, key: str, response: web.StreamResponse) -> None:
        """Keep ``response`` as the answer every later request with ``key`` gets."""
        body = response.body if isinstance(response, web.Response) else None
        if not isinstance(body, bytes):
            body = b""
        self._answers[key] = _Stored(
            status=response.status,
            headers=tuple(response.headers.items()),
            body=body,
            stored_at=self._clock(),
        )
