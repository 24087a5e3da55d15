"""An attacker's review of the audit trail and the schema migrations: stored garbage that no
usermgr writes (SQLite keeps any value in any column; PostgreSQL any text in `changes`) is an
edit that `audit verify` names (exit 9), never a crash; reading the trail refuses it in one
line; concurrent writers on PostgreSQL leave one chain whatever the server's default isolation;
`init` leaves a database written by a newer usermgr as it is. Both backends, real CLI."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, make_url, text

from tests.conftest import (
    ADMIN,
    ADMIN_PASSWORD,
    HANG_TIMEOUT,
    PASSWORD,
    USERMGR,
    Runner,
    create_user,
    error_line,
    login,
    ok,
    process_env,
    run_usermgr,
    uid_of,
)
from usermgr import database, migrations
from usermgr.database import Database
from usermgr.service.audit import jsonable, record, verify_chain
from usermgr.service.core import find_user, writing

BOB = "bob@example.com"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


def some_events(run: Runner) -> None:
    """Events 1 to 4: two creates, a disable, an enable."""
    create_user(run, ADMIN, "--admin", password=ADMIN_PASSWORD)
    ok(run("create", "--email", BOB, "--no-password"))
    ok(run("disable", BOB))
    ok(run("enable", BOB))


def store(engine: Engine, sql: str, **params: Any) -> None:
    with engine.begin() as connection:
        connection.execute(text(sql), params)


def sqlite_only(engine: Engine) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL's typed columns cannot hold such a value")


# ---- verify: any stored value is an edit or intact, never a crash ----------------------------------


@pytest.mark.parametrize(
    "column, value",
    [
        ("actor", "X'c3'"),
        ("target_email", "X'ff'"),
        ("prev_hash", "X'00'"),
        ("changes", "X'ff00'"),
        ("changes", "zeroblob(10)"),
        ("action", "X'75736572'"),
        ("target_uid", "3.5"),
        ("on_behalf_of", "7"),
        ("client_address", "X'31'"),
    ],
)
def test_verify_names_an_event_edited_to_a_value_of_another_type(
    run: Runner, engine: Engine, column: str, value: str
) -> None:
    """SQLite keeps a BLOB or a number in a text column: no usermgr writes one, so it is an
    edit of that event (exit 9), whatever the column."""
    sqlite_only(engine)
    some_events(run)
    store(engine, f"UPDATE audit_events SET {column} = {value} WHERE id = 3")
    line = error_line(run("audit", "verify"), 9)
    assert line == "usermgr: error: audit chain broken at event 3: it does not match its hash (it was edited)"


@pytest.mark.parametrize(
    "changes",
    ["not json", "[1, 2]", '{"checkpoint": 5}', '{"before": "x"}', "null", '"a string"'],
)
def test_verify_names_a_prune_event_whose_checkpoint_cannot_be_read(run: Runner, engine: Engine, changes: str) -> None:
    """The last prune's checkpoint anchors the chain: a prune event edited so that it holds no
    readable checkpoint is named as edited (exit 9), on both backends."""
    some_events(run)
    ok(run("audit", "prune", "--before", "2000-01-01"))  # event 5: removes nothing
    store(engine, "UPDATE audit_events SET changes = :changes WHERE id = 5", changes=changes)
    line = error_line(run("audit", "verify"), 9)
    assert line == "usermgr: error: audit chain broken at event 5: its checkpoint cannot be read (it was edited)"
    assert error_line(run("audit", "prune", "--before", "2000-01-01"), 9) == line


@pytest.mark.parametrize(
    "column, message",
    [
        ("changes", "it does not match its hash (it was edited)"),
        ("actor", "it does not match its hash (it was edited)"),
        ("hash", "it does not match its hash (it was edited)"),
        ("occurred_at", "its time is not a timestamp (it was edited)"),
    ],
)
def test_verify_names_an_event_edited_to_text_that_is_not_utf8(
    run: Runner, engine: Engine, column: str, message: str
) -> None:
    """SQLite stores TEXT that is not UTF-8 (CAST of bytes), which its driver cannot read:
    `verify` said "cannot use the database" (exit 1); it is an edit of that event (exit 9)."""
    sqlite_only(engine)
    some_events(run)
    store(engine, f"UPDATE audit_events SET {column} = CAST(X'ff41' AS TEXT) WHERE id = 3")
    line = error_line(run("audit", "verify"), 9)
    assert line == f"usermgr: error: audit chain broken at event 3: {message}"
    ok(run("audit", "--until", "2000-01-01"))  # the connection reads text as before


# ---- reading: stored garbage is refused in one line --------------------------------------------


def stream_error(result: Any) -> str:
    """A refusal in the middle of a stream (exit 1, one line on stderr, no traceback), which
    the events before the bad one preceded on stdout: the line."""
    assert result.exit_code == 1, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr and "a bug" not in result.stderr
    assert "event 3" not in result.stdout.replace('"id": 3', "event 3")  # the bad event is never shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


NOT_JSON = (
    "usermgr: error: audit event 3 holds changes that are not a JSON object (it was edited: see `usermgr audit"
    " verify`): correct that row with SQL or restore a backup"
)


@pytest.mark.parametrize("changes", ["not json", "{", "", "[1, 2]", "null"])
def test_reading_an_event_whose_changes_are_not_json_is_refused_in_one_line(
    run: Runner, engine: Engine, changes: str
) -> None:
    some_events(run)
    store(engine, "UPDATE audit_events SET changes = :changes WHERE id = 3", changes=changes)
    for fmt in ("table", "json", "jsonl", "csv"):
        assert stream_error(run("audit", "-o", fmt)) == NOT_JSON
    ok(run("audit", "--until", "2000-01-01"))  # the others can still be read around it


@pytest.mark.parametrize("changes", ["zeroblob(10)", "X'ff00'", "X'7b7d'", "5"])
def test_reading_an_event_whose_changes_are_of_another_type_is_refused_in_one_line(
    run: Runner, engine: Engine, changes: str
) -> None:
    """SQLite keeps a BLOB (even one whose bytes are a JSON object) or a number in `changes`."""
    sqlite_only(engine)
    some_events(run)
    store(engine, f"UPDATE audit_events SET changes = {changes} WHERE id = 3")
    assert stream_error(run("audit", "-o", "jsonl")) == NOT_JSON


# ---- migrations: a database written by a newer usermgr -------------------------------------------


def test_init_leaves_a_database_at_a_revision_it_does_not_know_unchanged(
    run: Runner, engine: Engine, db_url: str
) -> None:
    """A newer usermgr's schema (revision 0099 here) is refused in one line, exit 2, before
    anything is written: not even SQLite's journal mode, which `init` otherwise sets."""
    sqlite_file = Path(make_url(db_url).database or "") if engine.dialect.name == "sqlite" else None
    if sqlite_file is not None:  # before any connection is open
        with closing(sqlite3.connect(sqlite_file, isolation_level=None)) as connection:
            assert connection.execute("PRAGMA journal_mode = DELETE").fetchone() == ("delete",)
    some_events(run)
    store(engine, "UPDATE alembic_version SET version_num = '0099'")
    before = sqlite_file.read_bytes() if sqlite_file is not None else None

    line = error_line(run("init"), 2)

    assert line == (
        "usermgr: error: the database is at schema revision '0099', which this usermgr does not know"
        " (a newer usermgr wrote it): use that usermgr or a newer one; nothing was changed"
    )
    if sqlite_file is not None:
        assert sqlite_file.read_bytes() == before
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT version_num FROM alembic_version")) == "0099"
    ok(run("audit", "verify"))


# ---- the chain under concurrent writers, whatever the server's default isolation -----------------


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_a_writer_whose_snapshot_predates_another_append_still_chains_after_it(
    run: Runner, engine: Engine, db_url: str, isolation: str
) -> None:
    """A PostgreSQL server whose default isolation is stricter than READ COMMITTED (an
    `ALTER DATABASE ... SET default_transaction_isolation`) gave a writer the chain's head as
    its snapshot saw it, taken before it queued for the chain's lock: two concurrent writers
    then both followed the same event, and the chain forked (or, serializable, one failed).
    Here writer A reads (its snapshot starts), writer B appends and commits, then A appends."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite's write transaction holds the one write lock from its BEGIN")
    some_events(run)
    database_name = make_url(db_url).database
    store(engine, f"ALTER DATABASE \"{database_name}\" SET default_transaction_isolation = '{isolation}'")
    opened = Database(db_url)
    try:
        with opened.SessionLocal() as db, writing(db):
            bob = find_user(db, BOB)
            assert bob is not None  # writer A's snapshot is taken
            ok(run_usermgr("disable", BOB, env=run.env))  # writer B appends event 5, and commits
            record(db, "tokens.revoke", bob, {"tokens": "revoked"})  # event 6
    finally:
        opened.dispose()
    ok(run("audit", "verify"))


def test_verify_sees_one_state_of_the_trail_while_a_prune_commits(run: Runner, engine: Engine, db_url: str) -> None:
    """`audit verify` reads the last prune's checkpoint, then walks the events: a prune that
    committed between the two (cron's prune beside a monitor's verify) made an untouched trail
    look broken on PostgreSQL (exit 9). Here the prune runs, as its own process, just before
    the walk's statement is sent."""
    some_events(run)
    with engine.connect() as connection:
        cut = connection.scalar(text("SELECT occurred_at FROM audit_events WHERE id = 3"))
    opened = Database(db_url)
    pruned: list[bool] = []

    def prune_before_the_walk(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not pruned and "ORDER BY audit_events.id" in statement and "LIMIT" not in statement:
            pruned.append(True)
            ok(run_usermgr("audit", "prune", "--before", jsonable(cut), env=run.env))

    event.listen(opened.engine, "before_cursor_execute", prune_before_the_walk)
    try:
        with opened.SessionLocal() as db:
            report = verify_chain(db)
    finally:
        opened.dispose()
    assert pruned
    assert report.events == 4  # the trail as it stood when verify began
    ok(run("audit", "verify"))  # and as it stands now, events 3 to 5


# ---- events: each says what happened ------------------------------------------------------------


def last_event(engine: Engine) -> dict[str, Any]:
    with engine.connect() as connection:
        row = connection.execute(text("SELECT * FROM audit_events ORDER BY id DESC LIMIT 1")).one()
    return {**row._asdict(), "changes": json.loads(row.changes)}


def test_an_expired_accounts_refused_login_is_recorded_as_expired_not_locked(run: Runner, engine: Engine) -> None:
    """The right password of an expired account is refused (exit 6, the one message); the
    trail gave the reason as "locked", sending an auditor after a lockout that never was."""
    create_user(run, ADMIN, "--admin", password=ADMIN_PASSWORD)
    create_user(run, BOB)
    ok(run("update", BOB, "--expires", "2020-01-01"))
    error_line(login(run, BOB), 6)
    event = last_event(engine)
    assert (event["action"], event["target_email"], event["changes"]) == ("login.failure", BOB, {"reason": "expired"})


# ---- reading: --user ----------------------------------------------------------------------------


@pytest.mark.parametrize("deleted", [False, True], ids=["live", "deleted"])
def test_audit_user_takes_a_uid_in_capitals(run: Runner, engine: Engine, deleted: bool) -> None:
    """A UUID's text is case-insensitive (RFC 9562: read in either case), and a uid is stored
    lowercase: a uid pasted in capitals listed nothing (exit 0), an empty trail for a user
    who has one."""
    create_user(run, ADMIN, "--admin", password=ADMIN_PASSWORD)
    ok(run("create", "--email", BOB, "--no-password"))
    uid = uid_of(run, BOB)
    ok(run("disable", BOB))
    if deleted:
        ok(run("delete", BOB, "--yes"))
    listed = ok(run("audit", "--user", uid.upper(), "-o", "jsonl")).stdout.splitlines()
    expected = ["user.create", "user.disable", *(["user.delete"] if deleted else [])]
    assert [json.loads(line)["action"] for line in listed] == expected
    assert {json.loads(line)["target_uid"] for line in listed} == {uid}


# ---- migrations: two inits at once ------------------------------------------------------------


def test_two_inits_at_once_on_postgresql_both_succeed(empty_db_url: str, tmp_path: Path) -> None:
    """Two replicas of a deployment each run `usermgr init` on the same new database: the
    second read "no schema yet" while the first was creating it, then failed on the first's
    tables. Here the second starts while the first has created its first table, uncommitted."""
    if make_url(empty_db_url).get_backend_name() != "postgresql":
        pytest.skip("SQLite's migration transaction takes the write lock at BEGIN")
    env = {"USERMGR_DATABASE_URL": empty_db_url, "USERMGR_SECRET_KEY": "k" * 64}
    first = database.make_engine(empty_db_url)
    second: list[subprocess.Popen[str]] = []

    def start_the_second(connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not second and statement.lstrip().startswith("CREATE TABLE users"):
            second.append(subprocess.Popen([USERMGR, "init"], env=process_env(env), stderr=subprocess.PIPE, text=True))
            _wait_until_another_waits_for_a_lock(connection)

    event.listen(first, "after_cursor_execute", start_the_second)
    try:
        migrations.upgrade(first)
    finally:
        first.dispose()
    assert second
    _, stderr = second[0].communicate()
    assert second[0].returncode == 0, stderr
    assert "is at schema revision 0006" in stderr


def _wait_until_another_waits_for_a_lock(connection: Any) -> None:
    """Until another connection to the database waits for a lock (the second init), seen from
    a third connection; HANG_TIMEOUT at most (a generous bound, no timing assert)."""
    watcher = create_engine(connection.engine.url.render_as_string(hide_password=False))
    deadline = time.monotonic() + HANG_TIMEOUT
    try:
        with watcher.connect() as watching:
            while time.monotonic() < deadline and not watching.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database() AND pid <> pg_backend_pid()"
                )
            ):
                watching.rollback()
                time.sleep(0.05)
    finally:
        watcher.dispose()


# ---- verify: the newest events deleted ----------------------------------------------------------


@pytest.mark.parametrize(
    "deleted, message",
    [
        ("id >= 3", "audit chain broken after event 2: events up to 4 were recorded (the newest were deleted)"),
        ("id = 4", "audit chain broken after event 3: events up to 4 were recorded (the newest were deleted)"),
        ("1 = 1", "audit chain broken at the start of the trail: events up to 4 were recorded (all were deleted)"),
    ],
)
def test_verify_on_sqlite_sees_the_newest_events_deleted(
    run: Runner, engine: Engine, deleted: str, message: str
) -> None:
    """A cut tail leaves a chain that links up: but SQLite's AUTOINCREMENT counter remembers
    the highest id ever recorded (a rolled-back insert takes its count back with it), so on
    SQLite verify sees the newest events gone (exit 9). PostgreSQL's sequence also counts
    rolled-back inserts: there, only a head kept elsewhere shows it (README)."""
    sqlite_only(engine)
    some_events(run)
    error_line(run("create", "--email", BOB, "--no-password"), 5)  # refused: takes no id
    store(engine, f"DELETE FROM audit_events WHERE {deleted}")
    assert error_line(run("audit", "verify"), 9) == f"usermgr: error: {message}"


def test_verify_after_refused_changes_and_a_prune_of_everything_is_intact(run: Runner, engine: Engine) -> None:
    """No false alarm: refused changes leave no gap, and a prune keeps the newest event (its own)."""
    some_events(run)
    error_line(run("create", "--email", BOB, "--no-password"), 5)
    rows = json.dumps({"email": "carol@example.com"}) + "\n" + json.dumps({"email": BOB}) + "\n"
    error_line(run("import", "-", "--format", "jsonl", input=rows), 5)
    ok(run("audit", "verify"))
    ok(run("audit", "prune", "--before", "9999-01-01"))
    ok(run("audit", "verify"))


def test_a_right_password_that_locks_then_enters_records_the_lock_ended(run: Runner, engine: Engine) -> None:
    """The guess that reaches the lockout threshold locks the account before it is checked;
    when it is the right password it enters and ends that lock. The trail said "locked until
    T", then a success that did not say the lock was gone: an auditor saw a locked account."""
    create_user(run, ADMIN, "--admin", password=ADMIN_PASSWORD)
    create_user(run, BOB)
    ok(login(run, BOB, PASSWORD, env={"USERMGR_LOCKOUT_THRESHOLD": "1"}))
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT action, changes FROM audit_events ORDER BY id DESC LIMIT 2")).all()
    locked, entered = (json.loads(changes) for _, changes in reversed(rows))
    assert [action for action, _ in reversed(rows)] == ["login.locked", "login.success"]
    assert entered == {"locked_until": [locked["locked_until"][1], None]}
    shown = ok(run("show", BOB, "-o", "json")).stdout
    assert json.loads(shown)["locked_until"] is None
