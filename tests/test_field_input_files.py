"""Field reports: batch files from the real world, read line by line and fully accounted for."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import ServedFake, cli, json_lines, outcomes_by_order, served, write  # noqa: F401

from klarna_om_async import BatchItem, CaptureRequest
from klarna_om_async.cli._batchfile import (
    BadLine,
    BatchFileError,
    BatchFormat,
    Row,
    open_batch,
)


def read(path: Path, content: str | bytes, **options: str) -> list[Row]:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    fmt = BatchFormat.CSV if path.suffix == ".csv" else BatchFormat.JSONL
    with open_batch(str(path), fmt, **options) as rows:
        return list(rows)


def bad_lines(rows: list[Row]) -> dict[int, str]:
    return {row.line: str(row.error) for row in rows if isinstance(row, BadLine)}


def items(rows: list[Row]) -> list[BatchItem]:
    return [row for row in rows if isinstance(row, BatchItem)]


def summary(stdout: str) -> dict[str, object]:
    [last] = [line for line in json_lines(stdout) if line["type"] == "summary"]
    return last


# -- item 7: duplicate columns and keys ------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "order_id,captured_amount,captured_amount",
        "order_id,captured_amount, captured_amount",
        "order_id;captured_amount;reference;captured_amount",
    ],
)
def test_a_duplicate_csv_column_is_refused_before_any_row(tmp_path: Path, header: str) -> None:
    with pytest.raises(BatchFileError, match="column 'captured_amount' appears more than once"):
        read(tmp_path / "a.csv", header + "\nORDER,100,200\n")


def test_batch_with_a_duplicate_column_sends_nothing(
    served: ServedFake,  # noqa: F811
    tmp_path: Path,
) -> None:
    order_id = served.add_order(1000)
    path = write(
        tmp_path, "a.csv", f"order_id,captured_amount,captured_amount\n{order_id},100,200\n"
    )
    result = cli(["batch", path, "--no-journal"], served)
    assert result.exit_code == 2, result.output
    assert "'captured_amount' appears more than once" in result.output
    assert served.requests_for(order_id) == 0


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"order_id": "o1", "captured_amount": 100, "captured_amount": 200}', "captured_amount"),
        ('{"order_id": "o1", "order_id": "o2", "captured_amount": 100}', "order_id"),
        (
            '{"order_id": "o1", "captured_amount": 1, "order_lines": [{"name": "a", "name": "b",'
            ' "quantity": 1, "unit_price": 1, "total_amount": 1}]}',
            "name",
        ),
    ],
)
def test_a_duplicate_jsonl_key_refuses_its_line(tmp_path: Path, line: str, field: str) -> None:
    rows = read(tmp_path / "a.jsonl", line + '\n{"order_id": "o3", "captured_amount": 3}\n')
    assert bad_lines(rows) == {
        1: f"line 1: {field}: appears more than once in an object; give each field once"
    }
    assert [item.order_id for item in items(rows)] == ["o3"]


# -- item 8: no field spans lines; every physical line is accounted for -----------------------


def test_an_unterminated_quote_refuses_only_its_own_line(tmp_path: Path) -> None:
    text = 'order_id,captured_amount,reference\nORDER_A,100,"abc\nORDER_B,100,x\n'
    rows = read(tmp_path / "a.csv", text)
    assert bad_lines(rows) == {
        2: "line 2: a quoted field is not closed on this line (a field cannot span lines)"
    }
    # Which field is the order is unknown on a line that is not CSV: no guess (the runner
    # then holds back every later release and cancel).
    assert rows[0].order_id is None
    assert items(rows) == [
        BatchItem(order_id="ORDER_B", request=CaptureRequest(captured_amount=100, reference="x"))
    ]


@pytest.mark.parametrize(
    ("content", "line", "field"),
    [
        ('order_id,captured_amount,reference\no1,1,"a\rb"\no2,2,\n', 2, "reference"),
        (
            '{"order_id": "o1", "captured_amount": 1, "reference": "a\\nb"}\n{"order_id": "o2", '
            '"captured_amount": 2}\n',
            1,
            "reference",
        ),
        (
            '{"order_id": "o1", "captured_amount": 1, "shipping_info": [{"tracking_number": '
            '"1\\r"}]}\n{"order_id": "o2", "captured_amount": 2}\n',
            1,
            "shipping_info[0].tracking_number",
        ),
    ],
)
def test_no_field_may_contain_a_line_break(
    tmp_path: Path, content: str, line: int, field: str
) -> None:
    name = "a.csv" if content.startswith("order_id") else "a.jsonl"
    rows = read(tmp_path / name, content)
    [message] = bad_lines(rows).values()
    assert message.startswith(f"line {line}: {field}: contains a line break")
    assert [item.order_id for item in items(rows)] == ["o2"]


def test_batch_summary_accounts_for_every_line_of_a_broken_csv(
    served: ServedFake,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, b, c = (served.add_order(1000) for _ in range(3))
    text = f'order_id,captured_amount,reference\n{a},100,"abc\n{b},100,x\nstray"\n{c},100,\n'
    result = cli(["batch", write(tmp_path, "a.csv", text), "--json", "--no-journal"], served)
    assert result.exit_code == 1, result.output
    outcomes = [line for line in json_lines(result.stdout) if line["type"] == "outcome"]
    assert sorted(o["line"] for o in outcomes if o["status"] == "refused") == [2, 4]
    assert {o["order_id"] for o in outcomes if o["status"] == "captured"} == {b, c}
    assert served.booked(a) == 0
    assert summary(result.stdout)["items"] == 4  # lines 2-5: one outcome each


# -- item 9: encoding errors name their line and the others go on -----------------------------


def test_an_undecodable_line_is_refused_with_its_own_number(tmp_path: Path) -> None:
    lines = [f"o{i},{i + 1},ref-{i}" for i in range(1, 1002)]
    lines[900] = "o901,901,caf\xe9"  # physical line 902, counting the header
    content = ("order_id,captured_amount,reference\n" + "\n".join(lines) + "\n").encode("latin-1")
    rows = read(tmp_path / "a.csv", content)
    assert len(rows) == 1001
    [(line, message)] = bad_lines(rows).items()
    assert line == 902
    assert "byte 0xe9 at column 13 is not valid utf-8" in message
    assert "--encoding" in message


def test_an_undecodable_jsonl_line_is_refused_and_the_rest_read(tmp_path: Path) -> None:
    content = b'{"order_id": "o1", "captured_amount": 1}\n{"order_id": "o\xff"}\n\n' + (
        b'{"order_id": "o4", "captured_amount": 4}\n'
    )
    rows = read(tmp_path / "a.jsonl", content)
    assert list(bad_lines(rows)) == [2]
    assert "byte 0xff at column 16 is not valid utf-8" in bad_lines(rows)[2]
    assert "--encoding" in bad_lines(rows)[2]
    assert [item.order_id for item in items(rows)] == ["o1", "o4"]


def test_encoding_option_reads_a_cp1252_file(
    served: ServedFake,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, b = served.add_order(1000), served.add_order(1000)
    path = tmp_path / "a.csv"
    path.write_bytes(
        f"order_id,captured_amount,reference\n{a},100,Café\n{b},100,ok\n".encode("cp1252")
    )
    plain = cli(["batch", str(path), "--json", "--no-journal"], served)
    assert plain.exit_code == 1, plain.output
    outcomes = outcomes_by_order(plain.stdout)
    assert outcomes[b]["status"] == "captured"
    refused = [o for o in json_lines(plain.stdout) if o.get("status") == "refused"]
    assert refused[0]["line"] == 2
    assert "--encoding" in refused[0]["error"]
    again = cli(["batch", str(path), "--encoding", "cp1252", "--no-journal"], served)
    assert again.exit_code == 0, again.output
    [capture] = served.do(lambda: served.fake.captures(a))
    assert capture.reference == "Café"


def test_an_unusable_encoding_is_an_input_error(tmp_path: Path) -> None:
    for encoding, message in [("klingon", "unknown encoding"), ("utf-16", "not supported")]:
        with pytest.raises(BatchFileError, match=message):
            read(tmp_path / "a.csv", "order_id,captured_amount\n", encoding=encoding)


# -- item 10: one normalisation for CSV, JSONL and the single commands ------------------------


def test_a_bom_is_accepted_in_jsonl_as_in_csv(tmp_path: Path) -> None:
    rows = read(tmp_path / "a.jsonl", '\ufeff{"order_id": "o1", "captured_amount": 1}\n')
    assert items(rows) == [BatchItem(order_id="o1", request=CaptureRequest(captured_amount=1))]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("a.csv", "order_id;captured_amount\n o1;1\n"),
        ("a.jsonl", '{"order_id": " o1\\t", "captured_amount": 1}\n'),
    ],
)
def test_order_ids_are_trimmed_in_every_format(tmp_path: Path, name: str, content: str) -> None:
    assert [item.order_id for item in items(read(tmp_path / name, content))] == ["o1"]


@pytest.mark.parametrize(
    ("content", "options"),
    [
        ("order_id;captured_amount;reference\no1;100;a,b\n", {}),
        ("order_id\tcaptured_amount\treference\no1\t100\ta,b\n", {}),
        ("order_id;captured_amount;reference\no1;100;a,b\n", {"delimiter": ";"}),
    ],
)
def test_semicolon_and_tab_separated_files_are_read(
    tmp_path: Path, content: str, options: dict[str, str]
) -> None:
    rows = read(tmp_path / "a.csv", content, **options)
    assert items(rows) == [
        BatchItem(order_id="o1", request=CaptureRequest(captured_amount=100, reference="a,b"))
    ]


def test_a_wrong_delimiter_gets_a_hint(tmp_path: Path) -> None:
    with pytest.raises(BatchFileError, match="pass --delimiter ';'"):
        read(tmp_path / "a.csv", "order_id;captured_amount\no1;1\n", delimiter=",")


def test_batch_reads_a_semicolon_csv_and_jsonl_ids_with_spaces(
    served: ServedFake,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, b = served.add_order(1000), served.add_order(1000)
    csv_path = write(tmp_path, "a.csv", f"\ufefforder_id;captured_amount\n {a} ;100\n")
    result = cli(["batch", csv_path, "--no-journal"], served)
    assert result.exit_code == 0, result.output
    jsonl = write(tmp_path, "b.jsonl", f'\ufeff{{"order_id": " {b} ", "captured_amount": 100}}\n')
    result = cli(["batch", jsonl, "--no-journal", "--json"], served)
    assert result.exit_code == 0, result.output
    assert (served.booked(a), served.booked(b)) == (1, 1)
    assert served.posts(b)
    assert served.requests_for(f" {b}") == 0
