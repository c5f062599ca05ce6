from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from klarna_om_async.testing import FakeKlarna


@pytest.fixture
async def fake() -> AsyncIterator[FakeKlarna]:
    """A started FakeKlarna on 127.0.0.1 and a free port, closed after the test."""
    async with FakeKlarna() as server:
        yield server
