"""Real `usermgr` processes racing on one database, on SQLite and PostgreSQL.

Every process is started before any is waited on. On PostgreSQL the test also holds
an exclusive lock on the table the command reads first, and lets go only once every
process is queued on it: they then all run their transactions at the same moment,
rather than one after another as process start-up would otherwise tend to space them.
(On SQLite every write transaction queues on the database's write lock at BEGIN.)
The assertions are on outcomes only, never on timing.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, create_engine, select, text
from sqlalchemy.orm import Session

from tests.conftest import HANG_TIMEOUT, USERMGR, process_env, user_count
from usermgr import service
from usermgr.config import Settings, sqlite_path
from usermgr.models import User
from usermgr.service import UserFilter

RACERS = 12
ADMIN_RACE_ROUNDS = 5


@dataclass(frozen=True)
class Outcome:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def start(
    commands: Sequence[Sequence[str]], env: dict[str, str], stdin: str | None = None
) -> list[subprocess.Popen[str]]:
    """One `usermgr` process per command, all started before any is waited on; each given
    `stdin` (written whole and closed at once), or none."""
    processes = []
    for args in commands:
        process = subprocess.Popen(
            [str(USERMGR), *args],
            env=process_env(env),
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if process.stdin is not None:
            process.stdin.write(stdin or "")
            process.stdin.close()
            process.stdin = None  # written: communicate() has nothing more to send
        processes.append(process)
    return processes


def finish(processes: list[subprocess.Popen[str]]) -> list[Outcome]:
    outcomes = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=HANG_TIMEOUT)
        outcomes.append(Outcome(tuple(process.args[1:]), process.returncode, stdout, stderr))
    return outcomes


def _queued_on(connection: Connection, table: str) -> int:
    sql = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = CAST(:table AS regclass)"
    return connection.execute(text(sql), {"table": table}).scalar_one()


@contextmanager
def gate(url: str, table: str, racers: list[subprocess.Popen[str]]) -> Iterator[None]:
    """Hold `table` (PostgreSQL) while the caller starts `racers`; on leaving, wait until
    all of them are queued on the lock, then let them go together.

    Fails if they never all queue: then the race this test means to run did not happen.
    """
    if sqlite_path(url) is not None:
        yield
        return
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            yield
            deadline = time.monotonic() + HANG_TIMEOUT
            while _queued_on(connection, table) < len(racers):
                early = [process.args for process in racers if process.poll() is not None]
                assert not early, f"racers ended before reaching the gate: {early}"
                assert time.monotonic() < deadline, "the racers never all queued on the gate"
                time.sleep(0.05)
            connection.commit()
    finally:
        engine.dispose()


def race(commands: Sequence[Sequence[str]], env: dict[str, str], *, first_table: str) -> list[Outcome]:
    """Run the commands at once; `first_table` is the table their transactions read first."""
    racers: list[subprocess.Popen[str]] = []
    try:
        with gate(env["USERMGR_DATABASE_URL"], first_table, racers):
            racers.extend(start(commands, env))
        return finish(racers)
    finally:
        for process in racers:  # only if the test failed half way: no racer outlives it
            if process.poll() is None:
                process.kill()
                process.wait()


def assert_clean_stderr(outcomes: list[Outcome]) -> None:
    for outcome in outcomes:
        assert "locked" not in outcome.stderr.lower(), outcome
        assert "Traceback" not in outcome.stderr, outcome
        assert all(line.startswith("usermgr: ") for line in outcome.stderr.splitlines()), outcome


def stored_emails(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return sorted(connection.execute(select(User.email)).scalars())
    finally:
        engine.dispose()


def test_creating_the_same_email_twelve_times_at_once(env: dict[str, str], db_url: str) -> None:
    command = ["create", "--email", "same@example.com", "--no-password", "-o", "email"]
    outcomes = race([command] * RACERS, env, first_table="users")
    assert sorted(outcome.returncode for outcome in outcomes) == [0] + [5] * (RACERS - 1), outcomes
    assert_clean_stderr(outcomes)
    (winner,) = [outcome for outcome in outcomes if outcome.returncode == 0]
    assert winner.stdout == "same@example.com\n"
    for loser in (outcome for outcome in outcomes if outcome.returncode == 5):
        assert loser.stdout == ""
        assert loser.stderr.startswith("usermgr: error: ")
        assert "already exists" in loser.stderr
        assert len(loser.stderr.splitlines()) == 1, loser
    assert stored_emails(db_url) == ["same@example.com"]
    assert user_count(db_url) == 1


def test_creating_twelve_different_emails_at_once(env: dict[str, str], db_url: str) -> None:
    wanted = [f"user{number:02}@example.com" for number in range(RACERS)]
    commands = [["create", "--email", email, "--no-password", "-o", "email"] for email in wanted]
    outcomes = race(commands, env, first_table="users")
    assert [outcome.returncode for outcome in outcomes] == [0] * RACERS, outcomes
    assert_clean_stderr(outcomes)
    assert [outcome.stdout for outcome in outcomes] == [f"{email}\n" for email in wanted]
    assert stored_emails(db_url) == wanted


def _active_admins(db: Session) -> list[str]:
    return [record["email"] for record in service.iter_user_records(db, UserFilter(admin=True, active=True))]


def _two_fresh_admins(db: Session, settings: Settings, round_number: int) -> tuple[str, str]:
    """Make two new admins, then take admin from whoever held it before: two admins, only."""
    pair = (f"left{round_number}@example.com", f"right{round_number}@example.com")
    previous = _active_admins(db)
    for email in pair:
        service.create_user(db, settings, service.new_user(email=email), admin=True)
    if previous:
        service.revoke_role(db, previous, "admin")
    assert _active_admins(db) == list(pair)
    return pair


LAST_ADMIN_CHANGES = {
    "revoke-admin": (["revoke-admin"], ["revoke-admin"]),
    "disable": (["disable"], ["disable"]),
    "delete": (["delete", "--yes"], ["delete", "--yes"]),
    "disable and delete": (["disable"], ["delete", "--yes"]),
    "delete and revoke-admin": (["delete", "--yes"], ["revoke-admin"]),
}


@pytest.mark.parametrize("change", LAST_ADMIN_CHANGES.values(), ids=LAST_ADMIN_CHANGES)
def test_two_admins_removing_each_other_at_once(
    env: dict[str, str], db: Session, settings: Settings, change: tuple[list[str], list[str]]
) -> None:
    """Each process takes a different one of the two last admins: one must be refused."""
    for round_number in range(ADMIN_RACE_ROUNDS):
        left, right = _two_fresh_admins(db, settings, round_number)
        outcomes = race([[*change[0], left], [*change[1], right]], env, first_table="roles")
        assert_clean_stderr(outcomes)
        assert sorted(outcome.returncode for outcome in outcomes) == [0, 5], outcomes  # never both
        (loser,) = [outcome for outcome in outcomes if outcome.returncode == 5]
        assert "last active admin" in loser.stderr
        assert _active_admins(db) == [loser.args[-1]]


def test_granting_a_new_role_to_twelve_users_at_once(env: dict[str, str], db: Session, settings: Settings) -> None:
    """Each racer finds no role `beta` and creates it: one insert wins, the others must take
    the winner's row, not fail on the unique name (`make loadtest` saw a 409 here)."""
    wanted = [f"member{number:02}@example.com" for number in range(RACERS)]
    for email in wanted:
        service.create_user(db, settings, service.new_user(email=email))
    outcomes = race([["grant-role", email, "beta"] for email in wanted], env, first_table="roles")
    assert [outcome.returncode for outcome in outcomes] == [0] * RACERS, outcomes
    assert_clean_stderr(outcomes)
    members = [record["email"] for record in service.iter_user_records(db, UserFilter(role="beta"))]
    assert members == wanted


def _waiting_on_a_lock(connection: Connection) -> bool:
    return bool(connection.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar_one())


def _racing_carols_delete(
    db_url: str, env: dict[str, str], command: list[str], stdin: str | None = None
) -> tuple[Outcome, list[str]]:
    """Run `command` while an uncommitted DELETE of carol@example.com holds her row, commit the
    delete once the command waits on it; the command's outcome and the actions recorded about carol."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as deleter:
            deleter.execute(text("DELETE FROM users WHERE email = 'carol@example.com'"))
            running = start([command], env, stdin)
            deadline = time.monotonic() + HANG_TIMEOUT
            _until(lambda: _waiting_on_a_lock(deleter), running, "the command never waited on the delete", deadline)
            deleter.commit()
        (outcome,) = finish(running)
        with engine.connect() as reader:
            events = reader.execute(text("SELECT action FROM audit_events WHERE target_email = 'carol@example.com'"))
            return outcome, list(events.scalars())
    finally:
        engine.dispose()


@pytest.mark.parametrize("roles", [[], ["ops"]], ids=["no-roles", "a-role"])
def test_an_import_update_of_a_user_deleted_meanwhile_is_refused(
    env: dict[str, str], db_url: str, db: Session, settings: Settings, backend: str, tmp_path: Path, roles: list[str]
) -> None:
    """`import --on-conflict update` reads a user, then a concurrent `delete` of that user
    commits before the import writes (PostgreSQL: the import's write waits on the deleter's
    row lock, then finds no row). The import must not report the row as updated, nor leave a
    `user.update` event for someone deleted, nor fail on the user's role links: it is refused."""
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: the import starts after the delete")
    service.create_user(db, settings, service.new_user(email="carol@example.com"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"email": "carol@example.com", "full_name": "Carol D", "roles": roles}) + "\n")
    importing = ["import", str(rows), "--format", "jsonl", "--on-conflict", "update"]
    outcome, actions = _racing_carols_delete(db_url, env, importing)
    assert_clean_stderr([outcome])
    assert (outcome.returncode, outcome.stderr) == (
        5,
        "usermgr: error: line 1: the user carol@example.com was deleted while the import ran; nothing was imported\n",
    )
    assert stored_emails(db_url) == []
    assert actions == ["user.create"]  # the delete was plain SQL: no event of its own


@pytest.mark.parametrize(
    "command",
    [
        ["update", "carol@example.com", "--full-name", "Carol D"],
        ["update", "carol@example.com", "--expires", "30d"],
        ["disable", "carol@example.com"],
        ["revoke-tokens", "carol@example.com"],
        ["grant-role", "carol@example.com", "ops"],
        ["revoke-role", "carol@example.com", "beta"],
        ["delete", "carol@example.com", "--yes"],
        ["set-password", "carol@example.com", "--password-stdin"],
    ],
    ids=lambda command: command[0] + ("-" + command[2] if command[0] == "update" else ""),
)
def test_a_change_to_a_user_deleted_meanwhile_is_not_found(
    env: dict[str, str], db_url: str, db: Session, settings: Settings, backend: str, command: list[str]
) -> None:
    """A command finds its user, then a concurrent `delete` commits before the command
    writes (PostgreSQL: the write waits on the deleter's row lock, then finds no row): the
    user is not found (exit 4), as if the command had come after the delete; never exit 1,
    nor a change or an event for nobody."""
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: the command starts after the delete")
    service.create_user(db, settings, service.new_user(email="carol@example.com"), roles=["beta"])
    outcome, actions = _racing_carols_delete(db_url, env, command, stdin="a new long password\n")
    assert_clean_stderr([outcome])
    assert outcome.returncode == 4, outcome
    assert outcome.stderr.startswith("usermgr: error: no user matches 'carol@example.com'"), outcome
    assert len(outcome.stderr.splitlines()) == 1, outcome
    assert actions == ["user.create"]  # the delete was plain SQL: no event of its own


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PATCH", "/users/{id}", {"full_name": "Carol D"}),
        ("DELETE", "/users/{id}", None),
        ("PUT", "/users/{id}/roles/ops", None),
        ("DELETE", "/users/{id}/roles/beta", None),
    ],
    ids=["patch", "delete", "grant", "revoke"],
)
def test_an_api_change_to_a_user_deleted_meanwhile_is_404(
    client: TestClient,
    admin: dict[str, str],
    db_url: str,
    db: Session,
    settings: Settings,
    backend: str,
    method: str,
    path: str,
    body: dict[str, str] | None,
) -> None:
    """The API's face of the same race: a 404, never a 500."""
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: the request starts after the delete")
    carol = service.create_user(db, settings, service.new_user(email="carol@example.com"), roles=["beta"]).id
    answers: list[Any] = []
    engine = create_engine(db_url)
    try:
        with engine.connect() as deleter:
            deleter.execute(text("DELETE FROM users WHERE email = 'carol@example.com'"))
            request = threading.Thread(
                target=lambda: answers.append(
                    client.request(method, path.format(id=carol), headers=admin, json=body).status_code
                )
            )
            request.start()
            deadline = time.monotonic() + HANG_TIMEOUT
            while not _waiting_on_a_lock(deleter):
                assert request.is_alive(), answers
                assert time.monotonic() < deadline, "the request never waited on the delete"
                time.sleep(0.05)
            deleter.commit()
        request.join(HANG_TIMEOUT)
    finally:
        engine.dispose()
    assert answers == [404]


def _waiting(connection: Connection, locktype: str) -> int:
    sql = "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = :locktype"
    return connection.execute(text(sql), {"locktype": locktype}).scalar_one()


def test_a_change_during_a_long_import_waits_for_it_and_never_deadlocks(
    env: dict[str, str], db_url: str, db: Session, settings: Settings, backend: str, tmp_path: Path
) -> None:
    """An import writes its first chunk of 1,000 rows, then waits on a row of its second chunk
    (held here); meanwhile `revoke-tokens` locks another row the import will update next and
    appends its event. The import must not already hold the audit chain's lock then (the
    commands take it last, after their rows): the two would wait on each other, and PostgreSQL
    would end one of them (`deadlock detected`)."""
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time")
    for email in ("dee@example.com", "carol@example.com"):
        service.create_user(db, settings, service.new_user(email=email))
    rows = [{"email": f"new{number:04}@example.com"} for number in range(1000)]
    rows += [{"email": "dee@example.com", "full_name": "Dee"}, {"email": "carol@example.com", "full_name": "Carol"}]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    engine = create_engine(db_url)
    processes: list[subprocess.Popen[str]] = []
    with _reaped(engine, processes):
        with engine.connect() as holder:
            holder.execute(text("SELECT id FROM users WHERE email = 'dee@example.com' FOR UPDATE"))
            deadline = time.monotonic() + HANG_TIMEOUT
            processes += start([["import", str(source), "--on-conflict", "update"]], env)
            on_dees_row = "the import never reached dee's row"
            _until(lambda: _waiting(holder, "transactionid") >= 1, processes, on_dees_row, deadline)
            processes += start([["revoke-tokens", "carol@example.com"]], env)
            while processes[1].poll() is None and _waiting(holder, "advisory") < 1:
                assert time.monotonic() < deadline, "revoke-tokens neither ended nor queued on the chain"
                time.sleep(0.05)
            holder.rollback()
        outcomes = finish(processes)
    assert_clean_stderr(outcomes)
    assert [outcome.returncode for outcome in outcomes] == [0, 0], outcomes
    assert outcomes[0].stderr.endswith("usermgr: imported: 1000 created, 2 updated, 0 skipped\n"), outcomes


def _waiting_processes(connection: Connection) -> int:
    return connection.execute(text("SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted")).scalar_one()


def _until(ready: Callable[[], bool], processes: list[subprocess.Popen[str]], what: str, deadline: float) -> None:
    """Wait until `ready()`; fail if one of `processes` ends first, or at `deadline` (`what` never happened)."""
    while not ready():
        assert all(process.poll() is None for process in processes), finish(processes)
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@contextmanager
def _reaped(engine: Engine, processes: list[subprocess.Popen[str]]) -> Iterator[None]:
    """Dispose of `engine` and kill whatever of `processes` still runs, however the test ends."""
    try:
        yield
    finally:
        engine.dispose()
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_two_batches_naming_the_same_users_in_other_forms_never_deadlock(
    env: dict[str, str], db_url: str, db: Session, settings: Settings, backend: str
) -> None:
    """`disable -` names ada by email and bob by id, `revoke-tokens -` bob by email and ada by id.
    Each row is held here until both commands wait on one; let go together, each command must
    lock its users in one order (by id), or each takes one and waits on the other's: a deadlock."""
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time")
    ada, bob = (
        service.create_user(db, settings, service.new_user(email=email)).id
        for email in ("ada@example.com", "bob@example.com")
    )
    engine = create_engine(db_url)
    processes: list[subprocess.Popen[str]] = []
    with _reaped(engine, processes):
        with engine.connect() as holds_ada, engine.connect() as holds_bob, engine.connect() as watcher:
            holds_ada.execute(text(f"SELECT id FROM users WHERE id = {ada} FOR UPDATE"))
            holds_bob.execute(text(f"SELECT id FROM users WHERE id = {bob} FOR UPDATE"))
            deadline = time.monotonic() + HANG_TIMEOUT
            for number, (command, stdin) in enumerate(
                [("disable", f"ada@example.com\n{bob}\n"), ("revoke-tokens", f"bob@example.com\n{ada}\n")], start=1
            ):
                processes += start([[command, "-"]], env, stdin=stdin)
                queued = f"{command} never queued on a held row"
                _until(lambda count=number: _waiting_processes(watcher) >= count, processes, queued, deadline)
            holds_ada.rollback()
            holds_bob.rollback()
        outcomes = finish(processes)
    assert_clean_stderr(outcomes)
    assert [outcome.returncode for outcome in outcomes] == [0, 0], outcomes


def test_granting_admin_while_another_process_disables_that_user_never_deadlocks(
    env: dict[str, str], db_url: str, db: Session, settings: Settings, backend: str
) -> None:
    """`grant-admin ada` links ada to the admin role (PostgreSQL locks the role's row to keep
    the link's key), `disable ada` locks the admin role's row first (the last-admin rule).
    Ada's row is held here until both wait on it: the grant must take the role's row before
    ada's too, or it holds ada and waits on the role while disable holds the role and waits
    on ada."""
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time")
    service.create_user(db, settings, service.new_user(email="root@example.com"), admin=True)
    ada = service.create_user(db, settings, service.new_user(email="ada@example.com")).id
    engine = create_engine(db_url)
    processes: list[subprocess.Popen[str]] = []
    with _reaped(engine, processes):
        with engine.connect() as holder, engine.connect() as watcher:
            holder.execute(text(f"SELECT id FROM users WHERE id = {ada} FOR UPDATE"))
            deadline = time.monotonic() + HANG_TIMEOUT
            for number, command in enumerate([["grant-admin", "ada@example.com"], ["disable", "ada@example.com"]], 1):
                processes += start([command], env)
                queued = f"{command} never queued"
                _until(lambda count=number: _waiting_processes(watcher) >= count, processes, queued, deadline)
            holder.rollback()
        outcomes = finish(processes)
    assert_clean_stderr(outcomes)
    assert [outcome.returncode for outcome in outcomes] == [0, 0], outcomes


def test_an_import_whose_new_role_another_process_creates_meanwhile_takes_that_role(
    env: dict[str, str], db_url: str, db: Session, settings: Settings, backend: str, tmp_path: Path
) -> None:
    """The import reads the roles, then creates `ops` for its row; another transaction (held
    open here) created `ops` first and commits while the import waits on the role's unique
    name. The import must take that role, as grant-role does, not fail on the name."""
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time")
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"email": "ada@example.com", "roles": ["ops"]}) + "\n")
    engine = create_engine(db_url)
    processes: list[subprocess.Popen[str]] = []
    with _reaped(engine, processes):
        with engine.connect() as creator, engine.connect() as watcher:
            creator.execute(text("INSERT INTO roles (name) VALUES ('ops')"))
            processes += start([["import", str(source)]], env)
            deadline = time.monotonic() + HANG_TIMEOUT
            waiting = "the import never waited on the role's name"
            _until(lambda: _waiting_processes(watcher) >= 1, processes, waiting, deadline)
            creator.commit()
        outcomes = finish(processes)
    assert_clean_stderr(outcomes)
    assert [outcome.returncode for outcome in outcomes] == [0], outcomes
    members = [record["email"] for record in service.iter_user_records(db, UserFilter(role="ops"))]
    assert members == ["ada@example.com"]
