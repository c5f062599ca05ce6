"""``KlarnaOM``: configuration, lifecycle, and the middleware chain every call goes through."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from datetime import datetime
from types import TracebackType
from typing import Self

import aiohttp
import yarl

from ._klarna_clock import KlarnaClock
from .batch import (
    DEFAULT_CONCURRENCY,
    BatchItem,
    BatchProgress,
    CaptureOutcome,
    ItemSource,
    _engine,
    run_many,
)
from .captures import CapturesService
from .config import (
    MAX_CONCURRENCY,
    Credentials,
    Region,
    RetryPolicy,
    base_url_for,
    check_count,
    check_rate_limit,
    check_seconds,
)
from .errors import ValidationError
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
from .operations import Operation, Services
from .orders import OrdersService
from .reconcile import Reconciliation, reconcile
from .refunds import RefundsService
from .throttle import Pace, ThrottleMiddleware
from .transport import AiohttpTransport, _Slots

__all__ = ("KlarnaOM",)


def _env_proxy(url: yarl.URL) -> str | None:
    """The proxy the standard variables (``HTTPS_PROXY``, ``NO_PROXY``...) name for ``url``."""
    proxy = urllib.request.getproxies().get(url.scheme)
    if not proxy or (url.host is not None and urllib.request.proxy_bypass(url.host)):
        return None
    try:
        parsed = yarl.URL(proxy)
        usable = parsed.scheme in ("http", "https") and bool(parsed.host)
    except ValueError:
        usable = False
    if not usable:  # aiohttp would fail every attempt, each reported "outcome unknown"
        raise ValueError(
            f"the environment's {url.scheme.upper()}_PROXY is {proxy!r}, not an http(s) proxy"
            " URL such as http://proxy:3128; fix it, or unset it"
        )
    return proxy


def check_base_url(url: str) -> None:
    """``ValueError`` unless ``url`` is an absolute http(s) URL every path can be added to."""
    try:
        parsed = yarl.URL(url)
        host = parsed.host
    except ValueError as error:  # e.g. "http://[::1": yarl cannot parse it
        raise ValueError(
            f"base_url must be an absolute http(s) URL, got {url!r}: {error}"
        ) from None
    if parsed.scheme not in ("http", "https") or not host:
        raise ValueError(f"base_url must be an absolute http(s) URL, got {url!r}")
    if parsed.user is not None or parsed.password is not None:
        # aiohttp refuses every request that has them and an Authorization header.
        raise ValueError(
            "base_url must not hold credentials (user:password@): KlarnaOM sends the ones it"
            " is given"
        )
    if parsed.query_string or parsed.fragment or "?" in url or "#" in url:
        # Every path would be added after them: .../?x=1/ordermanagement/v1/...
        raise ValueError(f"base_url must have no query or fragment, got {url!r}")


class KlarnaOM:
    """Async client for Klarna Order Management; use it as ``async with``.

    The calls live on three attributes and two methods:

    - ``om.captures`` (``CapturesService``): ``create`` (full or partial capture),
      ``get``, ``list``, ``add_shipping_info``, ``trigger_send_out``;
    - ``om.refunds`` (``RefundsService``): ``create`` (full or partial refund), ``get``;
    - ``om.orders`` (``OrdersService``): ``get`` (amounts, status, what is left to capture);
    - ``om.capture_many(items, ...)``: capture many orders concurrently, optionally with a
      journal that makes reruns exactly-once;
    - ``om.run_many(items, ...)``: the same for any mix of captures, refunds, releases,
      extensions and cancellations;
    - ``om.reconcile(journal)``: settle a journal's unknown outcomes by reading the orders.

    Amounts are ``int`` minor units (6000 = 60.00); times are seconds. Every failure of a
    call raises a ``KlarnaError`` subclass (``ValidationError`` before sending,
    ``KlarnaAPIError`` subclasses for Klarna's refusals, ``KlarnaConnectionError``/
    ``KlarnaTimeoutError`` after the retries) carrying ``idempotency_key`` and
    ``outcome_unknown``. The constructor raises ``ValueError`` for a bad ``base_url`` or
    ``timeout``/``max_connections`` out of range, or a lent session with ``auth=``.
    https://docs.klarna.com/api/ordermanagement/

    One instance owns one ``aiohttp.ClientSession`` (or borrows yours via ``session=``) and
    should live as long as your application: create it once, share it between requests.
    ``base_url`` overrides ``region``/``playground`` (e.g. to point at ``FakeKlarna``).
    ``timeout`` (seconds, finite, 0 < timeout <= 3600) bounds each HTTP attempt from the
    moment it has a connection slot: waiting for the pool does not count. ``retry`` bounds
    the whole call. ``max_connections`` (1..10,000) caps the attempts in flight;
    ``capture_many(concurrency=N)`` raises it to N. The session this client makes honours
    the standard proxy variables (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``:
    read once, when the session is made; ``.netrc`` is not read). A borrowed ``session=`` is
    used for its connector and proxy settings only (``ClientSession(trust_env=True)`` or
    ``proxy=...``): its ``raise_for_status``, ``base_url``, default ``Authorization``
    header, middlewares, ``auto_decompress`` and timeouts never change what this client
    sees (its cookie jar and ``response_class`` are used as given; a session with
    ``auth=`` is refused with ``ValueError``); its connector's limit caps the concurrency,
    and ``capture_many`` refuses more. ``middlewares``
    run once per attempt, inside the retry loop and throttle, outside error decoding and
    auth, so they see every attempt with its idempotency key but never the credentials.
    ``rate_limit`` (requests per second, finite, at most 10,000; None: no pace) paces every
    attempt of this client, batches and single calls alike, on one drift-free grid at 99% of
    it (so a late send never puts one request too many in a window of Klarna's): Klarna
    counts requests per merchant (200/s in production, 50/s in the playground). Without it
    the client paces at 95% of a limit Klarna states (``X-Ratelimit-Limit``), or, when Klarna
    states none, at a rate learned from its 429s: 90% of what got through in the second
    before, climbing back towards it and settling just under it
    (``klarna_om_async.throttle.AdaptiveRate``). ``om.rate_limited_count`` counts the 429s.
    ``clock`` (monotonic seconds) times deadlines, pacing and 429 pauses; tests pass a fake
    one with the policy's ``sleep``.
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
        rate_limit: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        credentials = Credentials(username, password)
        url = base_url if base_url is not None else base_url_for(region, playground=playground)
        check_base_url(url)
        if session is None:
            _env_proxy(yarl.URL(url))  # the proxy its session will take: checked now
        check_seconds("timeout", timeout, high=3600.0)
        check_count("max_connections", max_connections)
        if session is not None and session.auth is not None:
            # aiohttp refuses a request with both its session's auth= and our header.
            raise ValueError(
                "session: lend a session without auth=; KlarnaOM sends its own credentials"
            )
        #: The API root every path is appended to.
        self.base_url = url.rstrip("/")
        #: Who we authenticate as (the password is not kept in any public attribute).
        self.username = credentials.username
        self.retry_policy = retry if retry is not None else RetryPolicy()
        self._clock = clock
        self._klarna_clock = KlarnaClock(clock)
        self._throttle = ThrottleMiddleware(
            sleep=self.retry_policy.sleep,
            clock=clock,
            max_pause=self.retry_policy.retry_after_cap,
            base_url=self.base_url,
            pace=None if rate_limit is None else Pace.under(rate_limit),
        )
        #: The middleware chain, outermost first; the transport follows the last one.
        self.chain: tuple[Middleware, ...] = (
            IdempotencyMiddleware(),
            RetryMiddleware(self.retry_policy, clock=clock),
            self._throttle,
            *middlewares,
            ErrorMiddleware(),
            AuthMiddleware(credentials),
        )
        self._timeout = timeout
        self._max_connections = max_connections
        self._session = session
        self._owns_session = session is None
        self._handler: Handler | None = None
        self._transport: AiohttpTransport | None = None
        self._closed = False
        #: Capture calls: create (full or partial), get, list, shipping info, send-out.
        self.captures = CapturesService(self._send)
        #: Refund calls: create (full or partial refund), get.
        self.refunds = RefundsService(self._send)
        #: Order calls: read the order and what is left to capture.
        self.orders = OrdersService(self._send, self._klarna_clock)

    @property
    def chain_fixed(self) -> bool:
        """True once ``chain`` has been built into the calls' handler (at ``async with`` or the
        first call) or the client is closed: changing ``chain`` then has no effect."""
        return self._handler is not None or self._closed

    @property
    def rate_limited_count(self) -> int:
        """How many 429 (Too Many Requests) answers this client has received from Klarna.

        Each one was retried, or ended its call when the deadline allowed no more waiting;
        calls refused before sending (their pause lay past their deadline) are not counted.
        """
        return self._throttle.rate_limited_count

    def klarna_now(self) -> datetime | None:
        """Klarna's current time (UTC), as the ``Date`` header of its latest answer to this
        client tells it (to a second or so), moved on by this client's clock since; None
        before any answer. Raises nothing. A journaled batch checks its journal's clock
        against it before each send and stops with a ``ClockSkewError`` when they are more
        than 5 minutes apart.
        https://docs.klarna.com/api/ordermanagement/
        """
        return self._klarna_clock.now()

    def capture_many(
        self,
        items: ItemSource,
        *,
        concurrency: int | None = None,
        rate_limit: float | None = None,
        journal: Journal | None = None,
        on_progress: Callable[[BatchProgress], None] | None = None,
    ) -> AsyncGenerator[CaptureOutcome, None]:
        """Capture many orders concurrently; ``async for`` the outcomes as they complete.

        ``items``: (order_id, CaptureRequest) pairs or ``BatchItem``s, sync or async,
        consumed lazily (a sync one on the event loop: give a source whose reads wait, a
        socket or a pipe, as an async iterable). ``rate_limit``: requests per second
        (Klarna allows 200/s in production, 50/s in the playground). ``journal``: makes
        reruns exactly-once.
        Stop early with ``await outcomes.aclose()`` (or by leaving ``async with
        contextlib.aclosing(...)``): no new item starts, and items in flight are cancelled and
        stay in the journal as in flight, so the next run finishes them with their keys.
        ``concurrency``: 1..10,000 (default ``DEFAULT_CONCURRENCY``, 128, enough to reach
        Klarna's 200/s at its latency; with a borrowed session, at most its connector's
        limit); above ``max_connections`` it raises this client's connection limit to match
        (with a borrowed session whose connector allows fewer, ``ValidationError``).
        ``rate_limit``: None or finite, 0 < rate_limit <= 10,000.
        A batch that cannot work stops early with ``BatchAbortedError`` (see
        ``klarna_om_async.batch.capture_many``). An item that is not a capture is refused
        on its outcome (``TypeError``): other operations run with ``run_many``.

        Yields one ``CaptureOutcome`` per item (``status``: captured, refused, failed,
        skipped or needs_review; ``capture_id``, ``idempotency_key``, ``attempts``,
        ``error``). A single item's Klarna error never raises: it is on its outcome.
        Raises ``ValidationError`` for a bad ``concurrency`` or ``rate_limit`` (at the call)
        or a bad item, and ``BatchAbortedError`` when the batch stops early.
        https://docs.klarna.com/api/ordermanagement/#operation/captureOrder
        """
        concurrency = self._batch_concurrency(concurrency, rate_limit)
        services = self._services(refunds=False)
        return _engine(
            services, items, journal, concurrency, rate_limit, on_progress, only=Operation.CAPTURE
        )

    def run_many(
        self,
        items: ItemSource,
        *,
        concurrency: int | None = None,
        rate_limit: float | None = None,
        journal: Journal | None = None,
        on_progress: Callable[[BatchProgress], None] | None = None,
        hold: Callable[[BatchItem], str | None] | None = None,
    ) -> AsyncGenerator[CaptureOutcome, None]:
        """Run many operations of any kind concurrently; ``async for`` the outcomes.

        ``items``: ``BatchItem``s (or (order_id, request) pairs) whose ``request`` names the
        operation: ``CaptureRequest``, ``RefundRequest``, ``ReleaseRemainingAuthorization()``,
        ``ExtendAuthorizationTime()`` or ``CancelOrder()`` (``klarna_om_async.operations``).
        Everything else is as ``capture_many``: concurrency, pacing, one ``CaptureOutcome``
        per item (``operation``; ``capture_id`` or ``refund_id``; ``status`` ``captured``
        means Klarna booked it, whatever the operation), and a ``journal`` that records each item's
        operation and makes reruns exactly-once for every operation. One order's items run
        one at a time, in the order given (a refund after its capture); once one ends failed,
        refused or needs review, the order's later items are held back (not sent, refused
        with ``ItemHeldBackError``), so a release never follows an unknown capture. A release
        or cancel under a key you gave is confirmed by reading the order back (see
        ``klarna_om_async.batch.run_many``). ``hold(item)`` may return a reason to hold an
        item back too (after the duplicate checks); its order's later items wait with it.

        Why one ``run_many`` and not ``refund_many``, ``release_many``, ...: a nightly job
        mixes operations on the same orders (capture the last part, then release the rest),
        and one call with typed items keeps them in one journal, in order, under one rate
        limit; a method per operation would multiply the API without adding a guarantee.
        An item whose ``request`` is no operation is refused on its outcome (``TypeError``).
        Raises ``ValidationError`` for a bad ``concurrency`` or ``rate_limit`` (at the call),
        and ``BatchAbortedError`` when the batch stops early (a 401, or Klarna unreachable).
        https://docs.klarna.com/api/ordermanagement/
        """
        concurrency = self._batch_concurrency(concurrency, rate_limit)
        services = self._services(refunds=True)
        return run_many(
            services,
            items,
            concurrency=concurrency,
            rate_limit=rate_limit,
            journal=journal,
            on_progress=on_progress,
            hold=hold,
        )

    def _services(self, *, refunds: bool) -> Services:
        """What a batch sends through, waiting on this client's sleep and clock."""
        return Services(
            captures=self.captures,
            refunds=self.refunds if refunds else None,
            orders=self.orders,
            sleep=self.retry_policy.sleep,
            clock=self._clock,
        )

    def _batch_concurrency(self, concurrency: int | None, rate_limit: float | None) -> int:
        """Check a batch's settings and size the connection slots for it."""
        transport = self._ready_transport()
        slots = transport.slots
        if concurrency is None:
            concurrency = DEFAULT_CONCURRENCY
            if slots is not None and not self._owns_session:
                concurrency = min(concurrency, slots.size)  # what the lent session allows
        check_count("concurrency", concurrency, high=MAX_CONCURRENCY)
        if rate_limit is not None:
            check_rate_limit(rate_limit)
        if slots is not None and concurrency > slots.size:
            if not self._owns_session:
                raise ValidationError(
                    "concurrency",
                    f"{concurrency} is more than the borrowed session's connector allows"
                    f" ({slots.size}); lower it or lend a session with a larger limit",
                )
            slots.grow(concurrency)
        return concurrency

    async def reconcile(self, journal: Journal, *, concurrency: int = 8) -> list[Reconciliation]:
        """Settle every item of ``journal`` whose outcome is unknown by reading its order.

        Returns one ``Reconciliation`` per unknown item: ``captured`` (recorded with its
        capture id), ``not_captured`` (the next run sends it with a new key), ``needs_review``
        (never sent again; read ``evidence``), ``resend`` (the key is still valid: the next
        run resends it, which settles it exactly), or ``verdict=None`` when the order could not
        be read. Each item is judged by the operation its journal entry records (a release
        is proven only by a released order, a cancel by a cancelled one; a journal that keeps
        no operation has its entries judged as captures). See ``klarna_om_async.reconcile``.

        Each order is read once (``om.orders.get``), ``concurrency`` (>= 1) at a time; an
        order that cannot be read gives its items ``verdict=None`` with the error, it does
        not raise. Raises ``ValueError`` for a bad ``concurrency`` and whatever the journal
        raises (e.g. ``sqlite3.Error``) when it cannot be read or written.
        https://docs.klarna.com/api/ordermanagement/#operation/getOrder
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
        self._throttle.flush_log()
        self._closed, self._handler, self._transport = True, None, None
        if self._session is not None and self._owns_session:
            await self._session.close()

    def _ready(self) -> Handler:
        # The session is made here, inside a running loop, as aiohttp requires.
        if self._handler is None:
            self._handler = compose(self.chain, self._ready_transport())
        return self._handler

    def _ready_transport(self) -> AiohttpTransport:
        if self._transport is None:
            if self._closed:
                raise RuntimeError("this KlarnaOM is closed; create a new one")
            if self._session is None:
                # The pool is unbounded: the transport's slots bound it, outside the
                # per-attempt timeout, and can grow for a batch that asks for more.
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0),
                    timeout=aiohttp.ClientTimeout(total=None),
                    # The proxy variables, as trust_env=True would read them, but once:
                    # trust_env also reads ~/.netrc on every request, in a thread, and its
                    # credentials for the host would clash with ours.
                    proxy=_env_proxy(yarl.URL(self.base_url)),
                )
                size = self._max_connections
            else:
                connector = self._session.connector
                limits = (connector.limit, connector.limit_per_host) if connector else (0, 0)
                size = min((n for n in limits if n > 0), default=0)
            self._transport = AiohttpTransport(
                self._session,
                self.base_url,
                self._timeout,
                _Slots(size) if size else None,
                # A 429 may pause the client while an attempt queues for a connection.
                before_send=self._throttle.recheck,
                klarna_clock=self._klarna_clock,
            )
        return self._transport

    def _send(self, request: Request) -> Awaitable[Response]:
        # Not a coroutine itself: the caller awaits the chain directly, one frame fewer.
        return (self._handler or self._ready())(request)
