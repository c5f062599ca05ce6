"""Read a batch file lazily, one capture per line: CSV with a header, or JSON Lines.

CSV (``.csv``): a header row, then one capture per row. Columns:

- ``order_id`` (required) -- the Klarna order to capture;
- ``captured_amount`` (required) -- integer minor units, e.g. ``1050`` for 10.50;
- ``reference``, ``description`` -- optional, at most 255 characters;
- ``idempotency_key`` -- optional; fix the key yourself (a journal makes one otherwise);
- ``shipping_company``, ``shipping_method``, ``tracking_number``, ``tracking_uri`` --
  optional; any of them adds one ``shipping_info`` entry to the capture.

Empty cells count as absent. Unknown columns are refused before anything is sent.

JSON Lines (``.jsonl`` / ``.ndjson``): one JSON object per line with ``order_id``, an optional
``idempotency_key``, and the capture in Klarna's JSON shape: ``captured_amount``,
``reference``, ``description``, ``order_lines``, ``shipping_info``, ``shipping_delay``.

Blank lines are skipped in both formats. A line that cannot become a capture (a missing or
malformed value) is not sent: it yields a :class:`BadLine` naming its line number and field,
and reading goes on with the next line.
"""

from __future__ import annotations

import contextlib
import csv
import enum
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, TypeAlias, TypeVar

import attrs
import cattrs
import orjson

from .._convert import converter
from ..batch import BatchItem
from ..errors import ValidationError
from ..models import CaptureRequest, OrderLine, ShippingInfo

__all__ = (
    "CSV_COLUMNS",
    "BadLine",
    "BadLineError",
    "BatchFileError",
    "BatchFormat",
    "Row",
    "count_lines",
    "detect_format",
    "open_batch",
)


class BatchFormat(enum.StrEnum):
    """The two batch file formats."""

    CSV = "csv"
    JSONL = "jsonl"


_SHIPPING_COLUMNS = ("shipping_company", "shipping_method", "tracking_number", "tracking_uri")
#: Every column a CSV batch file may have; the first two are required.
CSV_COLUMNS = (
    "order_id",
    "captured_amount",
    "reference",
    "description",
    "idempotency_key",
    *_SHIPPING_COLUMNS,
)
_EXTENSIONS = {".csv": BatchFormat.CSV, ".jsonl": BatchFormat.JSONL, ".ndjson": BatchFormat.JSONL}
_MINOR_UNITS = re.compile(r"[0-9]+")
_JSON_EXTRA_KEYS = frozenset({"order_id", "idempotency_key"})


class BatchFileError(Exception):
    """The file as a whole cannot be read (missing, unknown format, bad header)."""


class BadLineError(ValueError):
    """One line cannot become a capture; ``str()`` is ``line N: field: reason``."""

    def __init__(self, line: int, field: str | None, reason: str) -> None:
        where = f"{field}: " if field else ""
        super().__init__(f"line {line}: {where}{reason}")
        #: 1-based line number in the file (for CSV, the line the record ends on).
        self.line = line
        #: The offending column or JSON path, if one is to blame.
        self.field = field
        #: What is wrong with it.
        self.reason = reason


@attrs.frozen
class BadLine:
    """A line that was not sent, and why."""

    line: int
    #: The order the line names, when it names one.
    order_id: str | None
    error: BadLineError


Row: TypeAlias = BatchItem | BadLine


def detect_format(path: str, explicit: BatchFormat | str | None = None) -> BatchFormat:
    """The format to read ``path`` as: ``explicit`` if given, else from its extension."""
    if explicit is not None:
        return BatchFormat(explicit)
    suffix = os.path.splitext(path)[1].lower()
    try:
        return _EXTENSIONS[suffix]
    except KeyError:
        raise BatchFileError(
            f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; "
            "use .csv, .jsonl or .ndjson, or pass --format"
        ) from None


def count_lines(path: str) -> int:
    """Non-blank lines in ``path``, streamed: the progress bar's (approximate) total."""
    with open(path, "rb") as file:
        return sum(1 for line in file if line.strip())


@contextlib.contextmanager
def open_batch(path: str, fmt: BatchFormat) -> Iterator[Iterator[Row]]:
    """Open ``path`` and give an iterator of its rows, read one line at a time.

    Problems with the whole file (cannot be opened, CSV header without the required columns
    or with unknown ones) raise :class:`BatchFileError` here, before any row is read.
    """
    if fmt is BatchFormat.CSV:
        # utf-8-sig: spreadsheets often save a byte order mark; newline="" is csv's rule.
        with _opened(path, lambda: open(path, encoding="utf-8-sig", newline="")) as text:
            yield _csv_rows(path, text)
    else:
        with _opened(path, lambda: open(path, "rb")) as binary:
            yield _jsonl_rows(binary)


_F = TypeVar("_F", IO[str], IO[bytes])


def _opened(path: str, opener: Callable[[], _F]) -> _F:
    try:
        return opener()
    except OSError as error:
        raise BatchFileError(f"{path}: {error.strerror or error}") from error


# --- CSV -------------------------------------------------------------------------------------


def _csv_rows(path: str, file: IO[str]) -> Iterator[Row]:
    reader = csv.DictReader(file)
    try:
        header = reader.fieldnames
    except (csv.Error, UnicodeDecodeError) as error:
        raise BatchFileError(f"{path}: line 1: cannot read the header: {error}") from error
    _check_header(path, header)
    return _csv_records(path, reader)


def _check_header(path: str, header: Sequence[str] | None) -> None:
    if not header:
        raise BatchFileError(f"{path}: empty file; expected a header line with {_columns()}")
    unknown = [name for name in header if name not in CSV_COLUMNS]
    if unknown:
        raise BatchFileError(
            f"{path}: line 1: unknown column(s) {', '.join(map(repr, unknown))}; "
            f"expected {_columns()}"
        )
    missing = [name for name in CSV_COLUMNS[:2] if name not in header]
    if missing:
        raise BatchFileError(
            f"{path}: line 1: missing required column(s) {', '.join(missing)}; "
            f"expected {_columns()}"
        )


def _columns() -> str:
    return f"order_id,captured_amount (required) and optionally {','.join(CSV_COLUMNS[2:])}"


def _csv_records(path: str, reader: csv.DictReader[str]) -> Iterator[Row]:
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as error:
            # The reader cannot find where the next record starts, so the rest is unsafe.
            # (DictReader.line_num only moves on success; its inner reader's is current.)
            raise BatchFileError(f"{path}: line {reader.reader.line_num}: {error}") from error
        values = {key: value for key, value in record.items() if key is not None}
        if not any(value and value.strip() for value in values.values()) and None not in record:
            continue  # a blank line, or one of only commas
        yield _csv_row(reader.line_num, values, extra=record.get(None))


def _cell(values: Mapping[str, str | None], column: str) -> str | None:
    value = values.get(column)
    return value if value else None


def _csv_row(line: int, values: Mapping[str, str | None], *, extra: object) -> Row:
    order_id = (_cell(values, "order_id") or "").strip() or None
    try:
        if extra is not None:
            raise BadLineError(line, None, "more values than the header has columns")
        if order_id is None:
            raise BadLineError(line, "order_id", "is required")
        request = CaptureRequest(
            captured_amount=_amount(line, _cell(values, "captured_amount")),
            reference=_cell(values, "reference"),
            description=_cell(values, "description"),
            shipping_info=_shipping_info(values),
        )
        key = _cell(values, "idempotency_key")
        return BatchItem(order_id=order_id, request=request, idempotency_key=key)
    except BadLineError as error:
        return BadLine(line, order_id, error)
    except ValidationError as error:
        # A CSV user knows the column, not the model path behind it.
        field = error.field.removeprefix("shipping_info[0].")
        return BadLine(line, order_id, BadLineError(line, field, error.reason))


def _amount(line: int, raw: str | None) -> int:
    if raw is None:
        raise BadLineError(line, "captured_amount", "is required")
    text = raw.strip()
    if not _MINOR_UNITS.fullmatch(text):
        raise BadLineError(
            line,
            "captured_amount",
            f"must be a whole number of minor units (e.g. 1050 for 10.50), got {raw!r}",
        )
    return int(text)


def _shipping_info(values: Mapping[str, str | None]) -> list[ShippingInfo] | None:
    fields = {column: _cell(values, column) for column in _SHIPPING_COLUMNS}
    if not any(fields.values()):
        return None
    return [ShippingInfo(**fields)]


# --- JSON Lines ------------------------------------------------------------------------------

_REQUEST_FIELDS = frozenset(field.name for field in attrs.fields(CaptureRequest))
_NESTED_FIELDS = {
    "order_lines": frozenset(field.name for field in attrs.fields(OrderLine)),
    "shipping_info": frozenset(field.name for field in attrs.fields(ShippingInfo)),
}


def _jsonl_rows(file: IO[bytes]) -> Iterator[Row]:
    for line, raw in enumerate(file, start=1):
        if raw.strip():
            yield _jsonl_row(line, raw)


def _jsonl_row(line: int, raw: bytes) -> Row:
    order_id: str | None = None
    try:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            # orjson counts within the line it was given, so only the column is worth saying.
            reason = f"not valid JSON at column {error.colno}: {error.msg}"
            raise BadLineError(line, None, reason) from None
        if not isinstance(data, dict):
            raise BadLineError(line, None, f"expected a JSON object, got {_json_type(data)}")
        order_id = _optional_str(line, data, "order_id")
        if order_id is None or not order_id.strip():
            order_id = None
            raise BadLineError(line, "order_id", "is required (a non-empty string)")
        key = _optional_str(line, data, "idempotency_key")
        body = {name: value for name, value in data.items() if name not in _JSON_EXTRA_KEYS}
        _check_known_fields(line, body)
        request = _structure(line, body)
        return BatchItem(order_id=order_id, request=request, idempotency_key=key or None)
    except BadLineError as error:
        return BadLine(line, order_id, error)
    except ValidationError as error:
        return BadLine(line, order_id, BadLineError(line, error.field, error.reason))


def _optional_str(line: int, data: Mapping[str, object], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise BadLineError(line, name, f"must be a string, got {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _check_known_fields(line: int, body: Mapping[str, object]) -> None:
    # The package's converter ignores unknown keys (Klarna adds fields to its answers), but
    # in a file we write ourselves an unknown key is a typo that would silently drop a value.
    _refuse_unknown(line, "", body, _REQUEST_FIELDS | _JSON_EXTRA_KEYS)
    for name, known in _NESTED_FIELDS.items():
        items = body.get(name)
        if isinstance(items, list):
            for index, item in enumerate(items):
                if isinstance(item, dict):
                    _refuse_unknown(line, f"{name}[{index}].", item, known)


def _refuse_unknown(
    line: int, where: str, data: Mapping[str, object], known: frozenset[str]
) -> None:
    for name in data:
        if name not in known:
            raise BadLineError(
                line, f"{where}{name}", f"unknown field; expected one of {', '.join(sorted(known))}"
            )


def _structure(line: int, body: dict[str, object]) -> CaptureRequest:
    try:
        request: CaptureRequest = converter.structure(body, CaptureRequest)
    except ValidationError as error:  # pragma: no cover - only if cattrs stops wrapping it
        raise BadLineError(line, error.field, error.reason) from None
    except cattrs.BaseValidationError as error:
        problems = cattrs.transform_error(error, format_exception=_format_problem)
        field, reason = _split_problem(problems[0])
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BadLineError(line, field, reason + more) from None
    return request


# A marker that cannot occur in a message, to carry a ValidationError's own field through
# cattrs' "message @ $.path" strings.
_FIELD_MARK = "\x00"


def _format_problem(error: BaseException, _type: object) -> str:
    if isinstance(error, ValidationError):
        return f"{_FIELD_MARK}{error.field}{_FIELD_MARK}{error.reason}"
    if isinstance(error, KeyError):
        return "is required"
    return str(error)


def _split_problem(problem: str) -> tuple[str | None, str]:
    message, _, path = problem.rpartition(" @ $")
    path = path.lstrip(".")
    if message.startswith(_FIELD_MARK):
        field, _, message = message[1:].partition(_FIELD_MARK)
        path = f"{path}.{field}" if path else field
    return path or None, message
