"""Read a batch file lazily, one operation per line: CSV with a header, or JSON Lines.

Each line names its ``operation``: ``capture`` (the default), ``refund``, ``release``
(the remaining authorization), ``extend`` (the authorization time) or ``cancel``.

CSV (``.csv``): a header row, then one operation per row. Columns:

- ``order_id`` (required) -- the Klarna order;
- ``operation`` -- optional; an empty cell is ``capture``;
- ``captured_amount`` -- integer minor units, e.g. ``1050`` for 10.50; required for a
  capture (and as a column when there is no ``operation`` column);
- ``refunded_amount`` -- integer minor units; required for a refund;
- ``reference``, ``description`` -- optional (captures and refunds), at most 255 characters;
- ``idempotency_key`` -- optional; fix the key yourself (a journal makes one otherwise);
- ``shipping_company``, ``shipping_method``, ``tracking_number``, ``tracking_uri`` --
  optional; any of them adds one ``shipping_info`` entry to a capture.

A release, extend or cancel row takes no amount, reference, description or shipping; a
value given for one is an error for that line.

Empty cells count as absent. Unknown and duplicate columns are refused before anything is
sent. Columns are separated by commas; a header separated by semicolons or tabs (Excel in
many locales) is recognised, or pass the ``delimiter``.

JSON Lines (``.jsonl`` / ``.ndjson``): one JSON object per line with ``order_id``, an optional
``operation`` and ``idempotency_key``, and the request in Klarna's JSON shape: for a capture
``captured_amount``, ``reference``, ``description``, ``order_lines``, ``shipping_info``,
``shipping_delay``; for a refund ``refunded_amount``, ``reference``, ``description``,
``order_lines``; nothing more for release, extend and cancel.

Both formats are read one physical line at a time in the given ``encoding`` (default
UTF-8; a byte order mark is accepted), so every line is accounted for: blank lines are
skipped, and a line that cannot become a capture (a missing, malformed or duplicate value, a
field with a line break or a quote left open, bytes that are not in the encoding) is not sent:
it yields a :class:`BadLine` naming its line number and field, and reading goes on with the
next line. Order ids are trimmed of surrounding spaces, as everywhere in the package.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import enum
import functools
import json
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, NamedTuple, TypeAlias, TypeVar

import attrs
import cattrs
import orjson

from .._convert import converter
from .._routes import normalize_id
from ..batch import BatchItem
from ..errors import ValidationError
from ..models import CaptureRequest, OrderLine, RefundRequest, ShippingInfo
from ..operations import (
    CancelOrder,
    ExtendAuthorizationTime,
    Operation,
    OperationRequest,
    ReleaseRemainingAuthorization,
)

__all__ = (
    "CSV_COLUMNS",
    "MAX_LINE_BYTES",
    "BadLine",
    "BadLineError",
    "BatchFileError",
    "BatchFormat",
    "BatchReadError",
    "Line",
    "OpenedLines",
    "Parse",
    "Row",
    "count_lines",
    "detect_format",
    "is_stream",
    "open_batch",
    "open_lines",
)


class BatchFormat(enum.StrEnum):
    """The two batch file formats."""

    CSV = "csv"
    JSONL = "jsonl"


_SHIPPING_COLUMNS = ("shipping_company", "shipping_method", "tracking_number", "tracking_uri")
#: Every column a CSV batch file may have; the first two are required (``captured_amount``
#: only without an ``operation`` column).
CSV_COLUMNS = (
    "order_id",
    "captured_amount",
    "reference",
    "description",
    "idempotency_key",
    *_SHIPPING_COLUMNS,
    "operation",
    "refunded_amount",
)
#: The body-less operations' requests.
_MARKERS: dict[Operation, OperationRequest] = {
    Operation.RELEASE: ReleaseRemainingAuthorization(),
    Operation.EXTEND: ExtendAuthorizationTime(),
    Operation.CANCEL: CancelOrder(),
}
_OPERATIONS = ", ".join(op.value for op in Operation)
_EXTENSIONS = {".csv": BatchFormat.CSV, ".jsonl": BatchFormat.JSONL, ".ndjson": BatchFormat.JSONL}
_MINOR_UNITS = re.compile(r"[0-9]+")
_JSON_EXTRA_KEYS = frozenset({"order_id", "idempotency_key", "operation"})
#: Column separators recognised from the header when none is given.
_DELIMITERS = (",", ";", "\t", "|")
_BOM = "\ufeff"


class BatchFileError(Exception):
    """The file as a whole cannot be read (missing, unknown format, bad header)."""


class BatchReadError(BatchFileError):
    """The file could not be read on from a line (an I/O error): the lines after it are
    not read. Raised where the reading stops: before the first row, or mid-run."""


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


def _bare(error: BadLineError) -> BadLineError:
    """``error`` without its traceback and the error it was raised in: they hold the frames
    that parsed its line, and so the line (up to 4 MiB), until the collector finds them."""
    error.__traceback__ = error.__context__ = error.__cause__ = None
    return error


@attrs.frozen
class BadLine:
    """A line that was not sent, and why."""

    line: int
    #: The order the line names, when it names one.
    order_id: str | None
    error: BadLineError = attrs.field(converter=_bare)


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


def is_stream(path: str) -> bool:
    """Whether ``path`` is no regular file but a stream (a pipe, /dev/stdin, a FIFO): read
    once, by the batch alone. ``OSError`` if it cannot be looked at."""
    return not stat.S_ISREG(os.stat(path).st_mode)


def count_lines(path: str) -> int | None:
    """Non-blank lines in ``path``, streamed: the progress bar's (approximate) total; None
    for a stream (counting it would consume it, or wait for its writer)."""
    if is_stream(path):
        return None
    with open(path, "rb") as file:
        # In pieces of at most MAX_LINE_BYTES (a line without end takes no memory without
        # end); a longer line's pieces count as lines.
        pieces = iter(lambda: file.readline(MAX_LINE_BYTES), b"")
        return sum(1 for piece in pieces if piece.strip())


@contextlib.contextmanager
def open_batch(
    path: str, fmt: BatchFormat, *, encoding: str = "utf-8", delimiter: str | None = None
) -> Iterator[Iterator[Row]]:
    """Open ``path`` and give an iterator of its rows, read one line at a time.

    ``encoding`` must keep ASCII bytes as they are (utf-8, cp1252, latin-1, ...); a UTF-8
    byte order mark is skipped. ``delimiter`` separates CSV columns; by default it is
    recognised from the header (``,``, ``;``, tab or ``|``).

    Problems with the whole file (cannot be opened, an unusable encoding, a CSV header that
    cannot be read or lacks the required columns, has unknown or duplicate ones) raise
    :class:`BatchFileError` here, before any row is read.
    """
    with open_lines(path, fmt, encoding=encoding, delimiter=delimiter) as opened:
        yield _parsed(opened.parse, opened.lines)


class OpenedLines(NamedTuple):
    """A batch file opened by ``open_lines``."""

    #: Makes each line's row (None for a line that gives none).
    parse: Parse
    #: The lines after the header.
    lines: Iterator[Line]
    #: The header's line number (0: the format has none).
    header_line: int = 0


@contextlib.contextmanager
def open_lines(
    path: str,
    fmt: BatchFormat,
    *,
    encoding: str = "utf-8",
    delimiter: str | None = None,
    stop: threading.Event | None = None,
) -> Iterator[OpenedLines]:
    """``open_batch`` in two halves: the file's lines after its header, and the function
    that makes each one's row.

    A stream's reader thread reads the lines; the event loop makes their rows. (Made on the
    thread, beside the loop, they held the interpreter lock the loop waited for: a rerun
    through a pipe cost about a tenth more CPU.) Once ``stop`` is set the lines end at the
    next one (the reader thread stops there). ``BatchFileError`` as ``open_batch``, on
    entry.
    """
    _check_encoding(encoding)
    if delimiter is not None and len(delimiter) != 1:
        raise BatchFileError(f"the delimiter must be one character, got {delimiter!r}")
    with _opened(path, lambda: open(path, "rb")) as binary:
        lines = _text_lines(binary, encoding, stream=is_stream(path), path=path, stop=stop)
        if fmt is BatchFormat.CSV:
            parse, header_line = _csv_parse(path, lines, delimiter)
            yield OpenedLines(parse, lines, header_line)
        else:
            yield OpenedLines(_jsonl_row_of, lines)


def _parsed(parse: Parse, lines: Iterator[Line]) -> Iterator[Row]:
    for line in lines:
        if (row := parse(line)) is not None:
            yield row


_F = TypeVar("_F", IO[str], IO[bytes])


def _opened(path: str, opener: Callable[[], _F]) -> _F:
    try:
        return opener()
    except OSError as error:
        raise BatchFileError(f"{path}: {error.strerror or error}") from error


def _check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise BatchFileError(f"unknown encoding {encoding!r}") from None
    # Lines are split on the newline byte, which needs an ASCII-compatible encoding.
    try:
        compatible = 'a,;"{}\n'.encode(encoding) == b'a,;"{}\n'
    except (UnicodeError, LookupError):  # pragma: no cover - codecs that cannot encode
        compatible = False
    if not compatible:
        raise BatchFileError(
            f"encoding {encoding!r} is not supported: use one that keeps ASCII as is "
            "(utf-8, cp1252, latin-1, ...); save UTF-16 files as UTF-8"
        )


class _Unreadable(ValueError):
    """A line that cannot be read: bytes not in the file's encoding, or far too long."""


# One physical line: its number, and its text without the line ending (or why not).
Line: TypeAlias = tuple[int, "str | _Unreadable"]
#: A line's row: None for a line that gives none (a blank one).
Parse: TypeAlias = Callable[[Line], "Row | None"]

#: The longest line read, in bytes (without its line end). A capture of a thousand order
#: lines takes well under one MiB; a longer line is no batch line (a binary file,
#: ``/dev/zero``), and reading it whole would take memory without end. It is refused, as a
#: line that cannot be read, and skipped a piece at a time.
MAX_LINE_BYTES = 4 * 1024 * 1024
# A line this long ends the reading: no batch file holds one.
_SKIPPED_AT_MOST = 16 * MAX_LINE_BYTES


def _text_lines(
    file: IO[bytes],
    encoding: str,
    *,
    stream: bool = False,
    path: str = "the file",
    stop: threading.Event | None = None,
) -> Iterator[Line]:
    """The file's lines; ``stream``: a last line without a line end is refused, as the
    stream's writer may have stopped in the middle of it (``O1,50`` of ``O1,5000``).
    ``BatchReadError`` when a line cannot be read (an I/O error). They end once ``stop``
    is set (blank lines give no row, so a reader thread would not see it otherwise)."""
    number = 0
    while raw := _read_line(file, MAX_LINE_BYTES + 2, path, number + 1):  # and its CR LF
        if stop is not None and stop.is_set():
            return
        number += 1
        ended = raw.endswith(b"\n")
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        if len(raw) > MAX_LINE_BYTES:
            yield number, _Unreadable(f"the line is longer than {MAX_LINE_BYTES} bytes")
            # Skipped once reported (a header at once refuses the file), up to a point: a
            # line that never ends (/dev/zero) would be read on until the batch is stopped.
            skipped = len(raw)
            while not ended and (rest := _read_line(file, MAX_LINE_BYTES, path, number)):
                ended, skipped = rest.endswith(b"\n"), skipped + len(rest)
                if skipped > _SKIPPED_AT_MOST:
                    raise BatchReadError(
                        f"{path}: line {number} has no end in its first"
                        f" {_SKIPPED_AT_MOST >> 20} MiB: this is no batch file"
                    )
            continue
        if stream and not ended and raw.strip():
            yield (
                number,
                _Unreadable(
                    "the stream ended in the middle of this line (no line end after it), which may"
                    " be cut short: not sent"
                ),
            )
            continue
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as error:
            yield (
                number,
                _Unreadable(
                    f"byte 0x{raw[error.start]:02x} at column {error.start + 1} is not valid "
                    f"{encoding}; if the file was saved in another encoding, pass --encoding "
                    "(e.g. --encoding cp1252)"
                ),
            )
            continue
        yield number, text.removeprefix(_BOM) if number == 1 else text


def _read_line(file: IO[bytes], size: int, path: str, number: int) -> bytes:
    try:
        return file.readline(size)
    except OSError as error:
        raise BatchReadError(
            f"{path}: could not read line {number}: {error.strerror or error}"
        ) from error


# --- CSV -------------------------------------------------------------------------------------


def _csv_parse(path: str, lines: Iterator[Line], delimiter: str | None) -> tuple[Parse, int]:
    """Read the header from ``lines``: the function that makes each later line's row, and
    the header's line number."""
    first = next(lines, None)
    # Blank lines are skipped everywhere, before the header too.
    while first is not None and isinstance(first[1], str) and not first[1].strip():
        first = next(lines, None)
    if first is None:
        _check_header(path, None, ",")
    assert first is not None
    number, text = first
    if isinstance(text, _Unreadable):
        raise BatchFileError(f"{path}: line {number}: cannot read the header: {text}")
    delimiter = delimiter or _guess_delimiter(text)
    try:
        header = [name.strip() for name in _csv_fields(text, delimiter)]
    except ValueError as error:
        raise BatchFileError(f"{path}: line {number}: cannot read the header: {error}") from None
    _check_header(path, header, delimiter, number)
    return functools.partial(_csv_record, header, delimiter), number


def _guess_delimiter(header: str) -> str:
    for delimiter in _DELIMITERS:
        if "order_id" in (name.strip() for name in header.split(delimiter)):
            return delimiter
    return ","


def _csv_fields(text: str, delimiter: str) -> list[str]:
    """The fields of one physical line; a quote left open or a line break is refused."""
    try:
        [fields] = csv.reader([text], delimiter=delimiter, strict=True)
    except csv.Error as error:
        if str(error) == "unexpected end of data":
            raise ValueError(
                "a quoted field is not closed on this line (a field cannot span lines)"
            ) from None
        raise ValueError(f"not valid CSV: {error}") from None
    return fields


def _check_header(path: str, header: Sequence[str] | None, delimiter: str, number: int = 1) -> None:
    if not header:
        raise BatchFileError(f"{path}: empty file; expected a header line with {_columns()}")
    unknown = [name for name in header if name not in CSV_COLUMNS]
    if unknown:
        raise BatchFileError(
            f"{path}: line {number}: unknown column(s) {', '.join(map(repr, unknown))}; "
            f"expected {_columns()}{_delimiter_hint(unknown, delimiter)}"
        )
    for index, name in enumerate(header):
        if name in header[:index]:
            raise BatchFileError(
                f"{path}: line {number}: column {name!r} appears more than once (columns "
                f"{header.index(name) + 1} and {index + 1}); each column may appear only once"
            )
    required = CSV_COLUMNS[:1] if "operation" in header else CSV_COLUMNS[:2]
    missing = [name for name in required if name not in header]
    if missing:
        refunds = "refunded_amount" in header and "captured_amount" in missing
        hint = "; to refund, add an operation column with refund" if refunds else ""
        raise BatchFileError(
            f"{path}: line {number}: missing required column(s) {', '.join(missing)}{hint}; "
            f"expected {_columns()}"
        )


def _columns() -> str:
    return (
        "order_id,captured_amount (required; captured_amount not with an operation column)"
        f" and optionally {','.join(CSV_COLUMNS[2:])}"
    )


def _delimiter_hint(unknown: Sequence[str], delimiter: str) -> str:
    for other in _DELIMITERS:
        if other != delimiter and any(other in name for name in unknown):
            return f"; the columns seem separated by {other!r}: pass --delimiter {other!r}"
    return ""


def _csv_record(header: list[str], delimiter: str, numbered: Line) -> Row | None:
    line, text = numbered
    if isinstance(text, _Unreadable):
        return BadLine(line, None, BadLineError(line, None, str(text)))
    if not text.strip():
        return None  # a blank line
    try:
        fields = _csv_fields(text, delimiter)
    except ValueError as error:
        # Which field is the order is unknown on a line that is not CSV (a quote left
        # open shifts the columns): no order, so the run holds back every later
        # release and cancel rather than guess.
        return BadLine(line, None, BadLineError(line, None, str(error)))
    if not any(value.strip() for value in fields):
        return None  # a line of only separators
    values: dict[str, str | None] = dict(zip(header, fields, strict=False))
    # More values than columns: they are shifted (an unquoted delimiter in a value), so
    # a bad line's order_id cell holds another value; its order is then not guessed.
    # (Fewer values may be trailing empty cells left out, a common way to write CSV.)
    aligned = len(fields) <= len(header)
    broken = next((name for name, value in values.items() if _has_break(value)), None)
    if broken is not None:
        reason = "contains a line break; a field cannot span lines"
        order_id = _clean_order_id(values.get("order_id")) if aligned else None
        return BadLine(line, order_id, BadLineError(line, broken, reason))
    row = _csv_row(
        line, values, extra=fields[len(header) :] or None, operations="operation" in header
    )
    return row if aligned or not isinstance(row, BadLine) else attrs.evolve(row, order_id=None)


def _has_break(value: str | None) -> bool:
    return value is not None and ("\n" in value or "\r" in value)


def _clean_order_id(value: object) -> str | None:
    try:
        return normalize_id("order_id", value)
    except ValidationError:
        return None


def _cell(values: Mapping[str, str | None], column: str) -> str | None:
    # A cell of spaces is empty: "O,5000, " and "O,5000," are one capture, not two.
    value = values.get(column)
    return (value.strip() or None) if value else None


def _csv_row(
    line: int, values: Mapping[str, str | None], *, extra: object, operations: bool = True
) -> Row:
    raw_id = (_cell(values, "order_id") or "").strip() or None
    order_id = _clean_order_id(raw_id)
    try:
        if extra is not None:
            raise BadLineError(line, None, "more values than the header has columns")
        if raw_id is None:
            raise BadLineError(line, "order_id", "is required")
        order_id = normalize_id("order_id", raw_id)
        request = _csv_request(line, values, operations=operations)
        key = _cell(values, "idempotency_key")
        return BatchItem(order_id=order_id, request=request, idempotency_key=key, line=line)
    except BadLineError as error:
        return BadLine(line, order_id, error)
    except ValidationError as error:
        # A CSV user knows the column, not the model path behind it.
        field = error.field.removeprefix("shipping_info[0].")
        return BadLine(line, order_id, BadLineError(line, field, error.reason))


def _operation(line: int, raw: object) -> Operation:
    """The line's operation: absent or empty is a capture; an unknown one is an error."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return Operation.CAPTURE
    if not isinstance(raw, str):
        raise BadLineError(line, "operation", f"must be a string, got {_json_type(raw)}")
    try:
        return Operation(raw.strip().lower())
    except ValueError:
        raise BadLineError(
            line, "operation", f"unknown operation {raw!r}; expected one of {_OPERATIONS}"
        ) from None


def _a(operation: Operation) -> str:
    article = "an" if operation.value[0] in "aeiou" else "a"
    return f"{article} {operation.value}"


def _refuse_cells(
    line: int, operation: Operation, values: Mapping[str, str | None], columns: Sequence[str]
) -> None:
    for column in columns:
        if _cell(values, column) is not None:
            what = "amount" if column.endswith("_amount") else column
            raise BadLineError(line, column, f"{_a(operation)} takes no {what}; leave it empty")


def _csv_request(
    line: int, values: Mapping[str, str | None], *, operations: bool = True
) -> OperationRequest:
    operation = _operation(line, _cell(values, "operation"))
    if operation is Operation.CAPTURE:
        if not operations and _cell(values, "refunded_amount") is not None:
            # Without an operation column every line is a capture: say how to refund.
            raise BadLineError(
                line,
                "refunded_amount",
                "this file has no operation column, so every line is a capture; to refund,"
                " add an operation column with refund on this line",
            )
        _refuse_cells(line, operation, values, ("refunded_amount",))
        return CaptureRequest(
            captured_amount=_amount(line, _cell(values, "captured_amount")),
            reference=_cell(values, "reference"),
            description=_cell(values, "description"),
            shipping_info=_shipping_info(values),
        )
    if operation is Operation.REFUND:
        _refuse_cells(line, operation, values, ("captured_amount", *_SHIPPING_COLUMNS))
        return RefundRequest(
            refunded_amount=_amount(line, _cell(values, "refunded_amount"), "refunded_amount"),
            reference=_cell(values, "reference"),
            description=_cell(values, "description"),
        )
    refused = ("captured_amount", "refunded_amount", "reference", "description")
    _refuse_cells(line, operation, values, (*refused, *_SHIPPING_COLUMNS))
    return _MARKERS[operation]


def _amount(line: int, raw: str | None, column: str = "captured_amount") -> int:
    if raw is None:
        raise BadLineError(line, column, "is required")
    text = raw.strip()
    if not _MINOR_UNITS.fullmatch(text):
        raise BadLineError(
            line,
            column,
            f"must be a whole number of minor units (e.g. 1050 for 10.50), got {raw!r}",
        )
    return int(text)


def _shipping_info(values: Mapping[str, str | None]) -> list[ShippingInfo] | None:
    fields = {column: _cell(values, column) for column in _SHIPPING_COLUMNS}
    if not any(fields.values()):
        return None
    return [ShippingInfo(**fields)]


# --- JSON Lines ------------------------------------------------------------------------------

_REQUEST_FIELDS = {
    Operation.CAPTURE: frozenset(field.name for field in attrs.fields(CaptureRequest)),
    Operation.REFUND: frozenset(field.name for field in attrs.fields(RefundRequest)),
}
_NESTED_FIELDS = {
    "order_lines": frozenset(field.name for field in attrs.fields(OrderLine)),
    "shipping_info": frozenset(field.name for field in attrs.fields(ShippingInfo)),
}


def _jsonl_row_of(numbered: Line) -> Row | None:
    line, text = numbered
    if isinstance(text, _Unreadable):
        return BadLine(line, None, BadLineError(line, None, str(text)))
    return _jsonl_row(line, text) if text.strip() else None


def _jsonl_row(line: int, raw: str) -> Row:
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
        _refuse_duplicate_keys(line, raw)
        order_id = _optional_str(line, data, "order_id")
        if order_id is None or not order_id.strip():
            order_id = None
            raise BadLineError(line, "order_id", "is required (a non-empty string)")
        order_id = _clean_order_id(order_id)
        _refuse_line_breaks(line, "", data)
        operation = _operation(line, data.get("operation"))
        key = _optional_str(line, data, "idempotency_key")
        body = {name: value for name, value in data.items() if name not in _JSON_EXTRA_KEYS}
        _check_known_fields(line, operation, body)
        request = _marker_or_structure(line, operation, body)
        item_id = normalize_id("order_id", data["order_id"])
        return BatchItem(order_id=item_id, request=request, idempotency_key=key or None, line=line)
    except BadLineError as error:
        return BadLine(line, order_id, error)
    except ValidationError as error:
        return BadLine(line, order_id, BadLineError(line, error.field, error.reason))
    except RecursionError:
        # Met by the json module on Python 3.11, by the checks that walk the parsed object
        # on 3.12 and later.
        too_deep = BadLineError(line, None, "is nested too deeply to be a capture")
        return BadLine(line, order_id, too_deep)


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for name, value in pairs:
        if name in result:
            raise _DuplicateKey(name)
        result[name] = value
    return result


def _refuse_duplicate_keys(line: int, raw: str) -> None:
    # orjson keeps the last of two equal keys without a word; a second "captured_amount"
    # in an object is a mistake that would silently change what is captured.
    try:
        json.loads(raw, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as error:
        raise BadLineError(
            line, str(error), "appears more than once in an object; give each field once"
        ) from None


def _refuse_line_breaks(line: int, where: str, value: object) -> None:
    if isinstance(value, str):
        if "\n" in value or "\r" in value:
            raise BadLineError(line, where or None, "contains a line break")
    elif isinstance(value, dict):
        for name, item in value.items():
            _refuse_line_breaks(line, f"{where}.{name}" if where else name, item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_line_breaks(line, f"{where}[{index}]", item)


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


def _check_known_fields(line: int, operation: Operation, body: Mapping[str, object]) -> None:
    # The package's converter ignores unknown keys (Klarna adds fields to its answers), but
    # in a file we write ourselves an unknown key is a typo that would silently drop a value.
    fields = _REQUEST_FIELDS.get(operation)
    if fields is None:
        for name in body:
            what = "amount" if name.endswith("_amount") else name
            raise BadLineError(
                line,
                name,
                f"{_a(operation)} takes no {what}; give only order_id,"
                " operation and idempotency_key",
            )
        return
    _refuse_unknown(line, "", body, fields | _JSON_EXTRA_KEYS)
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


def _marker_or_structure(
    line: int, operation: Operation, body: dict[str, object]
) -> OperationRequest:
    if operation in _MARKERS:
        return _MARKERS[operation]
    if operation is Operation.REFUND:
        return _structure(line, body, RefundRequest)
    return _structure(line, body, CaptureRequest)


_R = TypeVar("_R", CaptureRequest, RefundRequest)


def _structure(line: int, body: dict[str, object], kind: type[_R]) -> _R:
    try:
        request: _R = converter.structure(body, kind)
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
