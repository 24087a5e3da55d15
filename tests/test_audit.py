"""The audit trail: every change leaves exactly its events, in its own transaction; the hash
chain holds under concurrent writers and shows an edited, inserted or deleted event; prune
keeps it verifiable; no secret ever lands in it. Both backends, real CLI and API."""

from __future__ import annotations

import getpass
import hashlib
import itertools
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, insert, select, text, update
from sqlalchemy.orm import Session

from tests.conftest import (
    ADMIN,
    ADMIN_PASSWORD,
    PASSWORD,
    Runner,
    api_login,
    bearer,
    create_user,
    error_line,
    login,
    ok,
    run_usermgr,
    token_of,
    uid_of,
)
from usermgr.database import utcnow
from usermgr.errors import ConfigurationError, InvalidInput, NotFound
from usermgr.models import AuditEvent, Role, User
from usermgr.service.audit import (
    COLUMN_FIELDS,
    GENESIS,
    TRACKED_FIELDS,
    Actor,
    AuditFilter,
    ChainReport,
    State,
    audit_filter,
    canonical_changes,
    created_changes,
    created_changes_texts,
    diff,
    event_hash,
    iter_events,
    jsonable,
    os_actor,
    parse_time,
    prune,
    state_of,
    verify_chain,
)
from usermgr.service.core import MAX_ROW_COUNT

BOB = "bob@example.com"
CAROL = "carol@example.com"
ON_BEHALF = "ticket-4711"
CLI_ACTOR = f"os:{getpass.getuser()}@{socket.gethostname()}"
EVENTS = AuditEvent.__table__


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


def all_events(engine: Engine, after: int = 0) -> list[dict[str, Any]]:
    """The stored events after id `after`, read straight from the table."""
    with engine.connect() as connection:
        rows = connection.execute(select(EVENTS).where(EVENTS.c.id > after).order_by(EVENTS.c.id))
        return [{**row._asdict(), "changes": json.loads(row.changes)} for row in rows]


def as_stored(event: dict[str, Any]) -> dict[str, Any]:
    """An event as its row holds it: `changes` as canonical JSON text."""
    return {**event, "changes": canonical_changes(event["changes"])}


def last_id(engine: Engine) -> int:
    events = all_events(engine)
    return events[-1]["id"] if events else 0


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str | None, dict[str, Any]]]:
    return [(event["action"], event["target_email"], event["changes"]) for event in events]


@pytest.fixture
def people(run: Runner) -> None:
    """An admin, and Bob with a password and the role beta."""
    create_user(run, ADMIN, "--admin", password=ADMIN_PASSWORD)
    create_user(run, BOB, "--role", "beta")


def lock(engine: Engine, email: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(User.__table__)
            .where(User.__table__.c.email == email)
            .values(failed_logins=2, locked_until=utcnow() + timedelta(hours=1))
        )


# ---- the table: every command that changes something, and exactly the events it leaves --------


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    expected: list[tuple[str, str | None, dict[str, Any]]]
    input: str | None = None
    setup: tuple[tuple[str, ...], ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[Engine], None] | None = None
    code: int = 0


ROLES = "roles"
REVOKED = {"tokens": "revoked"}
CASES = [
    Case(
        "create",
        ("create", "--email", CAROL, "--full-name", "Carol", "--role", "staff", "--password-stdin", "-o", "id"),
        [
            (
                "user.create",
                CAROL,
                {
                    "email": [None, CAROL],
                    "full_name": [None, "Carol"],
                    "is_active": [None, True],
                    ROLES: [None, ["staff"]],
                    "password": "set",
                },
            )
        ],
        input=f"{PASSWORD}\n",
    ),
    Case(
        "update",
        ("update", BOB, "--full-name", "Bob B", "--username", "bob", "-o", "id"),
        [("user.update", BOB, {"full_name": [None, "Bob B"], "username": [None, "bob"]})],
    ),
    Case(
        "update-email",
        ("update", BOB, "--email", "robert@example.com", "-o", "id"),
        [("user.update", "robert@example.com", {"email": [BOB, "robert@example.com"], **REVOKED})],
    ),
    Case(
        "update-unchanged",
        ("update", BOB, "--email", BOB, "-o", "id"),
        [],
    ),
    Case(
        "set-password",
        ("set-password", BOB, "--password-stdin"),
        [("user.password", BOB, {"password": "changed", **REVOKED})],
        input="another password 2\n",
    ),
    Case("disable", ("disable", BOB), [("user.disable", BOB, {"is_active": [True, False], **REVOKED})]),
    Case(
        "disable-two",
        ("disable", BOB, CAROL),
        [
            ("user.disable", BOB, {"is_active": [True, False], **REVOKED}),
            ("user.disable", CAROL, {"is_active": [True, False], **REVOKED}),
        ],
        setup=(("create", "--email", CAROL, "--no-password", "-o", "id"),),
    ),
    Case("enable", ("enable", BOB), [("user.enable", BOB, {"is_active": [False, True]})], setup=(("disable", BOB),)),
    Case("enable-already", ("enable", BOB), []),
    Case(
        "unlock",
        ("unlock", BOB),
        [("user.unlock", BOB, {"locked_until": [ANY, None], "failed_logins": [2, 0]})],
        prepare=lambda engine: lock(engine, BOB),
    ),
    Case(
        "delete",
        ("delete", BOB, "--yes"),
        [("user.delete", BOB, {"email": [BOB, None], "is_active": [True, None], ROLES: [["beta"], None]})],
    ),
    Case("grant-admin", ("grant-admin", BOB), [("role.grant", BOB, {ROLES: [["beta"], ["admin", "beta"]]})]),
    Case(
        "revoke-admin",
        ("revoke-admin", BOB),
        [("role.revoke", BOB, {ROLES: [["admin", "beta"], ["beta"]], **REVOKED})],
        setup=(("grant-admin", BOB),),
    ),
    Case("grant-role", ("grant-role", BOB, "staff"), [("role.grant", BOB, {ROLES: [["beta"], ["beta", "staff"]]})]),
    Case("grant-role-held", ("grant-role", BOB, "beta"), []),
    Case("revoke-role", ("revoke-role", BOB, "beta"), [("role.revoke", BOB, {ROLES: [["beta"], []], **REVOKED})]),
    Case("revoke-tokens", ("revoke-tokens", BOB), [("tokens.revoke", BOB, REVOKED)]),
    Case("login", ("login", BOB, "--password-stdin"), [("login.success", BOB, {})], input=f"{PASSWORD}\n"),
    Case(
        "login-wrong",
        ("login", BOB, "--password-stdin"),
        [("login.failure", BOB, {"reason": "wrong password"})],
        input="not the password\n",
        code=6,
    ),
    Case(
        "login-unknown",
        ("login", "nobody@example.com", "--password-stdin"),
        [("login.failure", None, {"reason": "unknown user"})],
        input=f"{PASSWORD}\n",
        code=6,
    ),
    Case(
        "login-disabled",
        ("login", BOB, "--password-stdin"),
        [("login.failure", BOB, {"reason": "disabled"})],
        input=f"{PASSWORD}\n",
        setup=(("disable", BOB),),
        code=6,
    ),
    Case(
        "login-locks",
        ("login", BOB, "--password-stdin"),
        [
            ("login.locked", BOB, {"locked_until": [None, ANY]}),
            ("login.failure", BOB, {"reason": "wrong password"}),
        ],
        input="not the password\n",
        env={"USERMGR_LOCKOUT_THRESHOLD": "1"},
        code=6,
    ),
    Case(
        "login-locked",
        ("login", BOB, "--password-stdin"),
        [("login.failure", BOB, {"reason": "locked"})],
        input=f"{PASSWORD}\n",
        prepare=lambda engine: lock(engine, BOB),
        code=6,
    ),
    Case(
        "import",
        ("import", "-", "--format", "jsonl", "--on-conflict", "update"),
        [
            ("user.update", BOB, {"full_name": [None, "Bob"], ROLES: [["beta"], []], **REVOKED}),
            (  # new users are written after the chunk's updates, in one statement
                "user.create",
                CAROL,
                {"email": [None, CAROL], "is_active": [None, True], ROLES: [None, ["staff"]], "password": "set"},
            ),
            ("import.summary", None, {"created": 1, "updated": 1, "skipped": 0}),
        ],
        input=(
            json.dumps({"email": CAROL, "roles": ["staff"], "password": "carols password"})
            + "\n"
            + json.dumps({"email": BOB, "full_name": "Bob"})
            + "\n"
        ),
    ),
    Case(
        "import-unchanged",
        ("import", "-", "--format", "jsonl", "--on-conflict", "update"),
        [("import.summary", None, {"created": 0, "updated": 1, "skipped": 0})],
        input=json.dumps({"email": BOB, "roles": ["beta"]}) + "\n",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_each_command_leaves_exactly_its_events(run: Runner, engine: Engine, people: None, case: Case) -> None:
    for args in case.setup:
        ok(run(*args))
    if case.prepare is not None:
        case.prepare(engine)
    mark = last_id(engine)

    result = run(*case.args, input=case.input, env={"USERMGR_ACTOR": ON_BEHALF, **case.env})

    assert result.exit_code == case.code, (result.stdout, result.stderr)
    events = all_events(engine, mark)
    assert summary(events) == case.expected
    for event in events:
        assert (event["actor"], event["on_behalf_of"], event["client_address"]) == (CLI_ACTOR, ON_BEHALF, None)
    targets = {event["target_email"]: event["target_uid"] for event in events if event["target_email"]}
    if BOB in targets and case.name != "delete":
        assert targets[BOB] == uid_of(run, BOB)


def test_without_usermgr_actor_the_os_user_alone_is_recorded(run: Runner, engine: Engine, people: None) -> None:
    mark = last_id(engine)
    ok(run("disable", BOB))
    [event] = all_events(engine, mark)
    assert (event["actor"], event["on_behalf_of"]) == (CLI_ACTOR, None)


@pytest.mark.parametrize(
    "actor",
    ["x" * 401, "evil\x1b]0;pwned\x07", "two\nlines", "bidi \u202eevil", "tab\there"],
    ids=["too-long", "terminal-escape", "newline", "bidi-override", "tab"],
)
def test_an_unusable_usermgr_actor_is_refused_before_any_change(
    run: Runner, engine: Engine, people: None, actor: str
) -> None:
    """The actor is shown to every admin who reads the trail (a table on a terminal): text
    that is not printable, such as a terminal's escape sequences, never gets stored."""
    mark = last_id(engine)
    result = run("disable", BOB, env={"USERMGR_ACTOR": actor})
    line = error_line(result, 2)
    assert line == "usermgr: error: USERMGR_ACTOR must be at most 400 printable characters"
    assert "\x1b" not in result.stderr
    assert all_events(engine, mark) == []
    assert ok(run("show", BOB, "-o", "json")).stdout.count('"is_active": true') == 1


@pytest.mark.parametrize("name", ["evil\x1b[2Jroot", "x" * 400], ids=["terminal-escape", "too-long"])
def test_an_unusable_os_user_name_is_refused_before_any_change(
    run: Runner, engine: Engine, people: None, name: str
) -> None:
    """The OS user comes from $LOGNAME/$USER (getpass), which whoever runs usermgr sets."""
    mark = last_id(engine)
    result = run("disable", BOB, env={"LOGNAME": name, "USER": name})
    line = error_line(result, 2)
    assert line == (
        "usermgr: error: the operating-system user and host (from $LOGNAME or $USER, and the host name)"
        " must be at most 400 printable characters"
    )
    assert "\x1b" not in result.stderr
    assert all_events(engine, mark) == []


def test_a_usermgr_actor_of_400_characters_is_recorded_whole(run: Runner, engine: Engine, people: None) -> None:
    mark = last_id(engine)
    ok(run("disable", BOB, env={"USERMGR_ACTOR": "x" * 400}))
    [event] = all_events(engine, mark)
    assert (event["actor"], event["on_behalf_of"]) == (CLI_ACTOR, "x" * 400)


def test_audit_prune_is_itself_an_event(run: Runner, engine: Engine, people: None) -> None:
    mark = last_id(engine)
    ok(run("audit", "prune", "--before", "2000-01-01", env={"USERMGR_ACTOR": ON_BEHALF}))
    [event] = all_events(engine, mark)
    assert event["action"] == "audit.prune"
    assert event["changes"] == {"before": "2000-01-01T00:00:00+00:00", "removed": 0, "checkpoint": GENESIS}
    assert (event["actor"], event["on_behalf_of"]) == (CLI_ACTOR, ON_BEHALF)


# ---- the API's routes ---------------------------------------------------------------------------


def api_cases(bob: int) -> list[tuple[str, str, str, dict[str, Any], list[tuple[str, str | None, dict[str, Any]]]]]:
    return [
        ("patch", "PATCH", f"/users/{bob}", {"json": {"full_name": "Bob B"}}, [
            ("user.update", BOB, {"full_name": [None, "Bob B"]}),
        ]),
        ("delete", "DELETE", f"/users/{bob}", {}, [
            ("user.delete", BOB, {"email": [BOB, None], "is_active": [True, None], ROLES: [["beta"], None]}),
        ]),
        ("grant", "PUT", f"/users/{bob}/roles/staff", {}, [
            ("role.grant", BOB, {ROLES: [["beta"], ["beta", "staff"]]}),
        ]),
        ("revoke", "DELETE", f"/users/{bob}/roles/beta", {}, [
            ("role.revoke", BOB, {ROLES: [["beta"], []], **REVOKED}),
        ]),
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["patch", "delete", "grant", "revoke"])
def test_each_admin_route_leaves_exactly_its_events(
    run: Runner, engine: Engine, people: None, client: TestClient, name: str
) -> None:
    bob = int(ok(run("show", BOB, "-o", "id")).stdout)
    [(_, method, path, options, expected)] = [case for case in api_cases(bob) if case[0] == name]
    headers = bearer(token_of(run, ADMIN, ADMIN_PASSWORD))
    mark = last_id(engine)

    response = client.request(method, path, headers=headers, **options)

    assert response.status_code in (200, 204), response.text
    events = all_events(engine, mark)
    assert summary(events) == expected
    assert {(event["actor"], event["on_behalf_of"], event["client_address"]) for event in events} == {
        (f"uid:{uid_of(run, ADMIN)}", None, "testclient")
    }


def test_signup_and_logins_on_the_api_are_anonymous_with_the_address(
    run: Runner, engine: Engine, people: None, client: TestClient
) -> None:
    mark = last_id(engine)
    assert client.post("/auth/signup", json={"email": CAROL, "password": PASSWORD}).status_code == 201
    assert api_login(client, CAROL).status_code == 200
    assert api_login(client, CAROL, "not the password").status_code == 401
    assert api_login(client, "nobody@example.com").status_code == 401
    events = all_events(engine, mark)
    assert summary(events) == [
        ("user.create", CAROL, {"email": [None, CAROL], "is_active": [None, True], "password": "set"}),
        ("login.success", CAROL, {}),
        ("login.failure", CAROL, {"reason": "wrong password"}),
        ("login.failure", None, {"reason": "unknown user"}),
    ]
    assert {(event["actor"], event["client_address"]) for event in events} == {("anonymous", "testclient")}


# ---- a failed change, a dry run: no event --------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "stdin"),
    [
        (("grant-role", BOB, "nobody@example.com", "staff"), 4, None),  # Bob would change: the batch fails
        (("revoke-admin", ADMIN), 5, None),  # the last admin
        (("disable", ADMIN, BOB), 5, None),
        (("create", "--email", BOB, "--no-password"), 5, None),
        (("update", BOB, "--email", ADMIN), 5, None),
        (("import", "-", "--format", "jsonl"), 5, json.dumps({"email": CAROL}) + "\n" + json.dumps({"email": BOB})),
        (("import", "-", "--format", "jsonl", "--dry-run"), 0, json.dumps({"email": CAROL}) + "\n"),
        (("import", "-", "--format", "jsonl", "--dry-run", "--on-conflict", "update"), 0, json.dumps({"email": BOB})),
    ],
    ids=["unknown-in-batch", "last-admin", "last-admin-batch", "duplicate", "taken-email", "import-conflict",
         "import-dry-run", "import-dry-run-update"],
)  # fmt: skip
def test_a_failed_or_dry_run_change_leaves_no_event(
    run: Runner, engine: Engine, people: None, args: tuple[str, ...], code: int, stdin: str | None
) -> None:
    mark = last_id(engine)
    result = run(*args, input=stdin)
    assert result.exit_code == code, result.stderr
    assert all_events(engine, mark) == []


def test_a_refused_api_change_leaves_no_event(run: Runner, engine: Engine, people: None, client: TestClient) -> None:
    headers = bearer(token_of(run, ADMIN, ADMIN_PASSWORD))
    admin = int(ok(run("show", ADMIN, "-o", "id")).stdout)
    mark = last_id(engine)
    assert client.delete(f"/users/{admin}/roles/admin", headers=headers).status_code == 409
    assert client.patch(f"/users/{admin}", json={"email": BOB}, headers=headers).status_code == 409
    assert client.post("/auth/signup", json={"email": BOB, "password": PASSWORD}).status_code == 409
    assert all_events(engine, mark) == []


# ---- the hash chain ------------------------------------------------------------------------------


def some_events(run: Runner) -> None:
    create_user(run, ADMIN, "--admin", password=ADMIN_PASSWORD)
    create_user(run, BOB)
    ok(run("grant-role", BOB, "beta"))
    ok(run("disable", BOB))
    ok(run("enable", BOB))  # events 1 to 5


def verify(run: Runner) -> Any:
    return run("audit", "verify")


def test_an_untouched_chain_is_intact(run: Runner, engine: Engine) -> None:
    some_events(run)
    result = ok(verify(run))
    head = all_events(engine)[-1]["hash"]
    assert result.stderr == f"usermgr: audit trail intact: 5 events, head {head}\n"
    assert all_events(engine)[0]["prev_hash"] == GENESIS


BETWEEN = " (events between them were deleted, or the one before was edited)"


def test_verify_names_an_edited_event(run: Runner, engine: Engine) -> None:
    some_events(run)
    with engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET target_email = 'mallory@example.com' WHERE id = 3"))
    line = error_line(verify(run), 9)
    assert line == "usermgr: error: audit chain broken at event 3: it does not match its hash (it was edited)"


@pytest.mark.parametrize("edited_time", ["junk", "2026-13-45 99:99:99.000000"])
def test_verify_names_an_event_whose_time_was_edited_into_no_timestamp(
    run: Runner, engine: Engine, edited_time: str
) -> None:
    """Text that is no timestamp in a stored time is an edit like any other (exit 9, that
    event named), not a database error: only SQLite stores the time as text."""
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL's timestamptz column cannot hold such text")
    some_events(run)
    with engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET occurred_at = :at WHERE id = 4"), {"at": edited_time})
    line = error_line(verify(run), 9)
    assert line == "usermgr: error: audit chain broken at event 4: its time is not a timestamp (it was edited)"
    assert error_line(run("audit", "prune", "--before", "1d"), 9) == line


def test_verify_names_an_edited_and_rehashed_event(run: Runner, engine: Engine) -> None:
    some_events(run)
    third = all_events(engine)[2]
    forged = as_stored({**third, "actor": "os:someone-else@host"})
    with engine.begin() as connection:
        connection.execute(
            update(EVENTS).where(EVENTS.c.id == 3).values(actor=forged["actor"], hash=event_hash(forged))
        )
    line = error_line(verify(run), 9)
    assert line == "usermgr: error: audit chain broken at event 4: it does not follow event 3" + BETWEEN


def test_verify_names_the_event_after_a_deleted_one(run: Runner, engine: Engine) -> None:
    some_events(run)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_events WHERE id = 3"))
    line = error_line(verify(run), 9)
    assert line == "usermgr: error: audit chain broken at event 4: it does not follow event 2" + BETWEEN


def test_verify_sees_the_oldest_event_deleted(run: Runner, engine: Engine) -> None:
    some_events(run)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_events WHERE id = 1"))
    line = error_line(verify(run), 9)
    assert line == "usermgr: error: audit chain broken at event 2: it does not follow the start of the trail" + BETWEEN


@pytest.mark.parametrize("well_formed", [True, False], ids=["rehashed", "made-up-hash"])
def test_verify_names_an_inserted_event(run: Runner, engine: Engine, well_formed: bool) -> None:
    """A forged event slipped between events 3 and 4 (the later ids moved up to make room),
    whose own hash and link to event 3 are right: the link of the event after it breaks."""
    some_events(run)
    third = all_events(engine)[2]
    with engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET id = id + 100 WHERE id > 3"))
        forged = as_stored(
            {
                **third,
                "id": 4,
                "action": "role.grant",
                "prev_hash": third["hash"],
                "changes": {"roles": [[], ["admin"]]},
            }
        )
        forged["hash"] = event_hash(forged) if well_formed else "f" * 64
        connection.execute(insert(EVENTS).values(forged))
    line = error_line(verify(run), 9)
    expected = "it was inserted into the chain" if well_formed else "it does not match its hash (it was edited)"
    assert line == f"usermgr: error: audit chain broken at event 4: {expected}"


def test_verify_names_an_event_inserted_first_with_a_made_up_link(run: Runner, engine: Engine) -> None:
    some_events(run)
    second = all_events(engine)[1]
    with engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET id = id + 100 WHERE id > 1"))
        forged = as_stored({**second, "id": 2, "prev_hash": "e" * 64})
        forged["hash"] = event_hash(forged)
        connection.execute(insert(EVENTS).values(forged))
    line = error_line(verify(run), 9)
    assert line == "usermgr: error: audit chain broken at event 2: it was inserted into the chain"


def test_concurrent_writers_leave_an_unbroken_chain(run: Runner, engine: Engine, env: dict[str, str]) -> None:
    create_user(run, ADMIN, "--admin", password=ADMIN_PASSWORD)
    jobs: list[tuple[tuple[str, ...], str | None]] = [
        (("create", "--email", f"user{n}@example.com", "--password-stdin", "-o", "id"), f"{PASSWORD}\n")
        for n in range(4)
    ]
    jobs += [(("login", ADMIN, "--password-stdin"), f"{password}\n") for password in (ADMIN_PASSWORD, "wrong pw 1")]
    jobs += [(("grant-role", ADMIN, f"role{n}"), None) for n in range(2)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: run_usermgr(*job[0], env=env, input=job[1]), jobs))
    assert [result.returncode for result in results] == [0] * 5 + [6] + [0] * 2, [r.stderr for r in results]
    events = all_events(engine)
    assert len(events) == 1 + len(jobs)
    assert all(later["prev_hash"] == earlier["hash"] for earlier, later in itertools.pairwise(events))
    ok(verify(run))


# ---- prune ---------------------------------------------------------------------------------------


def test_prune_keeps_the_chain_verifiable(run: Runner, engine: Engine) -> None:
    some_events(run)
    events = all_events(engine)
    cut = events[2]["occurred_at"].isoformat()  # keep events 3, 4, 5

    result = ok(run("audit", "prune", "--before", cut))

    assert result.stderr.startswith("usermgr: pruned 2 audit events older than"), result.stderr
    kept = all_events(engine)
    assert [event["id"] for event in kept] == [3, 4, 5, 6]
    assert kept[-1]["action"] == "audit.prune"
    assert kept[-1]["changes"] == {"before": cut, "removed": 2, "checkpoint": events[1]["hash"]}
    ok(verify(run))
    ok(run("disable", BOB))
    ok(run("audit", "prune", "--before", "2000-01-01"))  # removes none
    ok(run("audit", "prune", "--before", kept[-1]["occurred_at"].isoformat()))  # 3 to 5
    assert all_events(engine)[0]["action"] == "audit.prune"
    ok(verify(run))


def test_prune_of_everything_keeps_the_chain_verifiable(run: Runner, engine: Engine) -> None:
    some_events(run)
    head = all_events(engine)[-1]["hash"]
    ok(run("audit", "prune", "--before", (utcnow() + timedelta(days=1)).isoformat()))
    [event] = all_events(engine)
    assert event["changes"]["checkpoint"] == head == event["prev_hash"]
    ok(verify(run))


def test_after_a_prune_deleting_the_oldest_kept_event_is_seen(run: Runner, engine: Engine) -> None:
    some_events(run)
    ok(run("audit", "prune", "--before", all_events(engine)[2]["occurred_at"].isoformat()))
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_events WHERE id = 3"))
    line = error_line(verify(run), 9)
    assert line == "usermgr: error: audit chain broken at event 4: it does not follow the start of the trail" + BETWEEN


def test_prune_refuses_a_broken_chain(run: Runner, engine: Engine) -> None:
    some_events(run)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_events WHERE id = 2"))
    error_line(run("audit", "prune", "--before", "2000-01-01"), 9)
    assert len(all_events(engine)) == 4  # nothing removed, no prune event


# ---- no secret in the trail ----------------------------------------------------------------------


def test_no_password_hash_or_token_is_ever_recorded(run: Runner, engine: Engine, client: TestClient) -> None:
    create_user(run, ADMIN, "--admin", password=ADMIN_PASSWORD)
    tokens = [token_of(run, ADMIN, ADMIN_PASSWORD)]
    create_user(run, BOB)
    ok(run("set-password", BOB, "--password-stdin", input="second secret 2\n"))
    login(run, BOB, "third secret 3")
    rows = [{"email": CAROL, "password": "fourth secret 4"}, {"email": BOB, "password": "fifth secret 5"}]
    ok(
        run(
            "import",
            "-",
            "--format",
            "jsonl",
            "--on-conflict",
            "update",
            input="".join(json.dumps(r) + "\n" for r in rows),
        )
    )
    assert (
        client.post("/auth/signup", json={"email": "dan@example.com", "password": "sixth secret 6"}).status_code == 201
    )
    tokens.append(api_login(client, "dan@example.com", "sixth secret 6").json()["access_token"])
    with engine.connect() as connection:
        hashes = list(connection.execute(select(User.__table__.c.hashed_password)).scalars())
        dump = "\n".join(str(tuple(row)) for row in connection.execute(text("SELECT * FROM audit_events")))
    secrets = [
        PASSWORD,
        ADMIN_PASSWORD,
        "second secret",
        "third secret",
        "fourth secret",
        "fifth secret",
        "sixth secret",
    ]
    for secret in [*secrets, *hashes, *(h[-12:] for h in hashes), *tokens]:
        assert secret not in dump
    assert "password" in dump  # the check reads the events: "set", "changed" are there


# ---- reading -------------------------------------------------------------------------------------


def test_audit_filters_and_formats(run: Runner, engine: Engine, people: None) -> None:
    ok(run("grant-role", BOB, "staff", env={"USERMGR_ACTOR": ON_BEHALF}))
    login(run, BOB, "wrong password!")
    jsonl = [json.loads(line) for line in ok(run("audit", "-o", "jsonl")).stdout.splitlines()]
    assert [event["id"] for event in jsonl] == [event["id"] for event in all_events(engine)]

    def ids(*filters: str) -> list[int]:
        return [json.loads(line)["id"] for line in ok(run("audit", *filters, "-o", "jsonl")).stdout.splitlines()]

    bob_ids = [event["id"] for event in jsonl if event["target_email"] == BOB]
    assert ids("--user", BOB) == bob_ids == ids("--user", uid_of(run, BOB))
    assert ids("--action", "role.grant") == [jsonl[2]["id"]]
    assert ids("--actor", ON_BEHALF) == [jsonl[2]["id"]]
    assert ids("--actor", CLI_ACTOR) == [event["id"] for event in jsonl]
    assert ids("--limit", "2") == [jsonl[0]["id"], jsonl[1]["id"]]
    middle = jsonl[2]["occurred_at"]
    assert ids("--since", middle) == [event["id"] for event in jsonl[2:]]
    assert ids("--until", middle) == [event["id"] for event in jsonl[:2]]
    assert ids("--since", "1h") == ids()
    ok(run("delete", BOB, "--yes"))
    assert ids("--user", BOB) == [*bob_ids, jsonl[-1]["id"] + 1]  # a deleted user, by their email then
    csv_lines = ok(run("audit", "--action", "role.grant", "-o", "csv")).stdout.splitlines()
    assert csv_lines[0] == ",".join(["id", "occurred_at", "actor", "on_behalf_of", "client_address", "action",
                                      "target_uid", "target_email", "changes", "prev_hash", "hash"])  # fmt: skip
    assert '"{""roles"": [[""beta""], [""beta"", ""staff""]]}"' in csv_lines[1]
    table = ok(run("audit", "--action", "role.grant")).stdout
    assert "role.grant" in table and ON_BEHALF in table
    assert json.loads(ok(run("audit", "-o", "json", "--limit", "1")).stdout)[0]["action"] == "user.create"


ALL_ACTIONS = "user.create, user.update, user.delete, user.disable, user.enable, user.unlock, user.password, role.grant, role.revoke, tokens.revoke, login.success, login.failure, login.locked, import.summary, audit.prune, key.add, key.activate, key.deactivate, key.retire"  # noqa: E501
ISO_OR_AGO = "must be an ISO 8601 date or time, or a duration ago such as 7d"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("audit", "--action", "user.explode"), 3, f"unknown action 'user.explode': one of {ALL_ACTIONS}"),
        (("audit", "--since", "yesterday-ish"), 3, f"--since {ISO_OR_AGO}"),
        (
            ("audit", "--until", "0001-01-01T00:00:00+01:00"),
            3,
            "--until is out of range: give a time between the years 1 and 9999",
        ),
        (("audit", "--since", "2999-01-01T10:00"), 0, ""),
        (("audit", "--user", "nobody@example"), 0, ""),
        (
            ("audit", "--user", "nobody"),
            4,
            "no user matches 'nobody': give an email, a username, an id or a deleted user's uid or email",
        ),
        (("audit", "--user", BOB, "verify"), 2, "the filters apply to `usermgr audit` alone, not to `verify`"),
        (("audit", "prune"), 2, "Missing option '--before'."),
        (("audit", "prune", "--before", "soon"), 3, f"--before {ISO_OR_AGO}"),
        (("audit", "--limit", str(2**63)), 3, "limit and offset must be at most 9223372036854775807"),
    ],
)
def test_audit_refuses_bad_input(run: Runner, people: None, args: tuple[str, ...], code: int, message: str) -> None:
    result = run(*args)
    if code:
        line = error_line(result, code).split(" (see `")[0]  # a usage error's pointer names the program as run
        assert line == f"usermgr: error: {message}"
    else:
        assert result.exit_code == 0 and result.stdout == "", result.stderr


def test_audit_takes_the_largest_limit(run: Runner, people: None) -> None:
    assert ok(run("audit", "--limit", str(2**63 - 1), "-o", "jsonl")).stdout.count("\n") == len(
        ok(run("audit", "-o", "jsonl")).stdout.splitlines()
    )


def test_get_audit_is_admin_only_paginated_and_filtered(
    run: Runner, people: None, client: TestClient, engine: Engine
) -> None:
    admin = bearer(token_of(run, ADMIN, ADMIN_PASSWORD))
    bob = bearer(token_of(run, BOB))
    assert client.get("/audit").status_code == 401
    assert client.get("/audit", headers=bob).status_code == 403
    everything = all_events(engine)
    page = client.get("/audit", params={"limit": 2, "offset": 1}, headers=admin)
    assert page.status_code == 200, page.text
    assert [event["id"] for event in page.json()] == [event["id"] for event in everything[1:3]]
    logins = client.get("/audit", params={"action": "login.success", "user": BOB}, headers=admin).json()
    assert [(event["action"], event["target_email"]) for event in logins] == [("login.success", BOB)]
    since = everything[2]["occurred_at"].isoformat()
    later = client.get("/audit", params={"since": since}, headers=admin).json()
    assert [event["id"] for event in later] == [event["id"] for event in everything[2:]]
    assert client.get("/audit", params={"action": "nope"}, headers=admin).status_code == 422
    assert client.get("/audit", params={"limit": 1001}, headers=admin).status_code == 422
    assert set(client.app.openapi()["paths"]["/audit"]["get"]["responses"]) >= {"200", "401", "403", "422"}


def test_reading_the_trail_writes_nothing(run: Runner, engine: Engine, people: None) -> None:
    before = all_events(engine)
    ok(run("audit"))
    ok(verify(run))
    assert all_events(engine) == before


def test_export_does_not_carry_the_trail(run: Runner, people: None, tmp_path: Path) -> None:
    exported = ok(run("export")).stdout
    assert "user.create" not in exported and "prev_hash" not in exported


# ---- the key ring --------------------------------------------------------------------------------


def test_each_key_change_leaves_its_event_and_a_refused_one_none(run: Runner, engine: Engine, tmp_path: Path) -> None:
    ring = {"USERMGR_KEY_FILE": str(tmp_path / "ring.key"), "USERMGR_ACTOR": ON_BEHALF}
    ok(run("init", env=ring))
    [old] = json.loads(ok(run("keys", "list", "-o", "json", env=ring)).stdout)
    mark = last_id(engine)
    new = ok(run("keys", "rotate", "--alg", "ES256", env=ring)).stdout.strip()
    ok(run("keys", "retire", "--", old["kid"], env=ring))
    error_line(run("keys", "retire", "--", new, env=ring), 5)  # the active key: refused, no event
    events = all_events(engine, mark)
    assert [(event["action"], event["changes"]) for event in events] == [
        ("key.add", {"kid": new, "alg": "ES256"}),
        ("key.activate", {"kid": new, "alg": "ES256"}),
        ("key.deactivate", {"kid": old["kid"], "alg": old["alg"]}),
        ("key.retire", {"kid": old["kid"], "alg": old["alg"]}),
    ]
    assert {(event["actor"], event["on_behalf_of"], event["target_uid"]) for event in events} == {
        (CLI_ACTOR, ON_BEHALF, None)
    }
    assert ok(run("audit", "verify")).exit_code == 0


def test_a_key_change_without_a_database_to_record_it_is_refused(tmp_path: Path) -> None:
    """No change without its event: with no database the ring is left as it was."""
    key_file = tmp_path / "ring.key"
    env = {"USERMGR_DATABASE_URL": f"sqlite:///{tmp_path / 'users.db'}", "USERMGR_KEY_FILE": str(key_file)}
    ok(run_usermgr("init", env=env))
    (tmp_path / "users.db").unlink()
    before = key_file.read_bytes()
    result = run_usermgr("keys", "add", env=env)
    assert result.returncode == 1 and "init" in result.stderr, result
    assert key_file.read_bytes() == before


IMPORTED_USERS = [
    {"email": "plain@example.com"},
    {"email": "named@example.com", "username": "named", "full_name": 'Zoë "Q" Ångström \\ 李', "roles": ["beta"]},
    {"email": "roles@example.com", "roles": ["staff", "beta", "staff"], "is_active": False},
    {"email": "secret@example.com", "password": PASSWORD, "expires_at": "2031-02-03T04:05:06+02:00"},
    {
        "email": "hashed@example.com",
        "hashed_password": "$2b$12$" + "a" * 53,
        "created_at": "2020-01-02T03:04:05Z",
        "last_login_at": "2021-01-02",
        "uid": "123e4567-e89b-42d3-a456-426614174000",
    },
    {"email": "mé@example.com", "full_name": "Mé"},
]


def test_the_import_writes_the_events_the_generic_path_computes(run: Runner, engine: Engine) -> None:
    """The import builds its `user.create` events without Event, diff or the ORM: each must equal,
    field for field and hash for hash, what service.audit computes for the same user."""
    from sqlalchemy.orm import Session

    from usermgr.service.audit import diff, state_of

    before = last_id(engine)
    lines = "".join(json.dumps(row) + "\n" for row in IMPORTED_USERS)
    ok(run("import", "-", "--format", "jsonl", input=lines, env={"USERMGR_ACTOR": ON_BEHALF}))
    with engine.connect() as connection:
        stored = [row._asdict() for row in connection.execute(select(EVENTS).where(EVENTS.c.id > before))]
    created = [event for event in stored if event["action"] == "user.create"]
    assert [event["target_email"] for event in created] == [row["email"] for row in IMPORTED_USERS]
    with Session(engine) as db:
        for event in created:
            user = db.scalars(select(User).where(User.uid == event["target_uid"])).one()
            generic = {
                **event,
                "actor": CLI_ACTOR,
                "on_behalf_of": ON_BEHALF,
                "client_address": None,
                "target_email": user.email,
                "changes": canonical_changes(diff(None, state_of(user))),
            }
            generic["hash"] = event_hash(generic)
            assert event == generic
    assert [event["prev_hash"] for event in stored[1:]] == [event["hash"] for event in stored[:-1]]
    assert "audit trail intact" in ok(run("audit", "verify")).stderr


# ---- what an event says, exactly, in process (what the mutation run can see) ----------------------

ADA_UID = "00000000-0000-0000-0000-000000000001"
PLUS_TWO = timezone(timedelta(hours=2))


def state(password: str | None = "hash-1", version: int = 0, failures: int = 0, **fields: Any) -> State:
    """A user as an event compares it: every tracked field empty unless given."""
    base = {name: None for name in TRACKED_FIELDS} | {"roles": [], "email": BOB, "is_active": True}
    return State({**base, **fields}, password, version, failures)


def test_diff_lists_each_kind_of_change_exactly() -> None:
    before = state(full_name="Bob", roles=["beta"])
    assert diff(before, before) == {}
    assert diff(before, state(full_name="Bob", roles=["beta"], username="bob")) == {"username": [None, "bob"]}
    assert diff(before, state(full_name="Robert", roles=["beta"])) == {"full_name": ["Bob", "Robert"]}
    assert diff(before, state(roles=["beta"])) == {"full_name": ["Bob", None]}
    assert diff(before, state(full_name="Bob", roles=["alpha", "beta"])) == {"roles": [["beta"], ["alpha", "beta"]]}
    assert diff(before, state(full_name="Bob")) == {"roles": [["beta"], []]}
    assert diff(before, state(full_name="Bob", roles=["beta"], is_active=False)) == {"is_active": [True, False]}
    assert diff(state(roles=None), state(roles=[])) == {}  # nothing and no roles are both empty
    assert diff(before, state("hash-2", full_name="Bob", roles=["beta"])) == {"password": "changed"}
    assert diff(before, state(None, full_name="Bob", roles=["beta"])) == {"password": "changed"}
    assert diff(before, state(version=1, full_name="Bob", roles=["beta"])) == {"tokens": "revoked"}
    assert diff(state(version=2), state(version=1)) == {}
    assert diff(state(failures=1), state(failures=2)) == {"failed_logins": [1, 2]}
    assert diff(state(failures=3), state(failures=0)) == {"failed_logins": [3, 0]}


def test_diff_of_a_new_and_a_deleted_user_lists_every_field_that_is_set() -> None:
    after = state(full_name="Bob", roles=["beta"], failures=2, version=3)
    assert diff(None, after) == {
        "email": [None, BOB],
        "full_name": [None, "Bob"],
        "is_active": [None, True],
        "roles": [None, ["beta"]],
        "password": "set",
    }
    assert diff(None, state(None)) == {"email": [None, BOB], "is_active": [None, True]}
    assert diff(after, None) == {
        "email": [BOB, None],
        "full_name": ["Bob", None],
        "is_active": [True, None],
        "roles": [["beta"], None],
    }
    assert diff(None, None) == {}


def test_created_changes_say_what_diff_says_of_a_new_user() -> None:
    expires = datetime(2030, 1, 2, 5, 4, 5, tzinfo=PLUS_TWO)
    values = {"email": BOB, "username": None, "full_name": "Bob", "is_active": False, "expires_at": expires}
    changes = created_changes({**values, "hashed_password": "h"}, ["beta", "alpha"])
    assert changes == {
        "email": [None, BOB],
        "full_name": [None, "Bob"],
        "is_active": [None, False],
        "expires_at": [None, "2030-01-02T03:04:05+00:00"],
        "roles": [None, ["alpha", "beta"]],
        "password": "set",
    }
    assert created_changes({"email": BOB, "hashed_password": None}, []) == {"email": [None, BOB]}
    columns: dict[str, list[Any]] = {name: [None, None, None] for name in COLUMN_FIELDS}
    columns.update(
        email=[BOB, CAROL, "dan@example.com"],
        full_name=["Bøb", None, None],
        is_active=[True, False, True],
        expires_at=[None, expires, None],
        hashed_password=["h", None, None],
    )
    roles = [["beta", "alpha"], [], []]
    texts = created_changes_texts(columns, roles)
    rows = [{name: column[index] for name, column in columns.items()} for index in range(3)]
    assert texts == [
        canonical_changes(created_changes(row, row_roles)) for row, row_roles in zip(rows, roles, strict=True)
    ]
    assert texts[0] == (
        '{"email":[null,"bob@example.com"],"full_name":[null,"Bøb"],"is_active":[null,true],'
        '"password":"set","roles":[null,["alpha","beta"]]}'
    )
    assert texts[1] == (
        '{"email":[null,"carol@example.com"],"expires_at":[null,"2030-01-02T03:04:05+00:00"],"is_active":[null,false]}'
    )


def test_state_of_takes_the_tracked_fields_json_ready_and_what_is_told_only_as_changed() -> None:
    user = User(
        uid=ADA_UID,
        email=BOB,
        username="bob",
        full_name=None,
        is_active=True,
        hashed_password="hash-1",
        expires_at=datetime(2030, 1, 2, 5, 4, 5, tzinfo=PLUS_TWO),
        roles=[Role(name="beta"), Role(name="alpha")],
    )
    assert state_of(user) == State(
        {
            "email": BOB,
            "username": "bob",
            "full_name": None,
            "is_active": True,
            "roles": ["alpha", "beta"],
            "locked_until": None,
            "expires_at": "2030-01-02T03:04:05+00:00",
        },
        "hash-1",
        0,
        0,
    )
    user.token_version, user.failed_logins = 4, 2
    assert (state_of(user).token_version, state_of(user).failed_logins) == (4, 2)
    assert jsonable(datetime(2030, 1, 2, 5, 4, 5, tzinfo=PLUS_TWO)) == "2030-01-02T03:04:05+00:00"
    assert jsonable("2030-01-02") == "2030-01-02"


def test_a_known_event_hashes_to_a_known_value() -> None:
    changes = canonical_changes({"full_name": ["Bob", "Bøb"]})
    assert changes == '{"full_name":["Bob","Bøb"]}'
    assert canonical_changes({"b": 1, "a": [None, True]}) == '{"a":[null,true],"b":1}'
    row = {
        "prev_hash": GENESIS,
        "occurred_at": datetime(2026, 1, 2, 5, 4, 5, tzinfo=PLUS_TWO),
        "actor": "os:ada@host",
        "on_behalf_of": "ticket-4711",
        "client_address": None,
        "action": "user.update",
        "target_uid": ADA_UID,
        "target_email": BOB,
        "changes": changes,
    }
    by_hand = (
        f'["{GENESIS}","2026-01-02T03:04:05+00:00","os:ada@host","ticket-4711",null,"user.update",'
        f'"{ADA_UID}","bob@example.com","{{\\"full_name\\":[\\"Bob\\",\\"Bøb\\"]}}"]'
    )
    golden = "e960f539bdd2523867b044108aea0b6d9e02ea4b8ed2552e5c2cc71478745097"
    assert hashlib.sha256(by_hand.encode()).hexdigest() == golden
    assert event_hash(row) == golden


def test_the_cli_actor_is_the_os_user_at_the_host_with_usermgr_actor_beside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USERMGR_ACTOR", raising=False)
    assert os_actor() == Actor(CLI_ACTOR, None)
    monkeypatch.setenv("USERMGR_ACTOR", "")
    assert os_actor() == Actor(CLI_ACTOR, None)
    monkeypatch.setenv("USERMGR_ACTOR", ON_BEHALF)
    assert os_actor() == Actor(CLI_ACTOR, ON_BEHALF)
    monkeypatch.setenv("USERMGR_ACTOR", "x" * 400)
    assert os_actor() == Actor(CLI_ACTOR, "x" * 400)
    for unusable in ("x" * 401, "a\udcffb", "a\x1bb"):  # too long; not UTF-8 (os.environ holds no NUL); escape
        monkeypatch.setenv("USERMGR_ACTOR", unusable)
        with pytest.raises(ConfigurationError) as refused:
            os_actor()
        assert str(refused.value) == "USERMGR_ACTOR must be at most 400 printable characters"
    monkeypatch.delenv("USERMGR_ACTOR")

    def nameless() -> str:
        raise KeyError("getpwuid(): uid not found")

    monkeypatch.setattr(getpass, "getuser", nameless)
    assert os_actor() == Actor(f"os:{os.getuid()}@{socket.gethostname()}", None)


def test_times_and_filters_are_refused_exactly() -> None:
    assert parse_time("2026-01-02T05:04:05+02:00", "--since") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_time(" 2026-01-02 ", "--since") == datetime(2026, 1, 2, tzinfo=UTC)
    ago = parse_time("7d", "--since")
    assert abs(utcnow() - timedelta(days=7) - ago) < timedelta(hours=1)
    for given, message in [
        ("yesterday", "--since must be an ISO 8601 date or time, or a duration ago such as 7d"),
        ("0001-01-01T00:00:00+01:00", "--since is out of range: give a time between the years 1 and 9999"),
    ]:
        with pytest.raises(InvalidInput) as refused:
            parse_time(given, "--since")
        assert str(refused.value) == message
    assert audit_filter(BOB, "os:x", "user.create", "2026-01-02", "2026-01-03T00:00:00Z", 5, 2) == AuditFilter(
        BOB,
        "os:x",
        "user.create",
        datetime(2026, 1, 2, tzinfo=UTC),
        datetime(2026, 1, 3, tzinfo=UTC),
        5,
        2,
    )
    assert audit_filter() == AuditFilter()
    for options, name in [({"since": "soon"}, "since"), ({"until": "later"}, "until")]:
        with pytest.raises(InvalidInput) as refused:
            audit_filter(**options, time_option="the query parameter {}")
        assert str(refused.value) == (
            f"the query parameter {name} must be an ISO 8601 date or time, or a duration ago such as 7d"
        )
        with pytest.raises(InvalidInput) as refused:
            audit_filter(**options)
        assert str(refused.value).startswith(f"{name} must be"), str(refused.value)


@pytest.fixture
def far_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone twelve hours east of UTC: what is written in UTC must not move."""
    monkeypatch.setenv("TZ", "UTC-12")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_times_are_read_and_written_in_utc_whatever_the_local_zone(far_zone: None) -> None:
    assert jsonable(datetime(2026, 1, 2, 5, 4, 5, tzinfo=PLUS_TWO)) == "2026-01-02T03:04:05+00:00"
    assert parse_time("2026-01-02T03:04:05", "--since").isoformat() == "2026-01-02T03:04:05+00:00"
    assert parse_time("2026-01-02T05:04:05+02:00", "--since").isoformat() == "2026-01-02T03:04:05+00:00"


def test_a_batch_whose_roles_do_not_match_its_columns_is_refused() -> None:
    columns: dict[str, list[Any]] = {name: [None] for name in COLUMN_FIELDS} | {"hashed_password": [None]}
    columns["email"] = [BOB]
    assert created_changes_texts(columns, [[]]) == ['{"email":[null,"bob@example.com"]}']
    with pytest.raises(ValueError, match="zip"):
        created_changes_texts(columns, [[], []])


# ---- reading, verifying and pruning in process ---------------------------------------------------------


def ids(db: Session, **filters: Any) -> list[int]:
    return [event["id"] for event in iter_events(db, AuditFilter(**filters))]


def test_each_filter_of_the_trail_selects_exactly_its_events(run: Runner, db: Session) -> None:
    some_events(run)  # 1 create admin, 2 create bob, 3 grant beta to bob, 4 disable bob, 5 enable bob
    ok(run("disable", BOB, env={"USERMGR_ACTOR": ON_BEHALF}))  # 6
    events = list(iter_events(db))
    assert [(event["id"], event["action"]) for event in events] == [
        (1, "user.create"),
        (2, "user.create"),
        (3, "role.grant"),
        (4, "user.disable"),
        (5, "user.enable"),
        (6, "user.disable"),
    ]
    assert events[2]["changes"] == {"roles": [[], ["beta"]]}
    assert ids(db, action="user.disable") == [4, 6]
    assert ids(db, user=BOB) == [2, 3, 4, 5, 6] == ids(db, user=f" {BOB.upper()} ")
    assert ids(db, user=ADMIN) == [1]
    assert ids(db, user="2") == [2, 3, 4, 5, 6]  # a user by their id: found, not read as a deleted user's
    assert ids(db, actor=CLI_ACTOR) == [1, 2, 3, 4, 5, 6]
    assert ids(db, actor=ON_BEHALF) == [6]
    assert ids(db, actor="os:nobody@nowhere") == []
    assert ids(db, limit=2) == [1, 2]
    assert ids(db, limit=0) == []
    assert ids(db, offset=4) == [5, 6]
    assert ids(db, limit=2, offset=1) == [2, 3]
    assert ids(db, limit=MAX_ROW_COUNT, offset=5) == [6]
    assert ids(db, offset=MAX_ROW_COUNT) == []
    middle = events[2]["occurred_at"]
    assert ids(db, since=middle) == [event["id"] for event in events if event["occurred_at"] >= middle]
    assert ids(db, until=middle) == [event["id"] for event in events if event["occurred_at"] < middle]
    assert 3 in ids(db, since=middle) and 3 not in ids(db, until=middle)
    assert ids(db, since=middle, until=middle) == []

    bob_uid = events[1]["target_uid"]
    ok(run("delete", BOB, "--yes"))  # 7
    assert ids(db, user=BOB) == [2, 3, 4, 5, 6, 7] == ids(db, user=bob_uid)
    refusals = {
        "limit=-1": ({"limit": -1}, "limit and offset must not be negative"),
        "offset=-1": ({"offset": -1}, "limit and offset must not be negative"),
        "limit-too-large": ({"limit": MAX_ROW_COUNT + 1}, f"limit and offset must be at most {MAX_ROW_COUNT}"),
        "offset-too-large": ({"offset": MAX_ROW_COUNT + 1}, f"limit and offset must be at most {MAX_ROW_COUNT}"),
        "action": ({"action": "user.explode"}, f"unknown action 'user.explode': one of {ALL_ACTIONS}"),
        "actor": ({"actor": "a\x00b"}, "the actor must not contain a NUL character or bytes that are not UTF-8"),
    }
    for case, (filters, message) in refusals.items():
        with pytest.raises(InvalidInput) as refused:
            ids(db, **filters)
        assert str(refused.value) == message, case
    for ref in ("nobody", "x" * 35, f"{bob_uid}x"):
        with pytest.raises(NotFound) as missing:
            ids(db, user=ref)
        assert str(missing.value) == (
            f"no user matches {ref!r}: give an email, a username, an id or a deleted user's uid or email"
        )


def test_verify_reports_the_count_and_head_and_prune_leaves_its_checkpoint(run: Runner, db: Session) -> None:
    assert verify_chain(db) == ChainReport(0, GENESIS)
    some_events(run)
    events = list(iter_events(db))
    assert verify_chain(db) == ChainReport(5, events[-1]["hash"])
    assert [event["prev_hash"] for event in events] == [GENESIS, *(event["hash"] for event in events[:-1])]

    assert prune(db, datetime(2000, 1, 1, tzinfo=UTC)) == 0
    cut = events[2]["occurred_at"]
    assert prune(db, cut) == 2
    kept = list(iter_events(db))
    assert [event["id"] for event in kept] == [3, 4, 5, 6, 7]
    assert kept[-2]["changes"] == {"before": "2000-01-01T00:00:00+00:00", "removed": 0, "checkpoint": GENESIS}
    assert kept[-1]["changes"] == {"before": jsonable(cut), "removed": 2, "checkpoint": events[1]["hash"]}
    assert (kept[-1]["action"], kept[-1]["target_uid"], kept[-1]["target_email"]) == ("audit.prune", None, None)
    assert kept[-1]["prev_hash"] == kept[-2]["hash"]
    assert verify_chain(db) == ChainReport(5, kept[-1]["hash"])

    assert prune(db, datetime(2000, 1, 1, tzinfo=UTC)) == 0  # nothing older: the checkpoint stays the last one
    assert list(iter_events(db))[-1]["changes"]["checkpoint"] == events[1]["hash"]
    last = list(iter_events(db))[-1]
    assert prune(db, last["occurred_at"] + timedelta(seconds=1)) == 6
    [only] = list(iter_events(db))
    assert only["changes"]["removed"] == 6
    assert only["changes"]["checkpoint"] == last["hash"] == only["prev_hash"]
    assert verify_chain(db) == ChainReport(1, only["hash"])


def test_imported_times_are_stored_as_every_other_write_stores_them(run: Runner, engine: Engine, backend: str) -> None:
    """SQLite keeps times as text and compares them as text, so every writer must store one form.
    The import binds its values for the driver itself; it once let sqlite3's own adapter write
    `... 20:31:13.094867+00:00` where SQLAlchemy writes `... 20:31:13.094867`, and then
    `audit --since T` left out an event at exactly T that `--until T` took in."""
    if backend != "sqlite":
        pytest.skip("PostgreSQL stores timestamptz, not text")
    ok(run("create", "--email", "orm@example.com", "--no-password"))
    lines = "".join(json.dumps(row) + "\n" for row in IMPORTED_USERS)
    ok(run("import", "-", "--format", "jsonl", input=lines))
    with engine.connect() as connection:
        stored = connection.exec_driver_sql(
            "SELECT created_at FROM users UNION ALL SELECT updated_at FROM users"
            " UNION ALL SELECT occurred_at FROM audit_events"
        ).scalars()
        forms = {re.sub(r"\d", "9", value) for value in stored}
    assert forms == {"9999-99-99 99:99:99.999999"}


def test_an_import_of_several_chunks_chains_each_chunk_after_the_last(run: Runner, db: Session) -> None:
    """An import appends its events a chunk at a time, each chunk chained after the previous
    chunk's last event (handed on, not read back), the summary after the last chunk; with an
    update among the new users, in the second chunk, and one event already in the trail."""
    from usermgr import service
    from usermgr.output import InputRow

    ok(run("create", "--email", "existing@example.com", "--no-password"))
    rows = [
        InputRow(line, {"email": f"c{line}@example.com", "roles": ["staff"] if line % 7 else []})
        for line in range(1, 2501)
    ]
    rows.insert(1500, InputRow(2501, {"email": "existing@example.com", "full_name": "Existing"}))
    plan = service.plan_import(rows)
    try:
        result = service.apply_import(db, plan, on_conflict="update")
    finally:
        plan.close()
    assert (result.created, result.updated) == (2500, 1)
    events = list(iter_events(db))
    assert [event["action"] for event in events] == [
        "user.create",
        *["user.create"] * 1000,
        "user.update",  # a chunk's updates are written before its new users
        *["user.create"] * 1500,
        "import.summary",
    ]
    assert [event["prev_hash"] for event in events] == [GENESIS, *(event["hash"] for event in events[:-1])]
    assert all(
        event_hash({**event, "changes": canonical_changes(event["changes"])}) == event["hash"] for event in events
    )
    assert verify_chain(db) == ChainReport(len(events), events[-1]["hash"])


@pytest.mark.parametrize("backend", ["sqlite"])  # SQLite's limit on the variables one statement binds
def test_insert_many_keeps_each_statement_within_sqlites_limit(db: Session) -> None:
    """On SQLite insert_many writes many rows a statement, never binding more variables than the
    connection allows, and every row lands whole, in order."""
    import sqlite3

    from usermgr.service.audit import _EVENT_COLUMNS
    from usermgr.service.core import insert_many, writing

    rows = [
        ("2026-01-01 00:00:00.000000", "os:t@h", None, None, "user.create", None, None, f'{{"n":{n}}}', "p", f"h{n}")
        for n in range(5)
    ]
    with writing(db):
        driver = db.connection().connection.driver_connection
        driver.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 25)  # two rows of ten columns a statement
        insert_many(db, EVENTS, _EVENT_COLUMNS, rows)
    stored = db.connection().exec_driver_sql(f"SELECT {', '.join(_EVENT_COLUMNS)} FROM audit_events ORDER BY id")
    assert [tuple(row) for row in stored] == rows  # as stored, times as the driver was given them
