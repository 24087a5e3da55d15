"""The service rules, through usermgr.service, on SQLite and PostgreSQL.

State is checked through a separate connection (`stored`), never through the session
under test, so that what the service left in the database is what gets asserted.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, insert, select, update
from sqlalchemy.orm import Session

from tests.conftest import CONTRACT_USER_FIELDS, HANG_TIMEOUT, PASSWORD, USERMGR, process_env
from usermgr import service
from usermgr.config import Settings, sqlite_path
from usermgr.errors import AuthenticationFailed, Conflict, InvalidInput, NotFound, TokenInvalid
from usermgr.models import AuditEvent, Role, User, user_roles
from usermgr.service import MAX_ROW_COUNT, UserFilter
from usermgr.service.core import writing

# ---- helpers ------------------------------------------------------------------------------


def add(
    db: Session,
    settings: Settings,
    email: str,
    *,
    username: str | None = None,
    full_name: str | None = None,
    password: str | None = PASSWORD,
    roles: Sequence[str] = (),
    admin: bool = False,
) -> User:
    data = service.new_user(email=email, username=username, full_name=full_name, password=password)
    return service.create_user(db, settings, data, roles=roles, admin=admin)


def stored(url: str) -> dict[str, Any]:
    """Every column of every user (with role names) and every role, read on a fresh connection."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            names = dict(connection.execute(select(Role.id, Role.name)).all())
            links: dict[int, list[str]] = {}
            for user_id, role_id in connection.execute(select(user_roles.c.user_id, user_roles.c.role_id)):
                links.setdefault(user_id, []).append(names[role_id])
            users = {
                row.email: {**row._asdict(), "roles": sorted(links.get(row.id, []))}
                for row in connection.execute(select(User.__table__))
            }
        return {"users": users, "roles": sorted(names.values())}
    finally:
        engine.dispose()


def user_state(url: str, email: str) -> dict[str, Any]:
    return stored(url)["users"][email]


def listed(db: Session, filters: UserFilter | None = None) -> list[str]:
    return [record["email"] for record in service.iter_user_records(db, filters or UserFilter())]


def active_admins(url: str) -> list[str]:
    return sorted(
        email for email, user in stored(url)["users"].items() if user["is_active"] and "admin" in user["roles"]
    )


def can_log_in(db: Session, settings: Settings, ref: str, password: str) -> bool:
    try:
        service.authenticate(db, settings, ref, password)
    except AuthenticationFailed:
        return False
    return True


# ---- create -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("Ada@Example.COM", "ada@example.com"),
        ("  ada@example.com  ", "ada@example.com"),
        ("ＡＤＡ@ｅｘａｍｐｌｅ.ｃｏｍ", "ada@example.com"),  # full-width letters: NFKC, then lowercased
    ],
)
def test_create_normalises_email(db: Session, settings: Settings, given: str, expected: str) -> None:
    user = add(db, settings, given)
    assert user.email == expected
    assert list(stored(settings.database_url)["users"]) == [expected]


@pytest.mark.parametrize("again", ["ada@example.com", "ADA@example.com", "Ada@EXAMPLE.com", "ＡＤＡ@example.com"])
def test_create_duplicate_email_in_any_case_is_conflict(db: Session, settings: Settings, again: str) -> None:
    add(db, settings, "ada@example.com", username="ada")
    before = stored(settings.database_url)
    with pytest.raises(Conflict, match=re.escape("ada@example.com")):
        add(db, settings, again, username="other", roles=["brand-new"])
    assert stored(settings.database_url) == before  # no user, and no role created on the way


def test_a_uid_taken_meanwhile_is_a_conflict_that_names_the_uid(db: Session, settings: Settings) -> None:
    """What the loser of two writers creating the same uid at once gets (an import names uids):
    the unique index refuses the row inside `writing`, which says which value was taken."""
    taken = add(db, settings, "ada@example.com").uid
    with pytest.raises(Conflict) as refused, writing(db):
        db.execute(insert(User).values(email="bob@example.com", uid=taken))
    assert str(refused.value) == "already exists: a user with that uid"
    assert list(stored(settings.database_url)["users"]) == ["ada@example.com"]


def test_create_duplicate_username_is_conflict(db: Session, settings: Settings) -> None:
    add(db, settings, "ada@example.com", username="ada")
    before = stored(settings.database_url)
    with pytest.raises(Conflict, match="username 'ada'"):
        add(db, settings, "bob@example.com", username="ada", roles=["brand-new"], admin=True)
    assert stored(settings.database_url) == before


def test_create_makes_roles_on_first_use_and_reuses_them(db: Session, settings: Settings) -> None:
    first = add(db, settings, "ada@example.com", roles=["staff", "ops"])
    second = add(db, settings, "bob@example.com", roles=["staff", "staff"])
    assert first.role_names == ["ops", "staff"]
    assert second.role_names == ["staff"]
    assert service.list_roles(db) == [
        {"name": "admin", "members": 0},
        {"name": "ops", "members": 1},
        {"name": "staff", "members": 2},
    ]
    assert stored(settings.database_url)["roles"] == ["admin", "ops", "staff"]


def test_create_admin_flag_grants_the_admin_role(db: Session, settings: Settings) -> None:
    admin = add(db, settings, "root@example.com", admin=True, roles=["ops"])
    plain = add(db, settings, "ada@example.com")
    assert admin.is_admin and admin.role_names == ["admin", "ops"]
    assert not plain.is_admin and plain.role_names == []
    assert user_state(settings.database_url, "root@example.com")["roles"] == ["admin", "ops"]
    assert service.list_roles(db)[0] == {"name": "admin", "members": 1}


def test_create_stores_a_hash_never_the_password(db: Session, settings: Settings) -> None:
    add(db, settings, "ada@example.com", password=PASSWORD)
    add(db, settings, "bob@example.com", password=None)
    ada = user_state(settings.database_url, "ada@example.com")
    assert ada["hashed_password"].startswith("$argon2")
    assert PASSWORD not in ada["hashed_password"]
    assert user_state(settings.database_url, "bob@example.com")["hashed_password"] is None
    assert can_log_in(db, settings, "ada@example.com", PASSWORD)
    assert not can_log_in(db, settings, "bob@example.com", "")


def test_create_sets_the_defaults(db: Session, settings: Settings) -> None:
    user = add(db, settings, "ada@example.com", username="ada", full_name="Ada Lovelace")
    state = user_state(settings.database_url, "ada@example.com")
    assert state["id"] == user.id
    assert (state["username"], state["full_name"]) == ("ada", "Ada Lovelace")
    assert state["is_active"] is True
    assert (state["failed_logins"], state["locked_until"], state["token_version"]) == (0, None, 0)
    assert state["created_at"].tzinfo is not None and state["last_login_at"] is None


@pytest.mark.parametrize(
    "fields",
    [
        {"email": "not-an-email"},
        {"email": ""},
        {"email": "ada@example.com", "username": "has space"},
        {"email": "ada@example.com", "full_name": "evil\u202eeman"},
        {"email": "ada@example.com", "password": "short"},
    ],
)
def test_create_rejects_bad_fields(fields: dict[str, str]) -> None:
    with pytest.raises(InvalidInput):
        service.new_user(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"email": "ada@example.com", "username": "has space"},
            "username: invalid username: use 1 to 150 of A-Z, a-z, 0-9 and . _ @ + -",
        ),
        (
            {"email": "not-an-email", "username": "has space", "full_name": ""},
            "email: value is not a valid email address: An email address must have an @-sign. (and 2 more)",
        ),
    ],
)
def test_a_bad_field_is_one_line_naming_it_and_counting_the_rest(fields: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        service.new_user(**fields)
    assert str(caught.value) == message


def test_create_rejects_bad_role_and_writes_nothing(db: Session, settings: Settings) -> None:
    before = stored(settings.database_url)
    with pytest.raises(InvalidInput, match="invalid role name"):
        add(db, settings, "ada@example.com", roles=["staff", "Not Valid"])
    assert stored(settings.database_url) == before


# ---- get ----------------------------------------------------------------------------------


def test_get_by_email_in_any_case_and_by_id(db: Session, settings: Settings) -> None:
    add(db, settings, "other@example.com")
    ada = add(db, settings, "ada@example.com")
    for ref in ("ada@example.com", "ADA@Example.Com", " ada@example.com\n", str(ada.id), f" {ada.id} "):
        assert service.get_user(db, ref).id == ada.id, ref


@pytest.mark.parametrize("ref", ["nobody@example.com", "999999", "ada", "0"])
def test_get_unknown_is_not_found(db: Session, settings: Settings, ref: str) -> None:
    add(db, settings, "ada@example.com")
    with pytest.raises(NotFound, match=re.escape(repr(ref))):
        service.get_user(db, ref)


# ---- list ---------------------------------------------------------------------------------


@pytest.fixture
def people(db: Session, settings: Settings) -> list[str]:
    """Six users, added in an order that is neither alphabetical nor reverse alphabetical."""
    add(db, settings, "carol@example.com", username="carol", full_name="Carol Lovelace", roles=["staff"])
    add(db, settings, "bob_x@example.com", username="bob", full_name="100% Bob", admin=True)
    add(db, settings, "bobbx@example.com", username="Zed", full_name="100 Bobb")
    add(db, settings, "alice@example.com", username="al_ice", full_name="Alice", roles=["staff", "ops"])
    add(db, settings, "erin@example.com", admin=True, roles=["staff"])
    add(db, settings, "dave@example.com", full_name="Dave")
    service.set_active(db, ["alice@example.com", "erin@example.com"], False)
    return [
        "carol@example.com",
        "bob_x@example.com",
        "bobbx@example.com",
        "alice@example.com",
        "erin@example.com",
        "dave@example.com",
    ]


def test_list_is_oldest_first(db: Session, people: list[str]) -> None:
    assert listed(db) == people


def test_list_records_have_the_contract_fields_and_no_hash(db: Session, people: list[str]) -> None:
    records = list(service.iter_user_records(db))
    assert all(tuple(record) == CONTRACT_USER_FIELDS for record in records)
    alice = records[3]
    assert (alice["email"], alice["username"], alice["is_active"], alice["roles"]) == (
        "alice@example.com",
        "al_ice",
        False,
        ["ops", "staff"],
    )
    with_hashes = list(service.iter_user_records(db, with_hashes=True))
    assert all(record["hashed_password"].startswith("$argon2") for record in with_hashes)


def test_stored_rows_write_the_records_timestamps(db: Session, settings: Settings) -> None:
    """`stored` rows (SQLite's own values: timestamps as text) write what the records write."""
    import io
    from datetime import UTC, datetime

    from usermgr import output
    from usermgr.contract import USER_FIELDS, USER_RECORD

    whole_second = add(db, settings, "whole@example.com", password=None)
    fraction = add(db, settings, "fraction@example.com", password=None)
    with db.begin():
        db.get(User, whole_second.id).created_at = datetime(2026, 1, 2, 9, 0, 0, tzinfo=UTC)
        user = db.get(User, fraction.id)
        user.created_at = datetime(2026, 1, 2, 9, 0, 0, 120, tzinfo=UTC)
        user.last_login_at = datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
        user.locked_until = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    written = {}
    for fmt in ("jsonl", "csv"):
        stored, records = io.StringIO(), io.StringIO()
        output.write_rows(service.iter_user_rows(db, stored=True), fmt, USER_FIELDS, stored, types=USER_RECORD)
        output.write_records(service.iter_user_records(db), fmt, USER_FIELDS, records)
        assert stored.getvalue() == records.getvalue()
        written[fmt] = stored.getvalue()
    assert '"created_at": "2026-01-02T09:00:00+00:00"' in written["jsonl"]
    assert '"created_at": "2026-01-02T09:00:00.000120+00:00"' in written["jsonl"]
    assert ",9999-12-31T23:59:59+00:00," in written["csv"]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (UserFilter(role="staff"), ["carol", "alice", "erin"]),
        (UserFilter(role="ops"), ["alice"]),
        (UserFilter(role="nobody-has-it"), []),
        (UserFilter(admin=True), ["bob_x", "erin"]),
        (UserFilter(active=True), ["carol", "bob_x", "bobbx", "dave"]),
        (UserFilter(active=False), ["alice", "erin"]),
        (UserFilter(role="staff", active=True), ["carol"]),
        (UserFilter(admin=True, active=True), ["bob_x"]),
    ],
)
def test_list_filters_by_role_admin_and_activity(db: Session, people: list[str], filters: UserFilter, expected) -> None:
    assert listed(db, filters) == [f"{name}@example.com" for name in expected]


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("LOVE", ["carol"]),  # full name, any case
        ("BOBBX@", ["bobbx"]),  # email, any case
        ("zE", ["bobbx"]),  # username, any case
        ("b_x", ["bob_x"]),  # `_` is a literal underscore, not "any one character"
        ("_", ["bob_x", "alice"]),
        ("100%", ["bob_x"]),  # `%` is a literal percent sign, not "anything"
        ("%", ["bob_x"]),
        ("al_ice", ["alice"]),
        ("example.com", ["carol", "bob_x", "bobbx", "alice", "erin", "dave"]),
        ("nowhere", []),
    ],
)
def test_list_search_is_case_insensitive_and_literal(db: Session, people: list[str], search: str, expected) -> None:
    assert listed(db, UserFilter(search=search)) == [f"{name}@example.com" for name in expected]


@pytest.mark.parametrize(
    ("limit", "offset", "expected"),
    [
        (2, 0, slice(0, 2)),
        (2, 1, slice(1, 3)),
        (None, 4, slice(4, None)),
        (10, 0, slice(0, None)),
        (0, 0, slice(0, 0)),
        (3, 6, slice(6, None)),
    ],
)
def test_list_limit_and_offset(db: Session, people: list[str], limit: int | None, offset: int, expected) -> None:
    assert listed(db, UserFilter(limit=limit, offset=offset)) == people[expected]


def test_list_limit_and_offset_apply_after_the_filters(db: Session, people: list[str]) -> None:
    assert listed(db, UserFilter(active=True, limit=2, offset=1)) == ["bob_x@example.com", "bobbx@example.com"]


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        (UserFilter(limit=-1), "limit and offset must not be negative"),
        (UserFilter(offset=-1), "limit and offset must not be negative"),
        (UserFilter(role="Bad Role"), "invalid role name 'Bad Role': use 1 to 64 of a-z, 0-9, _ and -"),
    ],
)
def test_list_rejects_bad_filters(db: Session, people: list[str], filters: UserFilter, message: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        list(service.iter_user_records(db, filters))
    assert str(refused.value) == message


def test_list_takes_the_largest_limit_and_offset_and_refuses_one_more(db: Session, people: list[str]) -> None:
    """The bound is the databases' own (2**63 - 1): that exact value is a valid limit or offset."""
    assert listed(db, UserFilter(limit=MAX_ROW_COUNT)) == people
    assert listed(db, UserFilter(offset=MAX_ROW_COUNT)) == []
    for filters in (UserFilter(limit=MAX_ROW_COUNT + 1), UserFilter(offset=MAX_ROW_COUNT + 1)):
        with pytest.raises(InvalidInput) as refused:
            list(service.iter_user_records(db, filters))
        assert str(refused.value) == "limit and offset must be at most 9223372036854775807"


def test_list_of_an_empty_database_is_empty(db: Session) -> None:
    assert listed(db) == []


def test_authenticate_takes_any_user_reference_unless_email_only(db: Session, settings: Settings) -> None:
    """The CLI's login names a user by email, username or id; the API's (`email_only`) by email alone."""
    user = add(db, settings, "ada@example.com", username="ada")
    for ref in ("ada", str(user.id), "ada@example.com"):
        assert service.authenticate(db, settings, ref, PASSWORD).id == user.id
    with pytest.raises(AuthenticationFailed):
        service.authenticate(db, settings, "ada", PASSWORD, email_only=True)
    assert service.authenticate(db, settings, "ada@example.com", PASSWORD, email_only=True).id == user.id


# ---- update -------------------------------------------------------------------------------


def test_update_changes_only_the_given_fields(db: Session, settings: Settings) -> None:
    add(db, settings, "ada@example.com", username="ada", full_name="Ada")
    before = user_state(settings.database_url, "ada@example.com")
    service.update_user(db, "ADA@example.com", service.user_changes(full_name="Ada Lovelace"))
    after = user_state(settings.database_url, "ada@example.com")
    assert after["full_name"] == "Ada Lovelace"
    unchanged = ("id", "email", "username", "hashed_password", "is_active", "token_version", "roles", "created_at")
    assert {name: after[name] for name in unchanged} == {name: before[name] for name in unchanged}


def test_update_email_is_normalised(db: Session, settings: Settings) -> None:
    ada = add(db, settings, "ada@example.com", username="ada")
    service.update_user(db, str(ada.id), service.user_changes(email="ＡＤＡ.L@Example.com", username="ada_l"))
    state = stored(settings.database_url)["users"]
    assert list(state) == ["ada.l@example.com"]
    assert state["ada.l@example.com"]["username"] == "ada_l"


def test_update_to_own_values_is_not_a_conflict(db: Session, settings: Settings) -> None:
    add(db, settings, "ada@example.com", username="ada")
    user = service.update_user(db, "ada@example.com", service.user_changes(email="ADA@example.com", username="ada"))
    assert (user.email, user.username) == ("ada@example.com", "ada")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"email": "BOB@example.com"}, "email 'bob@example.com'"),
        ({"username": "bob"}, "username 'bob'"),
        ({"full_name": "New", "username": "bob"}, "username 'bob'"),
    ],
)
def test_update_to_anothers_email_or_username_is_conflict(
    db: Session, settings: Settings, changes: dict[str, str], message: str
) -> None:
    add(db, settings, "ada@example.com", username="ada")
    add(db, settings, "bob@example.com", username="bob")
    before = stored(settings.database_url)
    with pytest.raises(Conflict, match=message):
        service.update_user(db, "ada@example.com", service.user_changes(**changes))
    assert stored(settings.database_url) == before


def test_update_with_nothing_to_change_is_invalid(db: Session, settings: Settings) -> None:
    add(db, settings, "ada@example.com")
    before = stored(settings.database_url)
    with pytest.raises(InvalidInput, match="nothing to change"):
        service.update_user(db, "ada@example.com", service.user_changes())
    with pytest.raises(InvalidInput, match="nothing to change"):
        service.update_user(db, "ada@example.com", service.user_changes(email=None, full_name=None))
    assert stored(settings.database_url) == before


def test_update_unknown_user_is_not_found(db: Session, settings: Settings) -> None:
    with pytest.raises(NotFound, match=re.escape("nobody@example.com")):
        service.update_user(db, "nobody@example.com", service.user_changes(full_name="X"))


@pytest.mark.parametrize("fields", [{"email": "nope"}, {"username": "a b"}, {"full_name": ""}, {"age": 3}])
def test_update_rejects_bad_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        service.user_changes(**fields)


def test_a_token_without_a_version_claim_counts_as_version_0(db: Session, settings: Settings) -> None:
    """`ver` is not a required claim: a token without it stands for version 0, so it holds
    until the user's first revocation."""
    user = add(db, settings, "ada@example.com")
    claims = {"sub": user.uid, "email": user.email, "roles": []}
    assert service.check_token_holder(db, claims).email == "ada@example.com"
    service.revoke_tokens(db, ["ada@example.com"])
    with pytest.raises(TokenInvalid, match="revoked"):
        service.check_token_holder(db, claims)


# ---- set_password ---------------------------------------------------------------------------


def test_set_password_stores_a_new_hash_and_revokes_tokens(db: Session, settings: Settings) -> None:
    add(db, settings, "ada@example.com", password=PASSWORD)
    before = user_state(settings.database_url, "ada@example.com")
    service.set_password(db, settings, "ADA@example.com", "a new secret")
    after = user_state(settings.database_url, "ada@example.com")
    assert after["hashed_password"] != before["hashed_password"]
    assert after["token_version"] == before["token_version"] + 1
    assert can_log_in(db, settings, "ada@example.com", "a new secret")
    assert not can_log_in(db, settings, "ada@example.com", PASSWORD)


def test_set_password_hashes_with_the_configured_profile(db: Session, settings: Settings) -> None:
    add(db, settings, "ada@example.com", password=PASSWORD)
    service.set_password(db, settings, "ada@example.com", "a new secret")
    hashed = user_state(settings.database_url, "ada@example.com")["hashed_password"]
    assert hashed.startswith("$argon2id$v=19$m=1024,t=1,p=1$")  # security._TEST_PROFILE


@pytest.mark.parametrize(("length", "ok"), [(0, False), (7, False), (8, True), (1024, True), (1025, False)])
def test_set_password_policy_on_length(db: Session, settings: Settings, length: int, ok: bool) -> None:
    add(db, settings, "ada@example.com", password=PASSWORD)
    before = user_state(settings.database_url, "ada@example.com")
    password = "p" * length
    if ok:
        service.set_password(db, settings, "ada@example.com", password)
        assert can_log_in(db, settings, "ada@example.com", password)
        return
    with pytest.raises(InvalidInput, match="password too"):
        service.set_password(db, settings, "ada@example.com", password)
    assert user_state(settings.database_url, "ada@example.com") == before


def test_set_password_applies_nfkc(db: Session, settings: Settings) -> None:
    add(db, settings, "ada@example.com", password=PASSWORD)
    service.set_password(db, settings, "ada@example.com", "ｐａｓｓｗｏｒｄ")  # full-width
    assert can_log_in(db, settings, "ada@example.com", "password")
    assert can_log_in(db, settings, "ada@example.com", "ｐａｓｓｗｏｒｄ")


@pytest.mark.parametrize(
    ("password", "ok"),
    [
        ("\ufb03" * 3, True),  # three ligatures "ffi": 3 code points, 9 characters after NFKC
        ("a" * 1023 + "\ufb03", False),  # 1024 code points, 1026 characters after NFKC
    ],
)
def test_set_password_policy_counts_after_nfkc(db: Session, settings: Settings, password: str, ok: bool) -> None:
    add(db, settings, "ada@example.com", password=PASSWORD)
    if ok:
        service.set_password(db, settings, "ada@example.com", password)
        assert can_log_in(db, settings, "ada@example.com", "ffiffiffi")
    else:
        with pytest.raises(InvalidInput, match="too long"):
            service.set_password(db, settings, "ada@example.com", password)


def test_set_password_unknown_user_is_not_found(db: Session, settings: Settings) -> None:
    with pytest.raises(NotFound):
        service.set_password(db, settings, "nobody@example.com", "long enough")


# ---- batch operations: several users, all or nothing ----------------------------------------

BatchOperation = Callable[[Session, Sequence[str], str], Any]

BATCH_OPERATIONS: dict[str, BatchOperation] = {
    "disable": lambda db, refs, origin: service.set_active(db, refs, False, origin),
    "enable": lambda db, refs, origin: service.set_active(db, refs, True, origin),
    "unlock": service.unlock,
    "delete": service.delete_users,
    "grant_role": lambda db, refs, origin: service.grant_role(db, refs, "brand-new", origin),
    "revoke_role": lambda db, refs, origin: service.revoke_role(db, refs, "staff", origin),
    "revoke_tokens": service.revoke_tokens,
}


@pytest.fixture
def trio(db: Session, settings: Settings) -> list[str]:
    """Three users that every batch operation would change: one locked with a role, one
    disabled, one plain; and an admin the operations do not name."""
    add(db, settings, "root@example.com", admin=True)
    locking = replace(settings, lockout_threshold=1)
    add(db, settings, "ann@example.com", roles=["staff"])
    add(db, settings, "ben@example.com", roles=["staff"])
    add(db, settings, "cat@example.com")
    assert not can_log_in(db, locking, "ann@example.com", "wrong password")
    service.set_active(db, ["ben@example.com"], False)
    ann = user_state(settings.database_url, "ann@example.com")
    assert ann["locked_until"] is not None
    return ["ann@example.com", "ben@example.com", "cat@example.com"]


@pytest.mark.parametrize("operation", BATCH_OPERATIONS)
@pytest.mark.parametrize("position", [1, 2, 4])
def test_batch_with_an_unknown_user_changes_nothing(
    db: Session, settings: Settings, trio: list[str], operation: str, position: int
) -> None:
    refs = [trio[0], str(service.get_user(db, trio[1]).id), trio[2].upper()]
    refs.insert(position - 1, "ghost@example.com")
    before = stored(settings.database_url)
    with pytest.raises(NotFound) as raised:
        BATCH_OPERATIONS[operation](db, refs, "argument")
    assert "'ghost@example.com'" in str(raised.value)
    assert f"(argument {position})" in str(raised.value)
    assert "nothing was changed" in str(raised.value)
    assert stored(settings.database_url) == before


@pytest.mark.parametrize("operation", BATCH_OPERATIONS)
def test_batch_unknown_id_names_its_line(db: Session, settings: Settings, trio: list[str], operation: str) -> None:
    before = stored(settings.database_url)
    with pytest.raises(NotFound, match=r"'987654' \(line 3\)"):
        BATCH_OPERATIONS[operation](db, [*trio[:2], "987654", trio[2]], "line")
    assert stored(settings.database_url) == before


@pytest.mark.parametrize("operation", BATCH_OPERATIONS)
def test_batch_of_no_users_changes_nothing(db: Session, settings: Settings, trio: list[str], operation: str) -> None:
    before = stored(settings.database_url)
    assert BATCH_OPERATIONS[operation](db, [], "argument") == []
    assert BATCH_OPERATIONS[operation](db, [None, None], "line") == []
    with pytest.raises(NotFound, match=r"'' \(argument 1\)"):
        BATCH_OPERATIONS[operation](db, [""], "argument")
    assert stored(settings.database_url) == before


def test_disable_and_enable(db: Session, settings: Settings, trio: list[str]) -> None:
    before = stored(settings.database_url)["users"]
    service.set_active(db, ["ann@example.com", "CAT@example.com"], False)
    after = stored(settings.database_url)["users"]
    for email in ("ann@example.com", "cat@example.com"):
        assert after[email]["is_active"] is False
        assert after[email]["token_version"] == before[email]["token_version"] + 1  # disabling ends tokens
    assert after["ben@example.com"] == before["ben@example.com"]
    assert after["ann@example.com"]["locked_until"] == before["ann@example.com"]["locked_until"]
    assert not can_log_in(db, settings, "cat@example.com", PASSWORD)

    service.set_active(db, ["cat@example.com", "ben@example.com"], True)
    enabled = stored(settings.database_url)["users"]
    assert enabled["cat@example.com"]["is_active"] is True
    assert enabled["ben@example.com"]["is_active"] is True
    assert enabled["cat@example.com"]["token_version"] == after["cat@example.com"]["token_version"]
    assert enabled["ann@example.com"] == after["ann@example.com"]
    assert can_log_in(db, settings, "cat@example.com", PASSWORD)


def test_unlock_clears_the_lock(db: Session, settings: Settings, trio: list[str]) -> None:
    assert not can_log_in(db, settings, "ann@example.com", PASSWORD)  # locked: even the right password fails
    service.unlock(db, ["ann@example.com", "cat@example.com"])
    ann = user_state(settings.database_url, "ann@example.com")
    assert (ann["failed_logins"], ann["locked_until"]) == (0, None)
    assert can_log_in(db, settings, "ann@example.com", PASSWORD)


def test_delete_removes_the_users_and_their_role_links(db: Session, settings: Settings, trio: list[str]) -> None:
    deleted = service.delete_users(db, ["ann@example.com", str(service.get_user(db, "ben@example.com").id)])
    assert sorted(user.email for user in deleted) == ["ann@example.com", "ben@example.com"]
    state = stored(settings.database_url)
    assert sorted(state["users"]) == ["cat@example.com", "root@example.com"]
    assert {role["name"]: role["members"] for role in service.list_roles(db)}["staff"] == 0
    with pytest.raises(NotFound):
        service.get_user(db, "ann@example.com")


def test_grant_and_revoke_role(db: Session, settings: Settings, trio: list[str]) -> None:
    service.grant_role(db, ["ann@example.com", "cat@example.com"], "staff")  # ann has it already
    state = stored(settings.database_url)["users"]
    assert [state[email]["roles"] for email in trio] == [["staff"], ["staff"], ["staff"]]

    service.revoke_role(db, ["ann@example.com", "cat@example.com", "root@example.com"], "staff")  # root lacks it
    state = stored(settings.database_url)["users"]
    assert [state[email]["roles"] for email in trio] == [[], ["staff"], []]
    assert state["root@example.com"]["roles"] == ["admin"]


def test_revoke_a_role_nobody_has_changes_nothing(db: Session, settings: Settings, trio: list[str]) -> None:
    before = stored(settings.database_url)
    service.revoke_role(db, trio, "never-created")
    assert stored(settings.database_url) == before


def test_revoke_tokens_bumps_each_named_user_once(db: Session, settings: Settings, trio: list[str]) -> None:
    before = stored(settings.database_url)["users"]
    ann_id = str(service.get_user(db, "ann@example.com").id)
    service.revoke_tokens(db, ["ann@example.com", ann_id, "ANN@example.com", "cat@example.com"])
    after = stored(settings.database_url)["users"]
    assert after["ann@example.com"]["token_version"] == before["ann@example.com"]["token_version"] + 1
    assert after["cat@example.com"]["token_version"] == before["cat@example.com"]["token_version"] + 1
    assert after["ben@example.com"] == before["ben@example.com"]


# ---- the last active admin ------------------------------------------------------------------

LAST_ADMIN_REMOVALS: dict[str, BatchOperation] = {
    "revoke admin": lambda db, refs, origin: service.revoke_role(db, refs, "admin", origin),
    "disable": lambda db, refs, origin: service.set_active(db, refs, False, origin),
    "delete": service.delete_users,
}


@pytest.mark.parametrize("operation", LAST_ADMIN_REMOVALS)
def test_the_only_admin_cannot_be_removed(db: Session, settings: Settings, operation: str) -> None:
    add(db, settings, "root@example.com", admin=True)
    add(db, settings, "ann@example.com")
    before = stored(settings.database_url)
    for refs in (["root@example.com"], ["ann@example.com", "root@example.com"]):
        with pytest.raises(Conflict, match="last active admin"):
            LAST_ADMIN_REMOVALS[operation](db, refs, "argument")
        assert stored(settings.database_url) == before  # ann is untouched too


@pytest.mark.parametrize("operation", LAST_ADMIN_REMOVALS)
def test_two_admins_named_together_cannot_both_go(db: Session, settings: Settings, operation: str) -> None:
    add(db, settings, "root@example.com", admin=True)
    add(db, settings, "boss@example.com", admin=True)
    before = stored(settings.database_url)
    with pytest.raises(Conflict, match="last active admin"):
        LAST_ADMIN_REMOVALS[operation](db, ["root@example.com", "boss@example.com"], "argument")
    assert stored(settings.database_url) == before
    LAST_ADMIN_REMOVALS[operation](db, ["boss@example.com"], "argument")  # one of them may go
    assert active_admins(settings.database_url) == ["root@example.com"]
    with pytest.raises(Conflict, match="last active admin"):
        LAST_ADMIN_REMOVALS[operation](db, ["root@example.com"], "argument")
    assert active_admins(settings.database_url) == ["root@example.com"]


@pytest.mark.parametrize("operation", LAST_ADMIN_REMOVALS)
def test_a_disabled_admin_does_not_count(db: Session, settings: Settings, operation: str) -> None:
    add(db, settings, "root@example.com", admin=True)
    add(db, settings, "sleepy@example.com", admin=True)
    service.set_active(db, ["sleepy@example.com"], False)
    before = stored(settings.database_url)
    with pytest.raises(Conflict, match="last active admin"):
        LAST_ADMIN_REMOVALS[operation](db, ["root@example.com"], "argument")
    assert stored(settings.database_url) == before


def test_the_last_admin_may_go_once_another_is_granted(db: Session, settings: Settings) -> None:
    add(db, settings, "root@example.com", admin=True)
    add(db, settings, "ann@example.com")
    service.grant_role(db, ["ann@example.com"], "admin")
    service.revoke_role(db, ["root@example.com"], "admin")
    assert active_admins(settings.database_url) == ["ann@example.com"]


def test_enabling_a_disabled_admin_then_removing_the_other_works(db: Session, settings: Settings) -> None:
    add(db, settings, "root@example.com", admin=True)
    add(db, settings, "sleepy@example.com", admin=True)
    service.set_active(db, ["sleepy@example.com"], False)
    service.set_active(db, ["sleepy@example.com"], True)
    service.delete_users(db, ["root@example.com"])
    assert active_admins(settings.database_url) == ["sleepy@example.com"]


def test_with_no_admins_ordinary_operations_work(db: Session, settings: Settings) -> None:
    add(db, settings, "ann@example.com", roles=["staff"])
    add(db, settings, "ben@example.com")
    add(db, settings, "cat@example.com")
    service.set_active(db, ["ann@example.com"], False)
    service.set_active(db, ["ann@example.com"], True)
    service.revoke_role(db, ["ann@example.com"], "staff")
    service.revoke_role(db, ["ben@example.com"], "admin")  # nobody has it: nothing to protect
    service.delete_users(db, ["cat@example.com"])
    state = stored(settings.database_url)["users"]
    assert sorted(state) == ["ann@example.com", "ben@example.com"]
    assert state["ann@example.com"]["roles"] == []
    assert active_admins(settings.database_url) == []


def test_with_only_a_disabled_admin_operations_work(db: Session, settings: Settings) -> None:
    add(db, settings, "sleepy@example.com")
    add(db, settings, "ann@example.com")
    service.set_active(db, ["sleepy@example.com"], False)
    service.grant_role(db, ["sleepy@example.com"], "admin")
    assert active_admins(settings.database_url) == []
    service.delete_users(db, ["ann@example.com"])
    service.revoke_role(db, ["sleepy@example.com"], "admin")
    assert sorted(stored(settings.database_url)["users"]) == ["sleepy@example.com"]


# ---- role names and list_roles ----------------------------------------------------------------

VALID_ROLE_NAMES = ["a", "ops", "ops-team_2", "0", "x" * 64, "-", "_"]
INVALID_ROLE_NAMES = ["", "Ops", "x" * 65, "has space", "ops.team", "rôle", "ops\n", " ops", "ops/x", "ＯＰＳ"]


@pytest.mark.parametrize("name", VALID_ROLE_NAMES)
def test_valid_role_names_are_accepted(db: Session, settings: Settings, name: str) -> None:
    add(db, settings, "ann@example.com")
    service.grant_role(db, ["ann@example.com"], name)
    assert user_state(settings.database_url, "ann@example.com")["roles"] == [name]
    assert listed(db, UserFilter(role=name)) == ["ann@example.com"]
    service.revoke_role(db, ["ann@example.com"], name)
    assert user_state(settings.database_url, "ann@example.com")["roles"] == []


@pytest.mark.parametrize("name", INVALID_ROLE_NAMES)
def test_invalid_role_names_are_refused_everywhere(db: Session, settings: Settings, name: str) -> None:
    add(db, settings, "ann@example.com", roles=["staff"])
    before = stored(settings.database_url)
    attempts: list[Callable[[], Any]] = [
        lambda: service.grant_role(db, ["ann@example.com"], name),
        lambda: service.revoke_role(db, ["ann@example.com"], name),
        lambda: add(db, settings, "ben@example.com", roles=[name]),
        lambda: list(service.iter_user_records(db, UserFilter(role=name))),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidInput, match="invalid role name"):
            attempt()
    assert stored(settings.database_url) == before


def test_list_roles_counts_members_including_none(db: Session, settings: Settings) -> None:
    assert service.list_roles(db) == [{"name": "admin", "members": 0}]
    add(db, settings, "ann@example.com", roles=["staff", "beta"], admin=True)
    add(db, settings, "ben@example.com", roles=["staff"])
    add(db, settings, "cat@example.com", roles=["staff"])
    service.revoke_role(db, ["ann@example.com"], "beta")
    service.set_active(db, ["cat@example.com"], False)  # a disabled member still counts
    assert service.list_roles(db) == [
        {"name": "admin", "members": 1},
        {"name": "beta", "members": 0},
        {"name": "staff", "members": 3},
    ]


# ---- two writers of one email: one wins, the other gets a Conflict ----------------------------


def _contend_behind_the_check(db: Session, env: dict[str, str], email: str) -> list[subprocess.Popen[str]]:
    """Just before the session flushes a new or changed user (the service's uniqueness check
    has passed by then), start a real `usermgr create --email <email>`, once.

    PostgreSQL: nothing holds the contender back, so it is waited for: it commits inside the
    service's transaction, between its check and its write. SQLite: the service took the
    write lock at BEGIN IMMEDIATE, before its check, so the contender can only queue on it;
    it is waited for until it does (see _wait_until_queued), and ends after the service
    commits. Returns the list that the contender's process is appended to.
    """
    contenders: list[subprocess.Popen[str]] = []

    def before_flush(session: Session, _context: Any, _instances: Any) -> None:
        if contenders or not any(isinstance(obj, User) for obj in [*session.new, *session.dirty]):
            return
        command = [str(USERMGR), "create", "--email", email, "--no-password"]
        process = subprocess.Popen(command, env=process_env(env), stderr=subprocess.PIPE, text=True)
        contenders.append(process)
        database = sqlite_path(env["USERMGR_DATABASE_URL"])
        if database is None:
            process.wait(timeout=HANG_TIMEOUT)
        else:
            _wait_until_queued(process, Path(f"{database}-wal").resolve())

    event.listen(db, "before_flush", before_flush)
    return contenders


def _wait_until_queued(process: subprocess.Popen[str], wal: Path) -> None:
    """Wait until `process` is queued on SQLite's write lock: it holds the database's
    write-ahead log open (so it is inside a statement) and sleeps, as SQLite's busy handler
    does between tries (Linux: /proc/PID/fd and /proc/PID/wchan). Fail if it ends first:
    then the lock did not hold it back, and there was no race."""
    proc = Path(f"/proc/{process.pid}")
    deadline = time.monotonic() + HANG_TIMEOUT  # a guard against a hang only
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the contender was never held back: {process.communicate()}"
        with suppress(FileNotFoundError, ProcessLookupError):  # a descriptor closed as it was listed
            if any(fd.readlink() == wal for fd in (proc / "fd").iterdir()) and "sleep" in (proc / "wchan").read_text():
                return
        time.sleep(0.01)
    pytest.fail(f"the contender never queued on the write lock of {wal.parent}")


def _outcome(process: subprocess.Popen[str]) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=HANG_TIMEOUT)
    return process.returncode, stderr


CONTENDER_LOST = (5, "usermgr: error: a user with email 'race@example.com' already exists\n")


def test_create_racing_another_writer(db: Session, settings: Settings, env: dict[str, str], backend: str) -> None:
    """The contract for two writers of one email: exactly one wins, the other gets a Conflict
    (exit 5), and the database holds the one user. Who loses depends on the backend (see
    _contend_behind_the_check): on SQLite the unique constraint is never what stops the
    second writer, as its BEGIN IMMEDIATE waits until the first has committed."""
    contenders = _contend_behind_the_check(db, env, "race@example.com")
    if backend == "postgres":
        with pytest.raises(Conflict, match="already exists"):
            add(db, settings, "race@example.com")
        expected = (0, "")
    else:
        add(db, settings, "race@example.com")
        expected = CONTENDER_LOST
    (contender,) = contenders
    assert _outcome(contender) == expected
    assert list(stored(settings.database_url)["users"]) == ["race@example.com"]


def test_update_racing_another_writer(db: Session, settings: Settings, env: dict[str, str], backend: str) -> None:
    """The same contract when the service renames a user to the email another writer creates."""
    add(db, settings, "ann@example.com")
    contenders = _contend_behind_the_check(db, env, "race@example.com")
    changes = service.user_changes(email="race@example.com")
    if backend == "postgres":
        with pytest.raises(Conflict, match="already exists"):
            service.update_user(db, "ann@example.com", changes)
        expected, emails = (0, ""), ["ann@example.com", "race@example.com"]
    else:
        service.update_user(db, "ann@example.com", changes)
        expected, emails = CONTENDER_LOST, ["race@example.com"]
    (contender,) = contenders
    assert _outcome(contender) == expected
    assert sorted(stored(settings.database_url)["users"]) == emails


def test_a_login_checked_against_a_hash_replaced_meanwhile_is_not_taken(db: Session, settings: Settings) -> None:
    """The success step of a login (after its slow hash check) is taken only while the stored
    hash is still the one it checked: a password set in between wins, deterministically here
    by setting it between the two steps that `authenticate` runs."""
    from usermgr.service.auth import _take_success

    user = service.create_user(db, settings, service.new_user("race@example.com", password="old password 1"))
    checked = user.hashed_password
    service.set_password(db, settings, "race@example.com", "new password 2")
    with pytest.raises(AuthenticationFailed):
        _take_success(db, user.id, checked, None, "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo")
    with db.begin():
        stored = db.scalar(select(User.hashed_password).where(User.id == user.id))
    assert stored != checked and not stored.endswith("aGFzaGhhc2hoYXNo")  # the new password stands
    with db.begin():
        refused = db.scalars(select(AuditEvent).order_by(AuditEvent.id.desc())).first()
    assert (refused.action, refused.target_uid, refused.changes) == (
        "login.failure",
        user.uid,
        '{"reason":"password changed meanwhile"}',
    )
    assert service.authenticate(db, settings, "race@example.com", "new password 2").id == user.id


def test_a_login_that_upgrades_an_old_hash_says_so_in_its_event_and_only_then(db: Session, settings: Settings) -> None:
    """The success event of a login whose bcrypt hash was replaced by argon2id records
    "password": "rehashed" (never the hash); the next login, with nothing to upgrade, records nothing."""
    import bcrypt

    user = add(db, settings, "old@example.com", password=None)
    with writing(db):
        db.execute(
            update(User)
            .where(User.id == user.id)
            .values(hashed_password=bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode())
        )
    changes = []
    for _ in range(2):
        service.authenticate(db, settings, "old@example.com", PASSWORD)
        with db.begin():
            event_ = db.scalars(select(AuditEvent).order_by(AuditEvent.id.desc())).first()
        changes.append((event_.action, event_.changes))
    assert changes == [("login.success", '{"password":"rehashed"}'), ("login.success", "{}")]


@pytest.mark.parametrize(
    "change",
    [
        lambda db: service.set_active(db, ["b@example.com"], False),
        lambda db: service.delete_users(db, ["b@example.com"]),
        lambda db: service.revoke_role(db, ["a@example.com"], "admin"),
        lambda db: list(service.iter_user_records(db, UserFilter(role="staff"))),
        lambda db: list(service.iter_user_records(db, UserFilter(admin=True))),
    ],
    ids=["disable", "delete", "revoke-admin", "list --role", "list --admin"],
)
def test_the_last_admin_rule_and_role_filters_never_scan_every_user(
    db: Session, settings: Settings, backend: str, change: Callable[[Session], Any]
) -> None:
    """Through the role index, so that a change to one user costs the same at a million users:
    SQLite's plan for every statement run finds users by key, never by reading them all."""
    if backend != "sqlite":
        pytest.skip("SQLite's EXPLAIN QUERY PLAN is what this reads")
    add(db, settings, "a@example.com", admin=True, password=None)
    add(db, settings, "b@example.com", roles=["staff"], password=None)
    add(db, settings, "c@example.com", admin=True, password=None)
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    engine = db.get_bind()
    event.listen(engine, "before_cursor_execute", record)
    try:
        change(db)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert statements
    with engine.connect() as connection:
        plans = [
            " / ".join(row[-1] for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params))
            for sql, params in statements
        ]
    assert [plan for plan in plans if "SCAN users" in plan] == []
