"""Field reports on HTTP and numbers: lent sessions, pool waits, proxies, bounds (issue 8)."""

from __future__ import annotations

import asyncio
import gzip
import math
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from klarna_om_async import (
    CaptureNotAllowedError,
    CaptureRequest,
    CaptureStatus,
    KlarnaOM,
    RetryPolicy,
    ValidationError,
)
from klarna_om_async.testing import FakeKlarna, InstantSleep
from klarna_om_async.throttle import rate_limited

ORDERS = "/ordermanagement/v1/orders"


def policy(sleeps: InstantSleep) -> RetryPolicy:
    return RetryPolicy(max_attempts=4, jitter=lambda d: d, sleep=sleeps)


async def collect(om: KlarnaOM, items: list[tuple[str, CaptureRequest]], **kw: object) -> list:  # type: ignore[type-arg]
    return [outcome async for outcome in om.capture_many(items, **kw)]  # type: ignore[arg-type]


# --- 1. a lent session never changes how answers are seen -----------------------------------


async def test_a_lent_raise_for_status_session_still_sees_a_refusal(
    fake: FakeKlarna, sleeps: InstantSleep
) -> None:
    order_id = fake.add_order(amount=100)
    async with (
        aiohttp.ClientSession(raise_for_status=True) as session,
        KlarnaOM(
            fake.username,
            fake.password,
            base_url=fake.base_url,
            retry=policy(sleeps),
            session=session,
        ) as om,
    ):
        with pytest.raises(CaptureNotAllowedError):
            await om.captures.create(order_id, CaptureRequest(captured_amount=101))
        assert len(fake.requests) == 1
        outcomes = await collect(om, [(order_id, CaptureRequest(captured_amount=101))])
    assert [o.status for o in outcomes] == [CaptureStatus.REFUSED]
    assert outcomes[0].attempts == 1
    assert len(fake.requests) == 2


async def test_a_lent_session_with_base_url_and_wrong_authorization_is_neutral(
    fake: FakeKlarna, sleeps: InstantSleep
) -> None:
    order_id = fake.add_order(amount=100)
    # A base URL elsewhere, a stale Authorization header, and a middleware that would
    # rewrite every answer: none of them may change what the client sends or sees.
    seen: list[str] = []

    async def teapot(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        seen.append(str(request.url))
        raise aiohttp.ClientConnectionError("the session's own middleware ran")

    async with (
        aiohttp.ClientSession(
            base_url="http://127.0.0.1:1/elsewhere/",
            headers={"Authorization": "Basic d3Jvbmc6d3Jvbmc="},
            middlewares=(teapot,),
        ) as session,
        KlarnaOM(
            fake.username,
            fake.password,
            base_url=fake.base_url,
            retry=policy(sleeps),
            session=session,
        ) as om,
    ):
        created = await om.captures.create(order_id, CaptureRequest(captured_amount=100))
    assert created.capture_id
    assert seen == []
    assert [r.path for r in fake.requests] == [f"{ORDERS}/{order_id}/captures"]


async def test_a_lent_session_without_decompression_still_reads_the_answer(
    aiohttp_server_gzip: str, sleeps: InstantSleep
) -> None:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        KlarnaOM(
            "u", "p", base_url=aiohttp_server_gzip, retry=policy(sleeps), session=session
        ) as om,
    ):
        order = await om.orders.get("abc")
    assert order.order_id == "abc"


async def test_a_lent_session_with_auth_is_refused_up_front() -> None:
    with pytest.warns(DeprecationWarning, match="BasicAuth"):
        auth = aiohttp.BasicAuth("someone", "else")
    async with aiohttp.ClientSession() as session:
        session._default_auth = auth  # as ClientSession(auth=...) would, minus its warning
        with pytest.raises(ValueError, match="session"):
            KlarnaOM("u", "p", base_url="http://127.0.0.1:1", session=session)


@pytest.fixture
async def aiohttp_server_gzip() -> AsyncIterator[str]:
    """A tiny server whose order answers are always gzip-compressed."""

    async def order(request: web.Request) -> web.Response:
        body = gzip.compress(b'{"order_id": "%s"}' % request.match_info["id"].encode())
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    app = web.Application()
    app.router.add_get(ORDERS + "/{id}", order)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


# --- 2. waiting for the pool is not the attempt ------------------------------------------------


@pytest.fixture
async def slow_server() -> AsyncIterator[tuple[str, list[int]]]:
    """Captures every POST after 0.5 s; records the most requests in flight at once."""
    state = {"now": 0}
    peaks: list[int] = []

    async def create(request: web.Request) -> web.Response:
        state["now"] += 1
        peaks.append(state["now"])
        try:
            await asyncio.sleep(0.5)  # the server's own pace, the behaviour under test
        finally:
            state["now"] -= 1
        order_id = request.match_info["id"]
        return web.Response(
            status=201,
            headers={
                "Capture-Id": f"cap-{order_id}",
                "Location": f"{ORDERS}/{order_id}/captures/cap-{order_id}",
            },
        )

    app = web.Application()
    app.router.add_post(ORDERS + "/{id}/captures", create)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", peaks
    finally:
        await runner.cleanup()


async def test_queueing_for_a_pooled_connection_never_times_an_attempt_out(
    slow_server: tuple[str, list[int]], sleeps: InstantSleep
) -> None:
    base_url, peaks = slow_server
    # 12 calls, 4 connections, 0.5 s each: the last wait 1 s for a connection, longer than
    # the 0.8 s timeout, which one answer never reaches (0.3 s of slack for a loaded machine).
    async with KlarnaOM(
        "u", "p", base_url=base_url, timeout=0.8, max_connections=4, retry=policy(sleeps)
    ) as om:
        created = await asyncio.gather(
            *(om.captures.create(f"o{i}", CaptureRequest(captured_amount=1)) for i in range(12))
        )
    assert [c.attempts for c in created] == [1] * 12
    assert len(peaks) == 12  # no attempt was counted that never reached the server
    assert max(peaks) <= 4
    assert sleeps.waits == []


async def test_a_batch_is_not_capped_by_the_pool(
    slow_server: tuple[str, list[int]], sleeps: InstantSleep
) -> None:
    base_url, peaks = slow_server
    items = [(f"o{i}", CaptureRequest(captured_amount=1)) for i in range(16)]
    async with KlarnaOM(
        "u", "p", base_url=base_url, timeout=0.8, max_connections=4, retry=policy(sleeps)
    ) as om:
        outcomes = await collect(om, items, concurrency=8)
    assert {o.status for o in outcomes} == {CaptureStatus.CAPTURED}
    assert sum(o.attempts for o in outcomes) == len(peaks) == 16
    assert max(peaks) == 8  # the concurrency asked for, not the pool's 4


async def test_a_lent_session_smaller_than_the_concurrency_is_refused(fake: FakeKlarna) -> None:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as session,
        KlarnaOM(fake.username, fake.password, base_url=fake.base_url, session=session) as om,
    ):
        with pytest.raises(ValidationError, match="concurrency"):
            om.capture_many([], concurrency=5)


# --- 4. proxies from the environment ------------------------------------------------------------


@pytest.fixture
async def proxy(fake: FakeKlarna) -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback HTTP proxy that records each absolute-URI request and forwards it."""
    seen: list[str] = []

    async def forward(request: web.Request) -> web.Response:
        seen.append(str(request.url))
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method,
                str(request.url),
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
                data=await request.read(),
            ) as answer,
        ):
            return web.Response(
                status=answer.status,
                body=await answer.read(),
                headers={
                    k: v
                    for k, v in answer.headers.items()
                    if k.lower() in ("content-type", "location", "capture-id")
                },
            )

    server = web.Server(forward)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
async def test_the_client_session_honours_the_proxy_variables(
    fake: FakeKlarna,
    proxy: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    proxy_url, seen = proxy
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, proxy_url)
    order_id = fake.add_order(amount=100)
    async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as om:
        order = await om.orders.get(order_id)
    assert order.order_id == order_id
    assert seen == [f"{fake.base_url}{ORDERS}/{order_id}"]
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # and the exceptions to it
    async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as om:
        await om.orders.get(order_id)
    assert len(seen) == 1


# --- 12. every number is finite and bounded ------------------------------------------------------


async def test_a_nan_rate_limit_is_refused_before_anything_is_sent(
    fake: FakeKlarna, om: KlarnaOM
) -> None:
    items = [
        (order, CaptureRequest(captured_amount=100)) for order in fake.add_orders(3, amount=100)
    ]
    async with asyncio.timeout(5):  # a regression spins forever; fail instead
        for bad in (math.nan, math.inf, 0.0, -1.0, 1e9):
            with pytest.raises(ValidationError, match="rate_limit"):
                await collect(om, items, rate_limit=bad)
    assert fake.requests == []


@pytest.mark.parametrize("bad", [0, -1, 10_001, 10**9, 2.5, True])
async def test_concurrency_is_bounded(om: KlarnaOM, bad: object) -> None:
    with pytest.raises(ValidationError, match="concurrency"):
        om.capture_many([], concurrency=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "bad"),
    [
        ("timeout", math.nan),
        ("timeout", math.inf),
        ("timeout", 0),
        ("timeout", 1e6),
        ("max_connections", 0),
        ("max_connections", 10**9),
        ("max_connections", 1.5),
    ],
)
def test_client_numbers_are_bounded(option: str, bad: object) -> None:
    with pytest.raises(ValidationError, match=f"^{option}: "):
        KlarnaOM("u", "p", base_url="http://127.0.0.1:1", **{option: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("deadline", math.nan),
        ("deadline", math.inf),
        ("initial_delay", math.nan),
        ("max_delay", math.inf),
        ("retry_after_cap", math.nan),
        ("max_attempts", 10**6),
        ("max_attempts", 0),
    ],
)
def test_retry_policy_numbers_are_bounded(field: str, bad: object) -> None:
    with pytest.raises(ValidationError, match=f"^{field}: "):
        RetryPolicy(**{field: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [math.nan, -math.inf, 0.0, 1e12])
def test_rate_limited_refuses_non_finite_rates(bad: float) -> None:
    with pytest.raises(ValidationError, match="rate_limit"), rate_limited(bad):
        pass
