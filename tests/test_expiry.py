"""Account expiry (issue 12): `--expires WHEN|never`, the login and token rules, list filters,
and the field in every output and through import; on SQLite and PostgreSQL, through the CLI
(in process and the installed `usermgr`) and the API (in process and a real server).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text, update

from tests.conftest import (
    AUTH_FAILED,
    AUTH_FAILED_LINE,
    PASSWORD,
    Runner,
    api_login,
    api_token,
    bearer,
    create_user,
    emails,
    error_line,
    login,
    login_process,
    ok,
    run_usermgr,
    serving,
    shown,
    token_of,
    usermgr_bytes,
    users,
)
from usermgr.models import User

FUTURE = "2999-01-31"
FUTURE_AT = "2999-01-31T00:00:00+00:00"
PAST = "2020-01-01T00:00:00+00:00"


def expires_at(run: Runner, ref: str) -> str | None:
    value: str | None = shown(run, ref)["expires_at"]
    return value


def set_expiry_by_sql(db_url: str, email: str, when: datetime | None) -> None:
    """Set `users.expires_at` behind usermgr's back, as time passing would."""
    engine = create_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(update(User).where(User.email == email).values(expires_at=when))
    finally:
        engine.dispose()


def failed_logins(db_url: str, email: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            return connection.execute(select(User.failed_logins).where(User.email == email)).scalar_one()
    finally:
        engine.dispose()


def verify_check_db(run: Runner, token: str) -> tuple[int, dict[str, Any]]:
    """`verify - --check-db -o jsonl` on one token: its exit code and its one result."""
    result = run("verify", "-", "--check-db", "-o", "jsonl", input=token + "\n")
    return result.exit_code, json.loads(result.stdout)


# ---- WHEN: the forms, and what is refused --------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "stored"),
    [
        (FUTURE, FUTURE_AT),  # a date is its start, in UTC
        ("2999-01-31T17:30", "2999-01-31T17:30:00+00:00"),  # no offset: UTC
        ("2999-01-31 17:30:05Z", "2999-01-31T17:30:05+00:00"),
        ("2999-01-31T17:30:00+02:00", "2999-01-31T15:30:00+00:00"),  # stored in UTC
        ("never", None),
    ],
)
def test_create_takes_every_form_of_when(run: Runner, when: str, stored: str | None) -> None:
    created = json.loads(
        ok(run("create", "--email", "ada@example.com", "--no-password", "--expires", when, "-o", "json")).stdout
    )
    assert created["expires_at"] == stored
    assert expires_at(run, "ada@example.com") == stored


def test_a_duration_is_from_now(run: Runner) -> None:
    before = datetime.now(UTC)
    create_user(run, "ada@example.com", "--expires", "90d")
    after = datetime.now(UTC)
    stored = datetime.fromisoformat(expires_at(run, "ada@example.com") or "")
    assert before + timedelta(days=90) <= stored <= after + timedelta(days=90)
    ok(run("update", "ada@example.com", "--expires", "36500d"))
    assert datetime.fromisoformat(expires_at(run, "ada@example.com") or "").year >= before.year + 99


def test_create_refuses_an_expiry_that_is_not_ahead(run: Runner) -> None:
    """An account expired at birth is a typo: refused before the password is asked for."""
    line = error_line(run("create", "--email", "ada@example.com", "--password-stdin", "--expires", "2020-01-01"), 3)
    assert "not in the future" in line
    assert users(run) == []


HOSTILE_WHEN = [
    "0000-01-01",  # year 0
    "10000-01-01",  # after year 9999
    "9999-12-31T23:00:00-05:00",  # year 10000 in UTC
    "2999-02-30",
    "36501d",  # over the duration parser's limit
    "99999999999999999999999999d",
    "1" * 5000 + "d",
    "0d",
    "-5d",
    "20270131",  # seconds or a date? neither: refused
    "",
    "   ",
    "tomorrow",
    "x" * 100_000,  # a huge argument
    "2999-01-01\x00",
    "2999-01-01\u202e",
    "1 d 2 h",
]


@pytest.mark.parametrize("when", HOSTILE_WHEN, ids=lambda when: ascii(when[:24]))
def test_a_hostile_when_is_refused_and_changes_nothing(run: Runner, when: str) -> None:
    create_user(run, "ada@example.com", "--expires", FUTURE)
    before = users(run)
    error_line(run("create", "--email", "bob@example.com", "--no-password", "--expires", when), 3)
    error_line(run("update", "ada@example.com", "--expires", when), 3)
    error_line(run("list", "--expires-before", when), 3)
    assert users(run) == before


NOT_A_DATE = "Input should be a valid datetime or date, invalid character in year"
ADVICE = "use an ISO 8601 date or time (2027-01-31, 2027-01-31T17:00Z), a duration such as 90d"


@pytest.mark.parametrize(
    ("option", "when", "message"),
    [
        ("--expires", "2999-01-01\x00", f"invalid --expires '2999-01-01\\x00': {ADVICE}, or never"),
        ("--expires-before", "2999-01-01\x00", f"invalid --expires-before '2999-01-01\\x00': {ADVICE}"),
        ("--expires", "tomorrow", f"invalid --expires 'tomorrow': {NOT_A_DATE}; {ADVICE}, or never"),
        ("--expires", "20270131", "invalid --expires '20270131': give a unit (90d) or a date (2027-01-31)"),
        ("--expires", "36501d", "invalid --expires '36501d': too long, the most is 36500d (100 years)"),
        (
            "--expires-before",
            "0d",
            "invalid --expires-before '0d': use a positive number with s, m, h or d, such as 15m or 8h",
        ),
    ],
)
def test_a_refused_when_is_named_with_its_option_and_the_forms_to_use(
    run: Runner, option: str, when: str, message: str
) -> None:
    args = ("list",) if option == "--expires-before" else ("create", "--email", "ada@example.com", "--no-password")
    assert error_line(run(*args, option, when), 3) == f"usermgr: error: {message}"


def test_when_that_is_not_utf8_is_refused(env: dict[str, str]) -> None:
    ok(run_usermgr("init", env=env))
    for args in (["create", "--email", "ada@example.com", "--no-password"], ["list"]):
        option = "--expires-before" if args == ["list"] else "--expires"
        result = usermgr_bytes(*args, option.encode(), b"\xff2999-01-01", env=env)
        assert result.returncode == 3, result.stderr
        assert result.stderr.startswith(b"usermgr: error: invalid ") and result.stderr.count(b"\n") == 1
    assert ok(run_usermgr("list", "-o", "email", env=env)).stdout == ""


def test_never_is_no_time_for_expires_before(run: Runner) -> None:
    assert "--expires-before" in error_line(run("list", "--expires-before", "never"), 3)


# ---- logins, tokens, and what expiry is not ------------------------------------------------------


def test_an_expired_account_cannot_log_in_and_is_told_nothing_more(run: Runner, db_url: str) -> None:
    create_user(run, "ada@example.com")
    ok(run("update", "ada@example.com", "--expires", "2020-01-01"))
    assert expires_at(run, "ada@example.com") == PAST
    expired = login(run, "ada@example.com")
    wrong = login(run, "ada@example.com", "not the password")
    assert error_line(expired, 6) + "\n" == AUTH_FAILED_LINE
    assert (expired.stderr, expired.exit_code) == (wrong.stderr, wrong.exit_code)
    # The right password was checked like any other guess: it counts toward the lockout.
    assert failed_logins(db_url, "ada@example.com") == 2
    assert shown(run, "ada@example.com")["last_login_at"] is None


def test_an_expired_account_through_the_installed_usermgr(env: dict[str, str]) -> None:
    ok(run_usermgr("init", env=env))
    ok(run_usermgr("create", "--email", "ada@example.com", "--password-stdin", env=env, input=f"{PASSWORD}\n"))
    ok(login_process(env, "ada@example.com"))
    ok(run_usermgr("update", "ada@example.com", "--expires", "2020-01-01", env=env))
    refused = login_process(env, "ada@example.com")
    assert (refused.returncode, refused.stdout, refused.stderr) == (6, "", AUTH_FAILED_LINE)


def test_expiry_is_not_disable(run: Runner) -> None:
    create_user(run, "ada@example.com")
    ok(run("update", "ada@example.com", "--expires", "2020-01-01"))
    ok(run("disable", "ada@example.com"))
    ok(run("enable", "ada@example.com"))
    assert expires_at(run, "ada@example.com") == PAST  # enable leaves the expiry
    assert login(run, "ada@example.com").exit_code == 6
    ok(run("update", "ada@example.com", "--expires", "never"))
    assert expires_at(run, "ada@example.com") is None
    ok(login(run, "ada@example.com"))


def test_an_expiry_ahead_changes_nothing_yet(run: Runner) -> None:
    create_user(run, "ada@example.com")
    token = token_of(run, "ada@example.com")
    ok(run("update", "ada@example.com", "--expires", "1d"))
    ok(login(run, "ada@example.com"))
    code, result = verify_check_db(run, token)
    assert (code, result["valid"]) == (0, True)  # setting an expiry revokes no token


def test_a_token_whose_holder_expires_after_issue_is_refused(run: Runner, db_url: str) -> None:
    create_user(run, "ada@example.com")
    token = token_of(run, "ada@example.com")
    set_expiry_by_sql(db_url, "ada@example.com", datetime.now(UTC) - timedelta(seconds=1))  # time passed
    code, result = verify_check_db(run, token)
    assert code == 7
    assert result == {"valid": False, "reason": "token invalid: the user's account expired", "claims": None}
    single = run("verify", token, "--check-db")
    assert "expired" in error_line(single, 7)
    ok(run("verify", token))  # offline, the token itself is still sound: only the database knows
    # Expiry revokes nothing: cleared, the same token is good again.
    ok(run("update", "ada@example.com", "--expires", "never"))
    assert verify_check_db(run, token)[0] == 0


def store_as_another_tool(db_url: str, email: str, column: str, stored: str) -> None:
    """Write `stored` as the column's text, as another tool sharing the SQLite file may."""
    engine = create_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f"UPDATE users SET {column} = :stored WHERE email = :email"), locals())
    finally:
        engine.dispose()


def _layouts(moment: datetime) -> dict[str, str]:
    """`moment` (UTC) written the ways other tools write a time into SQLite's text column."""
    east, west = timezone(timedelta(hours=5)), timezone(timedelta(hours=-5))
    return {
        "T, no fraction": moment.strftime("%Y-%m-%dT%H:%M:%S"),
        "Z": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "+05:00": moment.astimezone(east).isoformat(),
        "-05:00": moment.astimezone(west).isoformat(),
    }


_HOUR = timedelta(hours=1)
LAYOUTS = list(_layouts(datetime(2026, 1, 1, tzinfo=UTC)))
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"])  # PostgreSQL keeps a timestamptz, not text


@SQLITE_ONLY
@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_expiry_another_tool_stored_an_hour_ago_keeps_the_account_out(run: Runner, db_url: str, layout: str) -> None:
    """SQLite compared the stored text: `2026-01-02T08:00:00` sorts after `2026-01-02 09:...`
    (T after the space), `...+05:00` after the UTC time it names: an account expired an hour
    ago logged in, and `list --expired` left it out."""
    create_user(run, "ada@example.com")
    store_as_another_tool(db_url, "ada@example.com", "expires_at", _layouts(datetime.now(UTC) - _HOUR)[layout])
    assert error_line(login(run, "ada@example.com"), 6) + "\n" == AUTH_FAILED_LINE
    assert emails(run, "--expired") == ["ada@example.com"]
    assert emails(run, "--expires-before", "1s") == ["ada@example.com"]


@SQLITE_ONLY
@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_expiry_another_tool_stored_an_hour_ahead_lets_the_account_in(run: Runner, db_url: str, layout: str) -> None:
    create_user(run, "ada@example.com")
    store_as_another_tool(db_url, "ada@example.com", "expires_at", _layouts(datetime.now(UTC) + _HOUR)[layout])
    ok(login(run, "ada@example.com"))
    assert emails(run, "--expired") == []
    assert emails(run, "--expires-before", "2h") == ["ada@example.com"]
    assert emails(run, "--expires-before", "30m") == []


@SQLITE_ONLY
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_lock_another_tool_stored_holds_until_the_instant_it_names(run: Runner, db_url: str, layout: str) -> None:
    """`...-05:00` sorted before the UTC time it names: a lock for the next hour had ended."""
    create_user(run, "ada@example.com")
    create_user(run, "bob@example.com")
    store_as_another_tool(db_url, "ada@example.com", "locked_until", _layouts(datetime.now(UTC) + _HOUR)[layout])
    store_as_another_tool(db_url, "bob@example.com", "locked_until", _layouts(datetime.now(UTC) - _HOUR)[layout])
    assert login(run, "ada@example.com").exit_code == 6
    assert emails(run, "--locked") == ["ada@example.com"]
    ok(login(run, "bob@example.com"))  # a lock that has ended


@SQLITE_ONLY
def test_a_time_python_reads_but_sqlite_cannot_keeps_the_account_out(run: Runner, db_url: str) -> None:
    """Compact ISO 8601 (`20990101T000000`) is a time `show` reads and julianday() does not:
    an expiry or a lock in it keeps the account out (it fails closed, documented)."""
    create_user(run, "ada@example.com")
    create_user(run, "bob@example.com")
    store_as_another_tool(db_url, "ada@example.com", "expires_at", "20990101T000000")
    store_as_another_tool(db_url, "bob@example.com", "locked_until", "20000101T000000")
    assert expires_at(run, "ada@example.com") == "2099-01-01T00:00:00+00:00"  # `show` reads it
    assert login(run, "ada@example.com").exit_code == 6
    assert login(run, "bob@example.com").exit_code == 6


@SQLITE_ONLY
@pytest.mark.parametrize("stored", ["soon", "2470000", "2026-13-45 99:99:99"])
def test_an_expiry_or_lock_that_is_no_time_is_refused_as_show_refuses_it(run: Runner, db_url: str, stored: str) -> None:
    """Text that sorts after any time, and a number julianday() takes for a Julian day
    (2470000 is in 2050): no login passes; the error names the unreadable value, as `show`'s."""
    create_user(run, "ada@example.com")
    create_user(run, "bob@example.com")
    store_as_another_tool(db_url, "ada@example.com", "expires_at", stored)
    store_as_another_tool(db_url, "bob@example.com", "locked_until", stored)
    for user in ("ada@example.com", "bob@example.com"):
        assert "timestamp usermgr cannot read" in error_line(login(run, user), 1)


def test_an_expired_admin_does_not_count_as_the_one_kept(run: Runner, db_url: str) -> None:
    """The last-admin rule counted an expired admin: with one expired and one who could log in,
    the second could be disabled, deleted or demoted, and no admin could log in any more."""
    create_user(run, "old@example.com", "--admin")
    create_user(run, "ada@example.com", "--admin")
    set_expiry_by_sql(db_url, "old@example.com", datetime.now(UTC) - timedelta(seconds=1))
    before = users(run)
    ada = "ada@example.com"
    for command in (["disable", ada], ["delete", ada, "--yes"], ["revoke-admin", ada]):
        assert "last active admin" in error_line(run(*command), 5), command
    assert users(run) == before


def test_the_last_admin_cannot_be_given_an_expiry_that_has_passed(
    run: Runner, client: TestClient, admin: dict[str, str], admin_id: int
) -> None:
    """Expiry is not disable, but an admin who cannot log in keeps no one able to administer:
    the last-admin rule holds for `update --expires` and PATCH as for `disable`."""
    [only] = [user["email"] for user in users(run) if "admin" in user["roles"]]
    assert "last active admin" in error_line(run("update", only, "--expires", "2020-01-01"), 5)
    answer = client.patch(f"/users/{admin_id}", json={"expires_at": PAST}, headers=admin)
    assert answer.status_code == 409, answer.text
    assert expires_at(run, only) is None
    ok(run("update", only, "--expires", "1d"))  # ahead: the admin can still log in, and grant admin to another


# ---- list, show, export, import ----------------------------------------------------------------


@pytest.fixture
def three(run: Runner, db_url: str) -> None:
    """past@ expired a second ago, soon@ expires in 10 days, never@ never."""
    create_user(run, "past@example.com", "--expires", "1d")
    set_expiry_by_sql(db_url, "past@example.com", datetime.now(UTC) - timedelta(seconds=1))
    create_user(run, "soon@example.com", "--expires", "10d")
    create_user(run, "never@example.com")


@pytest.mark.usefixtures("three")
def test_list_expired_and_expires_before(run: Runner) -> None:
    assert emails(run, "--expired") == ["past@example.com"]
    assert emails(run, "--expires-before", "30d") == ["past@example.com", "soon@example.com"]
    assert emails(run, "--expires-before", "5d") == ["past@example.com"]
    assert emails(run, "--expires-before", "2000-01-01") == []
    assert emails(run, "--expires-before", FUTURE) == ["past@example.com", "soon@example.com"]
    assert emails(run, "--expired", "--expires-before", "30d") == ["past@example.com"]
    assert emails(run, "--expired", "--search", "soon") == []


def test_expires_before_is_strictly_before(run: Runner) -> None:
    create_user(run, "ada@example.com", "--expires", "2030-01-01")
    assert emails(run, "--expires-before", "2030-01-01") == []
    assert emails(run, "--expires-before", "2030-01-01T00:00:00.001") == ["ada@example.com"]


@pytest.mark.usefixtures("three")
def test_every_output_carries_expires_at(run: Runner) -> None:
    listed = users(run)
    assert [user["expires_at"] is None for user in listed] == [False, False, True]
    assert [json.loads(line) for line in ok(run("list", "-o", "jsonl")).stdout.splitlines()] == listed
    rows = ok(run("list", "-o", "csv")).stdout.splitlines()
    assert rows[0].endswith(",expires_at")
    assert [row.rsplit(",", 1)[1] for row in rows[1:]] == [user["expires_at"] or "" for user in listed]
    assert "expires_at" in ok(run("show", "past@example.com")).stdout  # the table too
    exported = [json.loads(line) for line in ok(run("export")).stdout.splitlines()]
    assert [user["expires_at"] for user in exported] == [user["expires_at"] for user in listed]


@pytest.mark.usefixtures("three")
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_export_re_imports_unchanged(run: Runner, tmp_path: Path, fmt: str) -> None:
    exported = ok(run("export", "-o", fmt)).stdout
    other = {**run.env, "USERMGR_DATABASE_URL": f"sqlite:///{tmp_path / 'other.db'}"}
    ok(run_usermgr("init", env=other))
    ok(run_usermgr("import", "-", "--format", fmt, env=other, input=exported))
    assert ok(run_usermgr("export", "-o", fmt, env=other)).stdout == exported


def test_import_validates_expires_at(run: Runner) -> None:
    rows = [
        {"email": "ok@example.com", "expires_at": FUTURE},
        {"email": "bad@example.com", "expires_at": "10000-01-01"},
        {"email": "worse@example.com", "expires_at": "0000-01-01T00:00:00Z"},
    ]
    result = run("import", "-", "--format", "jsonl", input="".join(json.dumps(row) + "\n" for row in rows))
    assert result.exit_code == 3
    assert "line 2: expires_at: " in result.stderr and "line 3: expires_at: " in result.stderr
    assert users(run) == []


@pytest.mark.parametrize("field", ["expires_at", "created_at", "last_login_at"])
@pytest.mark.parametrize("number", [20270331, 1.8e9, 0], ids=["date-like", "seconds", "zero"])
def test_import_refuses_a_json_number_as_a_time(run: Runner, field: str, number: float) -> None:
    """`20270331` reads as seconds (1970-08-23) and as a date alike: refused as `--expires`
    refuses it, and as the same digits in a string are, never stored as seconds."""
    rows = json.dumps({"email": "ok@example.com"}) + "\n" + json.dumps({"email": "ada@example.com", field: number})
    result = run("import", "-", "--format", "jsonl", input=rows + "\n")
    assert result.exit_code == 3, result.stderr
    assert result.stderr.startswith(f"usermgr: error: line 2: {field}: a number is not a time: "), result.stderr
    assert users(run) == []


def test_import_takes_a_past_expiry_and_update_makes_the_user_match(run: Runner) -> None:
    """An export of an expired account must come back as it was; with --on-conflict update a
    row without expires_at leaves the user without one, as for every other field."""
    ok(run("import", "-", "--format", "csv", input=f"email,expires_at\nada@example.com,{PAST}\n"))
    assert expires_at(run, "ada@example.com") == PAST
    ok(run("import", "-", "--format", "csv", "--on-conflict", "update", input="email,full_name\nada@example.com,Ada\n"))
    assert expires_at(run, "ada@example.com") is None


# ---- the API -----------------------------------------------------------------------------------


def test_signup_cannot_set_an_expiry(client: TestClient) -> None:
    answer = client.post("/auth/signup", json={"email": "ada@example.com", "password": PASSWORD, "expires_at": FUTURE})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "expires_at"]
    assert api_login(client, "ada@example.com").status_code == 401  # nobody was created


def test_patch_sets_and_clears_the_expiry(client: TestClient, admin: dict[str, str], run: Runner) -> None:
    user_id = create_user(run, "ada@example.com")
    patched = client.patch(f"/users/{user_id}", json={"expires_at": "2999-01-31T17:30"}, headers=admin)
    assert patched.status_code == 200, patched.text
    assert datetime.fromisoformat(patched.json()["expires_at"]) == datetime(2999, 1, 31, 17, 30, tzinfo=UTC)
    assert client.patch(f"/users/{user_id}", json={"full_name": "Ada"}, headers=admin).json()["expires_at"]
    cleared = client.patch(f"/users/{user_id}", json={"expires_at": None}, headers=admin)
    assert cleared.status_code == 200 and cleared.json()["expires_at"] is None
    assert expires_at(run, "ada@example.com") is None


@pytest.mark.parametrize("value", ["10000-01-01", "0000-01-01", "tomorrow", "90d", 10**30, 20270331, ["2999-01-01"]])
def test_patch_refuses_a_bad_expiry(client: TestClient, admin: dict[str, str], run: Runner, value: Any) -> None:
    user_id = create_user(run, "ada@example.com", "--expires", FUTURE)
    answer = client.patch(f"/users/{user_id}", json={"expires_at": value}, headers=admin)
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "expires_at"]
    assert expires_at(run, "ada@example.com") == FUTURE_AT


def test_api_login_and_tokens_of_an_expired_account(client: TestClient, admin: dict[str, str], run: Runner) -> None:
    user_id = create_user(run, "ada@example.com")
    token = api_token(client, "ada@example.com")
    assert client.get("/users/me", headers=bearer(token)).status_code == 200
    assert client.patch(f"/users/{user_id}", json={"expires_at": PAST}, headers=admin).status_code == 200
    me = client.get("/users/me", headers=bearer(token))
    assert (me.status_code, me.json()) == (401, {"detail": "token invalid: the user's account expired"})
    expired, wrong = api_login(client, "ada@example.com"), api_login(client, "ada@example.com", "not the password")
    assert (expired.status_code, expired.json()) == (wrong.status_code, wrong.json()) == (401, {"detail": AUTH_FAILED})
    listed = client.get("/users", headers=admin).json()
    assert datetime.fromisoformat(listed[1]["expires_at"]) == datetime.fromisoformat(PAST)


def test_a_real_server_refuses_an_expired_holder(env: dict[str, str], run: Runner, tmp_path: Path) -> None:
    create_user(run, "ada@example.com")
    with serving(env, tmp_path / "serve.log") as served, served.client() as http:
        token = api_token(http, "ada@example.com")
        assert http.get("/users/me", headers=bearer(token)).status_code == 200
        ok(run_usermgr("update", "ada@example.com", "--expires", "2020-01-01", env=env))
        assert http.get("/users/me", headers=bearer(token)).status_code == 401
        assert api_login(http, "ada@example.com").json() == {"detail": AUTH_FAILED}
        ok(run_usermgr("update", "ada@example.com", "--expires", "never", env=env))
        assert http.get("/users/me", headers=bearer(token)).status_code == 200


def test_the_service_refuses_a_new_account_expired_at_birth(db: Any, settings: Any) -> None:
    """create_user checks again in its own call: the check before the prompt is the CLI's courtesy."""
    from usermgr import service
    from usermgr.errors import InvalidInput

    with pytest.raises(InvalidInput, match="not in the future"):
        service.create_user(
            db, settings, service.new_user("ada@example.com"), expires_at=datetime.now(UTC) - timedelta(seconds=1)
        )
    assert list(service.iter_user_records(db)) == []
