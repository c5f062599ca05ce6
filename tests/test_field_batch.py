"""A batch that cannot work stops early, sends nothing more, and reruns exactly once (issue 8)."""

from __future__ import annotations

import socket
from pathlib import Path

import orjson
import pytest
from test_cli import PASSWORD, ServedFake, cli
from test_cli import served as served  # the fixture

from klarna_om_async import (
    AuthenticationError,
    BatchAbortedError,
    CaptureOutcome,
    CaptureRequest,
    CaptureStatus,
    ClockSkewError,
    JournalStatus,
    KlarnaConnectionError,
    KlarnaOM,
    MemoryJournal,
    RetryPolicy,
)
from klarna_om_async.testing import FakeKlarna, InstantSleep


async def run(
    om: KlarnaOM, items: list[tuple[str, CaptureRequest]], **kw: object
) -> tuple[list[CaptureOutcome], BatchAbortedError | None]:
    outcomes: list[CaptureOutcome] = []
    try:
        async for outcome in om.capture_many(items, **kw):  # type: ignore[arg-type]
            outcomes.append(outcome)
    except BatchAbortedError as error:
        return outcomes, error
    return outcomes, None


async def test_wrong_credentials_stop_the_batch_and_a_rerun_captures_each_once(
    fake: FakeKlarna, sleeps: InstantSleep
) -> None:
    orders = fake.add_orders(200, amount=100)
    items = [(order, CaptureRequest(captured_amount=100)) for order in orders]
    journal = MemoryJournal()
    policy = RetryPolicy(jitter=lambda d: d, sleep=sleeps)
    async with KlarnaOM(fake.username, "wrong", base_url=fake.base_url, retry=policy) as om:
        outcomes, stopped = await run(om, items, concurrency=4, journal=journal)
    assert stopped is not None
    assert isinstance(stopped.cause, AuthenticationError)
    assert str(stopped).startswith("stopped: Klarna refused the credentials (401); ")
    # (Before any send, the first item's order was read for Klarna's time: a 401 too.)
    assert [r.method for r in fake.requests].count("GET") == 1
    assert [r.method for r in fake.requests].count("POST") == len(outcomes) <= 4
    assert len(outcomes) + len(stopped.not_sent) == 200
    assert {o.status for o in outcomes} == {CaptureStatus.REFUSED}
    # The items never sent were never claimed: the journal holds only the refused ones.
    assert len(await journal.entries()) == len(outcomes)

    async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url, retry=policy) as om:
        outcomes, stopped = await run(om, items, concurrency=8, journal=journal)
    assert stopped is None
    assert {o.status for o in outcomes} == {CaptureStatus.CAPTURED}
    assert len(fake.booked_captures) == 200
    assert {e.status for e in await journal.entries()} == {JournalStatus.CAPTURED}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("journaled", [False, True], ids=["no-journal", "journal"])
async def test_an_unreachable_host_stops_the_batch_after_a_few_items(
    sleeps: InstantSleep, journaled: bool
) -> None:
    items = [(f"order-{i}", CaptureRequest(captured_amount=100)) for i in range(50)]
    journal = MemoryJournal() if journaled else None
    policy = RetryPolicy(max_attempts=2, jitter=lambda d: d, sleep=sleeps)
    async with KlarnaOM("u", "p", base_url=f"http://127.0.0.1:{closed_port()}", retry=policy) as om:
        outcomes, stopped = await run(om, items, concurrency=2, journal=journal)
    assert stopped is not None
    assert len(outcomes) + len(stopped.not_sent) == 50
    if journal is None:
        assert isinstance(stopped.cause, KlarnaConnectionError)
        assert not stopped.cause.request_sent
        assert len(outcomes) <= 4
        assert "3 items in a row could not connect" in str(stopped)
        return
    # A journaled batch first reads an order for Klarna's time, and stops when it cannot.
    assert isinstance(stopped.cause, ClockSkewError)
    assert isinstance(stopped.cause.failure, KlarnaConnectionError)
    assert not stopped.cause.failure.request_sent
    assert len(outcomes) <= 2
    assert "Klarna's time could not be learned (reading the order: Could not connect" in str(
        stopped
    )
    # Klarna's time is learned before anything is claimed: nothing was.
    assert await journal.entries() == []


def test_the_cli_stops_a_batch_with_wrong_credentials_in_one_line(
    served: ServedFake, tmp_path: Path
) -> None:
    orders = [served.add_order(100) for _ in range(200)]
    path = tmp_path / "b.jsonl"
    path.write_text("".join(f'{{"order_id": "{o}", "captured_amount": 100}}\n' for o in orders))
    result = cli(
        ["batch", str(path), "--concurrency", "4", "--json"],
        served,
        env={"KLARNA_PASSWORD": "not-" + PASSWORD[:-1]},
    )
    assert result.exit_code == 1
    sent = served.do(lambda: sum(r.method == "POST" for r in served.fake.requests))
    assert sent <= 4
    line = (
        f"stopped: Klarna refused the credentials (401); {200 - sent} items not sent;"
        " fix the credentials and rerun"
    )
    assert line in result.stderr.splitlines()
    summary = orjson.loads(result.stdout.splitlines()[-1])
    assert summary["not_sent"] == 200 - sent

    result = cli(["batch", str(path), "--concurrency", "8", "--json"], served)
    assert result.exit_code == 0
    assert all(served.booked(o) == 1 for o in orders)


# A file without rows: before the fix these ran (and `--rate nan` with a row spun for ever).
@pytest.mark.parametrize(
    "option", [["--rate", "nan"], ["--rate", "inf"], ["--concurrency", "10001"]]
)
def test_the_cli_refuses_unbounded_batch_numbers(
    served: ServedFake, tmp_path: Path, option: list[str]
) -> None:
    path = tmp_path / "b.csv"
    path.write_text("order_id,captured_amount\n")
    result = cli(["batch", str(path), *option], served)
    assert result.exit_code == 2
    assert served.do(lambda: len(served.fake.requests)) == 0
