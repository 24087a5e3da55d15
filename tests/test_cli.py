"""The admin CLI in process, on SQLite and PostgreSQL: every command of the contract, its
exit codes, its output formats, and stdout (data) kept apart from stderr (messages).

login and verify have their own tests; here they only serve to check a password or a lock.
"""

from __future__ import annotations

import csv
import io
import json
import stat
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tests.conftest import CONTRACT_USER_FIELDS, PASSWORD, Runner, create_user, emails, error_line, login, ok, users
from usermgr import errors
from usermgr.cli import cli

FIELDS = list(CONTRACT_USER_FIELDS)
USER_FORMATS = ["table", "json", "jsonl", "csv", "email", "id"]


# ---- helpers --------------------------------------------------------------------------


def said(result: Result, count: str, *words: str) -> bool:
    """A success that told stderr, in one line, how many users it changed (and how)."""
    ok(result)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("usermgr: ") and "error" not in lines[0], result.stderr
    assert lines[0].endswith(f" {count}"), lines[0]
    return all(word in lines[0] for word in words)


def role_counts(run: Runner) -> dict[str, int]:
    return {row["name"]: row["members"] for row in json.loads(ok(run("roles", "-o", "json")).stdout)}


def state(run: Runner) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Everything a command could change that the CLI can show: users and role counts."""
    return users(run), role_counts(run)


def assert_utc_timestamp(value: str) -> None:
    parsed = datetime.fromisoformat(value)
    assert value.endswith("+00:00"), value
    assert parsed.utcoffset() == timedelta(0)


# ---- decoding each output format back to JSON values ------------------------------------


def from_csv(text: str) -> list[dict[str, Any]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    assert header == FIELDS
    return [_typed(dict(zip(header, row, strict=True)), ";") for row in reader]


def from_table_one(text: str) -> dict[str, Any]:
    """`show -o table`: one `field  value` line per field, in the contract's order."""
    pairs = [line.split(None, 1) for line in text.splitlines()]
    assert [pair[0] for pair in pairs] == FIELDS
    return _typed({pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}, ", ")


def _typed(cells: dict[str, str], separator: str) -> dict[str, Any]:
    record: dict[str, Any] = {key: value or None for key, value in cells.items()}
    record["id"] = int(cells["id"])
    assert cells["is_active"] in ("true", "false")
    record["is_active"] = cells["is_active"] == "true"
    record["roles"] = cells["roles"].split(separator) if cells["roles"] else []
    return record


def decode_one(fmt: str, text: str) -> dict[str, Any] | str:
    """The one user that show, create or update printed, as JSON values (email/id: the value)."""
    if fmt == "json":
        return json.loads(text)
    if fmt == "jsonl":
        assert text.count("\n") == 1 and text.endswith("\n")
        return json.loads(text)
    if fmt == "csv":
        (record,) = from_csv(text)
        return record
    if fmt == "table":
        return from_table_one(text)
    assert text.count("\n") == 1 and text.endswith("\n")
    return text.removesuffix("\n")


def expected_one(fmt: str, user: dict[str, Any]) -> dict[str, Any] | str:
    return {"email": user["email"], "id": str(user["id"])}.get(fmt, user)


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def people(run: Runner) -> dict[str, dict[str, Any]]:
    """ada: password, two roles, has logged in; bob: no password, disabled; cy: plain."""
    create_user(
        run, "Ada@Example.COM", "--username", "ada", "--full-name", "Ada Lovelace", "--role", "staff", "--role", "beta"
    )
    assert ok(login(run, "ada@example.com")).stdout.count(".") == 2
    create_user(run, "bob@example.com", "--username", "bob", password=None)
    ok(run("disable", "bob@example.com"))
    create_user(run, "cy@corp.example", "--full-name", "Cy Corp", password=None)
    return {user["username"] or user["email"].split("@")[0]: user for user in users(run)}


# ---- output formats ---------------------------------------------------------------------------


def test_list_jsonl_has_exactly_the_contract_fields(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    result = ok(run("list", "-o", "jsonl"))
    assert result.stderr == ""
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [list(record) for record in records] == [FIELDS] * 3
    assert [(r["email"], r["username"], r["full_name"], r["is_active"], r["roles"]) for r in records] == [
        ("ada@example.com", "ada", "Ada Lovelace", True, ["beta", "staff"]),
        ("bob@example.com", "bob", None, False, []),
        ("cy@corp.example", None, "Cy Corp", True, []),
    ]
    assert [type(record["id"]) for record in records] == [int] * 3
    assert records[0]["id"] < records[1]["id"] < records[2]["id"]  # oldest first
    for record in records:
        assert_utc_timestamp(record["created_at"])
    assert_utc_timestamp(records[0]["last_login_at"])
    assert records[1]["last_login_at"] is None


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_list_json_and_csv_say_what_jsonl_says(run: Runner, people: dict[str, dict[str, Any]], fmt: str) -> None:
    result = ok(run("list", "-o", fmt))
    assert result.stderr == ""
    decoded = json.loads(result.stdout) if fmt == "json" else from_csv(result.stdout)
    assert decoded == users(run)


def test_list_csv_joins_roles_with_semicolons(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    rows = list(csv.DictReader(io.StringIO(ok(run("list", "-o", "csv")).stdout)))
    assert [row["roles"] for row in rows] == ["beta;staff", "", ""]
    assert [row["is_active"] for row in rows] == ["true", "false", "true"]
    assert rows[1]["last_login_at"] == ""


def test_list_table_has_a_header_and_a_row_per_user(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    result = ok(run("list"))
    assert result.stderr == ""
    header, rule, *rows = result.stdout.splitlines()
    assert header.split() == FIELDS
    assert set(rule) <= {"-", " "}
    assert [row.split()[2] for row in rows] == ["ada@example.com", "bob@example.com", "cy@corp.example"]
    assert "beta, staff" in rows[0]


@pytest.mark.parametrize("fmt", ["email", "id"])
def test_list_one_value_a_line(run: Runner, people: dict[str, dict[str, Any]], fmt: str) -> None:
    result = ok(run("list", "-o", fmt))
    assert result.stderr == ""
    assert result.stdout == "".join(f"{user[fmt]}\n" for user in users(run))


def test_list_of_nobody(run: Runner) -> None:
    assert ok(run("list")).stdout == ""
    assert ok(run("list", "-o", "json")).stdout == "[]\n"
    assert ok(run("list", "-o", "jsonl")).stdout == ""
    assert ok(run("list", "-o", "csv")).stdout == ",".join(FIELDS) + "\n"
    assert ok(run("list", "-o", "email")).stdout == ""


@pytest.mark.parametrize("fmt", USER_FORMATS)
def test_show_formats(run: Runner, people: dict[str, dict[str, Any]], fmt: str) -> None:
    ada = people["ada"]
    result = ok(run("show", "ADA@example.com", "-o", fmt))
    assert result.stderr == ""
    assert decode_one(fmt, result.stdout) == expected_one(fmt, ada)
    if fmt == "json":
        assert list(json.loads(result.stdout)) == FIELDS


@pytest.mark.parametrize("fmt", USER_FORMATS)
def test_create_formats(run: Runner, fmt: str) -> None:
    result = ok(run("create", "--email", "New@Example.com", "--role", "beta", "--no-password", "-o", fmt))
    assert result.stderr == ""
    (created,) = users(run)
    assert created["email"] == "new@example.com"
    assert decode_one(fmt, result.stdout) == expected_one(fmt, created)


@pytest.mark.parametrize("fmt", USER_FORMATS)
def test_update_formats(run: Runner, people: dict[str, dict[str, Any]], fmt: str) -> None:
    result = ok(run("update", str(people["ada"]["id"]), "--full-name", "Ada King", "-o", fmt))
    assert result.stderr == ""
    updated = users(run)[0]
    assert updated["full_name"] == "Ada King"
    assert decode_one(fmt, result.stdout) == expected_one(fmt, updated)


@pytest.mark.parametrize("fmt", USER_FORMATS)
@pytest.mark.parametrize("command", [["list"], ["show", "ada"], ["update", "ada", "--username", "ada2"]])
def test_no_output_shows_a_password_hash(
    run: Runner, people: dict[str, dict[str, Any]], command: list[str], fmt: str
) -> None:
    command = [people["ada"]["email"] if word == "ada" else word for word in command]
    result = ok(run(*command, "-o", fmt))
    for text in (result.stdout, result.stderr):
        assert "hashed_password" not in text
        assert "$argon2" not in text


def test_create_with_a_password_does_not_show_its_hash(run: Runner) -> None:
    for fmt in USER_FORMATS:
        result = ok(run("create", "--email", f"{fmt}@example.com", "--password-stdin", "-o", fmt, input=PASSWORD))
        assert "hashed_password" not in result.stdout + result.stderr
        assert "$argon2" not in result.stdout + result.stderr


# ---- init and global settings ---------------------------------------------------------------


def test_init_creates_the_schema_and_a_private_key_file_and_is_idempotent(empty_db_url: str, tmp_path: Path) -> None:
    key = tmp_path / "keys" / "new.key"
    key.parent.mkdir()
    run = Runner({"USERMGR_DATABASE_URL": empty_db_url, "USERMGR_KEY_FILE": str(key), "USERMGR_HASH_PROFILE": "test"})
    assert "usermgr init" in error_line(run("list"), 1)
    first = ok(run("init"))
    assert first.stdout == ""
    assert "schema revision" in first.stderr
    assert f"created key file {key} (mode 0600)" in first.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    secret = key.read_bytes()
    again = ok(run("init"))
    assert "schema revision" in again.stderr
    assert "created key file" not in again.stderr
    assert key.read_bytes() == secret
    assert ok(run("list")).stdout == ""
    create_user(run, "a@example.com", password=None)
    ok(run("init"))
    assert emails(run) == ["a@example.com"]


def test_bare_sqlite_path_with_the_key_file_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = Runner({"USERMGR_HASH_PROFILE": "test"})
    ok(run("--db", "users.db.sample", "init"))
    assert (tmp_path / "users.db.sample").is_file()
    assert stat.S_IMODE((tmp_path / "usermgr.key").stat().st_mode) == 0o600
    ok(run("--db", "users.db.sample", "create", "--email", "a@example.com", "--password-stdin", input=PASSWORD))
    assert ok(run("--db", "users.db.sample", "list", "-o", "email")).stdout == "a@example.com\n"
    assert (
        ok(run("--db", f"sqlite:///{tmp_path / 'users.db.sample'}", "list", "-o", "email")).stdout == "a@example.com\n"
    )
    assert ok(login(run, "a@example.com", env={"USERMGR_DATABASE_URL": "users.db.sample"})).stdout.count(".") == 2


def test_database_url_from_the_environment_and_db_overrides_it(run: Runner, tmp_path: Path) -> None:
    create_user(run, "in-env@example.com", password=None)
    assert emails(run) == ["in-env@example.com"]  # the run fixture sets only USERMGR_DATABASE_URL
    other = str(tmp_path / "other.db")
    ok(run("--db", other, "init"))
    assert ok(run("--db", other, "list", "-o", "email")).stdout == ""
    assert emails(run) == ["in-env@example.com"]


def test_default_database_is_users_db_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = Runner({"USERMGR_HASH_PROFILE": "test"})
    assert "usermgr init" in error_line(run("list"), 1)
    ok(run("init"))
    assert (tmp_path / "users.db").is_file()
    assert (tmp_path / "usermgr.key").is_file()


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        ["list", "--bogus"],
        ["frobnicate"],
        ["list", "-o", "yaml"],
        ["show"],
        ["create"],
        ["grant-role", "a@example.com"],
        ["list", "--limit", "-1"],
        ["list", "--limit", "many"],
    ],
    ids=" ".join,
)
def test_usage_errors_are_one_line_and_exit_2(run: Runner, args: list[str]) -> None:
    line = error_line(run(*args), 2)
    assert "--help" in line


def test_no_command_prints_help_on_stderr_and_exits_2() -> None:
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "Example" in result.stderr


def test_version(run: Runner) -> None:
    result = ok(run("--version"))
    assert result.stdout.startswith("usermgr, version ")
    assert result.stderr == ""


@pytest.mark.parametrize("name", [None, *sorted(cli.commands)])
def test_every_command_has_help_with_an_example(name: str | None) -> None:
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(cli, [name, flag] if name else [flag])
        assert result.exit_code == 0, result.stderr
        assert result.stderr == ""
        assert "Example" in result.stdout
        assert result.stdout.startswith("Usage: ")


def test_help_and_readme_list_every_exit_code_of_the_error_table() -> None:
    """The codes are declared once (errors.ERROR_TABLE): `--help` derives its line from it, and the
    README's table must have a row for each."""
    codes = {0, errors.UNEXPECTED_EXIT_CODE} | {codes.exit_code for codes in errors.ERROR_TABLE.values()}
    helped = " ".join(CliRunner().invoke(cli, ["--help"]).stdout.split())
    summary = helped.split("Exit codes: ", 1)[1]
    assert [int(item.split()[0]) for item in summary.rstrip(".").split(", ")] == sorted(codes)
    for code, _status, meaning in errors.ERROR_TABLE.values():
        assert f"{code} {meaning}" in summary
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    assert {int(line.split("|")[1]) for line in table.splitlines() if line.startswith("| ") and "code" not in line} == (
        codes | {130}
    )


# ---- create ------------------------------------------------------------------------------------


def test_create_with_every_option(run: Runner) -> None:
    result = ok(
        run(
            "create",
            "--email",
            "Ada@Example.COM",
            "--username",
            "ada",
            "--full-name",
            "Ada Lovelace",
            "--admin",
            "--role",
            "beta",
            "--role",
            "beta",
            "--role",
            "staff",
            "--no-password",
            "-o",
            "json",
        )
    )
    assert result.stderr == ""
    created = json.loads(result.stdout)
    assert {key: created[key] for key in ("email", "username", "full_name", "is_active", "roles", "last_login_at")} == {
        "email": "ada@example.com",
        "username": "ada",
        "full_name": "Ada Lovelace",
        "is_active": True,
        "roles": ["admin", "beta", "staff"],
        "last_login_at": None,
    }
    assert role_counts(run) == {"admin": 1, "beta": 1, "staff": 1}


def test_create_without_a_password_cannot_log_in(run: Runner) -> None:
    create_user(run, "nopw@example.com", password=None)
    assert error_line(login(run, "nopw@example.com"), 6).startswith("usermgr: error: authentication failed")


def test_create_needs_a_terminal_or_a_password_flag(run: Runner) -> None:
    for stdin in (None, f"{PASSWORD}\n"):
        line = error_line(run("create", "--email", "a@example.com", input=stdin), 2)
        assert "--password-stdin" in line
        assert "--no-password" in line
    assert users(run) == []


def test_create_refuses_both_password_flags(run: Runner) -> None:
    line = error_line(run("create", "--email", "a@example.com", "--password-stdin", "--no-password", input=PASSWORD), 2)
    assert "--password-stdin" in line and "--no-password" in line
    assert users(run) == []


@pytest.mark.parametrize("stdin", [f"{PASSWORD}\n", f"{PASSWORD}\r\n", PASSWORD, f"{PASSWORD}\nsecond line\n"])
def test_password_stdin_takes_the_first_line_without_its_newline(run: Runner, stdin: str) -> None:
    ok(run("create", "--email", "a@example.com", "--password-stdin", input=stdin))
    assert ok(login(run, "a@example.com")).stdout.count(".") == 2  # login sends exactly PASSWORD
    error_line(login(run, "a@example.com", "second line"), 6)


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ("short\n", "password too short"),
        ("\n", "password too short"),
        ("x" * 1025 + "\n", "password too long"),
        ("", "no password on standard input"),
    ],
    ids=["short", "empty line", "too long", "no input"],
)
def test_create_with_a_bad_password_creates_nothing(run: Runner, stdin: str, message: str) -> None:
    before = state(run)
    assert message in error_line(run("create", "--email", "a@example.com", "--password-stdin", input=stdin), 3)
    assert state(run) == before


def test_create_with_a_bad_field_fails_before_reading_a_password(run: Runner) -> None:
    line = error_line(run("create", "--email", "not-an-email", "--password-stdin", input=PASSWORD), 3)
    assert line.startswith("usermgr: error: email: ")
    assert users(run) == []


def test_create_with_a_bad_role_creates_nothing(run: Runner) -> None:
    before = state(run)
    line = error_line(run("create", "--email", "a@example.com", "--role", "Beta", "--no-password"), 3)
    assert "invalid role name 'Beta'" in line
    assert state(run) == before


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (["ada@example.com"], ["ADA@example.com"], "email 'ada@example.com' already exists"),
        (
            ["a@example.com", "--username", "ada"],
            ["b@example.com", "--username", "ada"],
            "username 'ada' already exists",
        ),
    ],
    ids=["email, any case", "username"],
)
def test_create_conflicts(run: Runner, first: list[str], second: list[str], message: str) -> None:
    create_user(run, *first, password=None)
    before = state(run)
    assert message in error_line(run("create", "--email", *second, "--no-password"), 5)
    assert state(run) == before


# ---- show and list ----------------------------------------------------------------------------


def test_show_by_id_and_by_email_in_any_case(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    ada = people["ada"]
    for ref in (str(ada["id"]), "ada@example.com", "ADA@EXAMPLE.COM", f" {ada['id']} "):
        assert json.loads(ok(run("show", ref, "-o", "json")).stdout) == ada


@pytest.mark.parametrize("ref", ["ghost@example.com", "999999", "ghost"])
def test_show_unknown_user(run: Runner, people: dict[str, dict[str, Any]], ref: str) -> None:
    line = error_line(run("show", ref), 4)
    assert f"no user matches {ref!r}" in line


def test_list_filters(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    create_user(run, "dee@example.com", "--admin", password=None)
    assert emails(run, "--role", "beta") == ["ada@example.com"]
    assert emails(run, "--role", "nobody") == []
    assert emails(run, "--admin") == ["dee@example.com"]
    assert emails(run, "--disabled") == ["bob@example.com"]
    assert emails(run, "--active") == ["ada@example.com", "cy@corp.example", "dee@example.com"]
    assert emails(run, "--search", "CORP") == ["cy@corp.example"]
    assert emails(run, "--search", "lovelace") == ["ada@example.com"]  # full name
    assert emails(run, "--search", "bo") == ["bob@example.com"]  # username and email
    assert emails(run, "--search", "%") == []  # a wildcard is a character
    assert emails(run, "--search", "_") == []
    assert emails(run, "--limit", "2") == ["ada@example.com", "bob@example.com"]
    assert emails(run, "--offset", "1", "--limit", "2") == ["bob@example.com", "cy@corp.example"]
    assert emails(run, "--offset", "10") == []
    assert emails(run, "--limit", "0") == []
    assert emails(run, "--active", "--role", "staff", "--search", "ada") == ["ada@example.com"]


def test_list_with_an_invalid_role_name(run: Runner) -> None:
    assert "invalid role name" in error_line(run("list", "--role", "Not A Role"), 3)


# ---- update ---------------------------------------------------------------------------------------


def test_update_changes_only_the_fields_given(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    ada = people["ada"]
    updated = json.loads(ok(run("update", "ada@example.com", "--email", "Ada.King@Example.com", "-o", "json")).stdout)
    assert updated == {**ada, "email": "ada.king@example.com"}
    updated = json.loads(
        ok(run("update", str(ada["id"]), "--username", "aking", "--full-name", "Ada King", "-o", "json")).stdout
    )
    assert updated == {**ada, "email": "ada.king@example.com", "username": "aking", "full_name": "Ada King"}
    assert ok(login(run, "ada.king@example.com")).stdout.count(".") == 2


def test_update_to_its_own_email_is_not_a_conflict(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    ok(run("update", "ada@example.com", "--email", "ADA@example.com", "--username", "ada"))
    assert users(run)[0] == people["ada"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["ghost@example.com", "--full-name", "X"], 4, "no user matches 'ghost@example.com'"),
        (["ada@example.com"], 3, "nothing to change"),
        (["ada@example.com", "--email", "bad"], 3, "email: "),
        (["ada@example.com", "--username", "has space"], 3, "invalid username"),
        (["ada@example.com", "--email", "BOB@example.com"], 5, "email 'bob@example.com' already exists"),
        (["ada@example.com", "--username", "bob"], 5, "username 'bob' already exists"),
        (["ada@example.com", "--full-name", "Ok", "--username", "bob"], 5, "username 'bob' already exists"),
    ],
    ids=["unknown", "nothing", "bad email", "bad username", "email taken", "username taken", "partly valid"],
)
def test_update_failures_change_nothing(
    run: Runner, people: dict[str, dict[str, Any]], args: list[str], code: int, message: str
) -> None:
    before = state(run)
    assert message in error_line(run("update", *args), code)
    assert state(run) == before


# ---- set-password -------------------------------------------------------------------------------------


def test_set_password_replaces_the_old_one_and_revokes_tokens(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    token = ok(login(run, "ada@example.com")).stdout.strip()
    ok(run("verify", token, "--check-db", "-o", "id"))
    result = ok(run("set-password", "ADA@example.com", "--password-stdin", input="a brand new one\n"))
    assert result.stdout == ""
    assert "password changed" in result.stderr
    error_line(login(run, "ada@example.com"), 6)
    assert ok(login(run, "ada@example.com", "a brand new one")).stdout.count(".") == 2
    assert "revoked" in error_line(run("verify", token, "--check-db"), 7)


def test_set_password_gives_a_password_to_a_user_without_one(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    ok(run("set-password", "bob@example.com", "--password-stdin", input=f"{PASSWORD}\r\n"))
    ok(run("enable", "bob@example.com"))
    assert ok(login(run, "bob@example.com")).stdout.count(".") == 2


@pytest.mark.parametrize(
    ("args", "stdin", "code", "message"),
    [
        (["ghost@example.com", "--password-stdin"], "whatever-long\n", 4, "no user matches"),
        (["ada@example.com", "--password-stdin"], "short\n", 3, "password too short"),
        (["ada@example.com", "--password-stdin"], "", 3, "no password on standard input"),
        (["ada@example.com"], "a brand new one\n", 2, "--password-stdin"),
    ],
    ids=["unknown user", "weak", "no input", "no terminal"],
)
def test_set_password_failures_keep_the_old_password(
    run: Runner, people: dict[str, dict[str, Any]], args: list[str], stdin: str, code: int, message: str
) -> None:
    assert message in error_line(run("set-password", *args, input=stdin), code)
    assert ok(login(run, "ada@example.com")).stdout.count(".") == 2


# ---- disable, enable, unlock ------------------------------------------------------------------------


def test_disable_and_enable_several_users(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    ada, cy = people["ada"], people["cy"]
    result = ok(run("disable", "ADA@example.com", str(cy["id"])))
    assert result.stdout == ""
    assert said(result, "2 users", "disabled")
    assert emails(run, "--disabled") == ["ada@example.com", "bob@example.com", "cy@corp.example"]
    error_line(login(run, "ada@example.com"), 6)
    result = ok(run("enable", str(ada["id"]), "cy@corp.example", "bob@example.com"))
    assert said(result, "3 users", "enabled")
    assert emails(run, "--disabled") == []
    ok(login(run, "ada@example.com"))


def test_the_same_user_twice_counts_once(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    result = ok(run("disable", "ada@example.com", str(people["ada"]["id"]), "ADA@EXAMPLE.COM"))
    assert said(result, "1 user", "disabled")


def test_disabling_a_disabled_user_is_fine(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    assert said(ok(run("disable", "bob@example.com")), "1 user", "disabled")
    assert emails(run, "--disabled") == ["bob@example.com"]


def test_unlock_clears_a_lock_that_enable_keeps(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    strict = {"USERMGR_LOCKOUT_THRESHOLD": "2"}
    for _ in range(2):
        error_line(login(run, "ada@example.com", "wrong password", env=strict), 6)
    error_line(login(run, "ada@example.com", env=strict), 6)  # locked: the right password fails too
    ok(run("disable", "ada@example.com"))
    ok(run("enable", "ada@example.com"))
    error_line(login(run, "ada@example.com", env=strict), 6)
    result = ok(run("unlock", "ada@example.com", "cy@corp.example"))
    assert result.stdout == ""
    assert said(result, "2 users", "unlocked")
    assert ok(login(run, "ada@example.com", env=strict)).stdout.count(".") == 2


# ---- roles --------------------------------------------------------------------------------------------


def test_grant_and_revoke_roles(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    assert role_counts(run) == {"admin": 0, "beta": 1, "staff": 1}
    result = ok(run("grant-role", "bob@example.com", str(people["cy"]["id"]), "ada@example.com", "beta"))
    assert result.stdout == ""
    assert said(result, "3 users", "granted", "'beta'")
    ok(run("grant-role", "cy@corp.example", "new-role_2"))
    assert role_counts(run) == {"admin": 0, "beta": 3, "new-role_2": 1, "staff": 1}
    assert emails(run, "--role", "beta") == ["ada@example.com", "bob@example.com", "cy@corp.example"]
    result = ok(run("revoke-role", "ada@example.com", "bob@example.com", "beta"))
    assert said(result, "2 users", "revoked", "'beta'")
    assert emails(run, "--role", "beta") == ["cy@corp.example"]
    ok(run("revoke-role", "ada@example.com", "beta"))  # does not have it: left as it is
    ok(run("revoke-role", "ada@example.com", "never-existed"))
    assert role_counts(run) == {"admin": 0, "beta": 1, "new-role_2": 1, "staff": 1}
    assert "never-existed" not in role_counts(run)


def test_grant_and_revoke_admin(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    result = ok(run("grant-admin", "ada@example.com", "cy@corp.example"))
    assert result.stdout == ""
    assert said(result, "2 users", "granted", "admin")
    ok(run("grant-admin", "ada@example.com"))  # twice is once
    assert emails(run, "--admin") == ["ada@example.com", "cy@corp.example"]
    assert said(ok(run("revoke-admin", "cy@corp.example")), "1 user", "revoked", "admin")
    ok(run("revoke-admin", "bob@example.com"))  # not an admin: left as it is
    assert emails(run, "--admin") == ["ada@example.com"]
    assert role_counts(run)["admin"] == 1


@pytest.mark.parametrize("role", ["Beta", "has space", "a;b", "x" * 65, "admin!"])
def test_grant_role_rejects_bad_names(run: Runner, people: dict[str, dict[str, Any]], role: str) -> None:
    before = state(run)
    assert "invalid role name" in error_line(run("grant-role", "ada@example.com", role), 3)
    assert state(run) == before


def test_roles_formats(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    expected = [{"name": "admin", "members": 0}, {"name": "beta", "members": 1}, {"name": "staff", "members": 1}]
    result = ok(run("roles", "-o", "json"))
    assert result.stderr == ""
    assert json.loads(result.stdout) == expected
    assert [json.loads(line) for line in ok(run("roles", "-o", "jsonl")).stdout.splitlines()] == expected
    assert ok(run("roles", "-o", "csv")).stdout == "name,members\nadmin,0\nbeta,1\nstaff,1\n"
    table = ok(run("roles")).stdout.splitlines()
    assert table[0].split() == ["name", "members"]
    assert [line.split() for line in table[2:]] == [["admin", "0"], ["beta", "1"], ["staff", "1"]]
    error_line(run("roles", "-o", "email"), 2)


# ---- delete -------------------------------------------------------------------------------------------


def test_delete_several_with_yes(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    result = ok(run("delete", "ADA@example.com", str(people["bob"]["id"]), "--yes"))
    assert result.stdout == ""
    assert said(result, "2 users", "deleted")
    assert emails(run) == ["cy@corp.example"]
    assert role_counts(run) == {"admin": 0, "beta": 0, "staff": 0}
    error_line(run("show", "ada@example.com"), 4)
    create_user(run, "ada@example.com", password=None)  # the email is free again


def test_delete_without_yes_and_no_terminal_refuses(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    before = state(run)
    for stdin in (None, "y\n"):
        assert "--yes" in error_line(run("delete", "ada@example.com", input=stdin), 2)
    assert "--yes" in error_line(run("delete", "-", input="ada@example.com\n"), 2)
    assert state(run) == before


def test_delete_unknown_user_deletes_nothing(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    before = state(run)
    line = error_line(run("delete", "ada@example.com", "ghost@example.com", "-y"), 4)
    assert "'ghost@example.com' (argument 2)" in line
    assert "nothing was changed" in line
    assert state(run) == before


# ---- the last active admin --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["revoke-admin", "ada@example.com"],
        ["revoke-role", "ada@example.com", "admin"],
        ["disable", "ada@example.com"],
        ["delete", "ada@example.com", "--yes"],
        ["disable", "-"],
    ],
    ids=" ".join,
)
def test_the_last_active_admin_stays(run: Runner, people: dict[str, dict[str, Any]], command: list[str]) -> None:
    ok(run("grant-admin", "ada@example.com", "bob@example.com"))  # bob is disabled: he does not count
    before = state(run)
    line = error_line(run(*command, input="cy@corp.example\nada@example.com\n"), 5)
    assert "last active admin" in line
    assert state(run) == before


def test_two_admins_can_lose_one_but_not_both(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    ok(run("grant-admin", "ada@example.com", "cy@corp.example"))
    before = state(run)
    error_line(run("disable", "ada@example.com", "cy@corp.example"), 5)
    error_line(run("revoke-admin", "ada@example.com", "cy@corp.example"), 5)
    error_line(run("delete", "ada@example.com", "cy@corp.example", "--yes"), 5)
    assert state(run) == before
    ok(run("revoke-admin", "cy@corp.example"))
    assert "last active admin" in error_line(run("disable", "ada@example.com"), 5)
    assert emails(run, "--admin", "--active") == ["ada@example.com"]


def test_with_no_admin_at_all_users_can_still_be_changed(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    ok(run("disable", "ada@example.com"))
    ok(run("delete", "cy@corp.example", "--yes"))
    assert emails(run) == ["ada@example.com", "bob@example.com"]


# ---- batches from standard input ------------------------------------------------------------------


def test_list_by_role_piped_into_disable(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    ok(run("grant-role", "cy@corp.example", "beta"))
    piped = ok(run("list", "--role", "beta", "-o", "email")).stdout
    assert piped == "ada@example.com\ncy@corp.example\n"
    result = ok(run("disable", "-", input=piped))
    assert result.stdout == ""
    assert said(result, "2 users", "disabled")
    assert emails(run, "--disabled") == ["ada@example.com", "bob@example.com", "cy@corp.example"]


def test_ids_piped_into_grant_role_with_crlf_and_padding(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    ids = ok(run("list", "--search", "example.com", "-o", "id")).stdout.splitlines()
    result = ok(run("grant-role", "-", "staff", input="".join(f" {line} \r\n" for line in ids)))
    assert said(result, "2 users", "granted", "'staff'")
    assert emails(run, "--role", "staff") == ["ada@example.com", "bob@example.com"]


BATCHES = [
    ["disable", "-"],
    ["enable", "-"],
    ["unlock", "-"],
    ["grant-admin", "-"],
    ["revoke-admin", "-"],
    ["grant-role", "-", "gamma"],
    ["revoke-role", "-", "beta"],
    ["delete", "-", "--yes"],
]


@pytest.mark.parametrize("command", BATCHES, ids=" ".join)
def test_unknown_user_on_line_3_changes_nothing(
    run: Runner, people: dict[str, dict[str, Any]], command: list[str]
) -> None:
    ok(run("grant-admin", "cy@corp.example"))
    before = state(run)
    stdin = "ada@example.com\nbob@example.com\nghost@example.com\ncy@corp.example\n"
    line = error_line(run(*command, input=stdin), 4)
    assert "'ghost@example.com' (line 3)" in line
    assert "nothing was changed" in line
    assert state(run) == before


@pytest.mark.parametrize("command", BATCHES, ids=" ".join)
def test_dash_cannot_be_mixed_with_users(run: Runner, people: dict[str, dict[str, Any]], command: list[str]) -> None:
    before = state(run)
    mixed = [command[0], "ada@example.com", *command[1:]]
    line = error_line(run(*mixed, input="bob@example.com\n"), 2)
    assert "cannot be mixed" in line
    assert state(run) == before


@pytest.mark.parametrize("command", BATCHES, ids=" ".join)
def test_batch_commands_need_a_user(run: Runner, command: list[str]) -> None:
    no_users = [word for word in command if word != "-"]
    if no_users[0] in ("grant-role", "revoke-role"):
        no_users = no_users[:1]  # the one word left would be taken for a user, the role missing
    assert "Missing argument" in error_line(run(*no_users), 2)


def test_empty_stdin_changes_no_one(run: Runner, people: dict[str, dict[str, Any]]) -> None:
    """`list --role nobody -o email | usermgr disable -` must not fail when nothing matches."""
    before = state(run)
    result = run("disable", "-", input="")
    assert (result.exit_code, result.stdout) == (0, "")
    assert "disabled 0 users" in result.stderr
    assert state(run) == before


def test_blank_lines_on_stdin_are_skipped_and_lines_keep_their_numbers(
    run: Runner, people: dict[str, dict[str, Any]]
) -> None:
    before = state(run)
    assert "'ghost@example.com' (line 4)" in error_line(
        run("disable", "-", input="ada@example.com\n\n\nghost@example.com\n"), 4
    )
    assert state(run) == before
    result = run("disable", "-", input="\ncy@corp.example\n\n")
    assert result.exit_code == 0, result.stderr
    assert "disabled 1 user" in result.stderr
