from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

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
