"""The README's Python examples run (against FakeKlarna) or at least compile; the public
docstrings say shapes, units, errors raised and link Klarna's docs."""

from __future__ import annotations

import ast
import inspect
import pydoc
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import CodeType

import attrs
import pytest

import klarna_om_async
from klarna_om_async import CaptureRequest, KlarnaOM
from klarna_om_async.batch import capture_many as batch_capture_many
from klarna_om_async.captures import CapturesService
from klarna_om_async.models import CaptureCreated
from klarna_om_async.orders import OrdersService
from klarna_om_async.reconcile import reconcile, reconcile_entry
from klarna_om_async.refunds import RefundsService
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


async def test_the_refund_example_runs_against_the_fake(
    fake: FakeKlarna, monkeypatch: pytest.MonkeyPatch
) -> None:
    class PointedAtFake(KlarnaOM):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(fake.username, fake.password, base_url=fake.base_url)

    monkeypatch.setattr(klarna_om_async, "KlarnaOM", PointedAtFake)
    order_id = fake.add_order(amount=6000)
    namespace: dict[str, object] = {"order_id": order_id}
    async with PointedAtFake() as om:
        await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
    await run(block("from klarna_om_async import KlarnaOM, RefundRequest"), namespace)
    assert [r.refunded_amount for r in fake.refunds(order_id)] == [2500]
    assert namespace["order"].refunded_amount == 2500  # type: ignore[attr-defined]


FAKE_KLARNA_EXAMPLE = "import asyncio\n\nfrom klarna_om_async import CaptureRequest, KlarnaOM\n"


def test_the_fake_klarna_example_runs_as_pasted_into_a_file() -> None:
    # A fresh interpreter with nothing imported for it: a missing import is a NameError.
    source = block(FAKE_KLARNA_EXAMPLE)
    command = [sys.executable, "-W", "error", "-c", source]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


async def test_the_fake_klarna_example_runs_as_a_pytest_asyncio_test() -> None:
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(block(FAKE_KLARNA_EXAMPLE), "README.md", "exec"), namespace)
    test = namespace["test_a_lost_answer_still_captures_once"]
    assert callable(test)
    await test()


# -- docstrings: shapes, units, errors raised, Klarna's docs ----------------------------------

KLARNA_DOCS = "https://docs.klarna.com/api/ordermanagement/"


def public_methods(cls: type) -> list[Callable[..., object]]:
    return [
        member
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and name != "close"
    ]


DOCUMENTED = [
    KlarnaOM,
    CapturesService,
    OrdersService,
    RefundsService,
    *public_methods(KlarnaOM),
    *public_methods(RefundsService),
    *public_methods(CapturesService),
    *public_methods(OrdersService),
    batch_capture_many,
    reconcile,
    reconcile_entry,
]


@pytest.mark.parametrize("documented", DOCUMENTED, ids=lambda d: d.__qualname__)
def test_every_public_call_names_its_errors_and_links_klarna_docs(documented: object) -> None:
    doc = inspect.getdoc(documented) or ""
    assert KLARNA_DOCS in doc
    assert "Raises" in doc or "raises" in doc
    assert "Error" in doc


def test_the_endpoints_are_all_documented() -> None:
    names = {m.__name__ for m in public_methods(CapturesService)}
    assert names == {
        "create",
        "get",
        "list",
        "add_shipping_info",
        "trigger_send_out",
        "extend_due_date",
        "get_extend_due_date_options",
    }
    assert {m.__name__ for m in public_methods(KlarnaOM)} >= {"capture_many", "reconcile"}


def test_help_on_the_client_shows_where_the_calls_live() -> None:
    text = pydoc.render_doc(KlarnaOM, renderer=pydoc.plaintext)
    for name in ("om.captures", "om.refunds", "om.orders", "om.capture_many", "om.reconcile"):
        assert name in text
    for call in ("create", "add_shipping_info", "trigger_send_out"):
        assert call in text
    assert "minor units" in text


def test_captures_create_names_errors_units_and_returned_fields() -> None:
    doc = inspect.getdoc(CapturesService.create) or ""
    for error in (
        "ValidationError",
        "CaptureNotAllowedError",
        "NoSuchOrderError",
        "AuthenticationError",
        "KlarnaConnectionError",
        "KlarnaTimeoutError",
        "KlarnaResponseError",
        "ServerError",
    ):
        assert error in doc
    assert "``int`` minor units" in doc
    for field in attrs.fields(CaptureCreated):
        assert f"``{field.name}``" in doc
    assert f"{KLARNA_DOCS}#operation/captureOrder" in doc


def test_every_capture_request_field_is_documented_with_its_unit() -> None:
    doc = inspect.getdoc(klarna_om_async.CaptureRequest) or ""
    for field in attrs.fields(klarna_om_async.CaptureRequest):
        assert f"- ``{field.name}``:" in doc
    assert "``captured_amount``: ``int`` minor units" in doc
    assert f"{KLARNA_DOCS}#operation/captureOrder" in doc
    # Klarna's spec gives shipping_delay no unit; the docstring must not invent one.
    shipping_delay = doc.split("- ``shipping_delay``:")[1]
    assert "gives no unit" in shipping_delay
