"""Migrations on SQLite and PostgreSQL: a fresh schema, idempotence, and upgrades from
every revision that keep every row; and `usermgr init` on a fresh file.

A new revision needs no change here: the revisions are listed from the migration
scripts, and rows are written with whatever columns the schema has at each one.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Boolean, DateTime, Engine, Integer, String, bindparam, create_engine, inspect, select, text

from tests.conftest import Runner, run_usermgr
from usermgr import database, migrations, service
from usermgr.models import DeletedUid
from usermgr.service import audit

REVISIONS = migrations.revisions_oldest_first(create_engine("sqlite://"))
HEAD = REVISIONS[-1]
SEED_EMAILS = ["first@example.com", "second@example.com", "third@example.com"]
SEED_ROLE = "staff"
SEED_TIME = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def engine(empty_db_url: str) -> Iterator[Engine]:
    engine = database.make_engine(empty_db_url)
    yield engine
    engine.dispose()


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def role_names(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return sorted(connection.execute(text("SELECT name FROM roles")).scalars())


def stored_emails(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return sorted(connection.execute(text("SELECT email FROM users")).scalars())


# ---- writing rows with plain SQL, from the schema as it is --------------------------------------


def _value_for(column: dict[str, Any], row: int) -> Any:
    """A plausible value for a column, by its type: so that columns added later need no change here."""
    kind = column["type"]
    if isinstance(kind, Boolean):
        return True
    if isinstance(kind, Integer):
        return 0
    if isinstance(kind, DateTime):
        return SEED_TIME
    if isinstance(kind, String):
        return f"{column['name']}-{row}"[: kind.length or None]
    if column["nullable"]:
        return None
    raise AssertionError(f"teach test_migrations a value for {column['name']} of type {kind!r}")


def insert_row(engine: Engine, table: str, known: dict[str, Any], row: int = 0) -> None:
    """INSERT one row with every column `table` has (except a serial key), by plain SQL."""
    inspector = inspect(engine)
    keys = inspector.get_pk_constraint(table)["constrained_columns"]
    references = {
        column: f"{key['referred_table']}.{referred}"
        for key in inspector.get_foreign_keys(table)
        for column, referred in zip(key["constrained_columns"], key["referred_columns"], strict=True)
    }
    values: dict[str, Any] = {}
    types: dict[str, Any] = {}
    for column in inspector.get_columns(table):
        name = column["name"]
        if name in known or name in references:
            value = known.get(name, known.get(references.get(name, "")))
        elif keys == [name] and isinstance(column["type"], Integer):
            continue  # the serial primary key
        else:
            value = _value_for(column, row)
        values[name] = value
        types[name] = column["type"]
    names = list(values)
    statement = text(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(':' + n for n in names)})")
    statement = statement.bindparams(*(bindparam(name, type_=types[name]) for name in names))
    with engine.begin() as connection:
        connection.execute(statement, values)


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as connection:
        return connection.execute(text(sql), params).scalar_one()


def seed(engine: Engine) -> None:
    """Users (and, where the schema has them, a role and its links), written as an older
    release of usermgr would have."""
    tables = table_names(engine)
    if "roles" in tables:
        insert_row(engine, "roles", {"name": SEED_ROLE})
    for row, email in enumerate(SEED_EMAILS):
        insert_row(engine, "users", {"email": email, "username": email.split("@")[0]}, row)
        if "user_roles" in tables:
            user_id = scalar(engine, "SELECT id FROM users WHERE email = :email", email=email)
            role_id = scalar(engine, "SELECT id FROM roles WHERE name = :name", name=SEED_ROLE)
            insert_row(engine, "user_roles", {"users.id": user_id, "roles.id": role_id}, row)


# ---- the schema ---------------------------------------------------------------------------------


def test_revisions_form_one_line() -> None:
    assert REVISIONS, "no migration revisions found"
    assert len(set(REVISIONS)) == len(REVISIONS)
    script = ScriptDirectory.from_config(migrations.alembic_config(create_engine("sqlite://")))
    assert script.get_heads() == [HEAD], "more than one head: `usermgr init` upgrades to a single head"


def test_upgrade_creates_the_schema_and_the_admin_role(engine: Engine) -> None:
    assert migrations.current_revision(engine) is None
    migrations.upgrade(engine)
    assert {"users", "roles", "user_roles", "alembic_version"} <= table_names(engine)
    assert role_names(engine) == ["admin"]
    assert migrations.current_revision(engine) == HEAD
    assert stored_emails(engine) == []


def test_upgrade_twice_is_idempotent(engine: Engine) -> None:
    migrations.upgrade(engine)
    seed(engine)
    migrations.upgrade(engine)
    assert migrations.current_revision(engine) == HEAD
    assert role_names(engine) == ["admin", SEED_ROLE]
    assert stored_emails(engine) == sorted(SEED_EMAILS)


def test_the_schema_at_head_matches_the_models(engine: Engine) -> None:
    migrations.upgrade(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), database.Base.metadata)
    assert differences == [], "the models and the migrations disagree: add a revision"


@pytest.mark.parametrize("revision", REVISIONS)
def test_upgrade_from_every_revision_keeps_every_row(empty_db_url: str, engine: Engine, revision: str) -> None:
    migrations.upgrade(engine, revision)
    assert migrations.current_revision(engine) == revision
    seed(engine)

    migrations.upgrade(engine)

    assert migrations.current_revision(engine) == HEAD
    assert stored_emails(engine) == sorted(SEED_EMAILS)
    assert "admin" in role_names(engine)
    with database.Database(empty_db_url).SessionLocal() as db:
        records = list(service.iter_user_records(db))
    assert sorted(record["email"] for record in records) == sorted(SEED_EMAILS)
    assert all(record["roles"] == [SEED_ROLE] for record in records)
    assert all(record["created_at"] == SEED_TIME for record in records)


def index_shapes(engine: Engine, table: str) -> dict[str, tuple[list[str], str | None]]:
    """Each index of `table` as the database has it: its columns and its WHERE (partial)."""
    where = f"{engine.dialect.name}_where"
    return {
        index["name"]: (index["column_names"], _predicate(index.get("dialect_options", {}).get(where)))
        for index in inspect(engine).get_indexes(table)
    }


def _predicate(clause: Any) -> str | None:
    """A partial index's condition as comparable text (PostgreSQL wraps it in parentheses)."""
    return None if clause is None else str(clause).strip("()").lower()


def test_the_indexes_at_head_match_the_models(engine: Engine) -> None:
    """compare_metadata sees an index's columns, not its WHERE: compare partial indexes here
    (a model holds its index's condition in `info["where"]`, the same for every backend)."""
    migrations.upgrade(engine)
    for table in database.Base.metadata.sorted_tables:
        modelled = {
            index.name: ([column.name for column in index.columns], _predicate(index.info.get("where")))
            for index in table.indexes
        }
        migrated = index_shapes(engine, table.name)
        assert {name: migrated.get(name) for name in modelled} == modelled, f"{table.name}: indexes differ"


def actor_plan(engine: Engine, url: str, actor: str) -> str:
    """The query plan of `usermgr audit --actor ACTOR`'s statement, as text."""
    with database.Database(url).SessionLocal() as db:
        statement = audit._filtered(db, audit.AuditFilter(actor=actor))
        compiled = statement.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            return "\n".join(str(row[-1]) for row in connection.execute(text(f"EXPLAIN QUERY PLAN {compiled}")))
        # Two rows: a scan would win. Leave the planner only bitmap scans, to see which indexes can serve.
        connection.execute(text("SET LOCAL enable_seqscan = off"))
        connection.execute(text("SET LOCAL enable_indexscan = off"))
        return "\n".join(connection.execute(text(f"EXPLAIN {compiled}")).scalars())


def test_0005_indexes_on_behalf_of_only_where_it_is_set(empty_db_url: str, engine: Engine) -> None:
    migrations.upgrade(engine, "0004")
    insert_row(
        engine,
        "audit_events",
        {"actor": "os:ops@host", "on_behalf_of": "ci-bot", "action": "user.create", "changes": "{}"},
    )
    insert_row(
        engine,
        "audit_events",
        {"actor": "os:ops@host", "on_behalf_of": None, "action": "user.update", "changes": "{}"},
        1,
    )
    assert index_shapes(engine, "audit_events")["ix_audit_events_on_behalf_of"] == (["on_behalf_of"], None)

    migrations.upgrade(engine, "0005")

    shapes = index_shapes(engine, "audit_events")
    assert shapes["ix_audit_events_on_behalf_of"] == (["on_behalf_of"], "on_behalf_of is not null")
    assert {name: shape for name, shape in shapes.items() if name != "ix_audit_events_on_behalf_of"} == {
        f"ix_audit_events_{column}": ([column], None) for column in ("occurred_at", "actor", "action", "target_uid")
    }
    assert "ix_audit_events_on_behalf_of" in actor_plan(engine, empty_db_url, "ci-bot")
    assert "ix_audit_events_actor" in actor_plan(engine, empty_db_url, "ci-bot")
    with database.Database(empty_db_url).SessionLocal() as db:
        assert [event["action"] for event in audit.iter_events(db, audit.AuditFilter(actor="ci-bot"))] == [
            "user.create"
        ]
        assert len(list(audit.iter_events(db, audit.AuditFilter(actor="os:ops@host")))) == 2

    command.downgrade(migrations.alembic_config(engine), "0004")

    assert migrations.current_revision(engine) == "0004"
    assert index_shapes(engine, "audit_events")["ix_audit_events_on_behalf_of"] == (["on_behalf_of"], None)
    assert scalar(engine, "SELECT count(*) FROM audit_events") == 2


def test_0006_keeps_the_uids_the_audit_trail_saw_deleted(empty_db_url: str, engine: Engine) -> None:
    """Users deleted before 0006 left their uid in the audit trail only: the migration keeps
    every uid it names that no user holds (the newest event's time), so an import cannot give
    them again; a user deleted by plain SQL left no delete event, only their others."""
    gone, reused, kept, vanished = (f"00000000-0000-4000-8000-00000000000{n}" for n in (1, 2, 3, 4))
    earlier, later = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)
    migrations.upgrade(engine, "0005")
    insert_row(engine, "users", {"uid": reused, "email": "reused@example.com", "username": None})
    insert_row(engine, "users", {"uid": kept, "email": "kept@example.com", "username": None}, 1)
    events = [
        ("user.delete", gone, earlier),
        ("user.delete", gone, later),  # deleted, imported back (the old hole), deleted again
        ("user.delete", reused, earlier),  # given again before 0006: it is a user's now
        ("user.update", kept, later),
        ("user.create", vanished, earlier),
    ]
    for row, (action, uid, moment) in enumerate(events):
        insert_row(engine, "audit_events", {"action": action, "target_uid": uid, "occurred_at": moment}, row)

    migrations.upgrade(engine, "0006")

    with database.Database(empty_db_url).SessionLocal() as db:
        assert db.execute(select(DeletedUid.uid, DeletedUid.deleted_at).order_by(DeletedUid.uid)).all() == [
            (gone, later),
            (vanished, earlier),
        ]
    with engine.begin() as connection:  # deleted by plain SQL from now on: the trigger keeps the uid
        connection.execute(text("DELETE FROM users WHERE uid = :uid"), {"uid": reused})
    with database.Database(empty_db_url).SessionLocal() as db:
        deleted_at = db.scalar(select(DeletedUid.deleted_at).where(DeletedUid.uid == reused))
    assert deleted_at is not None and abs(datetime.now(UTC) - deleted_at) < timedelta(days=1)
    if engine.dialect.name == "sqlite":  # stored as every other time is: UTC, six fractional digits
        stored = scalar(engine, "SELECT deleted_at FROM deleted_uids WHERE uid = :uid", uid=reused)
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", stored), stored
    command.downgrade(migrations.alembic_config(engine), "0005")
    assert "deleted_uids" not in inspect(engine).get_table_names()
    with engine.begin() as connection:  # the trigger went with its table
        assert connection.execute(text("DELETE FROM users WHERE uid = :uid"), {"uid": kept}).rowcount == 1


# ---- usermgr init ---------------------------------------------------------------------------------


def test_init_twice_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    db_file = tmp_path / "users.db"
    key_file = tmp_path / "usermgr.key"  # the default: beside a SQLite database
    run = Runner({"USERMGR_HASH_PROFILE": "test"})
    assert not db_file.exists()

    first = run("--db", str(db_file), "init")
    assert first.exit_code == 0, first.stderr
    assert first.stdout == ""
    assert f"created key file {key_file}" in first.stderr
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    key = key_file.read_bytes()

    second = run("--db", str(db_file), "init")
    assert second.exit_code == 0, second.stderr
    assert second.stdout == ""
    assert "created key file" not in second.stderr
    assert key_file.read_bytes() == key
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600

    engine = create_engine(f"sqlite:///{db_file}")
    try:
        assert migrations.current_revision(engine) == HEAD
        assert role_names(engine) == ["admin"]
    finally:
        engine.dispose()
    listed = run("--db", str(db_file), "list", "-o", "email")
    assert (listed.exit_code, listed.stdout, listed.stderr) == (0, "", "")


def test_init_twice_on_an_empty_database(empty_db_url: str, tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "signing.key"
    key_file.parent.mkdir()
    run = Runner({"USERMGR_DATABASE_URL": empty_db_url, "USERMGR_KEY_FILE": str(key_file)})
    for _ in range(2):
        result = run("init")
        assert result.exit_code == 0, result.stderr
        assert result.stdout == ""
        assert f"schema revision {HEAD}" in result.stderr
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    engine = create_engine(empty_db_url)
    try:
        assert migrations.current_revision(engine) == HEAD
    finally:
        engine.dispose()


def test_init_where_the_directory_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    result = run_usermgr("--db", str(missing / "users.db"), "init", env={"USERMGR_HASH_PROFILE": "test"})
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("usermgr: error: ")
    assert "Traceback" not in result.stderr
    assert not missing.exists()
    assert not missing.parent.exists()


UNREACHABLE = {
    "12345": "all digits",
    "ann@work": "an @",
    " spaced ": "spaces around",
    "０７": "digits after NFKC",
    "tab\t": "a space other than ' ' around",
    "007": "all digits again: one more than the report shows",
}
REACHABLE = ["9lives", "ok.name", "zoë"]


def test_init_reports_the_usernames_no_user_argument_can_name(
    empty_db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """Usernames were not checked before the USER-by-username rule: `init` names the users
    whose username reads as an id or an email (or loses its spaces), so an admin renames them."""
    migrations.upgrade(engine, REVISIONS[0])
    for row, username in enumerate([*REACHABLE, *UNREACHABLE], 1):
        insert_row(engine, "users", {"email": f"u{row}@example.com", "username": username}, row)
    run = Runner({"USERMGR_DATABASE_URL": empty_db_url, "USERMGR_KEY_FILE": str(tmp_path / "usermgr.key")})
    for _ in range(2):  # upgrading, then at head: the report stands until they are renamed
        result = run("init")
        assert result.exit_code == 0, result.stderr
        warnings = [line for line in result.stderr.splitlines() if "warning" in line]
        assert warnings == [
            "usermgr: warning: 6 usernames no USER argument can name (all digits reads as an id, an @ as an email;"
            " spaces around are dropped): id 4 ('12345'), id 5 ('ann@work'), id 6 (' spaced '), id 7 ('０７'),"
            " id 8 ('tab\\t') and 1 more; name each user by id, and rename with `usermgr update ID --username NEW`"
        ]
    for user_id in range(4, 10):
        assert run("update", str(user_id), "--username", f"renamed{user_id}").exit_code == 0
    assert "warning" not in run("init").stderr


def test_init_reports_sqlite_usernames_that_are_no_text_and_still_succeeds(tmp_path: Path) -> None:
    """Another tool may store a BLOB or bytes that are no UTF-8 in SQLite's username column (a
    number becomes text there: '7.5' is a username like any other): no USER equals such a
    value, and reading it failed `init` ("unexpected TypeError (a bug)", "Could not decode to
    UTF-8") after the schema was upgraded."""
    url = f"sqlite:///{tmp_path / 'users.db'}"
    run = Runner({"USERMGR_DATABASE_URL": url, "USERMGR_KEY_FILE": str(tmp_path / "usermgr.key")})
    assert run("init").exit_code == 0
    for email in ("a@example.com", "b@example.com", "c@example.com", "d@example.com"):
        assert run("create", "--email", email, "--no-password").exit_code == 0
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            for user_id, stored in ((1, "X'616263'"), (2, "CAST(X'ff41' AS TEXT)"), (3, "7.5"), (4, "'fine'")):
                connection.exec_driver_sql(f"UPDATE users SET username = {stored} WHERE id = {user_id}")
    finally:
        engine.dispose()
    result = run("init")
    assert result.exit_code == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "warning" in line] == [
        "usermgr: warning: 2 usernames no USER argument can name (all digits reads as an id, an @ as an email;"
        " spaces around are dropped): id 1 ('abc'), id 2 ('\\\\xffA'); name each user by id, and"
        " rename with `usermgr update ID --username NEW`"
    ]
