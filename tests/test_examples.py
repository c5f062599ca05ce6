"""The examples run: the web service against FakeKlarna, the batch script as a process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest
from aiohttp import web

from klarna_om_async.testing import FakeKlarna

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_web_service_captures_once_per_shipment_even_when_resent(
    fake: FakeKlarna, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KLARNA_USERNAME", fake.username)
    monkeypatch.setenv("KLARNA_PASSWORD", fake.password)
    monkeypatch.setenv("KLARNA_BASE_URL", fake.base_url)
    service = load("web_service")
    order_id = fake.add_order(amount=3000)
    runner = web.AppRunner(service.make_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/orders/{order_id}/shipments/box-1"
    shipment = {"amount": 1000, "carrier": "DHL", "tracking_number": "123"}
    try:
        async with aiohttp.ClientSession() as session:
            statuses = []
            for _ in range(2):  # the warehouse resends the same message
                async with session.post(url, json=shipment) as answer:
                    statuses.append((answer.status, await answer.json()))
            async with session.post(url.replace("box-1", "box-2"), json={"amount": 1}) as bad:
                assert bad.status == 400
            big = {**shipment, "amount": 5000}
            async with session.post(url.replace("box-1", "box-3"), json=big) as refused:
                assert refused.status == 409
    finally:
        await runner.cleanup()
    assert statuses[0][0] == statuses[1][0] == 201
    assert statuses[0][1] == statuses[1][1]
    [booked] = fake.booked_captures
    assert statuses[0][1]["capture_id"] == booked.capture_id
    assert booked.shipping_info == [{"shipping_company": "DHL", "tracking_number": "123"}]


def test_batch_script_captures_every_order_despite_lost_answers(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    env = {"PATH": "", "PYTHONPATH": str(EXAMPLES.parent)}
    command = [sys.executable, str(EXAMPLES / "batch_capture.py"), str(journal)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sum(" captured " in line for line in lines) == 10
    assert lines[-1] == "summary: {'captured': 10}"
