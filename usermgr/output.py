"""Every format usermgr writes (table, json, jsonl, csv, one value a line) and reads back
(csv, jsonl for `import`), so that each encoding rule lives in one place.

Data goes to standard output, streamed row by row except for `table`, which must see
every row to size its columns. Stdlib only at import time; tabulate loads on use.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

USER_FORMATS = ("table", "json", "jsonl", "csv", "email", "id")
DATA_FORMATS = ("table", "json", "jsonl", "csv")
IMPORT_FORMATS = ("csv", "jsonl")
LIST_SEPARATOR = ";"  # how CSV joins a list (roles); role names cannot contain it


def _iso(value: Any) -> str:
    """Timestamps in JSON: ISO 8601 with their UTC offset."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# One encoder for every line: the C encoder calls `_iso` only for timestamps.
_JSON = json.JSONEncoder(ensure_ascii=False, default=_iso)


def _cell(value: Any, list_separator: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return list_separator.join(str(item) for item in value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _json_line(record: dict[str, Any]) -> str:
    return _JSON.encode(record)


def write_records(records: Iterable[dict[str, Any]], fmt: str, fields: Sequence[str], out: TextIO | None = None) -> int:
    """Write records in `fmt`, with `fields` as the columns; returns how many were written."""
    out = out or sys.stdout
    writer = _WRITERS[fmt]
    return writer(records, fields, out)


def _each(records: Iterable[dict[str, Any]], write: Callable[[dict[str, Any]], Any]) -> int:
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


def _write_csv(records: Iterable[dict[str, Any]], fields: Sequence[str], out: TextIO) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(fields)
    return _each(
        records, lambda record: writer.writerow([_cell(record.get(field), LIST_SEPARATOR) for field in fields])
    )


def _write_table(records: Iterable[dict[str, Any]], fields: Sequence[str], out: TextIO) -> int:
    from tabulate import tabulate

    rows = [[_cell(record.get(field), ", ") for field in fields] for record in records]
    if rows:
        out.write(tabulate(rows, headers=list(fields), disable_numparse=True) + "\n")
    return len(rows)


def _one_value(field: str) -> Callable[[Iterable[dict[str, Any]], Sequence[str], TextIO], int]:
    def write(records: Iterable[dict[str, Any]], _fields: Sequence[str], out: TextIO) -> int:
        return _each(records, lambda record: out.write(f"{record[field]}\n"))

    return write


_WRITERS = {
    "table": _write_table,
    "json": _write_json,
    "jsonl": _write_jsonl,
    "csv": _write_csv,
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

        rows = [[field, _cell(record.get(field), ", ")] for field in fields]
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


def read_rows(stream: TextIO, fmt: str, list_fields: Sequence[str] = ("roles",)) -> Iterator[InputRow]:
    """Rows of a CSV or JSONL stream, as `write_records` writes them.

    CSV: empty cells are absent fields, and list fields are `;`-joined. Blank JSONL
    lines are skipped.
    """
    return _read_csv(stream, list_fields) if fmt == "csv" else _read_jsonl(stream)


def _read_jsonl(stream: TextIO) -> Iterator[InputRow]:
    for line_number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            yield InputRow(line_number, None, "not valid JSON")
            continue
        if not isinstance(value, dict):
            yield InputRow(line_number, None, "not a JSON object")
            continue
        yield InputRow(line_number, value)


def _read_csv(stream: TextIO, list_fields: Sequence[str]) -> Iterator[InputRow]:
    reader = csv.reader(stream)
    try:
        header = next(reader, None)
    except csv.Error as error:
        yield InputRow(1, None, f"unreadable CSV header: {error}")
        return
    if header is None:
        return
    names = [name.strip() for name in header]
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield InputRow(reader.line_num, None, f"unreadable CSV: {error}")
            return
        if not any(cells):
            continue
        if len(cells) != len(names):
            yield InputRow(reader.line_num, None, f"{len(cells)} cells where the header has {len(names)}")
            continue
        fields: dict[str, Any] = {name: cell for name, cell in zip(names, cells, strict=True) if cell != ""}
        for name in list_fields:
            if name in fields:
                fields[name] = fields[name].split(LIST_SEPARATOR)
        yield InputRow(reader.line_num, fields)
