"""import, export and batch arguments: all or nothing, line numbers, round trips."""

from __future__ import annotations

import csv
import io
import json
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import bcrypt
import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from tests.conftest import (
    CONTRACT_USER_FIELDS,
    HANG_TIMEOUT,
    USERMGR,
    Runner,
    emails,
    login,
    ok,
    process_env,
    run_usermgr,
    shown,
    user_count,
    users,
)
from usermgr import service
from usermgr.cli import LARGE_IMPORT_ROWS
from usermgr.config import sqlite_path
from usermgr.models import User, new_uids
from usermgr.output import InputRow


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def test_import_csv_file_with_roles_and_flags(run: Runner, tmp_path: Path) -> None:
    source = tmp_path / "staff.csv"
    source.write_text(
        "email,username,full_name,roles,is_active\nAnn@Example.com,ann,Ann A,staff;beta,true\nbo@example.com,,,,false\n"
    )
    result = run("import", str(source))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "2 created, 0 updated, 0 skipped" in result.stderr
    assert [(u["email"], u["username"], u["roles"], u["is_active"]) for u in users(run)] == [
        ("ann@example.com", "ann", ["beta", "staff"], True),
        ("bo@example.com", None, [], False),
    ]


def test_import_jsonl_from_stdin_needs_format(run: Runner) -> None:
    data = jsonl({"email": "a@example.com", "roles": ["x"]})
    refused = run("import", "-", input=data)
    assert refused.exit_code == 2
    assert "--format" in refused.stderr
    assert emails(run) == []
    accepted = run("import", "-", "--format", "jsonl", input=data)
    assert accepted.exit_code == 0, accepted.stderr
    assert emails(run) == ["a@example.com"]


def test_bad_rows_are_reported_by_line_and_nothing_is_written(run: Runner) -> None:
    rows = ["email,password"] + [f"user{i}@example.com,password{i:04d}" for i in range(5)]
    rows[2] = "not-an-email,password-ok"
    rows[4] = "weak@example.com,short"
    result = run("import", "-", "--format", "csv", input="\n".join(rows) + "\n")
    assert result.exit_code == 3
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert all(line.startswith("usermgr: error: ") for line in lines)
    assert lines[0].startswith("usermgr: error: line 3: email")
    assert lines[1].startswith("usermgr: error: line 5: password")
    assert "2 invalid rows; nothing was imported" in lines[-1]
    assert emails(run) == []


def test_only_the_first_twenty_bad_rows_are_listed(run: Runner) -> None:
    data = "email\n" + "".join(f"bad{i}\n" for i in range(45))
    result = run("import", "-", "--format", "csv", input=data)
    assert result.exit_code == 3
    listed = [line for line in result.stderr.splitlines() if ": line " in line]
    assert len(listed) == 20
    assert "45 invalid rows (the first 20 shown)" in result.stderr


ARGON2_HASH = "$argon2id$v=19${cost}$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g"
BCRYPT_HASH = "$2b${cost}$" + "N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy"


@pytest.mark.parametrize(
    ("hashed", "refused"),
    [
        (ARGON2_HASH.format(cost="m=65536,t=3,p=4"), False),  # argon2-cffi's defaults
        (ARGON2_HASH.format(cost="m=1048576,t=16,p=16"), False),  # at every cap
        (ARGON2_HASH.format(cost="m=1048577,t=1,p=1"), True),
        (ARGON2_HASH.format(cost="m=65536,t=17,p=4"), True),
        (ARGON2_HASH.format(cost="m=65536,t=999999999,p=4"), True),
        (ARGON2_HASH.format(cost="m=65536,t=3,p=17"), True),
        (BCRYPT_HASH.format(cost="12"), False),
        (BCRYPT_HASH.format(cost="16"), False),
        (BCRYPT_HASH.format(cost="17"), True),
        (BCRYPT_HASH.format(cost="31"), True),
    ],
)
def test_an_imported_hash_costs_at_most_what_a_login_can_pay(run: Runner, hashed: str, refused: bool) -> None:
    """A stored hash sets the work of every login to its account, and anyone may try a login:
    an imported argon2 of t=999999999 or a bcrypt of cost 31 would hold a worker for hours a
    try. Import takes hashes up to argon2 m=1 GiB, t=16, p=16 and bcrypt cost 16."""
    result = run(
        "import",
        "-",
        "--format",
        "jsonl",
        input=json.dumps({"email": "a@example.com", "hashed_password": hashed}) + "\n",
    )
    if refused:
        assert result.exit_code == 3, result.stderr
        assert (
            "line 1: hashed_password: unsupported hashed_password: its cost is beyond what a login can pay"
            in result.stderr
        )
        assert run("show", "a@example.com").exit_code == 4
    else:
        assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    "data, problem",
    [
        ("{not json}\n", "line 1: not valid JSON"),
        ("[1, 2]\n", "line 1: not a JSON object"),
        ('{"email": "a@example.com", "password": "long-enough", "hashed_password": "$2b$04$x"}\n', "line 1:"),
        ('{"email": "a@example.com", "hashed_password": "md5$abc"}\n', "unsupported hashed_password"),
        ('{"email": "a@example.com", "roles": ["Not Valid"]}\n', "invalid role name"),
        # Longer than the column (512): PostgreSQL refused it as a database failure (exit 1).
        (
            json.dumps(
                {
                    "email": "a@example.com",
                    "hashed_password": "$argon2id$v=19$m=65536,t=3,p=4$" + "c2FsdA" * 80 + "$aGFzaA",
                }
            )
            + "\n",
            "line 1: hashed_password: unsupported hashed_password: longer than 512 characters",
        ),
    ],
)
def test_malformed_jsonl_rows(run: Runner, data: str, problem: str) -> None:
    result = run("import", "-", "--format", "jsonl", input=data)
    assert result.exit_code == 3
    assert problem in result.stderr
    assert "Traceback" not in result.stderr
    assert emails(run) == []


def test_csv_with_a_row_of_the_wrong_width(run: Runner) -> None:
    result = run("import", "-", "--format", "csv", input="email,username\na@example.com,a,extra\n")
    assert result.exit_code == 3
    assert "line 2: 3 cells where the header has 2" in result.stderr


TWICE_CSV, TWICE_JSON = "line 1: the CSV header names 'email' twice", "line 1: the JSON object names 'email' twice"


@pytest.mark.parametrize(
    ("fmt", "data", "problem"),
    [
        ("csv", "email,full_name,email\na@example.com,A,admin@example.com\n", TWICE_CSV),
        ("csv", "email, email \na@example.com,b@example.com\n", TWICE_CSV),
        ("jsonl", '{"email": "a@example.com", "email": "admin@example.com"}\n', TWICE_JSON),
        ("jsonl", '{"email": "a@example.com", "roles": ["x"], "roles": ["admin"]}\n', "names 'roles' twice"),
    ],
    ids=["csv", "csv-spaced", "jsonl", "jsonl-roles"],
)
def test_a_field_named_twice_in_one_row_is_refused(run: Runner, fmt: str, data: str, problem: str) -> None:
    """The last of two equal names won, where a reviewer of the file (or a tool that checked it
    first) may read the first: the two would disagree on who is imported, and with what roles."""
    result = run("import", "-", "--format", fmt, input=data)
    assert result.exit_code == 3, result.stderr
    assert problem in result.stderr
    assert emails(run) == []


def test_input_that_is_not_utf8(run: Runner, tmp_path: Path) -> None:
    source = tmp_path / "latin1.csv"
    source.write_bytes("email,full_name\nz@example.com,Jos\xe9\n".encode("latin-1"))
    result = run("import", str(source))
    assert result.exit_code == 3
    assert "not UTF-8" in result.stderr
    assert emails(run) == []


def test_conflicts_error_skip_update(run: Runner) -> None:
    assert run("create", "--email", "old@example.com", "--full-name", "Old", "--no-password").exit_code == 0
    data = "email,full_name,roles\nnew@example.com,New,\nold@example.com,Renamed,staff\n"
    conflict = run("import", "-", "--format", "csv", input=data)
    assert conflict.exit_code == 5
    assert "line 3" in conflict.stderr and "--on-conflict" in conflict.stderr
    assert emails(run) == ["old@example.com"]

    skipped = run("import", "-", "--format", "csv", "--on-conflict", "skip", input=data)
    assert skipped.exit_code == 0, skipped.stderr
    assert "1 created, 0 updated, 1 skipped" in skipped.stderr
    assert shown(run, "old@example.com")["full_name"] == "Old"

    updated = run("import", "-", "--format", "csv", "--on-conflict", "update", input=data.replace("New,", "Newer,"))
    assert updated.exit_code == 0, updated.stderr
    assert "0 created, 2 updated, 0 skipped" in updated.stderr
    old = shown(run, "old@example.com")
    assert (old["full_name"], old["roles"]) == ("Renamed", ["staff"])


SPELLED_FLAGS = {True: [True, 1, "true", "TRUE", "yes", "y", "on", "1"], False: [False, 0, "false", "no", "off", "0"]}


def test_is_active_takes_the_usual_spellings_of_true_and_false(run: Runner) -> None:
    """Spreadsheets write TRUE, people write yes: both read as the flag. JSONL and CSV alike."""
    spelled = [(flag, value) for flag, values in SPELLED_FLAGS.items() for value in values]
    rows = [{"email": f"u{number}@example.com", "is_active": value} for number, (_, value) in enumerate(spelled)]
    ok(run("import", "-", "--format", "jsonl", input=jsonl(*rows)))
    cells = "".join(f"c{number}@example.com,{str(value).lower()}\n" for number, (_, value) in enumerate(spelled))
    ok(run("import", "-", "--format", "csv", input="email,is_active\n" + cells))
    disabled = set(emails(run, "--disabled"))
    for number, (flag, value) in enumerate(spelled):
        for email in (f"u{number}@example.com", f"c{number}@example.com"):
            assert (email not in disabled) is flag, (email, value)


@pytest.mark.parametrize("value", ["2", 2, 0.5, "maybe", " false", None, "", [], {}], ids=repr)
def test_is_active_refuses_anything_else(run: Runner, value: object) -> None:
    result = run("import", "-", "--format", "jsonl", input=jsonl({"email": "a@example.com", "is_active": value}))
    assert result.exit_code == 3, result.stderr
    assert result.stderr.startswith("usermgr: error: line 1: is_active: "), result.stderr
    assert "Traceback" not in result.stderr
    assert emails(run) == []


def test_duplicate_email_within_the_input_is_a_conflict(run: Runner) -> None:
    data = "email\ndup@example.com\nDUP@example.com\n"
    result = run("import", "-", "--format", "csv", input=data)
    assert result.exit_code == 5
    assert "line 3" in result.stderr
    assert emails(run) == []


@pytest.mark.parametrize("on_conflict", ["error", "skip", "update"])
def test_one_username_for_two_emails_within_the_input_names_its_line(run: Runner, on_conflict: str) -> None:
    data = "email,username\nann@example.com,ann\nbo@example.com,bo\nann2@example.com,ann\n"
    result = run("import", "-", "--format", "csv", "--on-conflict", on_conflict, input=data)
    assert (result.exit_code, result.stderr) == (
        5,
        "usermgr: error: line 4: the username 'ann' is also line 2's (ann@example.com); nothing was imported\n",
    )
    assert emails(run) == []


def _spread(first: str, last: str) -> str:
    """`first` and `last` as CSV rows (email,username) with a chunk's worth of rows between."""
    between = "".join(f"filler{number}@example.com,\n" for number in range(1100))
    return f"email,username\n{first}\n{between}{last}\n"


@pytest.mark.parametrize("on_conflict", ["error", "skip", "update"])
def test_a_username_taken_across_chunks_or_in_the_database_names_its_line(run: Runner, on_conflict: str) -> None:
    """The unique index refused these with "already exists: a user with that username", no line."""
    run("create", "--email", "ada@example.com", "--username", "ada", "--no-password")
    across_chunks = run("import", "-", "--format", "csv", "--on-conflict", on_conflict,
                        input=_spread("zed@example.com,email", "zoe@example.com,email"))  # fmt: skip
    assert (across_chunks.exit_code, across_chunks.stderr) == (
        5,
        "usermgr: error: line 1103: the username 'email' is zed@example.com's already; nothing was imported\n",
    )
    in_the_database = run("import", "-", "--format", "csv", "--on-conflict", on_conflict,
                          input="email,username\nbob@example.com,bob\nbea@example.com,ada\n")  # fmt: skip
    assert (in_the_database.exit_code, in_the_database.stderr) == (
        5,
        "usermgr: error: line 3: the username 'ada' is ada@example.com's already; nothing was imported\n",
    )
    assert emails(run) == ["ada@example.com"]


def test_a_skipped_row_holds_no_username(run: Runner) -> None:
    run("create", "--email", "ada@example.com", "--username", "ada", "--no-password")
    data = _spread("ada@example.com,zed", "zoe@example.com,zed\nyan@example.com,ada")
    result = run("import", "-", "--format", "csv", "--on-conflict", "skip", input=data)
    assert result.stderr == (
        "usermgr: error: line 1104: the username 'ada' is ada@example.com's already; nothing was imported\n"
    )


def test_a_username_freed_by_an_earlier_line_moves_without_conflict(run: Runner) -> None:
    run("create", "--email", "ada@example.com", "--username", "ada", "--no-password")
    moved = _spread("ada@example.com,countess", "bea@example.com,ada")
    assert run("import", "-", "--format", "csv", "--on-conflict", "update", input=moved).exit_code == 0
    assert {(user["email"], user["username"]) for user in users(run) if user["username"]} == {
        ("ada@example.com", "countess"),
        ("bea@example.com", "ada"),
    }
    moved_then_clash = _spread("bea@example.com,bee\ncid@example.com,ada\ndee@example.com,cat",
                               "eve@example.com,cat")  # fmt: skip
    result = run("import", "-", "--format", "csv", "--on-conflict", "update", input=moved_then_clash)
    assert result.stderr == (
        "usermgr: error: line 1105: the username 'cat' is dee@example.com's already; nothing was imported\n"
    )


def test_a_username_given_again_to_the_same_email_or_in_a_skipped_row_is_no_conflict(run: Runner) -> None:
    run("create", "--email", "bo@example.com", "--no-password")
    data = "email,username\nann@example.com,ann\nANN@example.com,ann\nbo@example.com,ann\n"
    assert run("import", "-", "--format", "csv", "--on-conflict", "skip", input=data).exit_code == 0
    assert [(user["email"], user["username"]) for user in users(run)] == [
        ("bo@example.com", None),
        ("ann@example.com", "ann"),
    ]


def test_dry_run_writes_nothing(run: Runner) -> None:
    result = run("import", "-", "--format", "jsonl", "--dry-run", input=jsonl({"email": "d@example.com"}))
    assert result.exit_code == 0, result.stderr
    assert "would have 1 created" in result.stderr
    assert emails(run) == []


def test_update_cannot_demote_the_last_admin(run: Runner) -> None:
    run("create", "--email", "root@example.com", "--admin", "--no-password")
    data = jsonl({"email": "root@example.com", "roles": []})
    result = run("import", "-", "--format", "jsonl", "--on-conflict", "update", input=data)
    assert result.exit_code == 5
    assert "last active admin" in result.stderr
    assert shown(run, "root@example.com")["roles"] == ["admin"]


def test_plaintext_passwords_are_hashed_with_an_estimate(run: Runner) -> None:
    data = jsonl({"email": "p@example.com", "password": "correct horse"})
    result = run("import", "-", "--format", "jsonl", input=data)
    assert result.exit_code == 0, result.stderr
    assert "hashing 1 password: about" in result.stderr
    logged_in = login(run, "p@example.com", "correct horse")
    assert logged_in.exit_code == 0, logged_in.stderr


@pytest.mark.parametrize("conflicting", ["old@example.com", "first@example.com"], ids=["existing", "repeated"])
def test_a_conflict_is_found_before_any_password_is_hashed(run: Runner, conflicting: str) -> None:
    assert run("create", "--email", "old@example.com", "--no-password").exit_code == 0
    rows = [{"email": "first@example.com", "password": "correct horse"}]
    rows += [{"email": f"u{n}@example.com"} for n in range(3)] + [{"email": conflicting}]
    result = run("import", "-", "--format", "jsonl", input=jsonl(*rows))
    assert result.exit_code == 5, result.stderr
    assert "line 5" in result.stderr
    assert "hashing" not in result.stderr  # announced before the first hash: none was made
    assert emails(run) == ["old@example.com"]


def test_imported_bcrypt_hash_logs_in_and_is_upgraded(run: Runner, db, settings) -> None:
    hashed = bcrypt.hashpw(b"legacy-password", bcrypt.gensalt(rounds=4)).decode()
    result = run("import", "-", "--format", "jsonl", input=jsonl({"email": "b@example.com", "hashed_password": hashed}))
    assert result.exit_code == 0, result.stderr
    assert login(run, "b@example.com", "legacy-password").exit_code == 0
    stored = db.scalar(select(User.hashed_password).where(User.email == "b@example.com"))
    assert stored.startswith("$argon2id$")


def test_export_import_round_trip_reproduces_users(run: Runner, env: dict, tmp_path: Path, backend: str) -> None:
    run(
        "create",
        "--email",
        "a@example.com",
        "--admin",
        "--full-name",
        "Ä Ünïcode",
        "--password-stdin",
        input="first-password\n",
    )
    run("create", "--email", "b@example.com", "--username", "bee", "--role", "beta", "--no-password")
    run("create", "--email", "c@example.com", "--role", "beta", "--role", "staff", "--no-password")
    run("disable", "c@example.com")
    assert login(run, "a@example.com", "first-password").exit_code == 0
    for fmt in ("jsonl", "csv"):
        exported = run("export", "--with-hashes", "-o", fmt)
        assert exported.exit_code == 0, exported.stderr
        assert "exported 3 users" in exported.stderr
        first = strip_ids(exported.stdout, fmt)[0]
        assert [*first] == [field for field in (*CONTRACT_USER_FIELDS, "hashed_password") if field != "id"]
        assert first["last_login_at"] and first["uid"]  # carried, not merely missing on both sides
        target = tmp_path / f"copy-{fmt}.db"
        target_env = {**env, "USERMGR_DATABASE_URL": str(target)}
        assert run("init", env=target_env).exit_code == 0
        imported = run("import", "-", "--format", fmt, input=exported.stdout, env=target_env)
        assert imported.exit_code == 0, imported.stderr
        again = run("export", "--with-hashes", "-o", fmt, env=target_env)
        assert strip_ids(again.stdout, fmt) == strip_ids(exported.stdout, fmt)
        logged_in = login(run, "a@example.com", "first-password", env=target_env)
        assert logged_in.exit_code == 0, logged_in.stderr


def strip_ids(data: str, fmt: str) -> list[dict]:
    rows = (
        [json.loads(line) for line in data.splitlines()] if fmt == "jsonl" else list(csv.DictReader(io.StringIO(data)))
    )
    return [{key: value for key, value in row.items() if key != "id"} for row in rows]


def test_import_update_without_a_password_keeps_the_users_password(run: Runner) -> None:
    run("create", "--email", "k@example.com", "--password-stdin", input="kept-password\n")
    data = jsonl({"email": "k@example.com", "full_name": "Kept"})
    assert run("import", "-", "--format", "jsonl", "--on-conflict", "update", input=data).exit_code == 0
    assert login(run, "k@example.com", "kept-password").exit_code == 0


def test_export_never_shows_hashes_unless_asked(run: Runner) -> None:
    run("create", "--email", "h@example.com", "--password-stdin", input="a-password\n")
    assert "argon2" not in run("export").stdout
    assert "hashed_password" not in run("export", "-o", "csv").stdout
    assert "$argon2id$" in run("export", "--with-hashes").stdout


def test_batch_from_stdin_names_the_unknown_line(run: Runner) -> None:
    for name in ("a", "b", "c"):
        run("create", "--email", f"{name}@example.com", "--no-password", "--role", "beta")
    result = run("disable", "-", input="a@example.com\nb@example.com\nghost@example.com\n")
    assert result.exit_code == 4
    assert "'ghost@example.com' (line 3)" in result.stderr
    assert "nothing was changed" in result.stderr
    assert run("list", "--disabled", "-o", "email").stdout == ""


def test_list_piped_into_disable(run: Runner) -> None:
    for name, role in (("a", "beta"), ("b", "other"), ("c", "beta")):
        run("create", "--email", f"{name}@example.com", "--no-password", "--role", role)
    beta = run("list", "--role", "beta", "-o", "email").stdout
    result = run("disable", "-", input=beta)
    assert result.exit_code == 0, result.stderr
    assert "disabled 2 users" in result.stderr
    assert run("list", "--disabled", "-o", "email").stdout.split() == ["a@example.com", "c@example.com"]


def _kill_9_once_it_is_writing(env: dict, source: Path) -> None:
    """Start `usermgr import`, wait for its first progress line (written inside its one
    transaction, after a chunk of rows) and kill -9 it there, or as soon after as this test
    gets to run; return once the database has let go of it (see _until_the_import_is_gone)."""
    process = subprocess.Popen(
        [str(USERMGR), "import", str(source)], env=process_env(env), stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if line.startswith("usermgr: writing: "):
                break
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    _until_the_import_is_gone(env["USERMGR_DATABASE_URL"])


def _until_the_import_is_gone(url: str) -> None:
    """PostgreSQL: until the killed import's server session has ended. It may still be running
    what it was sent (a COMMIT too), so its rows are counted only after. SQLite: at once (a
    commit is whole in the file, or not there)."""
    if sqlite_path(url) is not None:
        return
    engine = create_engine(url)
    others = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    try:
        with engine.connect() as connection:
            deadline = time.monotonic() + HANG_TIMEOUT  # a guard against a hang only
            while connection.execute(text(others)).scalar_one():
                assert time.monotonic() < deadline, "the killed import's session never ended"
                time.sleep(0.05)
    finally:
        engine.dispose()


def test_kill_9_mid_import_leaves_no_row(env: dict, db_url: str, backend: str, tmp_path: Path) -> None:
    """No time budget: the test waits for the import's own word that it is writing. Should the
    import commit before the kill lands (this test may get no CPU for a while after that word),
    it is tried again with twice the rows. Whether it committed is the database's to say: the
    exit status is -9 also when the kill landed after the commit, before the exit."""
    rows = LARGE_IMPORT_ROWS * 2
    while True:
        source = tmp_path / "big.csv"
        with source.open("w") as handle:
            handle.write("email,full_name,roles\n")
            handle.writelines(f"user{i}@example.com,User {i},staff\n" for i in range(rows))
        _kill_9_once_it_is_writing(env, source)
        stored = user_count(db_url)
        if stored == 0:
            break
        assert stored == rows  # it finished first: all of it, then; start again, larger
        everyone = run_usermgr("list", "-o", "id", env=env).stdout
        assert run_usermgr("delete", "-", "--yes", env=env, input=everyone).returncode == 0
        rows *= 2
    if backend == "sqlite":
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    result = run_usermgr("list", "-o", "id", env=env)
    assert (result.returncode, result.stdout) == (0, "")


def test_import_update_of_a_row_added_earlier_in_the_same_input(run: Runner) -> None:
    """--on-conflict update: a later row for an email that an earlier row of the same input
    creates updates that new user."""
    rows = jsonl({"email": "ann@example.com", "full_name": "Ann A"}, {"email": "ann@example.com", "full_name": "Ann B"})
    result = run("import", "-", "--format", "jsonl", "--on-conflict", "update", input=rows)
    assert result.exit_code == 0, result.stderr
    shown = run("show", "ann@example.com", "-o", "json")
    assert (emails(run), json.loads(shown.stdout)["full_name"]) == (["ann@example.com"], "Ann B")


def test_an_import_plan_counts_its_rows() -> None:
    """plan.rows sizes the progress of a large import: one a valid row."""
    plan = service.plan_import(InputRow(line, {"email": f"u{line}@example.com"}) for line in range(1, 4))
    try:
        assert plan.rows == 3
    finally:
        plan.close()


def test_an_import_tells_its_progress_the_rows_of_each_chunk_written(db: Session) -> None:
    """The progress callback hears each chunk's row count as it is written, adding up to the
    plan's rows, so `import`'s progress line can count to the end."""
    rows = 2_500
    plan = service.plan_import(InputRow(line, {"email": f"p{line}@example.com"}) for line in range(1, rows + 1))
    heard: list[int] = []
    try:
        result = service.apply_import(db, plan, progress=heard.append)
    finally:
        plan.close()
    assert (heard, result.created) == ([1000, 1000, 500], rows)


def test_new_uids_are_distinct_random_version_4_uuids_in_canonical_form() -> None:
    """The bulk uids are uuid4's: version 4, variant RFC 4122, canonical text, and every
    other hex digit random (across 2000 uids each takes all 16 values; the variant's 4)."""
    uids = new_uids(2000)
    assert len(set(uids)) == 2000
    for uid in uids:
        parsed = uuid.UUID(uid)
        assert (str(parsed), parsed.version, parsed.variant) == (uid, 4, uuid.RFC_4122)
    for position in range(36):
        seen = {uid[position] for uid in uids}
        if position in (8, 13, 18, 23):
            assert seen == {"-"}
        elif position == 14:
            assert seen == {"4"}
        elif position == 19:
            assert seen == set("89ab")
        else:
            assert seen == set("0123456789abcdef"), position


def test_an_import_gives_each_new_user_without_a_uid_its_own_and_keeps_a_given_one(db: Session) -> None:
    given = "123e4567-e89b-42d3-a456-426614174000"
    rows = [InputRow(1, {"email": "a@example.com"}), InputRow(2, {"email": "b@example.com", "uid": given})]
    rows += [InputRow(3, {"email": "c@example.com"})]
    plan = service.plan_import(rows)
    try:
        service.apply_import(db, plan)
    finally:
        plan.close()
    uids = dict(db.execute(select(User.email, User.uid)).all())
    assert uids["b@example.com"] == given
    made = [uids["a@example.com"], uids["c@example.com"]]
    assert made[0] != made[1]
    assert all(uuid.UUID(uid).version == 4 and str(uuid.UUID(uid)) == uid for uid in made)


def test_the_domain_cache_keeps_email_validators_rules() -> None:
    from usermgr import schemas
    from usermgr.errors import InvalidInput

    hits_before = schemas.checked_domain.cache_info().hits
    emails_in = ["a@cache.example.com", "b@exa_mple.com", "c@cache.example.com", "d@exa_mple.com", "e@-bad.example"]
    rows = [InputRow(line, {"email": email}) for line, email in enumerate(emails_in, start=1)]
    with pytest.raises(InvalidInput) as refused:
        service.plan_import(rows)
    lines = [line.split(":")[0] for line in str(refused.value).splitlines()[:-1]]
    assert lines == ["line 2", "line 4", "line 5"]  # an invalid domain after a valid one, and again: refused
    assert schemas.checked_domain.cache_info().hits > hits_before  # the valid domain was checked once
    plan = service.plan_import(rows[:1] + rows[2:3])
    plan.close()
    assert plan.rows == 2


@pytest.mark.parametrize("backend", ["sqlite"])  # a SQLite pragma: PostgreSQL has no page cache per connection
def test_an_import_writes_with_a_large_page_cache_and_gives_the_connection_back_as_it_was(db) -> None:
    """The import's transaction runs with a 32 MiB page cache (its index pages are read back
    from the file less often), and the connection has its own cache size again afterwards."""
    from usermgr.service.bulk import IMPORT_PAGE_CACHE_KIB

    def cache_size() -> int:
        return int(db.connection().exec_driver_sql("PRAGMA cache_size").scalar_one())

    with db.begin():
        before = cache_size()
    during: list[int] = []
    plan = service.plan_import(InputRow(line, {"email": f"u{line}@example.com"}) for line in range(1, 4))
    try:
        service.apply_import(db, plan, progress=lambda _rows: during.append(cache_size()))
    finally:
        plan.close()
    with db.begin():
        after = cache_size()
    assert (during, after) == ([-IMPORT_PAGE_CACHE_KIB], before)
    assert before != -IMPORT_PAGE_CACHE_KIB
