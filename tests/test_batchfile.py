"""Reading batch files: CSV and JSON Lines into BatchItems, bad lines named by number."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import orjson
import pytest

from klarna_om_async import BatchItem, CaptureRequest, OrderLine, ShippingInfo, ShippingMethod
from klarna_om_async.cli._batchfile import (
    BadLine,
    BatchFileError,
    BatchFormat,
    Row,
    count_lines,
    detect_format,
    open_batch,
)


def read(tmp_path: Path, name: str, content: str | bytes, fmt: str | None = None) -> list[Row]:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    with open_batch(str(path), detect_format(str(path), fmt)) as rows:
        return list(rows)


def bad(row: Row) -> str:
    assert isinstance(row, BadLine), row
    assert str(row.error).startswith(f"line {row.line}: ")
    return str(row.error)


# -- format ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt", "expected"),
    [
        ("a.csv", None, BatchFormat.CSV),
        ("A.CSV", None, BatchFormat.CSV),
        ("a.jsonl", None, BatchFormat.JSONL),
        ("a.ndjson", None, BatchFormat.JSONL),
        ("a.csv", "jsonl", BatchFormat.JSONL),
        ("a", "csv", BatchFormat.CSV),
    ],
)
def test_format_comes_from_the_extension_unless_given(
    name: str, fmt: str | None, expected: BatchFormat
) -> None:
    assert detect_format(name, fmt) is expected


@pytest.mark.parametrize("name", ["a.txt", "a"])
def test_an_unknown_extension_asks_for_format(name: str) -> None:
    with pytest.raises(BatchFileError, match="--format"):
        detect_format(name)


def test_a_missing_file_is_a_file_error(tmp_path: Path) -> None:
    for fmt in BatchFormat:
        with (
            pytest.raises(BatchFileError, match="No such file"),
            open_batch(str(tmp_path / "nope"), fmt),
        ):
            pass  # pragma: no cover - never entered


def test_count_lines_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("h\n1\n\n  \n2\n3")
    assert count_lines(str(path)) == 4


def test_count_lines_leaves_a_pipe_to_the_batch() -> None:
    # `cat f | klarna-om batch /dev/stdin` on a terminal: counting the lines for the
    # progress bar read the pipe to its end, and the batch then found an empty file.
    read_end, write_end = os.pipe()
    os.write(write_end, b"order_id,captured_amount\no1,100\n")
    os.close(write_end)
    try:
        assert count_lines(f"/dev/fd/{read_end}") is None
        assert os.read(read_end, 100) == b"order_id,captured_amount\no1,100\n"
    finally:
        os.close(read_end)


# -- CSV ---------------------------------------------------------------------------------------

HEADER = (
    "order_id,captured_amount,reference,description,idempotency_key,"
    "shipping_company,shipping_method,tracking_number,tracking_uri\n"
)


def test_csv_rows_become_batch_items(tmp_path: Path) -> None:
    rows = read(
        tmp_path,
        "a.csv",
        HEADER
        + "o1,6000,INV-1,Tomatoes,key-1,DHL,PickUpPoint,T-1,https://t.example/1\n"
        + "o2, 250 ,,,,,,,\n",
    )
    assert rows == [
        BatchItem(
            order_id="o1",
            request=CaptureRequest(
                captured_amount=6000,
                reference="INV-1",
                description="Tomatoes",
                shipping_info=[
                    ShippingInfo(
                        shipping_company="DHL",
                        shipping_method=ShippingMethod.PICK_UP_POINT,
                        tracking_number="T-1",
                        tracking_uri="https://t.example/1",
                    )
                ],
            ),
            idempotency_key="key-1",
        ),
        BatchItem(order_id="o2", request=CaptureRequest(captured_amount=250)),
    ]
    assert rows[0].item_key == "o1:INV-1"  # type: ignore[union-attr]


def test_csv_columns_may_come_in_any_order_and_a_bom_is_ignored(tmp_path: Path) -> None:
    rows = read(tmp_path, "a.csv", "\ufeffcaptured_amount,order_id\n100,o1\n")
    assert rows == [BatchItem(order_id="o1", request=CaptureRequest(captured_amount=100))]


def test_csv_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path: Path) -> None:
    text = 'order_id,captured_amount,description\n\n,,\no1,x,\n\no2,1,"two\nlines"\no3,y,\n'
    rows = read(tmp_path, "a.csv", text)
    assert bad(rows[0]) == (
        "line 4: captured_amount: must be a whole number of minor units (e.g. 1050 for 10.50), "
        "got 'x'"
    )
    # A field cannot span lines: both halves of the broken record are accounted for.
    assert bad(rows[1]).startswith("line 6: a quoted field is not closed on this line")
    assert bad(rows[2]).startswith("line 7: ")
    assert bad(rows[3]).startswith("line 8: captured_amount")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (",100", "line 2: order_id: is required"),
        ("  ,100", "line 2: order_id: is required"),
        ("o1,", "line 2: captured_amount: is required"),
        ("o1,12.50", "line 2: captured_amount: must be a whole number"),
        ("o1,-5", "line 2: captured_amount: must be a whole number"),
        ("o1,1e3", "line 2: captured_amount: must be a whole number"),
        ("o1,300000000", "line 2: captured_amount: must be at most 200000000"),
        ("o1,1," + "r" * 256, "line 2: reference: must be at most 255 characters, got 256"),
        ("o1,1,,,,,Boat", "line 2: shipping_method: unknown value 'Boat'"),
        ("o1,1,,,,DHL" + "L" * 100, "line 2: shipping_company: must be at most 100"),
        ("o1,1,,,,,,,,extra", "line 2: more values than the header has columns"),
    ],
)
def test_csv_bad_lines_name_their_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    [row] = read(tmp_path, "a.csv", HEADER + line + "\n")
    assert bad(row).startswith(message)


def test_csv_blank_lines_before_the_header_are_skipped(tmp_path: Path) -> None:
    # Blank lines are skipped everywhere, but one before the header made an "empty file".
    [row] = read(tmp_path, "a.csv", "\n \r\norder_id,captured_amount\n\no1,100\n")
    assert isinstance(row, BatchItem)
    assert (row.order_id, row.line) == ("o1", 5)


def test_csv_bad_line_keeps_its_order_id(tmp_path: Path) -> None:
    [row] = read(tmp_path, "a.csv", "order_id,captured_amount\no1,x\n")
    assert isinstance(row, BadLine)
    assert (row.line, row.order_id, row.error.field) == (2, "o1", "captured_amount")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("\n  \r\n", "empty file"),
        ("order_id,amount\n", "line 1: unknown column(s) 'amount'"),
        ("\n\norder_id,amount\n", "line 3: unknown column(s) 'amount'"),
        ("order_id,reference\n", "line 1: missing required column(s) captured_amount"),
        (b"order_id,captured_amount\xff\n", "line 1: cannot read the header"),
    ],
)
def test_csv_header_problems_stop_before_any_row(
    tmp_path: Path, text: str | bytes, message: str
) -> None:
    with pytest.raises(BatchFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read(tmp_path, "a.csv", text)


def test_an_unreadable_csv_record_is_refused_with_its_line_and_reading_goes_on(
    tmp_path: Path,
) -> None:
    # csv refuses fields over its size limit; each line is parsed alone, so the next is safe.
    text = "order_id,captured_amount,description\no1,1,ok\no2,1," + "x" * 200_000 + "\no3,1,\n"
    rows = read(tmp_path, "a.csv", text)
    assert isinstance(rows[0], BatchItem)
    assert "line 3: not valid CSV: field larger than field limit" in bad(rows[1])
    assert rows[1].order_id is None  # not CSV: which field is the order is not guessed
    assert isinstance(rows[2], BatchItem)


# -- JSON Lines --------------------------------------------------------------------------------


def test_jsonl_lines_use_klarnas_capture_shape(tmp_path: Path) -> None:
    line = {
        "order_id": "o1",
        "idempotency_key": "k1",
        "captured_amount": 6000,
        "reference": "INV-1",
        "order_lines": [
            {"name": "Tomatoes", "quantity": 1, "unit_price": 6000, "total_amount": 6000}
        ],
        "shipping_info": [{"shipping_company": "DHL", "shipping_method": "Home"}],
        "shipping_delay": 2,
    }
    text = orjson.dumps(line).decode() + "\n\n   \n" + '{"order_id": "o2", "captured_amount": 1}'
    rows = read(tmp_path, "a.jsonl", text)
    assert rows == [
        BatchItem(
            order_id="o1",
            idempotency_key="k1",
            request=CaptureRequest(
                captured_amount=6000,
                reference="INV-1",
                order_lines=[
                    OrderLine(name="Tomatoes", quantity=1, unit_price=6000, total_amount=6000)
                ],
                shipping_info=[ShippingInfo(shipping_company="DHL", shipping_method="Home")],
                shipping_delay=2,
            ),
        ),
        BatchItem(order_id="o2", request=CaptureRequest(captured_amount=1)),
    ]
    assert isinstance(rows[1], BatchItem)
    assert rows[1].idempotency_key is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"order_id": "o1", "captured_amount": 10', "line 1: not valid JSON at column"),
        (b'{"order_id": "\xff"}', "line 1: byte 0xff at column 15 is not valid utf-8"),
        ("[1, 2]", "line 1: expected a JSON object, got an array"),
        ("12", "line 1: expected a JSON object, got a number"),
        ("null", "line 1: expected a JSON object, got null"),
        ('{"captured_amount": 1}', "line 1: order_id: is required (a non-empty string)"),
        ('{"order_id": " ", "captured_amount": 1}', "line 1: order_id: is required"),
        (
            '{"order_id": 7, "captured_amount": 1}',
            "line 1: order_id: must be a string, got a number",
        ),
        (
            '{"order_id": "o", "captured_amount": 1, "idempotency_key": true}',
            "line 1: idempotency_key: must be a string, got a boolean",
        ),
        ('{"order_id": "o"}', "line 1: captured_amount: is required"),
        (
            '{"order_id": "o", "captured_amount": "5"}',
            "line 1: captured_amount: expected int, got str",
        ),
        (
            '{"order_id": "o", "captured_amount": 5.0}',
            "line 1: captured_amount: expected int, got float",
        ),
        ('{"order_id": "o", "captured_amount": -5}', "line 1: captured_amount: must be at least 0"),
        (
            '{"order_id": "o", "captured_amount": 5, "refrence": "x"}',
            "line 1: refrence: unknown field; expected one of captured_amount,",
        ),
        (
            '{"order_id": "o", "captured_amount": 5, "order_lines": [{"name": "n"}]}',
            "line 1: order_lines[0].quantity: is required",
        ),
        (
            '{"order_id": "o", "captured_amount": 5, "order_lines": [{"nmae": "n"}]}',
            "line 1: order_lines[0].nmae: unknown field",
        ),
        (
            '{"order_id": "o", "captured_amount": 5, "order_lines": {}}',
            "line 1: order_lines: expected a JSON array, got dict",
        ),
        (
            '{"order_id": "o", "captured_amount": 5, "order_lines": [{"name": "'
            + "n" * 256
            + '", "quantity": 1, "unit_price": 1, "total_amount": 1}]}',
            "line 1: order_lines[0].name: must be at most 255 characters",
        ),
        (
            '{"order_id": "o", "captured_amount": 5, '
            '"shipping_info": [{"shipping_method": "Boat"}]}',
            "line 1: shipping_info[0].shipping_method: unknown value 'Boat'",
        ),
    ],
)
def test_jsonl_bad_lines_name_their_line_and_field(
    tmp_path: Path, line: str | bytes, message: str
) -> None:
    content = line + (b"\n" if isinstance(line, bytes) else "\n")
    [row] = read(tmp_path, "a.jsonl", content)
    assert bad(row).startswith(message)


def test_jsonl_bad_line_keeps_its_order_id_and_the_next_line_is_read(tmp_path: Path) -> None:
    text = '{"order_id": "o1", "captured_amount": "x"}\n{"order_id": "o2", "captured_amount": 2}\n'
    first, second = read(tmp_path, "a.ndjson", text)
    assert isinstance(first, BadLine)
    assert (first.line, first.order_id, first.error.field) == (1, "o1", "captured_amount")
    assert isinstance(second, BatchItem)


# -- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(BatchFormat))
def test_files_are_read_one_line_at_a_time(tmp_path: Path, fmt: BatchFormat) -> None:
    lines = 20_000
    description = "d" * 200
    path = tmp_path / f"big.{fmt.value}"
    with path.open("w") as file:
        if fmt is BatchFormat.CSV:
            file.write("order_id,captured_amount,description\n")
            file.writelines(f"o{i},{i},{description}\n" for i in range(lines))
        else:
            file.writelines(
                f'{{"order_id": "o{i}", "captured_amount": {i}, "description": "{description}"}}\n'
                for i in range(lines)
            )
    assert path.stat().st_size > 4_000_000
    tracemalloc.start()
    try:
        count = 0
        with open_batch(str(path), fmt) as rows:
            for row in rows:
                assert isinstance(row, BatchItem)
                count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == lines
    assert peak < 1_000_000  # a fraction of the file: nothing holds all of it
