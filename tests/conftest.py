from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from klarna_om_async import KlarnaOM, RetryPolicy
from klarna_om_async.testing import FakeKlarna, InstantSleep


@pytest.fixture
async def fake() -> AsyncIterator[FakeKlarna]:
    """A started FakeKlarna on 127.0.0.1 and a free port, closed after the test."""
    async with FakeKlarna() as server:
        yield server


@pytest.fixture
def sleeps() -> InstantSleep:
    """Stands in for asyncio.sleep: retries are instant and their waits observable."""
    return InstantSleep()


@pytest.fixture
async def om(fake: FakeKlarna, sleeps: InstantSleep) -> AsyncIterator[KlarnaOM]:
    """A client of ``fake`` with 4 attempts, un-jittered backoff, instant sleeps, and a clock
    that moves by the waits (so deadlines end retry loops as they would in real time)."""
    policy = RetryPolicy(max_attempts=4, jitter=lambda d: d, sleep=sleeps)
    async with KlarnaOM(
        fake.username, fake.password, base_url=fake.base_url, retry=policy, clock=sleeps.clock
    ) as client:
        yield client


@contextlib.asynccontextmanager
async def served_app(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 and a free port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def answer_201() -> AsyncIterator[tuple[dict[str, str], KlarnaOM]]:
    """A client of a tiny server answering every capture and refund POST 201 with
    ``headers`` (filled in by the test; ``{origin}`` becomes ``http://host:port``)."""
    headers: dict[str, str] = {}

    async def created(request: web.Request) -> web.Response:
        origin = str(request.url.origin())
        return web.Response(
            status=201, headers={k: v.format(origin=origin) for k, v in headers.items()}
        )

    app = web.Application()
    app.router.add_post("/ordermanagement/v1/orders/{order_id}/{kind}", created)
    async with served_app(app) as url, KlarnaOM("u", "p", base_url=url) as om:
        yield headers, om
