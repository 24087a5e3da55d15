"""Every format usermgr writes (table, json, jsonl, csv, one value a line) and reads back
(csv, jsonl for `import`), so that each encoding rule lives in one place.

Data goes to standard output, streamed row by row; `table` sizes its columns from the
first TABLE_WINDOW rows. Stdlib and usermgr.errors only at import time; tabulate
loads on use.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from types import NoneType, UnionType
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO, get_args, get_origin

from usermgr.contract import UNPRINTABLE_CATEGORIES
from usermgr.errors import DatabaseUnavailable, InvalidInput, UnreadableBoolean, UnreadableTimestamp, cut_repr

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

USER_FORMATS = ("table", "json", "jsonl", "csv", "email", "id")
DATA_FORMATS = ("table", "json", "jsonl", "csv")
IMPORT_FORMATS = ("csv", "jsonl")
LIST_SEPARATOR = ";"  # how CSV joins a list (roles); role names cannot contain it

# CSV injection (OWASP): a spreadsheet runs a cell that starts with one of these as a
# formula, so CSV output writes such a cell with CSV_GUARD before it, and a cell that
# already starts with CSV_GUARD gets one too, so that reading can take exactly one off.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
CSV_GUARD = "'"
_GUARDED_STARTS = (*FORMULA_STARTS, CSV_GUARD)


def _not_text(value: bytes) -> DatabaseUnavailable:
    """Bytes where text belongs (SQLite keeps a BLOB in any column): no format can write them
    as the text they should be, so every one refuses them, naming the value cut short."""
    return DatabaseUnavailable(
        f"the database holds bytes where text belongs ({cut_repr(value)}): correct that row with SQL"
        " or restore a backup"
    )


def stored_truth(value: Any) -> bool | None:
    """A true/false value as stored: SQLite's 0 or 1 (or a bool, as PostgreSQL's driver gives
    it), None for NULL; anything else SQLite kept there is UnreadableBoolean. The one reading
    of a stored bool: database.StrictBoolean and the list fast path both call it."""
    if value is None or value.__class__ is bool:
        return value  # type: ignore[no-any-return]
    if value.__class__ is int and (value == 0 or value == 1):
        return value == 1
    raise UnreadableBoolean(value)


def _iso(value: object) -> str:
    """Timestamps in JSON: ISO 8601 with their UTC offset."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        raise _not_text(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _text(value: object) -> str:
    """A value that is not None, a bool, a list or a datetime as a CSV or table cell."""
    if isinstance(value, bytes):
        raise _not_text(value)
    return str(value)


# One encoder for every line: the C encoder calls `_iso` only for timestamps.
_JSON = json.JSONEncoder(ensure_ascii=False, default=_iso)


def _cell(value: object, list_separator: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return list_separator.join(map(_text, value))
    if isinstance(value, datetime):
        return value.isoformat()
    return _text(value)


def _json_line(record: dict[str, Any]) -> str:
    return _JSON.encode(record)


def write_records(
    records: Iterable[dict[str, Any]],
    fmt: str,
    fields: Sequence[str],
    out: TextIO | None = None,
    *,
    csv_guard: bool = True,
) -> int:
    """Write records in `fmt`, with `fields` as the columns; returns how many were written.

    `csv_guard=False` writes CSV cells as they are, formulas included (see `guard_cell`).
    """
    out = out or sys.stdout
    if fmt == "csv":
        return _write_csv(records, fields, out, guard=csv_guard)
    return _WRITERS[fmt](records, fields, out)


def _each(records: Iterable[dict[str, Any]], write: Callable[[dict[str, Any]], object]) -> int:
    """Write every record as it comes (streaming); returns how many there were."""
    count = 0
    for record in records:
        write(record)
        count += 1
    return count


def _picker(fields: Sequence[str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Records reduced to `fields`, in their order; a record that already is just that
    (as the service's are) passes as it is, which saves a dict a row on large lists."""
    wanted = list(fields)

    def pick(record: dict[str, Any]) -> dict[str, Any]:
        return record if list(record) == wanted else {field: record.get(field) for field in wanted}

    return pick


def _write_jsonl(records: Iterable[dict[str, Any]], fields: Sequence[str], out: TextIO) -> int:
    pick = _picker(fields)
    return _each(records, lambda record: out.write(_json_line(pick(record)) + "\n"))


def _write_json(records: Iterable[dict[str, Any]], fields: Sequence[str], out: TextIO) -> int:
    separators = iter(["[\n  "])
    pick = _picker(fields)

    def write(record: dict[str, Any]) -> None:
        out.write(next(separators, ",\n  ") + _json_line(pick(record)))

    count = _each(records, write)
    out.write("\n]\n" if count else "[]\n")
    return count


_ROW_CHUNK = 1000
"""Rows encoded before one write: large writes, bounded memory."""


def _json_value(value: Any) -> str:
    """A value that is not None, str, int or bool as _JSON writes it: an empty list directly
    (most users have no role), the rest (roles, datetimes...) through _JSON itself."""
    return "[]" if value.__class__ is list and not value else _JSON.encode(value)


def _json_list(value: Any) -> str:
    """A list field's value that is not None as _JSON writes it: a list of text (the roles)
    joined directly, a third of _JSON's cost; anything else through `_json_value`."""
    if value.__class__ is list:
        try:
            return "[" + ", ".join(map(json.encoder.encode_basestring, value)) + "]"
        except TypeError:  # an item that is not text
            pass
    return _json_value(value)


_UNPARSED = datetime.min.replace(tzinfo=UTC)


def _parsed(text: str) -> datetime:
    """datetime.fromisoformat, text that is no time an aware datetime: the row encoder then
    takes it to `_json_time`, which says what it is (UnreadableTimestamp)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return _UNPARSED


def utc_iso(text: str) -> str:
    """A timestamp stored as text (SQLite keeps usermgr's as naive UTC ISO 8601,
    `2026-01-02 09:00:00.000000`) as the record writes it, datetime.isoformat's
    `2026-01-02T09:00:00+00:00`: naive taken as UTC, a time with an offset moved to UTC (what
    reading it through database.UtcDateTime gives). Text that is no time, or none in UTC's
    range, is UnreadableTimestamp, as that read says. (The JSON row encoder cuts the stored
    layout inline instead: see `_ENCODE_AS`.)"""
    try:
        moment = datetime.fromisoformat(text)
        return (moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)).isoformat()
    except (ValueError, OverflowError):
        raise UnreadableTimestamp(text) from None


def _json_time(value: Any) -> str:
    """A timestamp that is not None as JSON: text through `utc_iso`, a datetime by its
    isoformat (what _JSON's default writes, without its encoder's set-up a value); anything
    else (a number, bytes) is no timestamp (`_as_time`)."""
    if value.__class__ is str:
        return json.encoder.encode_basestring(utc_iso(value))
    return json.encoder.encode_basestring(_as_time(value).isoformat())


def _json_truth(value: Any) -> str:
    """A stored true/false value other than SQLite's 0 or 1 as JSON (`stored_truth`)."""
    truth = stored_truth(value)
    return "null" if truth is None else "true" if truth else "false"


def _kind(declared: object) -> type:
    """The class a contract type (contract.USER_RECORD's: `int`, `str | None`, `list[str]`,
    `datetime`...) names, None aside; `object` for no type or a union of several."""
    options = get_args(declared) if isinstance(declared, UnionType) else (declared,)
    classes = [get_origin(option) or option for option in options if option is not NoneType]
    return classes[0] if len(classes) == 1 and isinstance(classes[0], type) else object


# The expression that encodes value {v} in a row encoder, by its field's declared class. Any
# value encodes as _JSON would (`_ANY`); each class first tries its usual value, and a field
# of class bool, list or datetime also takes the compact forms `write_rows` names.
_ANY = (
    "text({v}) if {v}.__class__ is str else 'null' if {v} is None else number({v}) if {v}.__class__ is int"
    " else ('true' if {v} else 'false') if {v}.__class__ is bool else other({v})"
)
_ENCODE_AS = {
    int: "{v} if {v}.__class__ is int else " + _ANY,  # the f-string writes an int as int.__repr__ does
    bool: "('true' if {v} else 'false') if {v}.__class__ is int and ({v} == 1 or {v} == 0) else truth({v})",
    list: "'[]' if {v} is None else names({v})",
    # Text in SQLite's layout (see utc_iso) cut inline. The layout's shape is not enough: `parse`
    # (datetime.fromisoformat, in C) checks that it is a time without an offset (`.123+01` is as
    # long) on a calendar date (`{v}[7]`: not `2026-W10-3`), and raises ValueError for text that
    # is none (`write_rows` then says which). Text it takes in this shape is ASCII digits and
    # `- :.`, which JSON writes as they are: no escaping to look for. Any other value through
    # `_json_time`.
    datetime: "'null' if {v} is None else f'{{quote}}{{{v}[:10]}}T{{{v}[11:26]}}{{utc}}' if {v}.__class__ is str"
    " and len({v}) == 26 and {v}[10] == ' ' and {v}[19] == '.' and {v}[20:] != '000000' and {v}[7] == '-'"
    " and parse({v}).tzinfo is None else time({v})",
}


def _row_encoder(
    fields: Sequence[str], types: Mapping[str, object], parse: Callable[[str], datetime] = datetime.fromisoformat
) -> Callable[[Sequence[Any]], str]:
    """A row of values in `fields`' order as the JSON object `_json_line` writes for the same
    record, byte for byte, at a fraction of its cost: one f-string made for these fields (as
    collections.namedtuple makes its class), with each key encoded once and each value by the
    expression its field's type in `types` picks (`_ENCODE_AS`): most values inline, the rest
    by `_json_value`, `_json_list` and `_json_time`. The generated source holds only variable names and
    those fixed expressions; keys and values are never part of it. `parse`: how a stored-layout
    timestamp is checked (see _ENCODE_AS; `_parsed` never raises)."""
    keys = {f"k{at}": ("{" if at == 0 else ", ") + _JSON.encode(field) + ": " for at, field in enumerate(fields)}
    names = [f"v{at}" for at in range(len(fields))]
    body = "".join(
        f"{{k{at}}}{{{_ENCODE_AS.get(_kind(types.get(field)), _ANY).format(v=name)}}}"
        for at, (field, name) in enumerate(zip(fields, names, strict=True))
    )
    source = f'def encode(row):\n    {", ".join(names)}, = row\n    return f"{body}}}}}"\n'
    namespace: dict[str, Any] = {
        **keys,
        "text": json.encoder.encode_basestring,
        "number": int.__repr__,
        "other": _json_value,
        "names": _json_list,
        "time": _json_time,
        "truth": _json_truth,
        "parse": parse,
        "utc": '+00:00"',
        "quote": '"',
    }
    exec(source, namespace)  # the source holds indices and fixed expressions only (see above)
    return namespace["encode"]


def _as_time(value: Any) -> Any:
    """A timestamp as the record holds it: a datetime, None, or text as `utc_iso` writes it;
    a stored number or bytes is no timestamp (database.UtcDateTime refuses it alike)."""
    if value.__class__ is str:
        return utc_iso(value)
    if value is None or isinstance(value, datetime):
        return value
    raise UnreadableTimestamp(value)


_RECORD_FORM = {bool: stored_truth, datetime: _as_time}  # a list as None: every cell writes it as it writes []


def _record_maker(fields: Sequence[str], types: Mapping[str, object]) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """A row as the record `write_records` takes: each compact form (see `write_rows`) as the
    record's own value (a datetime given as text as its ISO text, which every format writes)."""
    converters = [
        (at, convert)
        for at, field in enumerate(fields)
        if (convert := _RECORD_FORM.get(_kind(types.get(field)))) is not None
    ]

    def record(row: Sequence[Any]) -> dict[str, Any]:
        values = list(row)
        for at, convert in converters:
            values[at] = convert(values[at])
        return dict(zip(fields, values, strict=True))

    return record


def write_rows(
    rows: Iterable[Sequence[Any]],
    fmt: str,
    fields: Sequence[str],
    out: TextIO | None = None,
    *,
    types: Mapping[str, object] | None = None,
    csv_guard: bool = True,
) -> int:
    """`write_records` for rows given as tuples in `fields`' order: `json` and `jsonl`
    encode them without a dict a row and write a chunk of lines at a time (a million users
    in seconds); every format writes exactly what `write_records` writes for the same records.

    `types` (field -> type, as contract.USER_RECORD declares them) lets a value come in a
    compact form of its field's type, as SQLite stores it: a `bool` as 0 or 1 (`stored_truth`), a `list` as
    None when empty, a `datetime` as naive UTC ISO 8601 text (`utc_iso`)."""
    out = out or sys.stdout
    types = types or {}
    if fmt not in ("json", "jsonl"):
        records = map(_record_maker(fields, types), rows)
        return write_records(records, fmt, fields, out, csv_guard=csv_guard)
    encode = _row_encoder(fields, types)
    rows = iter(rows)
    first, between, last = ("", "\n", "\n") if fmt == "jsonl" else ("[\n  ", ",\n  ", "\n]\n")
    count = 0
    while chunk := list(islice(rows, _ROW_CHUNK)):
        try:
            lines = list(map(encode, chunk))
        except ValueError:  # text in the stored layout's shape that is no time: which, and said as such
            lines = list(map(_row_encoder(fields, types, _parsed), chunk))
        out.write((first if count == 0 else between) + between.join(lines))
        count += len(lines)
    out.write(last if count else ("" if fmt == "jsonl" else "[]\n"))
    return count


def guard_cell(cell: str) -> str:
    """A CSV cell a spreadsheet shows as text: CSV_GUARD before a formula start or a CSV_GUARD."""
    return CSV_GUARD + cell if cell.startswith(_GUARDED_STARTS) else cell


def unguard_cell(cell: str) -> str:
    """The cell `guard_cell` was given: one CSV_GUARD off, only where `guard_cell` adds one.

    A cell like `'quoted` (a CSV_GUARD before anything else) was not guarded and stays.
    """
    return cell[1:] if cell[:1] == CSV_GUARD and cell[1:2] in _GUARDED_STARTS else cell


def _write_csv(records: Iterable[dict[str, Any]], fields: Sequence[str], out: TextIO, *, guard: bool) -> int:
    writer = csv.writer(out, lineterminator="\n")
    # csv quotes a cell holding the line terminator's "\n", not one holding a lone "\r", which a
    # spreadsheet (and csv.reader) takes as the row's end: `x\r=cmd()` would start a row with a
    # formula. A row with a "\r" anywhere is written with every cell quoted.
    quoted = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow(fields)
    encode = guard_cell if guard else str

    def write(record: dict[str, Any]) -> None:
        cells = [encode(_cell(record.get(field), LIST_SEPARATOR)) for field in fields]
        (quoted if any("\r" in cell for cell in cells) else writer).writerow(cells)

    return _each(records, write)


def _visible(cell: str) -> str:
    """A table cell with each character in UNPRINTABLE_CATEGORIES as its Python escape (`\\x1b`, `\\n`,
    `\\u202e`): a stored escape sequence neither recolours the terminal nor breaks the row.
    str.isprintable passes nearly every cell in one C call (the space is printable)."""
    if cell.isprintable():
        return cell
    import unicodedata  # here: `usermgr --help` and `verify` load this module, and rarely a cell needs it

    return "".join(ascii(char)[1:-1] if unicodedata.category(char) in UNPRINTABLE_CATEGORIES else char for char in cell)


TABLE_WINDOW = 1000
"""`table` sizes its columns from the first this many rows and streams the rest (README, Output)."""


def _write_table(records: Iterable[dict[str, Any]], fields: Sequence[str], out: TextIO) -> int:
    """tabulate's plain table of the first TABLE_WINDOW rows, then the rest streamed in the
    same columns, so memory stays flat at a million rows; a longer value further down widens
    only its own line."""
    from tabulate import tabulate

    rows = ([_visible(_cell(record.get(field), ", ")) for field in fields] for record in records)
    window = list(islice(rows, TABLE_WINDOW))
    if not window:
        return 0
    text = tabulate(window, headers=list(fields), disable_numparse=True)
    out.write(text + "\n")
    widths = [len(rule) for rule in text.splitlines()[1].split("  ")]  # the ---- line under the headers
    count = len(window)
    for row in rows:
        out.write("  ".join(cell.strip().ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")
        count += 1
    return count


def _one_value(field: str) -> Callable[[Iterable[dict[str, Any]], Sequence[str], TextIO], int]:
    def write(records: Iterable[dict[str, Any]], _fields: Sequence[str], out: TextIO) -> int:
        return _each(records, lambda record: out.write(f"{_visible(_text(record[field]))}\n"))  # one line each

    return write


_WRITERS = {
    "table": _write_table,
    "json": _write_json,
    "jsonl": _write_jsonl,
    "email": _one_value("email"),
    "id": _one_value("id"),
}


def write_one(record: dict[str, Any], fmt: str, fields: Sequence[str], out: TextIO | None = None) -> None:
    """One record: `json` prints an object, `table` a two-column field/value listing."""
    out = out or sys.stdout
    if fmt == "json":
        out.write(
            json.dumps({field: record.get(field) for field in fields}, ensure_ascii=False, indent=2, default=_iso)
            + "\n"
        )
    elif fmt == "table":
        from tabulate import tabulate

        rows = [[field, _visible(_cell(record.get(field), ", "))] for field in fields]
        out.write(tabulate(rows, tablefmt="plain", disable_numparse=True) + "\n")
    else:
        write_records([record], fmt, fields, out)


# ---- reading rows back (`usermgr import`) -------------------------------------------------


@dataclass(frozen=True)
class InputRow:
    """One row of input: its line number, and its fields or why they could not be read."""

    line: int
    fields: dict[str, Any] | None
    problem: str | None = None


def format_for_path(path: str) -> str | None:
    """The import format a file name implies (`.csv`, `.jsonl`/`.ndjson`), if any."""
    lowered = path.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    return None


# Encodings `import` reads: UTF-16 when its byte-order mark says so, else UTF-8, whose
# byte-order mark (Excel's "CSV UTF-8") 'utf-8-sig' drops.
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
# What 'surrogateescape' makes of bytes that do not decode: they mark a line as not text.
_UNDECODED = re.compile("[\udc80-\udcff]")


class _Replay(io.RawIOBase):
    """A binary stream whose first bytes were read to look for a byte-order mark, and are
    given again: standard input cannot seek back."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest
        # The bytes there are now, without waiting for a full buffer (a pipe): read1 on a
        # buffered stream, what one read gives on an unbuffered one.
        self._read_some = rest.read1 if isinstance(rest, io.BufferedIOBase) else rest.read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        with memoryview(buffer) as view:
            data = self._head or self._read_some(len(view))
            count = min(len(data), len(view))
            view[:count] = data[:count]
        self._head = self._head[count:]
        return count

    def close(self) -> None:
        self._rest.close()
        super().close()


def open_import_text(binary: BinaryIO) -> TextIO:
    """The text of an import stream, in the encoding its byte-order mark names (UTF-16 LE
    or BE, UTF-8) or else UTF-8; newlines are left to the reader (CRLF, LF and lone CR).

    Bytes that do not decode become lone surrogates, which `read_rows` reports by line.
    """
    head = binary.read(len(codecs.BOM_UTF16_LE))
    encoding = "utf-16" if head in _UTF16_BOMS else "utf-8-sig"
    stream = io.BufferedReader(_Replay(head, binary))
    return io.TextIOWrapper(stream, encoding=encoding, errors="surrogateescape", newline="")


def _text_lines(stream: Iterable[str]) -> Iterator[str]:
    """The lines of `stream`; bytes that do not decode end the input, naming their line."""
    encoding = "UTF-16" if getattr(stream, "encoding", "") == "utf-16" else "UTF-8"
    advice = "nothing was imported (save the file as UTF-8, or as UTF-16 with a byte-order mark)"
    number = 0
    try:
        for number, line in enumerate(stream, start=1):
            if not line.isascii() and _UNDECODED.search(line):  # isascii: the common case, fast
                raise InvalidInput(f"line {number}: not {encoding} text; {advice}")
            yield line
    except UnicodeDecodeError:  # what surrogateescape cannot carry: UTF-16's lone surrogates
        where = f" after line {number}" if number else ""  # decoded a chunk ahead: no exact line
        raise InvalidInput(f"not {encoding} text{where}; {advice}") from None


def read_rows(
    stream: Iterable[str], fmt: str, list_fields: Sequence[str] = ("roles",), *, csv_guard: bool = True
) -> Iterator[InputRow]:
    """Rows of a CSV or JSONL stream, as `write_records` writes them.

    CSV: empty cells are absent fields, list fields are `;`-joined, and with `csv_guard`
    the CSV_GUARD that `guard_cell` adds is taken off again. Blank JSONL lines are skipped.
    """
    lines = _text_lines(stream)
    return _read_csv(lines, list_fields, csv_guard) if fmt == "csv" else _read_jsonl(lines)


def _read_jsonl(lines: Iterable[str]) -> Iterator[InputRow]:
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line, object_pairs_hook=object_named_once)
        except NamedTwice as error:
            yield InputRow(line_number, None, f"the JSON object names {error} twice")
            continue
        except ValueError:
            yield InputRow(line_number, None, "not valid JSON")
            continue
        except RecursionError:
            yield InputRow(line_number, None, "not valid JSON: nested too deeply")
            continue
        if not isinstance(value, dict):
            yield InputRow(line_number, None, "not a JSON object")
            continue
        yield InputRow(line_number, value)


class NamedTwice(ValueError):
    """A JSON object that names a key twice (the key's repr is the message)."""


def object_named_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads's `object_pairs_hook` for input that names each key once (an import row, an
    API body): the decoder keeps the last of two, where whoever checked the text first (a
    reviewer of the file, a proxy in front of the API) may have read the first."""
    value = dict(pairs)
    if len(value) != len(pairs):
        raise NamedTwice(_repeated([name for name, _ in pairs]))
    return value


def _repeated(names: Sequence[str]) -> str | None:
    """The first name that `names` holds twice, quoted; None if each is there once."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return repr(name)
        seen.add(name)
    return None


def _read_csv(lines: Iterable[str], list_fields: Sequence[str], guard: bool) -> Iterator[InputRow]:
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
    except csv.Error as error:
        yield InputRow(1, None, f"unreadable CSV header: {error}")
        return
    if header is None:
        return
    names = [name.strip() for name in header]
    repeated = _repeated(names)
    if repeated:
        yield InputRow(1, None, f"the CSV header names {repeated} twice")
        return
    width = len(names)
    lists = [name for name in list_fields if name in names]
    try:
        for cells in reader:
            if len(cells) != width:
                if any(cells):
                    yield InputRow(reader.line_num, None, f"{len(cells)} cells where the header has {width}")
                continue
            # A cell is "" (absent), or has a first character: the guard is looked for only there.
            fields: dict[str, Any] = {
                name: unguard_cell(cell) if guard and cell[0] == CSV_GUARD else cell
                for name, cell in zip(names, cells, strict=True)
                if cell
            }
            if not fields:
                continue  # a row of empty cells, as a blank line
            for name in lists:
                if name in fields:
                    fields[name] = fields[name].split(LIST_SEPARATOR)
            yield InputRow(reader.line_num, fields)
    except csv.Error as error:
        yield InputRow(reader.line_num, None, f"unreadable CSV: {error}")
