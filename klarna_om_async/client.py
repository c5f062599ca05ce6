"""``KlarnaOM``: configuration, lifecycle, and the middleware chain every call goes through."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Self

import aiohttp
import yarl

from .batch import BatchProgress, CaptureOutcome, ItemSource, capture_many
from .captures import CapturesService
from .config import Credentials, Region, RetryPolicy, base_url_for
from .journal import Journal
from .middleware import (
    AuthMiddleware,
    ErrorMiddleware,
    Handler,
    IdempotencyMiddleware,
    Middleware,
    Request,
    Response,
    RetryMiddleware,
    compose,
)
from .orders import OrdersService
from .reconcile import Reconciliation, reconcile
from .throttle import ThrottleMiddleware
from .transport import AiohttpTransport

__all__ = ("KlarnaOM",)


class KlarnaOM:
    """Async client for Klarna Order Management captures; use it as ``async with``.

    One instance owns one ``aiohttp.ClientSession`` (or borrows yours via ``session=``) and
    should live as long as your application: create it once, share it between requests.
    ``base_url`` overrides ``region``/``playground`` (e.g. to point at ``FakeKlarna``).
    ``timeout`` bounds each HTTP attempt; ``retry`` bounds the whole call. ``middlewares``
    run once per attempt, inside the retry loop and throttle, outside error decoding and
    auth, so they see every attempt with its idempotency key but never the credentials.
    ``clock`` (monotonic seconds) times deadlines and 429 pauses; tests pass a fake one with
    the policy's ``sleep``.
    """

    def __init__(
        self,
        username: str,
        password: str,
        *,
        region: Region | str = Region.EU,
        playground: bool = False,
        base_url: str | None = None,
        timeout: float = 20.0,
        retry: RetryPolicy | None = None,
        session: aiohttp.ClientSession | None = None,
        middlewares: Iterable[Middleware] = (),
        max_connections: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        credentials = Credentials(username, password)
        url = base_url if base_url is not None else base_url_for(region, playground=playground)
        parsed = yarl.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"base_url must be an absolute http(s) URL, got {url!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        #: The API root every path is appended to.
        self.base_url = url.rstrip("/")
        #: Who we authenticate as (the password is not kept in any public attribute).
        self.username = credentials.username
        self.retry_policy = retry if retry is not None else RetryPolicy()
        #: The middleware chain, outermost first; the transport follows the last one.
        self.chain: tuple[Middleware, ...] = (
            IdempotencyMiddleware(),
            RetryMiddleware(self.retry_policy, clock=clock),
            ThrottleMiddleware(
                sleep=self.retry_policy.sleep,
                clock=clock,
                max_pause=self.retry_policy.retry_after_cap,
                base_url=self.base_url,
            ),
            *middlewares,
            ErrorMiddleware(),
            AuthMiddleware(credentials),
        )
        self._timeout = timeout
        self._max_connections = max_connections
        self._session = session
        self._owns_session = session is None
        self._handler: Handler | None = None
        self._closed = False
        #: Capture calls: create (full or partial), get, list, shipping info, send-out.
        self.captures = CapturesService(self._send)
        #: Order calls: read the order and what is left to capture.
        self.orders = OrdersService(self._send)

    def capture_many(
        self,
        items: ItemSource,
        *,
        concurrency: int = 32,
        rate_limit: float | None = None,
        journal: Journal | None = None,
        on_progress: Callable[[BatchProgress], None] | None = None,
    ) -> AsyncGenerator[CaptureOutcome, None]:
        """Capture many orders concurrently; ``async for`` the outcomes as they complete.

        ``items``: (order_id, CaptureRequest) pairs or ``BatchItem``s, sync or async,
        consumed lazily. ``rate_limit``: requests per second (Klarna allows 200/s in
        production, 50/s in the playground). ``journal``: makes reruns exactly-once.
        Stop early with ``await outcomes.aclose()`` (or by leaving ``async with
        contextlib.aclosing(...)``): no new item starts, and items in flight are cancelled and
        stay in the journal as in flight, so the next run finishes them with their keys.
        See ``klarna_om_async.batch.capture_many``.
        """
        return capture_many(
            self.captures,
            items,
            concurrency=concurrency,
            rate_limit=rate_limit,
            journal=journal,
            on_progress=on_progress,
            orders=self.orders,
        )

    async def reconcile(self, journal: Journal, *, concurrency: int = 8) -> list[Reconciliation]:
        """Settle every item of ``journal`` whose outcome is unknown by reading its order.

        Returns one ``Reconciliation`` per unknown item: ``captured`` (recorded with its
        capture id), ``not_captured`` (the next run sends it with a new key), ``needs_review``
        (never sent again; read ``evidence``), ``resend`` (the key is still valid: the next
        run resends it, which settles it exactly), or ``verdict=None`` when the order could not
        be read. See ``klarna_om_async.reconcile``.
        """
        return await reconcile(self.orders, journal, concurrency=concurrency)

    def __repr__(self) -> str:
        return f"KlarnaOM(base_url={self.base_url!r}, username={self.username!r})"

    async def __aenter__(self) -> Self:
        self._ready()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if this client created it; safe to call twice."""
        if self._closed:
            return
        self._closed, self._handler = True, None
        if self._session is not None and self._owns_session:
            await self._session.close()

    def _ready(self) -> Handler:
        # The session is made here, inside a running loop, as aiohttp requires.
        if self._handler is None:
            if self._closed:
                raise RuntimeError("this KlarnaOM is closed; create a new one")
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=self._max_connections),
                    timeout=aiohttp.ClientTimeout(total=None),
                )
            transport = AiohttpTransport(self._session, self.base_url, self._timeout)
            self._handler = compose(self.chain, transport)
        return self._handler

    def _send(self, request: Request) -> Awaitable[Response]:
        # Not a coroutine itself: the caller awaits the chain directly, one frame fewer.
        return (self._handler or self._ready())(request)
