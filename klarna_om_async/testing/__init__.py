"""A fake Klarna Order Management server, to test code that captures and refunds Klarna orders.

``FakeKlarna`` serves the Order Management endpoints over real HTTP with Klarna's rules
(over-capture and cancelled/expired/released orders are refused with 403 ``CAPTURE_NOT_ALLOWED``,
refunds beyond what was captured and not yet refunded with 403 ``REFUND_NOT_ALLOWED``, cancels
after a capture with 403 ``CANCEL_NOT_ALLOWED``, other refused updates with 403 ``NOT_ALLOWED``;
orders expire on the fake's clock, see ``FakeKlarna.advance_clock``), Basic auth,
idempotency keys (the first completed answer for a key is replayed, marked with the header
``Klarna-Idempotent-Replayed: true``), fault injection, and a record of every request::

    from klarna_om_async.testing import DropAfterProcessing, FakeKlarna

    async def test_capture_survives_a_lost_response() -> None:
        async with FakeKlarna() as fake:
            order_id = fake.add_order(amount=6000)
            fake.inject(DropAfterProcessing(), method="POST", path="/captures")
            await your_capture_code(fake.base_url, fake.username, fake.password, order_id)
            assert len(fake.captures(order_id)) == 1

Faults are consumed first-in first-out by the requests they match. Note that aiohttp's client
silently retries an idempotent method (GET) once when a reused connection drops, so drop
faults are best aimed at POSTs.
"""

from ._faults import (
    Delay,
    DropAfterProcessing,
    DropConnection,
    Fault,
    NonJsonError,
    RateLimited,
    ServerFailure,
)
from ._idempotency import REPLAYED_HEADER
from ._ledger import FakeCapture, FakeOrder, FakeRefund
from ._recording import RecordedRequest
from ._server import FakeKlarna
from ._sleep import InstantSleep

__all__ = (
    "REPLAYED_HEADER",
    "Delay",
    "DropAfterProcessing",
    "DropConnection",
    "FakeCapture",
    "FakeKlarna",
    "FakeOrder",
    "FakeRefund",
    "Fault",
    "InstantSleep",
    "NonJsonError",
    "RateLimited",
    "RecordedRequest",
    "ServerFailure",
)
