"""output.py writes and reads the same formats: whatever `export` writes, `import` reads back."""

from __future__ import annotations

import io
import json
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
