"""A token names one person forever: the stable `uid`, ids never reused, identities that
travel with export and import, and revocation on every path that changes what a token
vouches for (commands, import, the API).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from tests.conftest import (
    ADMIN,
    ADMIN_PASSWORD,
    Runner,
    api_token,
    bearer,
    create_user,
    emails,
    login,
    run_usermgr,
    shown,
    token_of,
    uid_of,
)
from usermgr.config import Settings


def check_db(run: Runner, token: str) -> tuple[int, str]:
    result = run("verify", token, "--check-db", "-o", "email")
    return result.exit_code, result.stdout or result.stderr


# ---- a deleted user's token never passes as the next user ---------------------------------


def test_a_deleted_users_token_never_passes_as_the_next_user(run: Runner) -> None:
    create_user(run, "admin@example.com", "--admin")
    carol = create_user(run, "carol@example.com")
    token = token_of(run, "carol@example.com")
    assert run("delete", "carol@example.com", "--yes").exit_code == 0
    mallory = create_user(run, "mallory@example.com", "--admin")
    assert mallory != carol  # ids are never reused, on SQLite too
    code, message = check_db(run, token)
    assert (code, message) == (7, "usermgr: error: token invalid: the user no longer exists\n")


def test_every_user_gets_a_distinct_canonical_uid(run: Runner) -> None:
    uids = [uid_of(run, str(create_user(run, f"user{n}@example.com"))) for n in range(3)]
    assert len(set(uids)) == 3
    for uid in uids:
        assert len(uid) == 36 and uid == uid.lower() and uid[14] == "4"  # a version-4 UUID


def test_ids_are_not_reused_after_deleting_the_newest_user(run: Runner) -> None:
    first = create_user(run, "first@example.com")
    second = create_user(run, "second@example.com")
    assert run("delete", str(second), "--yes").exit_code == 0
    assert create_user(run, "third@example.com") > second > first


# ---- identities travel with export and import, across databases ---------------------------


def _sqlite_url(tmp_path: Path, name: str) -> str:
    url = f"sqlite:///{tmp_path / name}"
    assert run_usermgr("--db", url, "init", env={}).returncode == 0
    return url


@pytest.mark.parametrize("direction", ["there", "back"])
def test_a_moved_users_token_works_and_nobody_elses_does(
    env: dict[str, str], db_url: str, tmp_path: Path, backend: str, direction: str
) -> None:
    """export --with-hashes | import between the backend's database and another SQLite file."""
    if backend == "sqlite" and direction == "back":
        pytest.skip("one SQLite-to-SQLite move is enough")
    other = _sqlite_url(tmp_path, "other.db")
    source, target = (db_url, other) if direction == "there" else (other, db_url)
    key = {"USERMGR_KEY_FILE": env["USERMGR_KEY_FILE"], "USERMGR_HASH_PROFILE": "test"}
    source_run, target_run = (
        Runner({**key, "USERMGR_DATABASE_URL": source}),
        Runner({**key, "USERMGR_DATABASE_URL": target}),
    )
    # The target already has someone at id 1; the mover is id 1 in the source.
    create_user(target_run, "resident@example.com", "--admin")
    create_user(source_run, "mover@example.com", "--admin")
    mover_token = token_of(source_run, "mover@example.com")
    resident_token = token_of(target_run, "resident@example.com")
    exported = source_run("export", "--with-hashes", "-o", "jsonl")
    assert exported.exit_code == 0, exported.stderr
    imported = target_run("import", "-", "--format", "jsonl", input=exported.stdout)
    assert imported.exit_code == 0, imported.stderr
    assert uid_of(target_run, "mover@example.com") == uid_of(source_run, "mover@example.com")
    assert check_db(target_run, mover_token) == (0, "mover@example.com\n")
    assert check_db(target_run, resident_token) == (0, "resident@example.com\n")
    assert check_db(source_run, resident_token)[0] == 7  # the resident never lived in the source


def test_a_token_from_another_database_never_passes_for_whoever_holds_its_uid_here(
    env: dict[str, str], run: Runner, client: TestClient, tmp_path: Path
) -> None:
    """An export edited to give Alice's uid to Mallory cannot be refused where the uid was
    never seen (this database never had Alice): her tokens from the other database, with the
    same key, must still not pass here as Mallory. A token names its email too, and no token
    whose email is not its holder's passes (within one database an email change revokes them)."""
    other = Runner({**env, "USERMGR_DATABASE_URL": _sqlite_url(tmp_path, "other.db")})
    create_user(other, "alice@example.com", "--role", "ops")
    alice_token = token_of(other, "alice@example.com")
    row = json.loads(other("export", "-o", "jsonl").stdout) | {"email": "mallory@example.com"}
    assert run("import", "-", "--format", "jsonl", input=json.dumps(row) + "\n").exit_code == 0
    assert uid_of(run, "mallory@example.com") == uid_of(other, "alice@example.com")
    assert check_db(run, alice_token) == (7, "usermgr: error: token invalid: revoked\n")
    assert client.get("/users/me", headers=bearer(alice_token)).status_code == 401
    assert check_db(other, alice_token) == (0, "alice@example.com\n")  # at home it passes


def test_import_refuses_a_uid_that_belongs_to_someone_else(run: Runner) -> None:
    create_user(run, "ada@example.com")
    ada_uid = uid_of(run, "ada@example.com")
    rows = json.dumps({"email": "eve@example.com", "uid": ada_uid}) + "\n"
    result = run("import", "-", "--format", "jsonl", input=rows)
    assert result.exit_code == 5
    assert (
        result.stderr
        == f"usermgr: error: line 1: uid {ada_uid} already belongs to another user; nothing was imported\n"
    )
    assert run("show", "eve@example.com").exit_code == 4


def test_import_refuses_one_uid_for_two_rows(run: Runner) -> None:
    uid = "6f1c0de4-6d0b-4f7e-9a55-0d6f5a1b7c3e"
    rows = "".join(json.dumps({"email": f"{name}@example.com", "uid": uid}) + "\n" for name in ("ann", "ben"))
    result = run("import", "-", "--format", "jsonl", input=rows)
    assert (result.exit_code, emails(run)) == (5, [])
    # Refused by the rule, with its line, not only by the database's unique index.
    assert result.stderr == f"usermgr: error: line 2: uid {uid} already belongs to another user; nothing was imported\n"


def _delete(run: Runner, client: TestClient, admin: dict[str, str], db_url: str, email: str, how: str) -> None:
    if how == "argument":
        assert run("delete", email, "--yes").exit_code == 0
    elif how == "stdin":
        assert run("delete", "-", "--yes", input=f"{email}\n").exit_code == 0
    elif how == "api":
        assert client.delete(f"/users/{shown(run, email)['id']}", headers=admin).status_code == 204
    elif how == "sql":  # the web app sharing the table, or plain SQL
        with create_engine(db_url).begin() as connection:
            connection.execute(text("DELETE FROM users WHERE email = :email"), {"email": email})
    else:  # every user at once: PostgreSQL's TRUNCATE fires no row trigger
        everyone = "TRUNCATE users CASCADE" if db_url.startswith("postgresql") else "DELETE FROM users"
        with create_engine(db_url).begin() as connection:
            connection.execute(text(everyone))


@pytest.mark.parametrize("email", ["carol@example.com", "mallory@example.com"], ids=["restored", "someone-else"])
@pytest.mark.parametrize("how", ["argument", "stdin", "api", "sql", "sql-all"])
def test_a_deleted_users_uid_is_never_given_again(
    run: Runner, client: TestClient, admin: dict[str, str], db_url: str, email: str, how: str
) -> None:
    """A revoked token never comes back, and a token never passes as someone else: an import
    row that names a deleted user's uid (an old export, an edited one) is refused, whether it
    brings that person back or gives their identity to another, however the user was deleted."""
    create_user(run, "carol@example.com")
    carol_uid = uid_of(run, "carol@example.com")
    token = token_of(run, "carol@example.com")
    _delete(run, client, admin, db_url, "carol@example.com", how)
    before = emails(run)
    rows = json.dumps({"email": email, "uid": carol_uid}) + "\n"
    for options in ([], ["--dry-run"], ["--on-conflict", "update"], ["--on-conflict", "skip"]):
        result = run("import", "-", "--format", "jsonl", *options, input=rows)
        assert (result.exit_code, result.stderr) == (
            5,
            f"usermgr: error: line 1: uid {carol_uid} belonged to a deleted user and is never given again;"
            " leave it out to give the row a new identity; nothing was imported\n",
        ), options
    assert emails(run) == before
    assert check_db(run, token) == (7, "usermgr: error: token invalid: the user no longer exists\n")
    # The row without its uid is a new person, whom the old token does not name.
    assert run("import", "-", "--format", "jsonl", input=json.dumps({"email": email}) + "\n").exit_code == 0
    assert uid_of(run, email) != carol_uid
    assert check_db(run, token) == (7, "usermgr: error: token invalid: the user no longer exists\n")


def test_a_uid_held_again_stays_its_holders_own(run: Runner, db_url: str) -> None:
    """A users row deleted and put back by hand (a repair in SQL) holds a uid the trigger
    recorded: an import that updates that very user is no gift of the uid, and goes through."""
    create_user(run, "carol@example.com")
    carol_uid = uid_of(run, "carol@example.com")
    with create_engine(db_url).begin() as connection:
        connection.execute(
            text("INSERT INTO deleted_uids (uid, deleted_at) VALUES (:uid, CURRENT_TIMESTAMP)"), {"uid": carol_uid}
        )
    row = json.dumps({"email": "carol@example.com", "uid": carol_uid, "full_name": "Carol Danvers"}) + "\n"
    result = run("import", "-", "--format", "jsonl", "--on-conflict", "update", input=row)
    assert result.exit_code == 0, result.stderr
    carol = shown(run, "carol@example.com")
    assert (carol["full_name"], carol["uid"]) == ("Carol Danvers", carol_uid)


CANONICAL_UID = "6f1c0de4-6d0b-4f7e-9a55-0d6f5a1b7c3e"


@pytest.mark.parametrize(
    ("uid", "advice"),
    [
        ("not-a-uuid", "give a UUID such as 123e4567-e89b-42d3-a456-426614174000"),
        ("6F1C0DE4-6D0B-4F7E-9A55-0D6F5A1B7C3E", f"write it as {CANONICAL_UID}"),
        ("6f1c0de46d0b4f7e9a550d6f5a1b7c3e", f"write it as {CANONICAL_UID}"),
        ("1", "give a UUID such as 123e4567-e89b-42d3-a456-426614174000"),
    ],
)
def test_import_refuses_a_malformed_uid(run: Runner, uid: str, advice: str) -> None:
    result = run("import", "-", "--format", "jsonl", input=json.dumps({"email": "ann@example.com", "uid": uid}) + "\n")
    assert result.exit_code == 3
    assert f"line 1: uid: invalid uid: {advice}" in result.stderr
    assert emails(run) == []


def test_update_from_import_never_changes_a_users_uid(run: Runner) -> None:
    create_user(run, "ada@example.com")
    uid = uid_of(run, "ada@example.com")
    other = "6f1c0de4-6d0b-4f7e-9a55-0d6f5a1b7c3e"
    rows = json.dumps({"email": "ada@example.com", "uid": other, "full_name": "Eve"}) + "\n"
    result = run("import", "-", "--format", "jsonl", "--on-conflict", "update", input=rows)
    assert result.exit_code == 5
    assert result.stderr == (
        f"usermgr: error: line 1: ada@example.com is uid {uid} here, not {other}; nothing was imported\n"
    )
    assert (uid_of(run, "ada@example.com"), shown(run, "ada@example.com")["full_name"]) == (uid, None)
    same = json.dumps({"email": "ada@example.com", "uid": uid, "full_name": "Ada"}) + "\n"
    assert run("import", "-", "--format", "jsonl", "--on-conflict", "update", input=same).exit_code == 0


# ---- the migration gives existing users an identity -----------------------------------------


def test_the_migration_gives_every_existing_user_a_uid_and_keeps_role_links(tmp_path: Path) -> None:
    from usermgr import database, migrations

    path = tmp_path / "old.db"
    engine = database.make_engine(f"sqlite:///{path}")
    migrations.upgrade(engine, "0001")
    with sqlite3.connect(path) as connection:
        for n in (1, 2, 3):
            connection.execute(
                "INSERT INTO users (id, email, is_active, created_at, updated_at, failed_logins, token_version)"
                " VALUES (?, ?, 1, '2024-01-01 00:00:00', '2024-01-01 00:00:00', 0, 0)",
                (n, f"u{n}@example.com"),
            )
        connection.execute("INSERT INTO user_roles (user_id, role_id) VALUES (3, 1)")
    migrations.upgrade(engine)
    engine.dispose()
    with sqlite3.connect(path) as connection:
        uids = [row[0] for row in connection.execute("SELECT uid FROM users ORDER BY id")]
        links = connection.execute("SELECT user_id, role_id FROM user_roles").fetchall()
    assert len(set(uids)) == 3 and all(len(uid) == 36 and uid[14] == "4" for uid in uids)
    assert links == [(3, 1)]  # the table rebuild did not cascade
    env = {"USERMGR_DATABASE_URL": f"sqlite:///{path}", "USERMGR_SECRET_KEY": "k" * 40}
    assert run_usermgr("delete", "3", "--yes", env=env).returncode == 5  # the last admin, still linked
    assert run_usermgr("create", "--email", "new@example.com", "--no-password", "-o", "id", env=env).stdout == "4\n"


# ---- revocation on every path: import and the API -------------------------------------------

ROW = {"email": "ada@example.com", "roles": ["beta"], "is_active": True}
IMPORT_CHANGES: dict[str, tuple[dict[str, Any], bool]] = {
    "a new plaintext password": ({"password": "another long password"}, True),
    "a new hash": ({"hashed_password": "$2b$12$" + "a" * 53}, True),
    "disabled": ({"is_active": False}, True),
    "a role lost": ({"roles": []}, True),
    "no password and nothing else": ({}, False),
    "a new full name": ({"full_name": "Ada King"}, False),
    "a role gained": ({"roles": ["beta", "gamma"]}, False),
}


@pytest.mark.parametrize("case", IMPORT_CHANGES, ids=list(IMPORT_CHANGES))
def test_import_update_revokes_exactly_as_the_commands_do(run: Runner, case: str) -> None:
    change, revokes = IMPORT_CHANGES[case]
    create_user(run, "ada@example.com", "--role", "beta")
    token = token_of(run, "ada@example.com")
    row = json.dumps({**ROW, **change}) + "\n"
    result = run("import", "-", "--format", "jsonl", "--on-conflict", "update", input=row)
    assert result.exit_code == 0, result.stderr
    assert check_db(run, token)[0] == (7 if revokes else 0)
    if "password" not in change and "hashed_password" not in change:
        assert token_of(run, "ada@example.com") if change.get("is_active", True) else True  # password kept


def test_import_reenabling_does_not_revive_tokens(run: Runner) -> None:
    create_user(run, "ada@example.com", "--role", "beta")
    token = token_of(run, "ada@example.com")
    for active in (False, True):
        row = json.dumps({**ROW, "is_active": active}) + "\n"
        assert run("import", "-", "--format", "jsonl", "--on-conflict", "update", input=row).exit_code == 0
    assert check_db(run, token) == (7, "usermgr: error: token invalid: revoked\n")


def test_api_patch_of_the_email_revokes_and_of_the_name_does_not(
    run: Runner, client: TestClient, admin: dict[str, str]
) -> None:
    ada = create_user(run, "ada@example.com")
    token = token_of(run, "ada@example.com")
    assert client.patch(f"/users/{ada}", json={"full_name": "Ada King"}, headers=admin).status_code == 200
    assert check_db(run, token)[0] == 0
    assert client.patch(f"/users/{ada}", json={"email": "ada@new.example"}, headers=admin).status_code == 200
    assert check_db(run, token) == (7, "usermgr: error: token invalid: revoked\n")
    assert client.get("/users/me", headers=bearer(token)).status_code == 401


# ---- locked_until in the record, and list --locked ----------------------------------------


def test_show_list_and_the_api_say_whether_an_account_is_locked(
    run: Runner, settings: Settings, client: TestClient
) -> None:
    create_user(run, "ada@example.com")
    create_user(run, "bob@example.com")
    assert shown(run, "ada@example.com")["locked_until"] is None
    for _ in range(settings.lockout_threshold):
        assert login(run, "ada@example.com", "wrong password").exit_code == 6
    locked_until = shown(run, "ada@example.com")["locked_until"]
    assert locked_until is not None and locked_until.endswith("+00:00")
    assert run("list", "--locked", "-o", "email").stdout == "ada@example.com\n"
    assert emails(run) == ["ada@example.com", "bob@example.com"]
    create_user(run, ADMIN, "--admin", password=ADMIN_PASSWORD)
    listed = client.get("/users", headers=bearer(api_token(client, ADMIN, ADMIN_PASSWORD))).json()
    assert [user["locked_until"] is not None for user in listed] == [True, False, False]
    assert run("unlock", "ada@example.com").exit_code == 0
    assert run("list", "--locked", "-o", "email").stdout == ""


# ---- USER: id, email or username; and what can name nobody ----------------------------------


def test_a_user_is_found_by_id_email_and_username(run: Runner) -> None:
    ada = create_user(run, "ada@example.com", "--username", "ada.l")
    for ref in (str(ada), "ADA@example.com", "ada.l", " ada.l "):
        assert shown(run, ref)["id"] == ada
    assert run("show", "ADA.L").exit_code == 4  # usernames are exact, as stored


def test_audit_of_a_deleted_user_by_uid_or_any_form_of_their_email(run: Runner, db_url: str) -> None:
    """A username that reads as a uid is refused now, but one may predate that rule (or another
    tool wrote it): it must not take over the deleted user's trail. Their email is normalised
    as on write (full-width forms, a display name), as every USER is: the trail of a deleted
    person is found by every form `create` took for them."""
    create_user(run, "admin@example.com", "--admin")
    create_user(run, "carol@example.com")
    carol_uid = uid_of(run, "carol@example.com")
    ok_delete = run("delete", "carol@example.com", "--yes")
    assert ok_delete.exit_code == 0, ok_delete.stderr
    refused = run("create", "--email", "mallory@example.com", "--username", carol_uid, "--no-password")
    assert refused.exit_code == 3 and "must not be a UUID" in refused.stderr
    create_user(run, "mallory@example.com")
    engine = create_engine(db_url)
    try:
        with engine.begin() as connection:
            renamed = text("UPDATE users SET username = :uid WHERE email = 'mallory@example.com'")
            connection.execute(renamed, {"uid": carol_uid})
    finally:
        engine.dispose()

    def about(ref: str) -> list[tuple[str, str]]:
        result = run("audit", "--user", ref, "-o", "jsonl")
        assert result.exit_code == 0, result.stderr
        return [(event["action"], event["target_uid"]) for event in map(json.loads, result.stdout.splitlines())]

    carols = [("user.create", carol_uid), ("user.delete", carol_uid)]
    assert about(carol_uid) == carols
    for form in ("carol@example.com", "CAROL@Example.com", "\uff23AROL@example.com", "Carol <carol@example.com>"):
        assert about(form) == carols, form


def test_an_all_digit_username_is_refused(run: Runner) -> None:
    result = run("create", "--email", "ada@example.com", "--username", "12345", "--no-password")
    assert result.exit_code == 3
    assert "must not be all digits" in result.stderr


@pytest.mark.parametrize("length", [321, 100_000])
def test_a_search_longer_than_any_field_is_invalid_input(run: Runner, length: int) -> None:
    result = run("list", "--search", "a" * length)
    assert result.exit_code == 3
    assert result.stderr == "usermgr: error: search text too long: use at most 320 characters\n"
