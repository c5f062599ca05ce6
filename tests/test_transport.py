"""The transport's per-attempt timeout: one shared loop timer, asyncio.timeout's semantics."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from conftest import served_app

from klarna_om_async import (
    CaptureCreated,
    CaptureRequest,
    CaptureStatus,
    KlarnaConnectionError,
    KlarnaOM,
    KlarnaTimeoutError,
    RateLimitError,
    Request,
    Response,
    RetryPolicy,
)
from klarna_om_async.middleware import Handler
from klarna_om_async.testing import Delay, DropConnection, FakeKlarna, InstantSleep
from klarna_om_async.transport import AiohttpTransport, _Slots


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def order_get(fake: FakeKlarna, order_id: str) -> Request:
    path = f"/ordermanagement/v1/orders/{order_id}"
    return Request("GET", path, headers={"Authorization": fake.auth_header})


async def test_a_slow_answer_times_out_and_leaves_the_task_uncancelled(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=100)
    fake.inject(Delay(5))
    transport = AiohttpTransport(session, fake.base_url, 0.1)
    with pytest.raises(KlarnaTimeoutError, match=r"within 0\.1s") as caught:
        await transport(order_get(fake, order_id))
    assert caught.value.method == "GET"
    assert caught.value.url == fake.base_url + f"/ordermanagement/v1/orders/{order_id}"
    assert isinstance(caught.value.__cause__, asyncio.CancelledError)
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    # The transport still works afterwards, within its deadline.
    assert (await transport(order_get(fake, order_id))).status == 200


async def test_overlapping_attempts_each_time_out_at_their_own_deadline(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=100)
    fake.inject(Delay(5), times=2)
    transport = AiohttpTransport(session, fake.base_url, 0.2)
    loop = asyncio.get_running_loop()

    async def timed_attempt(after: float) -> float:
        await asyncio.sleep(after)
        started = loop.time()
        with pytest.raises(KlarnaTimeoutError):
            await transport(order_get(fake, order_id))
        return loop.time() - started

    first, second = await asyncio.gather(timed_attempt(0), timed_attempt(0.1))
    assert 0.19 <= first < 1
    assert 0.19 <= second < 1


async def test_a_fast_answer_is_not_cancelled_by_a_slow_neighbours_deadline(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=100)
    fake.inject(Delay(5))
    transport = AiohttpTransport(session, fake.base_url, 0.3)
    slow = asyncio.ensure_future(transport(order_get(fake, order_id)))
    await fake.wait_for_requests(1)
    for _ in range(3):
        assert (await transport(order_get(fake, order_id))).status == 200
    with pytest.raises(KlarnaTimeoutError):
        await slow


async def test_the_callers_cancellation_is_not_turned_into_a_timeout(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=100)
    fake.inject(Delay(5))
    transport = AiohttpTransport(session, fake.base_url, 10)
    attempt = asyncio.ensure_future(transport(order_get(fake, order_id)))
    await fake.wait_for_requests(1)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt


async def test_a_cancellation_racing_the_deadline_stays_a_cancellation(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    order_id = fake.add_order(amount=100)
    fake.inject(Delay(5))
    transport = AiohttpTransport(session, fake.base_url, 0.1)

    async def cancelled_at_the_deadline() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, task.cancel)
        await transport(order_get(fake, order_id))

    with pytest.raises(asyncio.CancelledError):
        await asyncio.ensure_future(cancelled_at_the_deadline())


async def test_an_attempt_outside_a_task_is_refused(
    fake: FakeKlarna, session: aiohttp.ClientSession
) -> None:
    transport = AiohttpTransport(session, fake.base_url, 1)
    coroutine = transport(order_get(fake, "x"))
    outcome: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    def step_outside_any_task() -> None:
        try:
            coroutine.send(None)
        except BaseException as exc:
            outcome.set_result(exc)

    asyncio.get_running_loop().call_soon(step_outside_any_task)
    error = await outcome
    assert isinstance(error, RuntimeError)
    assert "asyncio task" in str(error)


class _ConnectTimesOut(aiohttp.TCPConnector):
    """A connector whose connects time out, as aiohttp reports a socket connect timeout."""

    async def connect(self, *args: object, **kwargs: object) -> aiohttp.connector.Connection:
        raise aiohttp.ConnectionTimeoutError("connect timed out")


async def test_aiohttps_own_timeouts_are_timeouts_too(fake: FakeKlarna) -> None:
    async with aiohttp.ClientSession(connector=_ConnectTimesOut()) as session:
        transport = AiohttpTransport(session, fake.base_url, 10)
        with pytest.raises(KlarnaTimeoutError) as caught:
            await transport(order_get(fake, "x"))
    assert isinstance(caught.value.__cause__, aiohttp.ConnectionTimeoutError)


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_connection_never_opened_is_not_an_unknown_outcome(sleeps: InstantSleep) -> None:
    port = closed_port()
    policy = RetryPolicy(max_attempts=3, jitter=lambda d: d, sleep=sleeps)
    async with KlarnaOM("u", "p", base_url=f"http://127.0.0.1:{port}", retry=policy) as om:
        with pytest.raises(KlarnaConnectionError) as caught:
            await om.captures.create("o1", CaptureRequest(captured_amount=100))
        outcomes = [o async for o in om.capture_many([("o2", CaptureRequest(captured_amount=100))])]
    error = caught.value
    assert not error.request_sent
    assert not error.outcome_unknown  # nothing reached Klarna
    assert error.attempts == 3  # still retried: the host may come back
    text = str(error)
    assert f"Could not connect to 127.0.0.1:{port} (Connection refused); nothing was sent" in text
    assert "ConnectionKey" not in text
    assert "outcome is unknown" not in text
    assert outcomes[0].status is CaptureStatus.REFUSED  # nothing captured, a rerun may resend


async def test_a_connection_that_breaks_after_sending_is_still_unknown(
    om: KlarnaOM, fake: FakeKlarna
) -> None:
    order_id = fake.add_order(amount=100)
    fake.inject(DropConnection(), method="POST", times=None)
    with pytest.raises(KlarnaConnectionError) as caught:
        await om.captures.create(order_id, CaptureRequest(captured_amount=100))
    assert caught.value.request_sent
    assert caught.value.outcome_unknown
    assert "ServerDisconnectedError" in str(caught.value)
    assert "4 attempts" in str(caught.value)


# --- a 429 that pauses the client while an attempt queues for a connection ------------------


class FakeTime:
    """A clock that moves only when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


class HeldServer:
    """Captures; the first request is held until the test releases it, then answered 429
    ``Retry-After: 2``; every request's order id and virtual arrival time is recorded."""

    def __init__(self, time: FakeTime) -> None:
        self.time = time
        self.arrivals: list[tuple[str, float]] = []
        self.first_arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def capture(self, request: web.Request) -> web.Response:
        self.arrivals.append((request.match_info["order"], self.time.now))
        if len(self.arrivals) == 1:
            self.first_arrived.set()
            await self.release.wait()
            return web.json_response(
                {"error_code": "TOO_MANY_REQUESTS"}, status=429, headers={"Retry-After": "2"}
            )
        return web.Response(status=201, headers={"Capture-Id": "cap"})


@pytest.fixture
async def held() -> AsyncIterator[tuple[str, HeldServer]]:
    server = HeldServer(FakeTime())
    app = web.Application()
    app.router.add_post("/ordermanagement/v1/orders/{order}/captures", server.capture)
    async with served_app(app) as url:
        try:
            yield url, server
        finally:
            server.release.set()


def one_connection_client(
    url: str, time: FakeTime, *, deadline: float
) -> tuple[KlarnaOM, asyncio.Event]:
    """A client with one connection and no retries, and an event set once the capture of
    order "b" has passed the throttle (user middlewares come right after it)."""
    passed = asyncio.Event()

    async def note_b(request: Request, call_next: Handler) -> Response:
        if "/orders/b/" in request.path:
            passed.set()
        return await call_next(request)

    policy = RetryPolicy(max_attempts=1, sleep=time.sleep, deadline=deadline)
    om = KlarnaOM(
        "u",
        "p",
        base_url=url,
        retry=policy,
        clock=time.clock,
        max_connections=1,
        middlewares=[note_b],
    )
    return om, passed


async def queue_behind_a_429(
    om: KlarnaOM, passed: asyncio.Event, server: HeldServer
) -> asyncio.Future[CaptureCreated]:
    """Send "a" (held by the server), then "b", which passes the throttle unpaused and
    queues for the only connection; then let the server answer "a" with a 429."""
    first = asyncio.ensure_future(om.captures.create("a", CaptureRequest(captured_amount=1)))
    await server.first_arrived.wait()
    second = asyncio.ensure_future(om.captures.create("b", CaptureRequest(captured_amount=1)))
    await passed.wait()  # "b" is now waiting for the connection "a" holds
    server.release.set()
    with pytest.raises(RateLimitError):
        await first  # no retries: the 429 ends "a", and pauses the client for 2 s
    return second


async def test_an_attempt_that_queued_for_a_connection_waits_out_a_429_pause(
    held: tuple[str, HeldServer],
) -> None:
    url, server = held
    om, passed = one_connection_client(url, server.time, deadline=60)
    async with om:
        second = await queue_behind_a_429(om, passed, server)
        assert (await second).capture_id == "cap"
    # "b" got the connection at once, but was sent only when the pause was over.
    assert server.arrivals == [("a", 0.0), ("b", 2.0)]
    assert server.time.waits == [2.0]
    assert om.rate_limited_count == 1


async def test_an_attempt_that_queued_past_its_deadline_is_refused_unsent(
    held: tuple[str, HeldServer],
) -> None:
    url, server = held
    om, passed = one_connection_client(url, server.time, deadline=1)
    async with om:
        second = await queue_behind_a_429(om, passed, server)
        with pytest.raises(RateLimitError, match="not sent") as caught:
            await second
    assert server.arrivals == [("a", 0.0)]  # "b" never reached the server
    assert server.time.waits == []
    assert not caught.value.outcome_unknown
    assert caught.value.idempotency_key is not None
    assert om.rate_limited_count == 1  # the refusal is no 429 from Klarna


async def test_an_attempt_that_got_its_connection_after_its_deadline_is_not_sent() -> None:
    # One connection, held by "a" until the clock has passed "b"'s deadline: "b" must not
    # start an attempt then ("no attempt starts later than the deadline").
    time = FakeTime()
    arrivals: list[str] = []
    first_arrived, release = asyncio.Event(), asyncio.Event()

    async def capture(request: web.Request) -> web.Response:
        arrivals.append(request.match_info["order"])
        if len(arrivals) == 1:
            first_arrived.set()
            await release.wait()
        return web.Response(status=201, headers={"Capture-Id": "cap"})

    app = web.Application()
    app.router.add_post("/ordermanagement/v1/orders/{order}/captures", capture)
    async with served_app(app) as url:
        om, passed = one_connection_client(url, time, deadline=2)
        async with om:
            first = asyncio.ensure_future(
                om.captures.create("a", CaptureRequest(captured_amount=1))
            )
            await first_arrived.wait()
            second = asyncio.ensure_future(
                om.captures.create("b", CaptureRequest(captured_amount=1))
            )
            await passed.wait()  # "b" waits for the connection "a" holds
            time.now = 3.0  # past "b"'s deadline (0 + 2)
            release.set()
            assert (await first).capture_id == "cap"
            with pytest.raises(RateLimitError, match="not sent: the call waited") as caught:
                await second
    assert arrivals == ["a"]  # "b" never reached the server
    assert not caught.value.outcome_unknown
    assert caught.value.idempotency_key is not None
    assert om.rate_limited_count == 0  # no 429 from Klarna, and no pause


async def test_connection_slots_go_in_turn_and_a_cancelled_waiter_passes_its_slot_on() -> None:
    slots = _Slots(1)
    assert slots.acquire() is None  # a free slot is taken at once
    got: list[str] = []

    async def attempt(name: str) -> None:
        waiting = slots.acquire()
        assert waiting is not None
        await waiting
        got.append(name)

    a, b, c, d = (asyncio.ensure_future(attempt(name)) for name in "abcd")
    await asyncio.sleep(0)  # all four queue, in this order
    b.cancel()  # gives up while queued: never holds a slot
    slots.release()  # to "a"
    await asyncio.sleep(0)
    assert got == ["a"]
    slots.release()  # to "c" ("b" is gone) ...
    c.cancel()  # ... which is cancelled before it runs: "d" takes the slot instead
    await asyncio.gather(a, b, c, d, return_exceptions=True)
    assert got == ["a", "d"]
    assert b.cancelled()
    assert c.cancelled()
    slots.release()  # "d" done: the slot is free again, once
    assert slots.acquire() is None
    e = asyncio.ensure_future(attempt("e"))
    await asyncio.sleep(0)
    assert not e.done()  # queued: no second slot appeared
    e.cancel()
    await asyncio.gather(e, return_exceptions=True)
    assert got == ["a", "d"]
