"""Capture a list of shipped orders concurrently, safely resumable with a journal.

With ``KLARNA_USERNAME``/``KLARNA_PASSWORD`` set it talks to Klarna (``KLARNA_BASE_URL`` or
the EU playground); without them it starts an in-process FakeKlarna with a few orders, so
it runs anywhere::

    python examples/batch_capture.py [journal.sqlite]

Rerun it with the same journal after a crash: captured orders are skipped, and orders whose
outcome was unknown are resent with their original idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator

from klarna_om_async import CaptureRequest, KlarnaOM, SQLiteJournal
from klarna_om_async.testing import DropAfterProcessing, FakeKlarna


@contextlib.asynccontextmanager
async def klarna() -> AsyncIterator[tuple[KlarnaOM, list[str]]]:
    """The real Klarna if credentials are set, else a fake one with ten orders to capture."""
    username = os.environ.get("KLARNA_USERNAME")
    if username:
        order_ids = sys.stdin.read().split()  # one order id per line
        async with KlarnaOM(
            username,
            os.environ["KLARNA_PASSWORD"],
            base_url=os.environ.get("KLARNA_BASE_URL"),
            playground=True,
        ) as om:
            yield om, order_ids
        return
    async with FakeKlarna() as fake:
        order_ids = fake.add_orders(10, amount=2500)
        fake.inject(DropAfterProcessing(), method="POST", times=2)  # lost answers, for realism
        async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as om:
            yield om, order_ids


async def main(journal_path: str) -> int:
    """Capture 25.00 of each order; print one line per order and a summary."""
    async with klarna() as (om, order_ids), SQLiteJournal(journal_path) as journal:
        items = ((order_id, CaptureRequest(captured_amount=2500)) for order_id in order_ids)
        totals: Counter[str] = Counter()
        async for outcome in om.capture_many(items, concurrency=8, journal=journal):
            totals[outcome.status.value] += 1
            detail = outcome.capture_id or outcome.error
            print(f"{outcome.order_id}  {outcome.status:<8}  {detail}")
        print("summary:", dict(sorted(totals.items())))
        return 1 if totals["failed"] or totals["refused"] else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "batch-journal.sqlite")))
