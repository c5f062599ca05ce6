"""The README's Python examples run (against FakeKlarna) or at least compile."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import CodeType

import pytest

import klarna_om_async
from klarna_om_async import KlarnaOM
from klarna_om_async.testing import FakeKlarna

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def compiled(source: str) -> CodeType:
    return compile(source, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def block(starting_with: str) -> str:
    [found] = [b for b in BLOCKS if b.startswith(starting_with)]
    return found


@pytest.mark.parametrize("source", BLOCKS)
def test_every_python_block_compiles(source: str) -> None:
    compiled(source)


async def run(source: str, namespace: dict[str, object]) -> None:
    result = eval(compiled(source), namespace)
    if result is not None:
        await result


async def test_the_happy_path_runs_against_the_fake(
    fake: FakeKlarna, monkeypatch: pytest.MonkeyPatch
) -> None:
    class PointedAtFake(KlarnaOM):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(fake.username, fake.password, base_url=fake.base_url)

    monkeypatch.setattr(klarna_om_async, "KlarnaOM", PointedAtFake)
    order_id = fake.add_order(amount=6000)
    await run(block("from klarna_om_async import CaptureRequest, KlarnaOM"), {"order_id": order_id})
    [capture] = fake.captures(order_id)
    assert capture.captured_amount == 6000
    assert capture.send_outs == 1
    assert capture.shipping_info == [{"shipping_company": "DHL", "tracking_number": "1234567890"}]


async def test_the_fake_klarna_example_runs() -> None:
    namespace: dict[str, object] = {
        "KlarnaOM": KlarnaOM,
        "CaptureRequest": klarna_om_async.CaptureRequest,
    }
    await run(block("from klarna_om_async.testing import"), namespace)
