"""The transport's per-attempt timeout: one shared loop timer, asyncio.timeout's semantics."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from klarna_om_async import (
    CaptureRequest,
    CaptureStatus,
    KlarnaConnectionError,
    KlarnaOM,
    KlarnaTimeoutError,
    Request,
    RetryPolicy,
)
from klarna_om_async.testing import Delay, DropConnection, FakeKlarna, InstantSleep
from klarna_om_async.transport import AiohttpTransport


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
