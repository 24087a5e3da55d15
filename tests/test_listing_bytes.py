"""`list` and `export` write, byte for byte, what the generic encoding of the contract's
record writes: the fast path (rows as tuples, a generated per-row encoder, timestamps sliced
from SQLite's stored text) must not change one byte, on either backend, for tricky data."""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from tests.conftest import ok
from usermgr import output, service
from usermgr.config import Settings
from usermgr.contract import USER_FIELDS
from usermgr.errors import UnreadableTimestamp
from usermgr.models import User
from usermgr.service import UserFilter, user_record

TRICKY = 'quote " backslash \\ slash / tab \t nl \n cr \r bell \x07 esc \x1b us \x1f del \x7f é Ж 😀 \u2028 \u00a0'


def _add(db: Session, settings: Settings, address: str, **fields: Any) -> User:
    """A user made by the service, then given `fields` as stored values: text the schema
    refuses today (control characters) may still be in a database written before."""
    roles = fields.pop("roles", ())
    user = service.create_user(db, settings, service.new_user(email=address, password=None), roles=roles)
    with db.begin():
        stored = db.get(User, user.id)
        for name, value in fields.items():
            setattr(stored, name, value)
    return user


@pytest.fixture
def tricky(db: Session, settings: Settings) -> Session:
    """Users with every kind of value each field can hold."""
    _add(db, settings, "plain@example.com", roles=["zeta", "admin"])  # zeta made before alpha and beta
    _add(db, settings, "many@example.com", username="many", full_name="Many Roles", roles=["zeta", "beta", "alpha"])
    _add(
        db,
        settings,
        "tricky@example.com",
        username="tr\"ick'y\\",
        full_name=TRICKY,
        created_at=datetime(2026, 1, 2, 9, 0, 0, tzinfo=UTC),  # whole second: no fraction in isoformat
        last_login_at=datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        locked_until=datetime(9999, 12, 31, 23, 59, 59, 120, tzinfo=UTC),
        expires_at=datetime(2001, 2, 3, 4, 5, 6, 7, tzinfo=UTC),
        is_active=False,
    )
    _add(
        db,
        settings,
        "zoe@example.com",
        email="zoë.ångström@exämple.com",
        full_name="Zoë Ångström",
        expires_at=datetime(2999, 1, 1, tzinfo=UTC),
    )
    _add(db, settings, "odd@example.com", full_name="", username="odd", roles=["beta"])
    if db.get_bind().dialect.name == "sqlite":  # a timestamp stored by another tool, without the fraction
        with db.begin():
            db.execute(text("UPDATE users SET last_login_at = '2026-03-04 05:06:07' WHERE email = 'odd@example.com'"))
    return db


def _generic_records(db: Session, *, with_hashes: bool = False) -> list[dict[str, Any]]:
    """Every user through the ORM and `user_record`: datetimes, roles as the model sorts them."""
    with db.begin():
        users = db.scalars(select(User).order_by(User.id)).all()
        records = [user_record(user) for user in users]
        if with_hashes:
            for record, user in zip(records, users, strict=True):
                record["hashed_password"] = user.hashed_password
    return records


def _generic_line(record: dict[str, Any]) -> str:
    """The JSON line the record's encoding gives: json.dumps with `list -o jsonl`'s options."""
    return json.dumps(record, ensure_ascii=False, default=datetime.isoformat)


def test_the_tricky_data_is_tricky(tricky: Session) -> None:
    records = _generic_records(tricky)
    assert [record["roles"] for record in records] == [["admin", "zeta"], ["alpha", "beta", "zeta"], [], [], ["beta"]]
    assert records[2]["full_name"] == TRICKY and records[2]["created_at"].microsecond == 0
    assert records[2]["last_login_at"] is not None and records[0]["last_login_at"] is None


def test_list_jsonl_is_the_generic_encoding_byte_for_byte(tricky: Session, run: Any) -> None:
    expected = "".join(_generic_line(record) + "\n" for record in _generic_records(tricky))
    assert ok(run("list", "-o", "jsonl")).stdout == expected


def test_export_is_the_generic_encoding_byte_for_byte(tricky: Session, run: Any) -> None:
    assert ok(run("export")).stdout == "".join(_generic_line(r) + "\n" for r in _generic_records(tricky))
    with_hashes = _generic_records(tricky, with_hashes=True)
    assert ok(run("export", "--with-hashes")).stdout == "".join(_generic_line(r) + "\n" for r in with_hashes)


def test_list_json_is_the_generic_encoding_byte_for_byte(tricky: Session, run: Any) -> None:
    lines = [_generic_line(record) for record in _generic_records(tricky)]
    assert ok(run("list", "-o", "json")).stdout == "[\n  " + ",\n  ".join(lines) + "\n]\n"
    assert json.loads(ok(run("list", "-o", "json")).stdout) == json.loads("[" + ",".join(lines) + "]")
    assert ok(run("list", "--search", "nobody-at-all", "-o", "json")).stdout == "[]\n"
    assert ok(run("list", "--search", "nobody-at-all", "-o", "jsonl")).stdout == ""


@pytest.mark.parametrize("fmt", ["csv", "table", "email", "id"])
def test_other_formats_are_what_write_records_writes(tricky: Session, run: Any, fmt: str) -> None:
    written = io.StringIO()
    output.write_records(_generic_records(tricky), fmt, USER_FIELDS, written)
    assert ok(run("list", "-o", fmt)).stdout == written.getvalue()
    if fmt == "csv":
        assert ok(run("export", "-o", "csv")).stdout == written.getvalue()


@pytest.mark.parametrize(
    ("options", "filters"),
    [
        (["--role", "beta"], UserFilter(role="beta")),
        (["--expired"], UserFilter(expired=True)),
        (["--locked"], UserFilter(locked=True)),
        (["--admin"], UserFilter(admin=True)),
        (["--search", "Ångström"], UserFilter(search="Ångström")),
        (["--active"], UserFilter(active=True)),
        (["--limit", "2", "--offset", "1"], UserFilter(limit=2, offset=1)),
    ],
)
@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_filtered_lists_are_the_generic_encoding(
    tricky: Session, run: Any, options: list[str], filters: UserFilter, fmt: str
) -> None:
    ids = [record["id"] for record in service.iter_user_records(tricky, filters)]
    assert ids, "each filter picks someone"
    records = [record for record in _generic_records(tricky) if record["id"] in ids]
    lines = [_generic_line(record) for record in records]
    expected = "".join(line + "\n" for line in lines) if fmt == "jsonl" else "[\n  " + ",\n  ".join(lines) + "\n]\n"
    assert ok(run("list", *options, "-o", fmt)).stdout == expected


def test_write_rows_encodes_any_value_as_write_records_does() -> None:
    """Values the service does not give today (floats, dicts, nested lists, int and str
    subclasses) still come out as the generic encoder writes them."""

    class Text(str):
        pass

    fields = ("a", 'ü"', "c", "d", "e", "f", "g", "h")
    rows = [
        (1.5, True, None, [1, "x\n"], {"k": "é"}, Text("t\t"), -0, datetime(2026, 1, 2, tzinfo=UTC)),
        (float("inf"), False, "", [], {}, "😀", 10**30, None),
    ]
    for fmt in ("jsonl", "json"):
        fast, generic = io.StringIO(), io.StringIO()
        assert output.write_rows(rows, fmt, fields, fast) == 2
        output.write_records([dict(zip(fields, row, strict=True)) for row in rows], fmt, fields, generic)
        assert fast.getvalue() == generic.getvalue()


def test_many_rows_are_written_in_chunks_without_a_seam() -> None:
    rows = [(n, f"user{n}") for n in range(2 * output._ROW_CHUNK + 3)]
    for fmt in ("jsonl", "json"):
        fast, generic = io.StringIO(), io.StringIO()
        assert output.write_rows(iter(rows), fmt, ("id", "name"), fast) == len(rows)
        output.write_records(({"id": n, "name": name} for n, name in rows), fmt, ("id", "name"), generic)
        assert fast.getvalue() == generic.getvalue()


OTHER_LAYOUTS = {
    "whole@example.com": "2026-03-04 05:06:07.000000",  # the stored layout, no fraction in isoformat
    "t@example.com": "2026-03-04T05:06:07",
    "short@example.com": "2026-03-04 05:06:07.5",
    "offset@example.com": "2026-03-04 05:06:07+02:00",  # moved to UTC, as database.UtcDateTime does
    "date@example.com": "2026-03-04",
    "hour@example.com": "2026-03-04 05:06:07.123+01",  # 26 characters, '.' at 19, as the stored layout
    "zulu@example.com": "2026-03-04 05:06:07.12345Z",
    "week@example.com": "2026-W10-3 05:06:07.123456",  # an ISO week date, as long as the stored layout
    "zero@example.com": "2026-03-04 05:06:07.000+01",
}


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "table"])
def test_timestamps_another_tool_stored_read_as_the_orm_reads_them(
    db: Session, settings: Settings, run: Any, fmt: str
) -> None:
    """Text in SQLite in another layout than SQLAlchemy's goes through datetime, as the ORM reads it."""
    if db.get_bind().dialect.name != "sqlite":
        pytest.skip("PostgreSQL stores a timestamptz, not text")
    for address, stored in OTHER_LAYOUTS.items():
        _add(db, settings, address)
        with db.begin():
            db.execute(
                text("UPDATE users SET last_login_at = :at WHERE email = :email"), {"at": stored, "email": address}
            )
    records = _generic_records(db)
    assert records[3]["last_login_at"].hour == 3  # 05:06 at +02:00 is 03:06 UTC
    written = io.StringIO()
    output.write_records(records, fmt, USER_FIELDS, written)
    assert ok(run("list", "-o", fmt)).stdout == written.getvalue()


def test_roles_of_users_skipped_by_offset_and_filters_stay_theirs(tricky: Session, run: Any) -> None:
    """Roles are read in one pass beside the users: users with roles around, before and after the
    ones listed, and a role granted late to the first user, land on their own rows only."""
    service.grant_role(tricky, ["plain@example.com"], "alpha")  # after every other grant
    records = _generic_records(tricky)
    assert records[0]["roles"] == ["admin", "alpha", "zeta"]
    for options in (["--offset", "1"], ["--offset", "2", "--limit", "1"], ["--limit", "1"], ["--disabled"]):
        listed = [json.loads(line) for line in ok(run("list", *options, "-o", "jsonl")).stdout.split("\n") if line]
        assert listed, options
        by_id = {record["id"]: record["roles"] for record in records}
        assert [(user["id"], user["roles"]) for user in listed] == [(user["id"], by_id[user["id"]]) for user in listed]


@pytest.mark.parametrize(
    "stored",
    [
        '2026-01-02 "9:00:00.000000',
        "2026-01-02 09:00:00\\000000",
        "2026-01-02 09:0\n:00.000001",
        '2026-01-02 09:00:00.00000"',
        "2026-01-02 09:00:00.12345\x01",
        "2026-01-02 09:00:00.00000é",
    ],
)
def test_a_timestamp_in_the_stored_layout_with_odd_characters_is_still_valid_json(stored: str) -> None:
    """The inline cut of stored timestamps never writes a character JSON must escape as it is."""
    rows = [(1, stored, None)]
    written = io.StringIO()
    try:
        output.write_rows(rows, "jsonl", ("id", "at", "never"), written, types={"at": datetime, "never": datetime})
    except UnreadableTimestamp:
        return  # refused as damage, as reading it through the ORM is: also fine
    assert json.loads(written.getvalue())["at"].startswith("2026-01-02T")


def test_compact_forms_write_what_the_record_forms_write() -> None:
    """A bool given as 0/1, a list as None when empty and a datetime as stored text encode as
    the record's own bool, [] and datetime do, in every format."""
    types = {"on": bool, "roles": list[str], "at": datetime | None}
    fields = ("on", "roles", "at")
    plus_two = datetime(2026, 1, 2, 11, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))  # a record's own value, kept
    compact = [
        (1, None, "2026-01-02 09:00:00.000000"),
        (0, ["a", "b"], "2026-01-02 09:00:00.000120"),
        (1, [], None),
        (True, ["x"], plus_two),
    ]
    records = [
        {"on": True, "roles": [], "at": datetime(2026, 1, 2, 9, tzinfo=UTC)},
        {"on": False, "roles": ["a", "b"], "at": datetime(2026, 1, 2, 9, 0, 0, 120, tzinfo=UTC)},
        {"on": True, "roles": [], "at": None},
        {"on": True, "roles": ["x"], "at": plus_two},
    ]
    for fmt in ("jsonl", "json", "csv", "table"):
        fast, generic = io.StringIO(), io.StringIO()
        assert output.write_rows(compact, fmt, fields, fast, types=types) == len(compact)
        output.write_records(records, fmt, fields, generic)
        assert fast.getvalue() == generic.getvalue(), fmt


def test_roles_join_their_rows_across_chunks() -> None:
    """`_with_roles` over several chunks: links of users before, between and after the rows
    listed (left out by a filter or the offset), at a chunk's first and last row, and many
    links for one user, each land on their own row only."""
    from usermgr.service.records import _ROLES_AT, _with_roles

    def row(user_id: int) -> tuple[Any, ...]:
        return (user_id, *(f"v{user_id}" for _ in range(_ROLES_AT - 1)), None, "after")

    chunks = [[row(1), row(2)], [row(3), row(5)], [row(6)], [row(8)]]
    links = [(0, "a"), (2, "a"), (2, "b"), (3, "c"), (4, "x"), (5, "d"), (7, "y"), (8, "e"), (8, "f"), (9, "z")]
    expected = {user_id: [name for held, name in links if held == user_id] for user_id in (1, 2, 3, 5, 6, 8)}
    got = [list(chunk) for chunk in _with_roles([list(chunk) for chunk in chunks], iter(links))]
    assert [[r[0] for r in chunk] for chunk in got] == [[1, 2], [3, 5], [6], [8]]
    for chunk in got:
        for listed in chunk:
            assert listed[_ROLES_AT] == (expected[listed[0]] or None)
            assert listed[:_ROLES_AT] == row(listed[0])[:_ROLES_AT] and listed[-1] == "after"


def test_a_list_field_encodes_any_value_as_write_records_does() -> None:
    """The roles' direct join of text items, and every other value a list field might hold."""
    values = [['é\n"\\', "b", TRICKY], ["a", 1], [None], [[]], "text", 5, (), [], ["x"]]
    rows = [(value,) for value in values]
    for fmt in ("jsonl", "json"):
        fast, generic = io.StringIO(), io.StringIO()
        assert output.write_rows(rows, fmt, ("roles",), fast, types={"roles": list[str]}) == len(rows)
        output.write_records([{"roles": value} for value in values], fmt, ("roles",), generic)
        assert fast.getvalue() == generic.getvalue()


NOT_TIMESTAMPS = [
    "'2026-13-45 99:99:99.123456'",  # the stored layout's shape, not a time
    "'2026-02-30 09:00:00.123456'",
    "'0000-01-02 09:00:00.123456'",
    "'2026-01-02 09:00:00.١٢٣٤٥٦'",  # digits, but not ASCII ones
    "'2026-01-02 09:00:00.12345é'",
    "'abcdefghij klmnopqr.stuvwx'",
    "'2026-13-45 99:99:99.000000'",
    "1700000000",  # a number, as another tool may store a time
    "1.5",
    "X'41'",  # bytes
    "'9999-12-31 23:59:59-01:00'",  # a time, but after year 9999 in UTC
    "'0001-01-01 00:30:00+01:00'",
]


@pytest.mark.parametrize("stored", NOT_TIMESTAMPS)
@pytest.mark.parametrize("column", ["created_at", "expires_at"])
def test_a_stored_timestamp_that_is_not_one_is_refused_by_list_export_and_show_alike(
    db: Session, settings: Settings, run: Any, stored: str, column: str
) -> None:
    """Text (or a number, or bytes) where a time belongs: every command that reads it says so in
    one line (exit 1, as UnreadableTimestamp), rather than `list` printing what `show` refuses."""
    if db.get_bind().dialect.name != "sqlite":
        pytest.skip("PostgreSQL's timestamptz holds only times")
    user = _add(db, settings, "bad-time@example.com")
    with db.begin():
        db.execute(text(f"UPDATE users SET {column} = {stored} WHERE id = :id"), {"id": user.id})
    commands = [["show", str(user.id), "-o", "json"], ["show", str(user.id)], ["export"], ["export", "-o", "csv"]]
    commands += [["list", "-o", fmt] for fmt in ("jsonl", "json", "csv", "table")]
    commands += [["list", "--search", "bad-time", "-o", "jsonl"]]
    for command in commands:
        result = run(*command)
        assert result.exit_code == 1, (command, result.stdout, result.stderr)
        assert result.stderr.startswith("usermgr: error: the database holds a timestamp usermgr cannot read ("), (
            command,
            result.stderr,
        )
        assert "a bug" not in result.stderr and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("stored", "read"), [("0", False), ("1", True), ("0.0", False), ("1.0", True)])
def test_a_stored_is_active_of_0_or_1_lists_as_show_reads_it(
    db: Session, settings: Settings, run: Any, stored: str, read: bool
) -> None:
    """SQLite stores a bool as 0 or 1 (a REAL 0.0 or 1.0 another tool wrote is kept as the
    INTEGER, by the column's NUMERIC affinity): every path reads it alike."""
    if db.get_bind().dialect.name != "sqlite":
        pytest.skip("PostgreSQL's boolean holds only booleans")
    user = _add(db, settings, "odd-active@example.com")
    with db.begin():
        db.execute(text(f"UPDATE users SET is_active = {stored} WHERE id = :id"), {"id": user.id})
    db.expire_all()  # the session still holds the user as _add left it
    records = _generic_records(db)
    assert records[0]["is_active"] is read
    assert json.loads(ok(run("show", str(user.id), "-o", "json")).stdout)["is_active"] is read
    assert ok(run("list", "-o", "jsonl")).stdout == _generic_line(records[0]) + "\n"
    assert ok(run("export")).stdout == _generic_line(records[0]) + "\n"
    for fmt in ("csv", "table"):
        written = io.StringIO()
        output.write_records(records, fmt, USER_FIELDS, written)
        assert ok(run("list", "-o", fmt)).stdout == written.getvalue()


ODD_TRUTHS = ["2", "-1", "'yes'", "'no'", "'false'", "''", "1.5", "X'00'"]


@pytest.mark.parametrize("stored", ODD_TRUTHS)
def test_a_stored_is_active_that_is_not_0_or_1_is_refused_alike(
    db: Session, settings: Settings, run: Any, stored: str
) -> None:
    """SQLite keeps any value in is_active. Read by its Python truth, 'no' or 'false' (another
    tool's 'disabled') was an enabled user who could log in, while the SQL filters (`--active`,
    the last-admin rule: `IS 1`) did not count them active. Such a value is damage, refused as
    a timestamp that is not one is: one line, exit 1, by every command that reads it."""
    if db.get_bind().dialect.name != "sqlite":
        pytest.skip("PostgreSQL's boolean holds only booleans")
    user = _add(db, settings, "odd-active@example.com")
    with db.begin():
        db.execute(text(f"UPDATE users SET is_active = {stored} WHERE id = :id"), {"id": user.id})
    commands = [
        ["show", str(user.id)],
        ["export"],
        *(["list", "-o", fmt] for fmt in ("jsonl", "json", "csv", "table", "email")),
        ["list", "--active"],  # the filters showed neither state: the row went unseen, exit 0
        ["list", "--disabled"],
    ]
    for command in commands:
        result = run(*command)
        assert result.exit_code == 1, (command, result.stdout, result.stderr)
        assert "odd-active@example.com" not in result.stdout  # a stream may have begun (csv's header): not this row
        assert result.stderr.startswith(
            "usermgr: error: the database holds a true/false value usermgr cannot read ("
        ), (
            command,
            result.stderr,
        )
        assert result.stderr.endswith("): correct that row with SQL (0 or 1) or restore a backup\n")


@pytest.mark.parametrize("options", [[], ["--role", "b"], ["--search", "odd-roles"], ["--limit", "5"]])
def test_role_names_another_tool_stored_list_as_show_reads_them(
    db: Session, settings: Settings, run: Any, options: list[str]
) -> None:
    """A role name usermgr would refuse (a comma, empty, a space) but another tool stored is
    still one name, on every path that reads roles (the filtered lists' subquery, PostgreSQL's)."""
    user = _add(db, settings, "odd-roles@example.com", roles=["b"])
    _add(db, settings, "other@example.com", roles=["b"])
    with db.begin():
        for name in ("a,b", "", "x y", ",", "b,"):
            db.execute(text("INSERT INTO roles (name) VALUES (:name)"), {"name": name})
            db.execute(
                text("INSERT INTO user_roles (user_id, role_id) SELECT :id, id FROM roles WHERE name = :name"),
                {"id": user.id, "name": name},
            )
    db.expire_all()
    records = _generic_records(db)
    assert records[0]["roles"] == ["", ",", "a,b", "b", "b,", "x y"]
    assert json.loads(ok(run("show", str(user.id), "-o", "json")).stdout)["roles"] == records[0]["roles"]
    expected = "".join(
        _generic_line(record) + "\n" for record in records if "--search" not in options or record is records[0]
    )
    assert ok(run("list", *options, "-o", "jsonl")).stdout == expected


@pytest.mark.parametrize("command", [["list", "-o", "csv"], ["export", "-o", "csv"], ["show", "1", "-o", "csv"]])
def test_a_carriage_return_in_a_stored_value_stays_inside_its_csv_cell(
    db: Session, settings: Settings, run: Any, command: list[str]
) -> None:
    """csv quotes a cell with a newline but not one with a lone CR, which a spreadsheet (and
    csv.reader) takes as the end of the row: `x\\r=cmd()` would start a row with a formula."""
    _add(db, settings, "cr@example.com", full_name="x\r=HYPERLINK(1)", username="\r=1+1")
    with db.begin():
        db.execute(text("UPDATE users SET email = 'cr\r@example.com'"))  # a CR in a column the API checks
    db.expire_all()
    written = ok(run(*command)).stdout
    rows = list(csv.reader(io.StringIO(written, newline="")))
    assert len(rows) == 2 and rows[1][2:5] == ["cr\r@example.com", "'\r=1+1", "x\r=HYPERLINK(1)"]


CONTROLS = "bell \x07 esc \x1b[31m nl \n cr \r tab \t nul-free \x7f c1 \x85 ls \u2028 ps \u2029 rlo \u202e lri \u2066"


@pytest.mark.parametrize("command", [["list"], ["list", "--search", "ctl"], ["show", "1"]])
def test_a_table_shows_control_and_format_characters_escaped(
    db: Session, settings: Settings, run: Any, command: list[str]
) -> None:
    """`table` goes to a terminal: a stored escape sequence must not recolour or retitle it, a
    newline or a line separator must not break the row, a right-to-left override must not
    reorder what follows. Each such character shows as its Python escape."""
    _add(db, settings, "ctl@example.com", full_name=CONTROLS)
    table = ok(run(*command)).stdout
    assert not [char for char in table if char != "\n" and unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")]
    assert len(table.splitlines()) == (3 if command[0] == "list" else len(USER_FIELDS))
    assert (
        "esc \\x1b[31m nl \\n cr \\r tab \\t" in table
        and "\\x85 ls \\u2028 ps \\u2029 rlo \\u202e lri \\u2066" in table
    )


@pytest.mark.parametrize("column", ["email", "username", "full_name", "uid"])
def test_bytes_stored_where_text_belongs_are_refused_in_one_line(
    db: Session, settings: Settings, run: Any, column: str
) -> None:
    """SQLite keeps a BLOB in a text column: no format can write it as the text it should be,
    so every command that shows it says so (exit 1, as for a timestamp that is not one)
    rather than crashing in JSON or writing `b'...'` in CSV."""
    if db.get_bind().dialect.name != "sqlite":
        pytest.skip("PostgreSQL's text columns hold only text")
    user = _add(db, settings, "blob@example.com", username="blob")
    with db.begin():
        db.execute(text(f"UPDATE users SET {column} = X'41e9' WHERE id = :id"), {"id": user.id})
    commands = [["show", str(user.id), "-o", fmt] for fmt in ("json", "table", "csv")]
    commands += [["list", "-o", fmt] for fmt in output.USER_FORMATS] + [["export"], ["export", "-o", "csv"]]
    for command in commands:
        if command[-1] == "id" or (command[-1] == "email" and column != "email"):
            ok(run(*command))  # writes no value of that column
            continue
        result = run(*command)
        assert result.exit_code == 1, (command, result.stdout, result.stderr)
        assert result.stderr == (
            "usermgr: error: the database holds bytes where text belongs (b'A\\xe9'): correct that row with SQL"
            " or restore a backup\n"
        ), command


def test_one_value_a_line_stays_one_line_a_user(db: Session, settings: Settings, run: Any) -> None:
    """`list -o email | usermgr disable -`: a stored email with a line break (or U+2028, which
    str.splitlines also breaks at) must not print a second line naming another user."""
    _add(db, settings, "admin@example.com")
    _add(db, settings, "victim@example.com")
    with db.begin():
        db.execute(text("UPDATE users SET email = :email WHERE id = 2"), {"email": "x@example.com\nadmin@example.com"})
    for command in (["list", "-o", "email"], ["show", "2", "-o", "email"]):
        lines = ok(run(*command)).stdout.split("\n")[:-1]
        assert "admin@example.com" not in lines[1:], command
        assert lines[-1] == "x@example.com\\nadmin@example.com"
