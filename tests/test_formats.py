"""output.py writes and reads the same formats: whatever `export` writes, `import` reads back."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import CONTRACT_USER_FIELDS
from usermgr import output
from usermgr.schemas import UNPRINTABLE_CATEGORIES

FIELDS = CONTRACT_USER_FIELDS

# Any text a user's fields can hold: schemas.py refuses control, format and line-separator
# characters in every stored field (and surrogates cannot be encoded at all).
text = st.text(st.characters(exclude_categories=(*UNPRINTABLE_CATEGORIES, "Cs")), max_size=40)
optional_text = st.none() | text.filter(bool)
timestamps = st.datetimes(timezones=st.just(UTC)) | st.none()
records = st.fixed_dictionaries(
    {
        "id": st.integers(min_value=1, max_value=2**31 - 1),
        "uid": st.uuids().map(str),
        "email": text.filter(bool),
        "username": optional_text,
        "full_name": optional_text,
        "is_active": st.booleans(),
        "roles": st.lists(st.from_regex(r"[a-z0-9_-]{1,64}", fullmatch=True), unique=True),
        "created_at": st.datetimes(timezones=st.just(UTC)),
        "last_login_at": timestamps,
        "locked_until": timestamps,
        "expires_at": timestamps,
    }
)


def _written(rows: list[dict], fmt: str) -> str:
    out = io.StringIO()
    assert output.write_records(iter(rows), fmt, FIELDS, out) == len(rows)
    return out.getvalue()


def _as_read_back(record: dict) -> dict:
    """What a reader gives for a record: text fields as text, absent when empty."""
    expected = {
        "id": str(record["id"]),
        "uid": record["uid"],
        "email": record["email"],
        "is_active": "true" if record["is_active"] else "false",
        "created_at": record["created_at"].isoformat(),
    }
    for name in ("username", "full_name"):
        if record[name]:
            expected[name] = record[name]
    if record["roles"]:
        expected["roles"] = record["roles"]
    for name in ("last_login_at", "locked_until", "expires_at"):
        if record[name]:
            expected[name] = record[name].isoformat()
    return expected


@given(st.lists(records, max_size=5))
def test_csv_round_trip(rows: list[dict]) -> None:
    written = _written(rows, "csv")
    back = list(output.read_rows(io.StringIO(written, newline=""), "csv"))
    assert [row.problem for row in back] == [None] * len(rows)
    assert [row.fields for row in back] == [_as_read_back(record) for record in rows]


@given(st.lists(records, max_size=5))
def test_jsonl_round_trip(rows: list[dict]) -> None:
    written = _written(rows, "jsonl")
    assert written.count("\n") == len(rows)  # one record a line, whatever the text holds
    back = [row.fields for row in output.read_rows(io.StringIO(written), "jsonl")]
    plain = [{k: v.isoformat() if isinstance(v, datetime) else v for k, v in record.items()} for record in rows]
    assert back == plain


@given(st.lists(records, max_size=5))
def test_json_is_one_array_of_the_jsonl_objects(rows: list[dict]) -> None:
    as_array = json.loads(_written(rows, "json"))
    as_lines = [json.loads(line) for line in _written(rows, "jsonl").split("\n")[:-1]]
    assert as_array == as_lines


@given(st.lists(records, max_size=5))
def test_email_and_id_print_one_value_a_line(rows: list[dict]) -> None:
    assert _written(rows, "id").splitlines() == [str(record["id"]) for record in rows]
    emails = _written(rows, "email")
    assert emails == "".join(f"{record['email']}\n" for record in rows)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_import_text_reads_buffered_and_unbuffered_streams_alike(tmp_path: Path, encoding: str) -> None:
    """`open_import_text` takes any binary stream: a raw one (no `read1`) reads as a buffered one."""
    text = "email,full_name\r\nana@example.com,Ana Ñúñez\r\n" + "x@example.com,Xavier\n" * 5000
    path = tmp_path / "users.csv"
    path.write_bytes(text.encode(encoding))
    with open(path, "rb") as buffered, open(path, "rb", buffering=0) as raw:
        assert not hasattr(raw, "read1")
        assert output.open_import_text(raw).read() == output.open_import_text(buffered).read() == text


def _user(n: int, email: str | None = None) -> dict:
    """A record of every contract field (None unless set here), as the service streams them."""
    return dict.fromkeys(FIELDS) | {
        "id": n,
        "uid": f"00000000-0000-4000-8000-{n:012d}",
        "email": email or f"user{n:07d}@example.com",
        "username": None,
        "full_name": "Ada Lovelace" if n % 2 else "Li Wei",
        "is_active": True,
        "roles": ["staff"] if n % 3 else [],
        "created_at": datetime(2026, 1, 2, 9, 0, n % 60, tzinfo=UTC),
    }


def test_a_table_past_its_first_window_looks_as_tabulate_makes_it() -> None:
    from tabulate import tabulate

    rows = [_user(n) for n in range(1, output.TABLE_WINDOW + 51)]
    cells = [[output._cell(row[field], ", ") for field in FIELDS] for row in rows]
    assert _written(rows, "table") == tabulate(cells, headers=list(FIELDS), disable_numparse=True) + "\n"


def test_a_longer_value_after_the_first_window_widens_only_its_own_line() -> None:
    from tabulate import tabulate

    long_email = "a-much-longer-address-than-any-in-the-first-window@example.com"
    rows = [_user(n) for n in range(1, output.TABLE_WINDOW + 3)]
    rows.insert(output.TABLE_WINDOW, _user(output.TABLE_WINDOW + 5, long_email))
    lines = _written(rows, "table").splitlines()
    assert len(lines) == 2 + len(rows)
    header, window, long_line, after = lines[0], lines[2 : 2 + output.TABLE_WINDOW], lines[-3], lines[-2:]
    first = [[output._cell(row[field], ", ") for field in FIELDS] for row in rows[: output.TABLE_WINDOW]]
    assert lines[: 2 + output.TABLE_WINDOW] == tabulate(first, headers=list(FIELDS), disable_numparse=True).splitlines()
    email_at, name_at = header.index("email"), header.index("full_name")
    assert long_line.split()[2] == long_email  # in full, in its column's place
    assert long_line.index(long_email) == email_at
    assert long_line.index("Ada Lovelace" if (output.TABLE_WINDOW + 5) % 2 else "Li Wei") > name_at
    for line in [*window, *after]:  # every other row keeps the window's columns
        assert line.index("@example.com") < name_at and line[name_at - 2 : name_at] == "  "
        assert line[name_at] != " "


def test_a_table_is_written_before_its_last_row_is_read() -> None:
    out = io.StringIO()
    seen_before_the_end: list[str] = []

    def rows() -> Iterator[dict]:
        yield from (_user(n) for n in range(1, output.TABLE_WINDOW + 2))
        seen_before_the_end.append(out.getvalue())
        yield _user(output.TABLE_WINDOW + 2)

    assert output.write_records(rows(), "table", FIELDS, out) == output.TABLE_WINDOW + 2
    assert seen_before_the_end[0].count("\n") == 2 + output.TABLE_WINDOW + 1  # header, rule, rows so far


def test_csv_reader_skips_empty_rows_reports_bad_ones_and_unguards_cells() -> None:
    """What the CSV reader makes of each kind of row: blank lines and rows of empty cells
    (of any width) are skipped, a row of the wrong width and a cell past the csv module's
    field limit are reported by line, a guard is taken off only where `guard_cell` adds one."""
    text = (
        "email , roles,full_name\n"  # header names are stripped
        "\n"
        ",,\n"
        ",\n"
        "a@example.com,staff;beta,'=SUM(1)\n"
        "b@example.com,,'quoted\n"
        "c@example.com,staff\n"
        "d@example.com,,\n"
        f"e@example.com,,{'x' * 200_000}\n"
        "f@example.com,,never read\n"
    )
    rows = [(row.line, row.fields, row.problem) for row in output.read_rows(io.StringIO(text, newline=""), "csv")]
    assert rows == [
        (5, {"email": "a@example.com", "roles": ["staff", "beta"], "full_name": "=SUM(1)"}, None),
        (6, {"email": "b@example.com", "full_name": "'quoted"}, None),
        (7, None, "2 cells where the header has 3"),
        (8, {"email": "d@example.com"}, None),
        (9, None, "unreadable CSV: field larger than field limit (131072)"),
    ]
    unguarded = next(output.read_rows(io.StringIO("full_name\n'=SUM(1)\n"), "csv", csv_guard=False))
    assert unguarded.fields == {"full_name": "'=SUM(1)"}
