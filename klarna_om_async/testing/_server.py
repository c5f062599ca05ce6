"""``FakeKlarna``: the aiohttp application, its request pipeline, and its lifecycle."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import random
import re
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from aiohttp import web
from aiohttp.typedefs import Handler

from ._auth import basic_auth_header, parse_basic_auth
from ._faults import (
    Delay,
    DropAfterProcessing,
    DropConnection,
    Fault,
    FaultQueue,
    NonJsonError,
    RateLimited,
    ServerFailure,
)
from ._handlers import IDEMPOTENCY_HEADER, OrderManagementApi
from ._idempotency import IdempotencyStore
from ._ledger import FakeCapture, FakeClock, FakeOrder, FakeRefund, Ledger, check_status
from ._recording import RecordedRequest
from ._responses import error_response, fault_response

__all__ = ("FakeKlarna",)

_IDEMPOTENT_METHODS = frozenset({"POST", "PATCH"})
# Short, so closing the fake never waits long on a request parked in a Delay fault.
_SHUTDOWN_TIMEOUT = 0.5
_DAY = 24 * 60 * 60.0
_HTTP_ERROR_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "REQUEST_TOO_LARGE"}


def _klarna_http_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (unknown route, wrong method) in Klarna's error shape."""
    code = _HTTP_ERROR_CODES.get(exc.status, "BAD_VALUE" if exc.status < 500 else "UNEXPECTED")
    allow = exc.headers.get("Allow")
    headers = {"Allow": allow} if allow is not None else None
    return error_response(exc.status, code, exc.reason, headers)


def _drop(request: web.Request) -> web.StreamResponse:
    """Close the connection with nothing sent; the client sees a server disconnect."""
    transport = request.transport
    if transport is not None:  # pragma: no branch - None only if the client left first
        transport.abort()
    # Never sent: aiohttp finds the transport closed when writing it and treats the
    # exchange as a premature client disconnect, quietly.
    return web.Response(status=204)


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


class FakeKlarna:
    """A fake Klarna Order Management server for tests, demos and benchmarks.

    It serves the Order Management endpoints (read, capture, refund, release, extend, cancel,
    update, ...) over real HTTP with Klarna's rules, Basic auth and idempotency, records every
    request, and injects faults on demand. ``seed`` makes
    probabilistic faults (``inject(..., probability=p)``) fall on the same requests every run.
    """

    def __init__(
        self,
        *,
        username: str = "test-user",
        password: str = "test-password",
        idempotency_ttl: float = _DAY,
        record_requests: bool = True,
        seed: int | None = None,
    ) -> None:
        self._username = username
        self._password = password
        self._auth_header = basic_auth_header(username, password)
        self._clock = FakeClock()
        self._ledger = Ledger(self._clock)
        self._faults = FaultQueue(random.Random(seed))
        self._idempotency = IdempotencyStore(idempotency_ttl, self._clock.monotonic)
        self._record_requests = record_requests
        self._requests: list[RecordedRequest] = []
        self._received = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self._app = self._build_app()

    def _build_app(self) -> web.Application:
        @web.middleware
        async def fake_klarna(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self._serve(request, handler)

        app = web.Application(middlewares=[fake_klarna])
        OrderManagementApi(self._ledger).add_routes(app.router)
        app.on_response_prepare.append(self._dated)
        return app

    async def _dated(self, _request: web.Request, response: web.StreamResponse) -> None:
        # Klarna's answers carry its time; the fake's is its clock (advance_clock moves it).
        response.headers["Date"] = email.utils.format_datetime(self._clock.now(), usegmt=True)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def app(self) -> web.Application:
        """The ``aiohttp.web.Application``, to mount elsewhere or serve with pytest-aiohttp."""
        return self._app

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server; ``RuntimeError`` before ``start()``."""
        if self._base_url is None:
            raise RuntimeError("FakeKlarna is not running; call start() first")
        return self._base_url

    @property
    def username(self) -> str:
        """The API username the fake accepts."""
        return self._username

    @property
    def password(self) -> str:
        """The API password the fake accepts."""
        return self._password

    @property
    def auth_header(self) -> str:
        """The ``Authorization`` header value the fake accepts (``Basic ...``)."""
        return self._auth_header

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve on ``host:port`` (0 picks a free port) and set ``base_url``."""
        if self._runner is not None:
            raise RuntimeError("FakeKlarna is already running")
        runner = web.AppRunner(
            self._app, handle_signals=False, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = int(runner.addresses[0][1])
        url_host = f"[{host}]" if ":" in host else host
        self._base_url = f"http://{url_host}:{bound_port}"

    async def close(self) -> None:
        """Stop serving; requests still running get a short grace period, then are cancelled."""
        runner, self._runner, self._base_url = self._runner, None, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- time --------------------------------------------------------------------------------

    def advance_clock(self, seconds: float) -> None:
        """Move the fake's time forward: idempotency keys age (``idempotency_ttl``, 24 hours
        by default), later captures and orders carry later timestamps, and orders whose
        ``expires_at`` has passed turn ``EXPIRED`` (captures then refused). No real wait."""
        self._clock.advance(seconds)
        self._ledger.expire_due()

    def now(self) -> datetime.datetime:
        """The fake's current UTC time; pass it as a journal's ``clock`` to share the time."""
        return self._clock.now()

    # -- orders and captures -----------------------------------------------------------------

    def add_order(
        self,
        order_id: str | None = None,
        *,
        amount: int,
        status: str = "AUTHORIZED",
        currency: str = "EUR",
        reference: str | None = None,
        payment_method: str = "INVOICE",
    ) -> str:
        """Create an order of ``amount`` minor units and return its id (a uuid4 by default).

        It expires 28 days after now (see ``advance_clock``). ``payment_method`` is its
        ``initial_payment_method.type``: with ``"INVOICE"`` (pay later) the amount can be
        increased and capture due dates extended; e.g. ``"CARD"`` allows neither.
        """
        return self._ledger.add_order(
            order_id,
            amount=amount,
            status=status,
            currency=currency,
            reference=reference,
            payment_method=payment_method,
        )

    def add_orders(self, n: int, *, amount: int, currency: str = "EUR") -> list[str]:
        """Create ``n`` authorized orders of ``amount`` each and return their ids."""
        return [self.add_order(amount=amount, currency=currency) for _ in range(n)]

    def order(self, order_id: str) -> FakeOrder:
        """The fake's live view of an order (amounts, status, captures, refunds, references,
        addresses, ``operations``...); ``KeyError`` if none."""
        return self._ledger.order(order_id)

    def set_order_status(self, order_id: str, status: str) -> None:
        """Force an order into a Klarna status, e.g. ``"CANCELLED"`` or ``"EXPIRED"``."""
        check_status(status)
        self._ledger.order(order_id).status = status

    def captures(self, order_id: str) -> list[FakeCapture]:
        """The captures booked on one order, in booking order; ``KeyError`` if no such order."""
        return list(self._ledger.order(order_id).captures)

    @property
    def booked_captures(self) -> Sequence[FakeCapture]:
        """Every capture booked on any order, in booking order (live)."""
        return self._ledger.booked

    def refunds(self, order_id: str) -> list[FakeRefund]:
        """The refunds booked on one order, in booking order; ``KeyError`` if no such order."""
        return list(self._ledger.order(order_id).refunds)

    @property
    def booked_refunds(self) -> Sequence[FakeRefund]:
        """Every refund booked on any order, in booking order (live)."""
        return self._ledger.booked_refunds

    # -- observation -------------------------------------------------------------------------

    @property
    def requests(self) -> Sequence[RecordedRequest]:
        """Every request received, in arrival order (live; empty if ``record_requests=False``)."""
        return self._requests

    @property
    def in_flight(self) -> int:
        """How many requests the fake is handling right now."""
        return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most requests the fake has handled at the same time."""
        return self._max_in_flight

    async def wait_for_requests(self, count: int) -> None:
        """Return once ``count`` requests in total have arrived (bodies read, faults chosen,
        idempotency keys claimed); wrap in ``asyncio.timeout`` to bound the wait."""
        if self._received >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((count, future))
        await future

    async def wait_until_idle(self) -> None:
        """Return once no request is being handled: the requests of a cancelled call may
        still hold their idempotency keys here (see `Delay`), as they would at Klarna."""
        if self._in_flight == 0:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(future)
        await future

    def _count_request(self) -> None:
        self._received += 1
        if self._waiters:
            waiting = []
            for count, future in self._waiters:
                if future.done():
                    continue
                if self._received >= count:
                    future.set_result(None)
                else:
                    waiting.append((count, future))
            self._waiters = waiting

    # -- faults ------------------------------------------------------------------------------

    def inject(
        self,
        fault: Fault,
        *,
        times: int | None = 1,
        method: str | None = None,
        path: str | re.Pattern[str] | None = None,
        probability: float = 1.0,
    ) -> None:
        """Apply ``fault`` to the next ``times`` requests (``None``: all) that match.

        ``method`` is an HTTP method; ``path`` a substring of the request path, or a compiled
        regex searched in it. Faults are consumed first-in first-out: each request takes the
        first queued fault it matches. ``probability`` below 1 spreads the fault over a run:
        each matching request takes it with that chance, drawn from the RNG seeded by
        ``FakeKlarna(seed=...)``, and a request that escapes it may take the next fault queued.
        """
        self._faults.add(fault, times=times, method=method, path=path, probability=probability)

    def clear_faults(self) -> None:
        """Drop every fault still queued."""
        self._faults.clear()

    @property
    def pending_faults(self) -> int:
        """How many injected faults are still queued."""
        return len(self._faults)

    # -- the request pipeline ----------------------------------------------------------------

    async def _serve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        received_at = time.monotonic()
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            too_large = False
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                body, too_large = b"", True
            key = request.headers.get(IDEMPOTENCY_HEADER)
            fault = self._faults.take(request.method, request.path)
            record = RecordedRequest(
                method=request.method,
                path=request.path,
                headers=request.headers,
                body=body,
                idempotency_key=key,
                received_at=received_at,
                fault=fault,
            )
            if self._record_requests:
                self._requests.append(record)
            self._count_request()
            response = await self._answer(request, handler, record, too_large)
            if response is None:
                return _drop(request)
            record.status = response.status
            return response
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._idle_waiters:
                for future in self._idle_waiters:
                    if not future.done():
                        future.set_result(None)
                self._idle_waiters = []

    async def _answer(
        self, request: web.Request, handler: Handler, record: RecordedRequest, too_large: bool
    ) -> web.StreamResponse | None:
        """The answer to send, or ``None`` to drop the connection instead."""
        fault = record.fault
        match fault:
            case DropConnection():
                return None
            case ServerFailure() | RateLimited() | NonJsonError():
                return fault_response(fault)
            case Delay(seconds=seconds, after_processing=False):
                return await self._process(request, handler, record, too_large, seconds)
        response = await self._process(request, handler, record, too_large, 0.0)
        if isinstance(fault, Delay):
            await asyncio.sleep(fault.seconds)
        if isinstance(fault, DropAfterProcessing):
            return None
        return response

    async def _process(
        self,
        request: web.Request,
        handler: Handler,
        record: RecordedRequest,
        too_large: bool,
        delay: float,
    ) -> web.StreamResponse:
        """What Klarna itself does: auth, idempotency, then the endpoint."""
        if too_large:
            return error_response(413, "REQUEST_TOO_LARGE", "Request body is too large.")
        if not self._authorized(request):
            return error_response(401, "UNAUTHORIZED", "Invalid or missing credentials.")
        key = record.idempotency_key
        if key is None or request.method not in _IDEMPOTENT_METHODS:
            await _sleep(delay)
            return await self._dispatch(request, handler)
        replayed = self._idempotency.replay(key)
        if replayed is not None:
            record.replayed = True
            await _sleep(delay)
            return replayed
        if not self._idempotency.claim(key):
            return error_response(
                409, "CONFLICT", f"A request with idempotency key {key} is already in progress."
            )
        try:
            await _sleep(delay)
            response = await self._dispatch(request, handler)
            self._idempotency.store(key, response)
            return response
        finally:
            self._idempotency.release(key)

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization")
        if header == self._auth_header:
            return True
        return parse_basic_auth(header) == (self._username, self._password)

    @staticmethod
    async def _dispatch(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return _klarna_http_error(exc)
