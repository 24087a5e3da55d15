"""Every way usermgr prints data: table, json, jsonl, csv, and one value a line.

Data goes to standard output, streamed row by row except for `table`, which must see
every row to size its columns. Stdlib only at import time; tabulate loads on use.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TextIO

USER_FORMATS = ("table", "json", "jsonl", "csv", "email", "id")
DATA_FORMATS = ("table", "json", "jsonl", "csv")
JSON_FORMATS = ("json", "jsonl")


def _plain(value: Any) -> Any:
    """A JSON-ready value: timestamps as ISO 8601 with their UTC offset."""
    if isinstance(value, datetime):
        return value.isoformat()
    return value


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
    return json.dumps({key: _plain(value) for key, value in record.items()}, ensure_ascii=False)


def write_records(
    records: Iterable[dict[str, Any]], fmt: str, fields: Sequence[str], out: TextIO | None = None
) -> int:
    """Write records in `fmt`, with `fields` as the columns; returns how many were written."""
    out = out or sys.stdout
    writer = _WRITERS[fmt]
    return writer(records, fields, out)


def _write_jsonl(records: Iterable[dict[str, Any]], fields: Sequence[str], out: TextIO) -> int:
    count = 0
    for count, record in enumerate(records, start=1):
        out.write(_json_line({field: record.get(field) for field in fields}) + "\n")
    return count


def _write_json(records: Iterable[dict[str, Any]], fields: Sequence[str], out: TextIO) -> int:
    count = 0
    for count, record in enumerate(records, start=1):
        out.write(("[\n  " if count == 1 else ",\n  ") + _json_line({field: record.get(field) for field in fields}))
    out.write("\n]\n" if count else "[]\n")
    return count


def _write_csv(records: Iterable[dict[str, Any]], fields: Sequence[str], out: TextIO) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(fields)
    count = 0
    for count, record in enumerate(records, start=1):
        writer.writerow([_cell(record.get(field), ";") for field in fields])
    return count


def _write_table(records: Iterable[dict[str, Any]], fields: Sequence[str], out: TextIO) -> int:
    from tabulate import tabulate

    rows = [[_cell(record.get(field), ", ") for field in fields] for record in records]
    if rows:
        out.write(tabulate(rows, headers=list(fields), disable_numparse=True) + "\n")
    return len(rows)


def _one_value(field: str) -> Any:
    def write(records: Iterable[dict[str, Any]], _fields: Sequence[str], out: TextIO) -> int:
        count = 0
        for count, record in enumerate(records, start=1):
            out.write(f"{record[field]}\n")
        return count

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
        out.write(json.dumps({field: _plain(record.get(field)) for field in fields}, ensure_ascii=False, indent=2) + "\n")
    elif fmt == "table":
        from tabulate import tabulate

        rows = [[field, _cell(record.get(field), ", ")] for field in fields]
        out.write(tabulate(rows, tablefmt="plain", disable_numparse=True) + "\n")
    else:
        write_records([record], fmt, fields, out)
