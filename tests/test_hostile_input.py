"""Hostile values in every field the CLI takes, and databases that are not what they should be.

Each value is either rejected (exit 3, one `usermgr: error:` line, nothing written) or
accepted and stored exactly as the schemas' rules say (NFKC, stripped, email lowercased).
"""

from __future__ import annotations

import json
import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Runner, error_line, shown

REJECTED = None


@dataclass(frozen=True)
class Case:
    label: str
    value: str
    stored: str | None  # what the database keeps, or REJECTED (exit 3)

    def __str__(self) -> str:
        return self.label


EMAILS = [
    Case("empty", "", REJECTED),
    Case("300 characters", "a" * 288 + "@example.com", REJECTED),
    Case("NUL", "a\x00b@example.com", REJECTED),
    Case("right-to-left override", "ab\u202ecd@example.com", REJECTED),
    Case("zero-width space", "ab\u200bcd@example.com", REJECTED),
    Case("SQL or-true", "' OR 1=1 --@example.com", REJECTED),
    Case("SQL drop table", "x'); DROP TABLE users; --@example.com", REJECTED),
    Case("quotes and dashes, valid", "o'reilly'--@example.com", "o'reilly'--@example.com"),
    Case("full-width letters", "ＡＤＡ@ＥＸＡＭＰＬＥ.ｃｏｍ", "ada@example.com"),
    Case("emoji local part", "😀@example.com", "😀@example.com"),
    Case("emoji domain", "ada@😀.example", REJECTED),
    Case("newline inside", "ada\n@example.com", REJECTED),
    Case("trailing newline", "ada@example.com\n", "ada@example.com"),
    Case("carriage return inside", "ada\r@example.com", REJECTED),
    Case("leading and trailing spaces", "  Ada@Example.com  ", "ada@example.com"),
    Case("inner space", "a da@example.com", REJECTED),
    Case("trailing dot in the domain", "ada@example.com.", REJECTED),
    Case("upper-case domain and local part", "ADA@EXAMPLE.COM", "ada@example.com"),
]

USERNAMES = [
    Case("empty", "", REJECTED),
    Case("300 characters", "u" * 300, REJECTED),
    Case("150 characters", "u" * 150, "u" * 150),
    Case("NUL", "a\x00b", REJECTED),
    Case("right-to-left override", "ab\u202ecd", REJECTED),
    Case("SQL or-true", "' OR 1=1 --", REJECTED),
    Case("SQL drop table", "x'); DROP TABLE users; --", REJECTED),
    Case("full-width letters", "ＡＤＡ", "ADA"),
    Case("emoji", "ada😀", REJECTED),
    Case("newline inside", "ada\nking", REJECTED),
    Case("trailing newline", "ada\n", "ada"),
    Case("leading and trailing spaces", "  ada  ", "ada"),
    Case("only spaces", "   ", REJECTED),
    Case("Cyrillic a", "\u0430da", REJECTED),  # usernames are ASCII: no look-alike can be one
    Case("zero-width space", "a\u200bda", REJECTED),
    Case("a uid's form", "123e4567-e89b-42d3-a456-426614174000", REJECTED),  # USER by uid would be ambiguous
]

FULL_NAMES = [
    Case("empty", "", REJECTED),
    Case("300 characters", "n" * 300, "n" * 300),
    Case("301 characters", "n" * 301, REJECTED),
    Case("NUL", "Ada\x00King", REJECTED),
    Case("right-to-left override", "Ada \u202eecalevoL", REJECTED),
    Case("zero-width space", "Ada\u200bKing", REJECTED),
    Case("SQL or-true", "' OR 1=1 --", "' OR 1=1 --"),
    Case("SQL drop table", "x'); DROP TABLE users; --", "x'); DROP TABLE users; --"),
    Case("full-width letters", "Ａｄａ Ｋｉｎｇ", "Ada King"),
    Case("emoji", "Ada 🚀 King", "Ada 🚀 King"),
    Case("newline inside", "Ada\nKing", REJECTED),
    Case("tab inside", "Ada\tKing", REJECTED),
    Case("leading and trailing spaces", "  Ada King  ", "Ada King"),
    Case("only spaces", "   ", REJECTED),
    Case("accents, decomposed", "Ade\u0300le", "Adèle"),
]

ROLES = [
    Case("empty", "", REJECTED),
    Case("300 characters", "r" * 300, REJECTED),
    Case("64 characters", "r" * 64, "r" * 64),
    Case("NUL", "be\x00ta", REJECTED),
    Case("right-to-left override", "be\u202eta", REJECTED),
    Case("SQL or-true", "' OR 1=1 --", REJECTED),
    Case("SQL drop table", "x'); DROP TABLE users; --", REJECTED),
    Case("full-width letters", "ｂｅｔａ", REJECTED),  # role names are not normalised, only checked
    Case("emoji", "beta😀", REJECTED),
    Case("newline inside", "be\nta", REJECTED),
    Case("trailing newline", "beta\n", REJECTED),
    Case("leading and trailing spaces", "  beta  ", REJECTED),
    Case("upper case", "Beta", REJECTED),
    Case("CSV separator", "a;b", REJECTED),
]

PROFILE = [("email", case) for case in EMAILS] + [
    (field, case) for field, cases in (("username", USERNAMES), ("full_name", FULL_NAMES)) for case in cases
]


# ---- helpers --------------------------------------------------------------------------------


def snapshot(run: Runner) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every user and every role with its count, as the CLI shows them."""
    listed = run("list", "-o", "jsonl")
    roles = run("roles", "-o", "json")
    assert listed.exit_code == 0 and roles.exit_code == 0, listed.stderr + roles.stderr
    return [json.loads(line) for line in listed.stdout.splitlines()], json.loads(roles.stdout)


def option(field: str) -> str:
    return "--" + field.replace("_", "-")


@pytest.fixture
def existing(run: Runner) -> dict[str, Any]:
    """A user that hostile updates and grants aim at."""
    result = run(
        "create",
        "--email",
        "target@example.com",
        "--username",
        "target",
        "--full-name",
        "Tar Get",
        "--role",
        "staff",
        "--no-password",
        "-o",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# ---- profile fields ---------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "case"), PROFILE, ids=lambda value: str(value))
def test_create_with_a_hostile_field(run: Runner, field: str, case: Case) -> None:
    fields = {"email": "new@example.com", field: case.value}
    args = [arg for name, value in fields.items() for arg in (option(name), value)]
    before = snapshot(run)
    result = run("create", *args, "--no-password", "-o", "json")
    if case.stored is REJECTED:
        line = error_line(result, 3)
        assert line.startswith(f"usermgr: error: {field}: ")
        assert snapshot(run) == before
        return
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    created = json.loads(result.stdout)
    assert created[field] == case.stored
    assert shown(run, created["email"]) == created
    assert len(snapshot(run)[0]) == 1


@pytest.mark.parametrize(
    ("full_name", "message"),
    [
        ("n" * 301, "full_name: full name too long: use at most 300 characters"),
        ("Ada\u200bKing", "full_name: full name must not contain control or invisible formatting characters"),
        ("Ada\tKing", "full_name: full name must not contain control or invisible formatting characters"),
    ],
    ids=["301-characters", "zero-width-space", "tab"],
)
def test_a_refused_full_name_says_why(run: Runner, full_name: str, message: str) -> None:
    """The reason, not only the field: a person must be able to fix the name they typed."""
    result = run("create", "--email", "new@example.com", "--full-name", full_name, "--no-password")
    assert error_line(result, 3) == f"usermgr: error: {message}"


@pytest.mark.parametrize(("field", "case"), PROFILE, ids=lambda value: str(value))
def test_update_with_a_hostile_field(run: Runner, existing: dict[str, Any], field: str, case: Case) -> None:
    before = snapshot(run)
    result = run("update", "target@example.com", option(field), case.value, "-o", "json")
    if case.stored is REJECTED:
        line = error_line(result, 3)
        assert line.startswith(f"usermgr: error: {field}: ")
        assert snapshot(run) == before
        return
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == {**existing, field: case.stored}
    assert snapshot(run)[0] == [{**existing, field: case.stored}]


# ---- role names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ROLES, ids=str)
def test_grant_a_hostile_role(run: Runner, existing: dict[str, Any], case: Case) -> None:
    before = snapshot(run)
    result = run("grant-role", "target@example.com", case.value)
    if case.stored is REJECTED:
        assert "invalid role name" in error_line(result, 3)
        assert snapshot(run) == before
        return
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert snapshot(run)[0][0]["roles"] == sorted(["staff", case.stored])


@pytest.mark.parametrize("case", ROLES, ids=str)
def test_create_with_a_hostile_role(run: Runner, case: Case) -> None:
    before = snapshot(run)
    result = run("create", "--email", "new@example.com", "--role", "beta", "--role", case.value, "--no-password")
    if case.stored is REJECTED:
        assert "invalid role name" in error_line(result, 3)
        assert snapshot(run) == before
        return
    assert result.exit_code == 0, result.stderr
    assert snapshot(run)[0][0]["roles"] == sorted(["beta", case.stored])


@pytest.mark.parametrize("case", ROLES, ids=str)
def test_revoke_or_filter_by_a_hostile_role(run: Runner, existing: dict[str, Any], case: Case) -> None:
    before = snapshot(run)
    revoked = run("revoke-role", "target@example.com", case.value)
    listed = run("list", "--role", case.value, "-o", "email")
    if case.stored is REJECTED:
        error_line(revoked, 3)
        error_line(listed, 3)
    else:
        assert (revoked.exit_code, listed.exit_code, listed.stdout) == (0, 0, "")
    assert snapshot(run) == before


# ---- hostile references to users ------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    [
        "' OR 1=1 --",
        "1 OR 1=1",
        "1; DROP TABLE users",
        "%",
        "_",
        "*",
        "target@example.com' --",
        "target@example.com\u202e",
        "+1",
        "0",
        "1.0",
        "0x1",
        "",
    ],
    ids=ascii,
)
def test_hostile_user_references_match_nobody(run: Runner, existing: dict[str, Any], ref: str) -> None:
    before = snapshot(run)
    assert "no user matches" in error_line(run("show", ref), 4)
    assert "no user matches" in error_line(run("disable", ref), 4)
    if ref:  # a blank line of standard input names no one (see the next test)
        assert "no user matches" in error_line(run("grant-role", "-", "beta", input=f"{ref}\n"), 4)
    assert snapshot(run) == before


def test_a_blank_line_of_standard_input_names_no_one(run: Runner, existing: dict[str, Any]) -> None:
    before = snapshot(run)
    result = run("grant-role", "-", "beta", input="\n")
    assert (result.exit_code, result.stdout) == (0, "")
    assert "to 0 users" in result.stderr
    assert snapshot(run) == before


@pytest.mark.parametrize("text", ["' OR 1=1 --", "%", "_", "\\", "' OR ''='", "😀"], ids=ascii)
def test_hostile_search_text_matches_only_itself(run: Runner, existing: dict[str, Any], text: str) -> None:
    result = run("list", "--search", text, "-o", "email")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")


def test_a_stored_sql_quote_is_found_by_a_search_for_it(run: Runner) -> None:
    created = run("create", "--email", "q@example.com", "--full-name", "' OR 1=1 --", "--no-password")
    assert created.exit_code == 0, created.stderr
    run("create", "--email", "other@example.com", "--no-password")
    result = run("list", "--search", "' or 1=1", "-o", "email")
    assert (result.exit_code, result.stdout) == (0, "q@example.com\n")


# ---- user references that look like ids ------------------------------------------------------------


@pytest.mark.parametrize("ref", ["²", "١", "１"], ids=["superscript two", "Arabic-Indic one", "full-width one"])
def test_digits_beyond_ascii_are_not_ids(run: Runner, existing: dict[str, Any], ref: str) -> None:
    """`str.isdigit()` is true for them; only ASCII digits name an id (the existing user is id 1).

    A USER is NFKC-normalised like a stored email, so `１` and `²` become `1` and `2`:
    the full-width one names id 1, and `²` names id 2, which does not exist."""
    if ref == "１":
        assert shown(run, ref)["id"] == 1
        return
    before = snapshot(run)
    assert "no user matches" in error_line(run("show", ref), 4)
    assert "no user matches" in error_line(run("disable", ref), 4)
    assert "authentication failed" in error_line(run("login", ref, "--password-stdin", input="pw\n"), 6)
    assert snapshot(run) == before


@pytest.mark.parametrize("ref", ["3000000000", "9" * 20], ids=["beyond 32 bits", "beyond 64 bits"])
def test_an_id_too_big_for_the_database_is_an_unknown_user(run: Runner, existing: dict[str, Any], ref: str) -> None:
    before = snapshot(run)
    assert "no user matches" in error_line(run("show", ref), 4)
    assert "no user matches" in error_line(run("disable", "-", input=f"{ref}\n"), 4)
    assert snapshot(run) == before


@pytest.mark.parametrize("ref", ["1\x00", "target@example.com\x00"], ids=ascii)
def test_a_nul_in_a_user_reference_is_an_unknown_user(run: Runner, existing: dict[str, Any], ref: str) -> None:
    """argv cannot hold a NUL, but standard input can: `printf 'a\\0b\\n' | usermgr disable -`."""
    before = snapshot(run)
    assert "no user matches" in error_line(run("disable", "-", input=f"{ref}\n"), 4)
    assert "no user matches" in error_line(run("show", ref), 4)
    assert snapshot(run) == before


@pytest.mark.parametrize(
    ("args", "stdin", "where"),
    [
        (["show"], None, ""),
        (["disable", "-"], "target@example.com\n", " (line 2)"),
        (["audit", "--user"], None, ""),
    ],
    ids=["show", "disable -", "audit --user"],
)
def test_a_megabyte_user_reference_is_not_echoed_whole(
    run: Runner, existing: dict[str, Any], args: list[str], stdin: str | None, where: str
) -> None:
    """One line a person can read (and a log can keep): the first characters, then `...`."""
    ref = "x" * 1_000_000
    before = snapshot(run)
    command = args if stdin is not None else [*args, ref]
    result = run(*command, input=None if stdin is None else stdin + ref + "\n")
    line = error_line(result, 4)
    assert line.startswith(f"usermgr: error: no user matches '{'x' * 60}...'{where}"), line[:200]
    assert len(line) < 300
    assert snapshot(run) == before


# ---- databases that are not what they should be ---------------------------------------------------


def _runner(database: str | Path) -> Runner:
    return Runner({"USERMGR_DATABASE_URL": str(database), "USERMGR_HASH_PROFILE": "test"})


@pytest.fixture
def garbage(tmp_path: Path) -> Path:
    path = tmp_path / "users.db"
    path.write_bytes(random.Random(3).randbytes(4096))
    return path


@pytest.mark.parametrize(
    "command",
    [["list"], ["init"], ["show", "1"], ["create", "--email", "a@example.com", "--no-password"]],
    ids=" ".join,
)
def test_a_corrupt_database_file(garbage: Path, command: list[str]) -> None:
    content = garbage.read_bytes()
    line = error_line(_runner(garbage)(*command), 1)
    assert "corrupt or not SQLite" in line
    assert garbage.read_bytes() == content


@pytest.mark.parametrize("command", [["list"], ["init"]], ids=" ".join)
def test_an_unreachable_database_path(tmp_path: Path, command: list[str]) -> None:
    run = _runner(tmp_path)
    line = error_line(run("--db", "/nonexistent/dir/users.db", *command), 1)
    assert "database" in line
    assert not Path("/nonexistent").exists()


def test_a_directory_as_the_database(tmp_path: Path) -> None:
    for command in ("list", "init"):
        assert "cannot use the database" in error_line(_runner(tmp_path)(command), 1)


def test_an_unreachable_postgresql_server(tmp_path: Path) -> None:
    run = _runner("postgresql://nobody@127.0.0.1:1/users")
    for command in ("list", "init"):
        assert "cannot use the database" in error_line(run(command), 1)


def test_a_database_url_without_its_driver(tmp_path: Path) -> None:
    assert "unsupported database 'mysql'" in error_line(_runner("mysql://db/users")("list"), 2)


@pytest.mark.parametrize("kind", ["other tables", "zero bytes"])
def test_a_sqlite_file_without_the_schema_says_to_run_init(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "users.db"
    if kind == "zero bytes":
        path.touch()
    else:
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    run = _runner(path)
    for command in (["list"], ["show", "1"], ["create", "--email", "a@example.com", "--no-password"]):
        assert "run `usermgr init`" in error_line(run(*command), 1)
    initialised = run("--key-file", str(tmp_path / "k.key"), "init")
    assert initialised.exit_code == 0, initialised.stderr
    listed = run("list", "-o", "jsonl")
    assert (listed.exit_code, listed.stdout, listed.stderr) == (0, "", "")


def test_a_missing_sqlite_file_says_to_run_init_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    assert "usermgr init" in error_line(_runner(path)("list"), 1)
    assert not path.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["list", "-o", "jsonl"],
        ["list", "-o", "json"],
        ["list", "-o", "table"],
        ["show", "garbled@example.com"],
        ["show", "garbled@example.com", "-o", "jsonl"],
        ["export"],
    ],
)
def test_a_stored_timestamp_that_is_not_one_is_named_not_called_a_bug(tmp_path: Path, command: list[str]) -> None:
    """Text another tool wrote into a timestamp column ends a read with one line that says
    what is wrong with the database (exit 1, DatabaseUnavailable's), on the fast list/export
    path and the ORM's alike; the value is shown cut short, its newline escaped."""
    path = tmp_path / "users.db"
    run = _runner(path)
    assert run("--key-file", str(tmp_path / "k.key"), "init").exit_code == 0
    assert run("create", "--email", "garbled@example.com", "--no-password").exit_code == 0
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE users SET created_at = ?", ("garbage\n" + "x" * 500,))
    line = error_line(run(*command), 1)
    shown = "'garbage\\n" + "x" * 27 + "..."  # repr, cut at 40 characters
    assert line == (
        f"usermgr: error: the database holds a timestamp usermgr cannot read ({shown}):"
        " correct that row with SQL or restore a backup"
    )
