"""The HTTP API (usermgr.api) against real databases, the real service and the real CLI.

Every test that takes `client`, `settings`, `run` or `env` runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import schemathesis
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy import create_engine, text

from tests.conftest import (
    ADMIN,
    ADMIN_PASSWORD,
    AUTH_FAILED,
    CONTRACT_ROUTES,
    CONTRACT_USER_FIELDS,
    HANG_TIMEOUT,
    PASSWORD,
    Runner,
    api_login,
    api_token,
    bearer,
    create_user,
    login,
    ok,
    process_env,
    run_usermgr,
    serving,
    shown,
    token_of,
    uid_of,
    users,
)
from usermgr import api, service, tokens
from usermgr.config import Settings
from usermgr.errors import ConfigurationError
from usermgr.models import User

# ---- helpers ---------------------------------------------------------------------------------------


def signup(client: TestClient, email: str, password: str = PASSWORD, **fields: Any) -> httpx.Response:
    return client.post("/auth/signup", json={"email": email, "password": password, **fields})


def assert_unauthorized(response: httpx.Response, detail: str | None = None) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    if detail is not None:
        assert response.json() == {"detail": detail}


# ---- the module and the app ---------------------------------------------------------------------


def test_importing_the_module_touches_no_database_and_no_key(tmp_path: Path) -> None:
    database = tmp_path / "absent.db"
    environment = process_env(
        {"USERMGR_DATABASE_URL": f"sqlite:///{database}", "USERMGR_KEY_FILE": str(tmp_path / "absent.key")}
    )
    result = subprocess.run(
        [sys.executable, "-c", "import usermgr.api; print(type(usermgr.api.app).__name__)"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "FastAPI\n"
    assert list(tmp_path.iterdir()) == []


def test_create_app_without_settings_reads_the_environment(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, run: Runner
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    create_user(run, "ada@example.com")
    with TestClient(api.create_app()) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        token = api_token(client, "ada@example.com")
        assert client.get("/users/me", headers=bearer(token)).json()["email"] == "ada@example.com"


def test_a_bad_setting_fails_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USERMGR_HASH_PROFILE", "bogus")
    with pytest.raises(ConfigurationError, match="USERMGR_HASH_PROFILE='bogus'"), TestClient(api.create_app()):
        pass


def test_healthz_answers_ok(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


UNAVAILABLE = {"detail": "the database is unavailable: the server's log says why"}


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("sqlite:///{tmp}/missing.db", "create it with `usermgr init`"),
        ("postgresql+psycopg://nobody:nothing@127.0.0.1:1/nowhere?connect_timeout=5", "cannot use the database"),
    ],
    ids=["sqlite-missing", "postgres-unreachable"],
)
def test_an_unusable_database_is_503(
    url: str, logged: str, key_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The client hears only that the database is unavailable; paths and driver text go to the log."""
    settings = Settings(database_url=url.format(tmp=tmp_path), key_file=key_file, hash_profile="test")
    with TestClient(api.create_app(settings)) as client:
        for response in (
            client.get("/healthz"),
            signup(client, "ada@example.com"),
            api_login(client, "ada@example.com"),
        ):
            assert response.status_code == 503, response.text
            assert response.json() == UNAVAILABLE
    assert logged in caplog.text
    assert not (tmp_path / "missing.db").exists()


def test_a_database_without_the_schema_is_503(
    empty_db_url: str, key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(database_url=empty_db_url, key_file=key_file, hash_profile="test")
    with TestClient(api.create_app(settings)) as client:
        for response in (signup(client, "ada@example.com"), api_login(client, "ada@example.com")):
            assert response.status_code == 503, response.text
            assert response.json() == UNAVAILABLE
    assert "usermgr init" in caplog.text


def test_a_valid_token_on_an_unusable_database_is_503(settings: Settings, tmp_path: Path, run: Runner) -> None:
    create_user(run, "ada@example.com")
    with TestClient(api.create_app(settings)) as client:
        token = api_token(client, "ada@example.com")
    broken = replace(settings, database_url=f"sqlite:///{tmp_path}/missing.db")
    with TestClient(api.create_app(broken)) as client:
        response = client.get("/users/me", headers=bearer(token))
    assert response.status_code == 503
    assert response.json() == UNAVAILABLE


def test_a_stored_timestamp_that_is_not_one_is_503_and_logged(
    settings: Settings, run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    """Text another tool wrote into a timestamp column is damage to the database: 503 with
    the usual answer, the value only in the server's log (SQLite alone stores times as text)."""
    if not settings.database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's timestamptz column cannot hold such text")
    create_user(run, "ada@example.com")
    with TestClient(api.create_app(settings)) as client:
        token = api_token(client, "ada@example.com")
        engine = create_engine(settings.database_url)
        with engine.begin() as connection:
            connection.execute(text("UPDATE users SET created_at = 'garbage'"))
        engine.dispose()
        response = client.get("/users/me", headers=bearer(token))
    assert response.status_code == 503, response.text
    assert response.json() == UNAVAILABLE
    assert "timestamp usermgr cannot read ('garbage')" in caplog.text


# ---- signup ----------------------------------------------------------------------------------------


def test_signup_creates_a_user_without_roles(client: TestClient, run: Runner) -> None:
    response = signup(client, " Ada@Example.COM ", username="ada", full_name="Ada Lovelace")
    assert response.status_code == 201, response.text
    body = response.json()
    assert tuple(body) == CONTRACT_USER_FIELDS
    assert body["email"] == "ada@example.com"
    assert (body["username"], body["full_name"], body["is_active"], body["roles"]) == ("ada", "Ada Lovelace", True, [])
    assert body["last_login_at"] is None
    assert [user["email"] for user in users(run)] == ["ada@example.com"]
    assert api_token(client, "ada@example.com")


def test_signup_of_a_taken_email_or_username_is_409(client: TestClient, run: Runner) -> None:
    assert signup(client, "ada@example.com", username="ada").status_code == 201
    taken_email = signup(client, "ADA@example.com")
    assert taken_email.status_code == 409
    assert taken_email.json() == {"detail": "a user with email 'ada@example.com' already exists"}
    taken_username = signup(client, "other@example.com", username="ada")
    assert taken_username.status_code == 409
    assert taken_username.json() == {"detail": "a user with username 'ada' already exists"}
    assert len(users(run)) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "ada@example.com", "password": "short"}, "password"),
        ({"email": "ada@example.com"}, "password"),
        ({"email": "not an email", "password": PASSWORD}, "email"),
        ({"password": PASSWORD}, "email"),
        ({"email": "ada@example.com", "password": PASSWORD, "username": "has space"}, "username"),
        ({"email": "ada@example.com", "password": PASSWORD, "roles": ["admin"]}, "roles"),
        ({"email": "ada@example.com", "password": PASSWORD, "is_active": False}, "is_active"),
    ],
    ids=["weak-password", "no-password", "bad-email", "no-email", "bad-username", "roles", "is_active"],
)
def test_invalid_signup_is_422_and_creates_nobody(
    client: TestClient, run: Runner, body: dict[str, Any], field: str
) -> None:
    response = client.post("/auth/signup", json=body)
    assert response.status_code == 422
    assert [issue["loc"] for issue in response.json()["detail"]] == [["body", field]]
    assert users(run) == []


def test_signup_is_never_a_way_to_a_role(client: TestClient, run: Runner) -> None:
    """Even the first account on an empty database gets no role, and it cannot reach admin routes."""
    assert signup(client, "first@example.com").json()["roles"] == []
    response = client.get("/users", headers=bearer(api_token(client, "first@example.com")))
    assert response.status_code == 403
    assert users(run)[0]["roles"] == []


# ---- login and lockout -----------------------------------------------------------------------------


def test_login_returns_a_bearer_token_that_the_cli_verifies(client: TestClient, run: Runner) -> None:
    user_id = create_user(run, "ada@example.com")
    response = api_login(client, "ADA@example.com")
    assert response.status_code == 200
    assert set(response.json()) == {"access_token", "token_type"}
    assert response.json()["token_type"] == "bearer"
    token = response.json()["access_token"]
    verified = run("verify", token, "--check-db", "-o", "json")
    assert verified.exit_code == 0, verified.stderr
    assert verified.stderr == ""
    claims = json.loads(verified.stdout)
    assert (claims["sub"], claims["email"], claims["roles"]) == (uid_of(run, str(user_id)), "ada@example.com", [])


def test_unknown_wrong_disabled_and_locked_logins_get_the_same_401(
    client: TestClient, run: Runner, settings: Settings
) -> None:
    create_user(run, "ada@example.com")
    create_user(run, "off@example.com")
    create_user(run, "locked@example.com")
    assert run("disable", "off@example.com").exit_code == 0
    for _ in range(settings.lockout_threshold):
        assert api_login(client, "locked@example.com", "wrong password").status_code == 401
    answers = [
        api_login(client, "nobody@example.com"),
        api_login(client, "ada@example.com", "wrong password"),
        api_login(client, "off@example.com"),
        api_login(client, "locked@example.com"),
    ]
    for response in answers:
        assert_unauthorized(response, AUTH_FAILED)
    assert len({(response.content, response.headers["content-length"]) for response in answers}) == 1


def test_login_without_the_form_fields_is_422(client: TestClient) -> None:
    response = client.post("/auth/login", data={"username": "ada@example.com"})
    assert response.status_code == 422
    assert [issue["loc"] for issue in response.json()["detail"]] == [["body", "password"]]
    assert client.post("/auth/login", json={"username": "a", "password": "b"}).status_code == 422


def test_lockout_over_http_then_unlock(client: TestClient, run: Runner, settings: Settings) -> None:
    create_user(run, "ada@example.com")
    assert settings.lockout_threshold == 5
    for _ in range(settings.lockout_threshold - 1):
        assert_unauthorized(api_login(client, "ada@example.com", "wrong password"))
    assert api_login(client, "ada@example.com").status_code == 200, "below the threshold the right password still works"
    for _ in range(settings.lockout_threshold):
        assert_unauthorized(api_login(client, "ada@example.com", "wrong password"))
    assert_unauthorized(api_login(client, "ada@example.com"), AUTH_FAILED)
    assert run("unlock", "ada@example.com").exit_code == 0
    assert api_login(client, "ada@example.com").status_code == 200


def test_failed_logins_on_the_cli_and_the_api_count_toward_one_lockout(
    client: TestClient, run: Runner, settings: Settings
) -> None:
    create_user(run, "ada@example.com")
    for _ in range(settings.lockout_threshold - 1):
        assert_unauthorized(api_login(client, "ada@example.com", "wrong password"))
    from_cli = login(run, "ada@example.com", "wrong password")
    assert from_cli.exit_code == 6
    assert from_cli.stdout == ""
    assert_unauthorized(api_login(client, "ada@example.com"))
    locked_cli = login(run, "ada@example.com")
    assert locked_cli.exit_code == 6
    assert locked_cli.stdout == ""


@pytest.mark.parametrize("stored", ["'no'", "'false'", "2"])
def test_a_user_whose_stored_is_active_is_not_0_or_1_is_not_let_in(
    client: TestClient, run: Runner, db_url: str, stored: str
) -> None:
    """Another tool's 'no' or 'false' in is_active was read by its Python truth: an enabled
    user, who logged in. Nobody is let in on a value usermgr cannot read: the CLI says so in
    one line (exit 1), the API answers 503 and issues no token."""
    if not db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's boolean holds only booleans")
    create_user(run, "ada@example.com")
    token = token_of(run, "ada@example.com")
    with create_engine(db_url).begin() as connection:
        connection.execute(text(f"UPDATE users SET is_active = {stored} WHERE email = 'ada@example.com'"))
    refused = login(run, "ada@example.com")
    assert (refused.exit_code, refused.stdout) == (1, "")
    assert refused.stderr.startswith("usermgr: error: the database holds a true/false value usermgr cannot read (")
    answered = api_login(client, "ada@example.com")
    assert answered.status_code == 503 and "access_token" not in answered.text
    assert client.get("/users/me", headers=bearer(token)).status_code == 503
    assert run("verify", token, "--check-db").exit_code == 1


# ---- tokens ----------------------------------------------------------------------------------------


def test_me_returns_the_tokens_holder(client: TestClient, run: Runner) -> None:
    user_id = create_user(run, "ada@example.com", "--full-name", "Ada")
    response = client.get("/users/me", headers=bearer(api_token(client, "ada@example.com")))
    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["email"], body["full_name"], body["roles"]) == (user_id, "ada@example.com", "Ada", [])
    assert body["last_login_at"] is not None
    assert "hashed_password" not in body


def test_me_answers_the_same_record_as_the_admin_read(client: TestClient, run: Runner, admin: dict[str, str]) -> None:
    """/users/me encodes its record itself: byte for byte what UserResponse gives elsewhere,
    roles sorted, every time in the same form."""
    ada = create_user(run, "ada@example.com", "--role", "zeta", "--role", "alpha", "--expires", "2099-01-02T03:04:05Z")
    assert run("grant-role", "ada@example.com", "beta").exit_code == 0
    me = client.get("/users/me", headers=bearer(api_token(client, "ada@example.com")))
    assert me.status_code == 200
    assert me.headers["content-type"] == "application/json"
    assert me.json()["roles"] == ["alpha", "beta", "zeta"]
    assert me.content == client.get(f"/users/{ada}", headers=admin).content


def test_a_cli_token_works_on_the_api_until_revoked(client: TestClient, run: Runner) -> None:
    create_user(run, "ada@example.com")
    from_cli = login(run, "ada@example.com")
    assert from_cli.exit_code == 0, from_cli.stderr
    token = from_cli.stdout.strip()
    assert from_cli.stdout == f"{token}\n"
    assert client.get("/users/me", headers=bearer(token)).json()["email"] == "ada@example.com"
    from_api = api_token(client, "ada@example.com")
    assert run("verify", from_api).exit_code == 0
    assert run("revoke-tokens", "ada@example.com").exit_code == 0
    for old in (token, from_api):
        assert_unauthorized(client.get("/users/me", headers=bearer(old)), "token invalid: revoked")
    assert client.get("/users/me", headers=bearer(api_token(client, "ada@example.com"))).status_code == 200


@pytest.mark.parametrize(
    ("authorization", "detail"),
    [
        (None, "not authenticated: send `Authorization: Bearer <token>` (get one at /auth/login)"),
        ("Bearer", "not authenticated: send `Authorization: Bearer <token>` (get one at /auth/login)"),
        ("Basic YWRhOnB3", "not authenticated: send `Authorization: Bearer <token>` (get one at /auth/login)"),
        ("Bearer not-a-token", "token invalid: malformed"),
        ("Bearer a.b.c", "token invalid: malformed"),
    ],
    ids=["missing", "empty", "basic", "garbage", "three-parts"],
)
def test_a_missing_or_garbage_token_is_401(client: TestClient, authorization: str | None, detail: str) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    assert_unauthorized(client.get("/users/me", headers=headers), detail)


@pytest.mark.parametrize("order", ["user-then-admin", "admin-then-user"])
def test_two_authorization_headers_are_401_whichever_comes_first(
    client: TestClient, run: Runner, admin: dict[str, str], order: str
) -> None:
    """Authorization is a singleton field (RFC 9110): with two, a proxy that checks or logs one
    and the app that uses the other disagree on who is calling. Refused, not the first taken."""
    create_user(run, "ada@example.com")
    tokens_sent = [bearer(api_token(client, "ada@example.com"))["Authorization"], admin["Authorization"]]
    if order == "admin-then-user":
        tokens_sent.reverse()
    headers = [("Authorization", value) for value in tokens_sent]
    for method, path in (("GET", "/users"), ("GET", "/users/me"), ("DELETE", "/users/2/roles/editor")):
        response = client.request(method, path, headers=headers)
        assert_unauthorized(response, "token invalid: send one Authorization header, not several")


NOT_AUTHENTICATED = "not authenticated: send `Authorization: Bearer <token>` (get one at /auth/login)"


@pytest.mark.parametrize("backend", ["sqlite"])  # the header's parsing is the API's, not the database's
@pytest.mark.parametrize(
    ("sent", "status"),
    [
        ({"Authorization": "bearer {token}"}, 200),
        ({"Authorization": "BEARER {token}"}, 200),
        ({"Authorization": "Bearer   {token}"}, 200),
        ({"Authorization": "Bearer\t{token}"}, 401),
        ({"Authorization": "{token}"}, 401),
        ({"Cookie": "access_token={token}; token={token}"}, 401),
    ],
    ids=["lowercase-scheme", "uppercase-scheme", "several-spaces", "tab", "no-scheme", "cookie"],
)
def test_the_bearer_scheme_is_case_insensitive_and_a_token_is_read_from_that_header_only(
    client: TestClient, run: Runner, sent: dict[str, str], status: int
) -> None:
    """RFC 6750: `Bearer` then one or more spaces, the scheme in any case; nothing else is a token
    (a token in the query string: test_api_edge, the access log)."""
    create_user(run, "ada@example.com")
    token = api_token(client, "ada@example.com")
    response = client.get("/users/me", headers={name: value.format(token=token) for name, value in sent.items()})
    if status == 200:
        assert response.status_code == 200, response.text
        assert response.json()["email"] == "ada@example.com"
    else:
        assert_unauthorized(response, NOT_AUTHENTICATED)


def test_expired_foreign_and_stale_tokens_are_401(client: TestClient, run: Runner, settings: Settings) -> None:
    user_id = create_user(run, "ada@example.com")
    claims = {"subject": uid_of(run, str(user_id)), "email": "ada@example.com", "roles": [], "token_version": 0}
    expired = tokens.issue_token(settings, **claims, ttl=-3600)
    assert_unauthorized(client.get("/users/me", headers=bearer(expired)), "token invalid: expired")
    foreign = tokens.issue_token(replace(settings, secret_key="x" * 40), **claims, ttl=600)
    assert_unauthorized(client.get("/users/me", headers=bearer(foreign)), "token invalid: unknown key")
    other_issuer = tokens.issue_token(replace(settings, token_issuer="elsewhere"), **claims, ttl=600)
    assert_unauthorized(client.get("/users/me", headers=bearer(other_issuer)), "token invalid: wrong issuer")
    valid = api_token(client, "ada@example.com")
    assert run("disable", "ada@example.com").exit_code == 0
    assert_unauthorized(client.get("/users/me", headers=bearer(valid)), "token invalid: the user is disabled")
    assert run("enable", "ada@example.com").exit_code == 0
    valid = api_token(client, "ada@example.com")
    assert run("delete", "ada@example.com", "--yes").exit_code == 0
    assert_unauthorized(client.get("/users/me", headers=bearer(valid)), "token invalid: the user no longer exists")


def test_a_token_of_a_user_locked_since_is_401(client: TestClient, run: Runner, settings: Settings) -> None:
    create_user(run, "ada@example.com")
    token = api_token(client, "ada@example.com")
    assert client.get("/users/me", headers=bearer(token)).status_code == 200
    for _ in range(settings.lockout_threshold):
        assert api_login(client, "ada@example.com", "wrong-password").status_code == 401
    assert_unauthorized(client.get("/users/me", headers=bearer(token)), "token invalid: the user is locked")


# ---- admin routes: who may call them -------------------------------------------------------------

ADMIN_ROUTES = [
    ("GET", "/users"),
    ("GET", "/users/{id}"),
    ("PATCH", "/users/{id}"),
    ("DELETE", "/users/{id}"),
    ("PUT", "/users/{id}/roles/editor"),
    ("DELETE", "/users/{id}/roles/editor"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES, ids=[f"{m} {p}" for m, p in ADMIN_ROUTES])
def test_admin_routes_refuse_anonymous_and_non_admins(
    client: TestClient, run: Runner, admin_id: int, method: str, path: str
) -> None:
    user_id = create_user(run, "ada@example.com")
    url = path.format(id=admin_id)
    body = {"json": {"full_name": "Changed"}} if method == "PATCH" else {}
    assert_unauthorized(client.request(method, url, **body))
    response = client.request(method, url, headers=bearer(api_token(client, "ada@example.com")), **body)
    assert response.status_code == 403
    assert response.json() == {"detail": "forbidden: the user does not have the role 'admin'"}
    by_id = {user["id"]: user for user in users(run)}
    assert by_id[admin_id]["full_name"] is None
    assert by_id[admin_id]["roles"] == ["admin"]
    assert by_id[user_id]["roles"] == []


@pytest.mark.parametrize("backend", ["sqlite"])  # the order of the checks is the API's
@pytest.mark.parametrize("target", ["existing", "missing", "deleted", "not-an-id", "beyond-bigint"])
def test_a_non_admin_gets_the_same_403_whether_or_not_the_user_exists(
    client: TestClient, run: Runner, admin_id: int, target: str
) -> None:
    """The role check comes before the lookup and before the path's validation: a non-admin
    cannot tell an existing user from a missing or deleted one, nor probe which ids parse."""
    deleted = create_user(run, "gone@example.com")
    assert run("delete", "gone@example.com", "--yes").exit_code == 0
    create_user(run, "ada@example.com")
    headers = bearer(api_token(client, "ada@example.com"))
    user_id = {
        "existing": str(admin_id),
        "missing": "999999",
        "deleted": str(deleted),
        "not-an-id": "admin@example.com",
        "beyond-bigint": str(2**70),
    }[target]
    for method, path in ADMIN_ROUTES[1:]:
        body = {"json": {"full_name": "Changed"}} if method == "PATCH" else {}
        response = client.request(method, path.format(id=user_id), headers=headers, **body)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json() == {"detail": "forbidden: the user does not have the role 'admin'"}


def test_roles_come_from_the_database_not_the_token(client: TestClient, run: Runner, admin: dict[str, str]) -> None:
    create_user(run, "ada@example.com")
    token = api_token(client, "ada@example.com")  # its roles claim is []
    assert client.get("/users", headers=bearer(token)).status_code == 403
    assert run("grant-admin", "ada@example.com").exit_code == 0
    assert client.get("/users", headers=bearer(token)).status_code == 200
    assert run("revoke-admin", ADMIN).exit_code == 0
    assert_unauthorized(client.get("/users", headers=admin), "token invalid: revoked")  # it named admin
    fresh = api_token(client, ADMIN, ADMIN_PASSWORD)
    assert client.get("/users", headers=bearer(fresh)).status_code == 403


# ---- admin routes: what they do --------------------------------------------------------------------


def test_list_users_filters_and_pages(client: TestClient, run: Runner, admin: dict[str, str], admin_id: int) -> None:
    ada = create_user(run, "ada@example.com", "--role", "editor", "--full-name", "Ada Lovelace")
    bob = create_user(run, "bob@example.com")
    assert run("disable", "bob@example.com").exit_code == 0

    def ids(**params: Any) -> list[int]:
        response = client.get("/users", headers=admin, params=params)
        assert response.status_code == 200, response.text
        return [user["id"] for user in response.json()]

    assert ids() == [admin_id, ada, bob]
    assert ids(role="editor") == [ada]
    assert ids(role="admin") == [admin_id]
    assert ids(role="nobody") == []
    assert ids(active="false") == [bob]
    assert ids(active="true") == [admin_id, ada]
    assert ids(search="LOVELACE") == [ada]
    assert ids(search="%") == []
    assert ids(limit=2) == [admin_id, ada]
    assert ids(limit=2, offset=2) == [bob]
    assert ids(limit=0) == []
    full = client.get("/users", headers=admin, params={"role": "editor"}).json()
    assert full == [client.get(f"/users/{ada}", headers=admin).json()]


@pytest.mark.parametrize(
    "params",
    [{"limit": 1001}, {"limit": -1}, {"offset": -1}, {"active": "maybe"}, {"limit": "ten"}],
    ids=["limit-above-max", "negative-limit", "negative-offset", "active-not-bool", "limit-not-int"],
)
def test_list_users_rejects_bad_parameters(client: TestClient, admin: dict[str, str], params: dict[str, Any]) -> None:
    response = client.get("/users", headers=admin, params=params)
    assert response.status_code == 422
    assert [issue["loc"][0] for issue in response.json()["detail"]] == ["query"]


def test_list_users_rejects_a_bad_role_name_with_the_services_message(
    client: TestClient, admin: dict[str, str]
) -> None:
    response = client.get("/users", headers=admin, params={"role": "Bad Role"})
    assert response.status_code == 422
    assert response.json() == {"detail": "invalid role name 'Bad Role': use 1 to 64 of a-z, 0-9, _ and -"}


def test_list_users_defaults_to_100_and_caps_at_1000(
    client: TestClient, admin: dict[str, str], db: Any, settings: Settings
) -> None:
    for number in range(api.LIST_LIMIT_DEFAULT + 5):
        service.create_user(db, settings, service.new_user(f"user{number}@example.com"))
    assert len(client.get("/users", headers=admin).json()) == 100
    assert len(client.get("/users", headers=admin, params={"limit": 1000}).json()) == 106


def test_get_user(client: TestClient, run: Runner, admin: dict[str, str]) -> None:
    ada = create_user(run, "ada@example.com", "--username", "ada")
    response = client.get(f"/users/{ada}", headers=admin)
    assert response.status_code == 200
    assert (response.json()["id"], response.json()["username"]) == (ada, "ada")
    missing = client.get(f"/users/{ada + 100}", headers=admin)
    assert missing.status_code == 404
    assert missing.json() == {"detail": f"no user matches '{ada + 100}': give an email, a username or a numeric id"}


@pytest.mark.parametrize("user_id", ["0", "-1", "abc", "ada@example.com", str(2**31), str(2**70)])
def test_a_user_id_that_is_no_id_is_422(client: TestClient, admin: dict[str, str], user_id: str) -> None:
    for method in ("GET", "PATCH", "DELETE"):
        response = client.request(method, f"/users/{user_id}", headers=admin, json={"full_name": "X"})
        assert response.status_code == 422, (method, response.text)
        assert response.json()["detail"][0]["loc"] == ["path", "user_id"]


def test_patch_user_changes_only_the_given_fields(client: TestClient, run: Runner, admin: dict[str, str]) -> None:
    ada = create_user(run, "ada@example.com", "--username", "ada", "--full-name", "Ada")
    response = client.patch(f"/users/{ada}", headers=admin, json={"email": "Ada.L@Example.com"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["email"], body["username"], body["full_name"]) == ("ada.l@example.com", "ada", "Ada")
    assert client.get(f"/users/{ada}", headers=admin).json() == body
    assert api_token(client, "ada.l@example.com")


def test_patch_user_failures(client: TestClient, run: Runner, admin: dict[str, str], admin_id: int) -> None:
    ada = create_user(run, "ada@example.com")
    taken = client.patch(f"/users/{ada}", headers=admin, json={"email": ADMIN})
    assert taken.status_code == 409
    assert taken.json() == {"detail": f"a user with email {ADMIN!r} already exists"}
    missing = client.patch(f"/users/{ada + 100}", headers=admin, json={"full_name": "X"})
    assert missing.status_code == 404
    for empty in ({}, {"full_name": None}):  # null means "not given" where a field may be empty
        nothing = client.patch(f"/users/{ada}", headers=admin, json=empty)
        assert nothing.status_code == 422, empty
        assert nothing.json()["detail"].startswith("nothing to change")
    for body in (
        {"email": None},
        {"email": "not an email"},
        {"is_active": False},
        {"roles": ["admin"]},
        {"full_name": "x" * 301},
    ):
        response = client.patch(f"/users/{ada}", headers=admin, json=body)
        assert response.status_code == 422, body
        assert isinstance(response.json()["detail"], list)
    by_id = {user["id"]: user for user in users(run)}
    assert (by_id[ada]["email"], by_id[ada]["is_active"], by_id[ada]["roles"]) == ("ada@example.com", True, [])
    partly_null = client.patch(f"/users/{ada}", headers=admin, json={"email": None, "full_name": "Ada"})
    assert partly_null.status_code == 422  # an email can be changed, never removed
    assert users(run)[-1]["full_name"] is None


def test_delete_user(client: TestClient, run: Runner, admin: dict[str, str]) -> None:
    ada = create_user(run, "ada@example.com")
    response = client.delete(f"/users/{ada}", headers=admin)
    assert response.status_code == 204
    assert response.content == b""
    assert client.get(f"/users/{ada}", headers=admin).status_code == 404
    again = client.delete(f"/users/{ada}", headers=admin)
    assert again.status_code == 404
    assert [user["email"] for user in users(run)] == [ADMIN]


def test_the_last_admin_cannot_be_deleted_or_demoted(
    client: TestClient, run: Runner, admin: dict[str, str], admin_id: int
) -> None:
    last = {"detail": "refused: this would remove the last active admin; grant admin to another user first"}
    deleted = client.delete(f"/users/{admin_id}", headers=admin)
    assert deleted.status_code == 409
    assert deleted.json() == last
    demoted = client.delete(f"/users/{admin_id}/roles/admin", headers=admin)
    assert demoted.status_code == 409
    assert demoted.json() == last
    assert users(run)[0]["roles"] == ["admin"]
    other = create_user(run, "other@example.com", "--admin")
    assert client.delete(f"/users/{other}/roles/admin", headers=admin).json()["roles"] == []
    assert run("grant-admin", "other@example.com").exit_code == 0
    assert client.delete(f"/users/{admin_id}", headers=admin).status_code == 204


def test_grant_and_revoke_roles(client: TestClient, run: Runner, admin: dict[str, str]) -> None:
    ada = create_user(run, "ada@example.com")
    granted = client.put(f"/users/{ada}/roles/editor", headers=admin)
    assert granted.status_code == 200
    assert granted.json()["roles"] == ["editor"]
    assert client.put(f"/users/{ada}/roles/editor", headers=admin).json()["roles"] == ["editor"]
    # sorted(): right after a grant the service hands back roles in the order they were added
    assert sorted(client.put(f"/users/{ada}/roles/admin", headers=admin).json()["roles"]) == ["admin", "editor"]
    assert run("verify", api_token(client, "ada@example.com"), "--role", "admin").exit_code == 0
    revoked = client.delete(f"/users/{ada}/roles/editor", headers=admin)
    assert revoked.status_code == 200
    assert revoked.json()["roles"] == ["admin"]
    assert client.delete(f"/users/{ada}/roles/never-granted", headers=admin).json()["roles"] == ["admin"]
    assert users(run)[1]["roles"] == ["admin"]


def test_role_routes_failures(client: TestClient, run: Runner, admin: dict[str, str]) -> None:
    ada = create_user(run, "ada@example.com")
    for method in ("PUT", "DELETE"):
        missing = client.request(method, f"/users/{ada + 100}/roles/editor", headers=admin)
        assert missing.status_code == 404
        assert missing.json()["detail"] == f"no user matches '{ada + 100}' (argument 1); nothing was changed"
        bad = client.request(method, f"/users/{ada}/roles/Not%20A%20Role", headers=admin)
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["path", "role"]
    assert users(run)[1]["roles"] == []


# ---- an existing FastAPI app reusing the routers and the dependencies -----------------------------


def test_an_existing_app_includes_the_routers_and_reuses_the_dependencies(
    settings: Settings, run: Runner, admin_id: int
) -> None:
    host = FastAPI()
    api.install(host, settings)
    host.include_router(api.auth_router)
    host.include_router(api.users_router)

    @host.get("/reports")
    def reports(user: Annotated[User, Depends(api.require_role("reporting"))]) -> dict[str, str]:
        return {"for": user.email}

    @host.get("/hello")
    def hello(
        user: Annotated[User, Depends(api.current_user)], db: Annotated[Any, Depends(api.get_db)]
    ) -> dict[str, Any]:
        return {"hello": user.email, "users": len(list(service.iter_user_records(db)))}

    create_user(run, "ada@example.com")
    with TestClient(host) as client:
        token = api_token(client, "ada@example.com")
        assert client.get("/hello", headers=bearer(token)).json() == {"hello": "ada@example.com", "users": 2}
        assert client.get("/reports", headers=bearer(token)).status_code == 403
        assert run("grant-role", "ada@example.com", "reporting").exit_code == 0
        assert client.get("/reports", headers=bearer(token)).json() == {"for": "ada@example.com"}
        assert_unauthorized(client.get("/reports"))
        admin = bearer(api_token(client, ADMIN, ADMIN_PASSWORD))
        assert client.get(f"/users/{admin_id}", headers=admin).json()["email"] == ADMIN


def test_routers_without_install_fail_loudly(settings: Settings) -> None:
    host = FastAPI()
    host.include_router(api.users_router)
    with TestClient(host) as client, pytest.raises(RuntimeError, match=r"usermgr\.api\.install"):
        client.get("/users/me", headers=bearer("x"))


def test_require_role_refuses_a_bad_role_name_at_once() -> None:
    with pytest.raises(ValueError, match="invalid role name"):
        api.require_role("Not A Role")


# ---- the OpenAPI document and Swagger ----------------------------------------------------------


def test_openapi_describes_every_route_with_the_bearer_scheme(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    operations = {
        (method.upper(), path): spec for path, item in document["paths"].items() for method, spec in item.items()
    }
    assert set(operations) == CONTRACT_ROUTES
    schemes = document["components"]["securitySchemes"]
    assert schemes == {
        "OAuth2PasswordBearer": {"type": "oauth2", "flows": {"password": {"scopes": {}, "tokenUrl": "/auth/login"}}}
    }
    public = {("POST", "/auth/signup"), ("POST", "/auth/login"), ("GET", "/healthz"), ("GET", "/.well-known/jwks.json")}
    for key, spec in operations.items():
        assert ("security" in spec) == (key not in public), key
        success = next(code for code in spec["responses"] if code.startswith("2"))
        if success != "204":
            assert spec["responses"][success]["content"]["application/json"]["schema"], key
        if key not in public:
            assert {"401", "503"} <= set(spec["responses"]), key
    limit = next(p for p in operations[("GET", "/users")]["parameters"] if p["name"] == "limit")
    assert (limit["schema"]["default"], limit["schema"]["maximum"]) == (100, 1000)


def test_swagger_ui_is_served(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert "swagger-ui" in response.text
    assert "/openapi.json" in response.text


# ---- schemathesis: generated requests against the OpenAPI document ----------------------------


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_every_response_conforms_to_the_openapi_document(
    app: FastAPI, admin: dict[str, str], mode: GenerationMode
) -> None:
    """Generated requests, as an admin: no 500, every status documented, every body as its schema says.

    Not checked: that every schema-valid request is accepted. JSON Schema cannot say what the
    validators do after NFKC normalisation (a username's characters, a name without control
    characters), so a schema-valid body may still get its 422.
    """
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(CONTRACT_ROUTES)

    if mode is GenerationMode.NEGATIVE:  # nothing to get wrong in GET /users/me and GET /healthz
        operations = [operation for operation in operations if operation.body or any(operation.iter_parameters())]
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis_settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def call_and_validate(case: Any) -> None:
            case.call_and_validate(headers=admin, excluded_checks=[positive_data_acceptance])

        call_and_validate()


def test_a_nul_byte_in_the_login_email_is_an_unknown_user(client: TestClient, run: Runner) -> None:
    """No email holds a NUL: not a database failure (PostgreSQL refuses NUL in text), but the one 401."""
    create_user(run, "ada@example.com")
    assert_unauthorized(api_login(client, "ada\x00@example.com"), AUTH_FAILED)


def test_a_nul_byte_in_the_search_is_invalid_input(client: TestClient, admin: dict[str, str]) -> None:
    """Not a 503 (PostgreSQL refuses NUL in text), nor everyone (SQLite's LIKE stops at a NUL)."""
    response = client.get("/users", headers=admin, params={"search": "ada\x00"})
    assert response.status_code == 422
    assert "NUL" in response.json()["detail"]


# ---- end to end: the installed `usermgr serve` --------------------------------------------------


@pytest.mark.e2e
def test_usermgr_serve_end_to_end(env: dict[str, str], tmp_path: Path) -> None:
    with serving(env, tmp_path / "serve.log") as served, served.client() as http:
        created = http.post("/auth/signup", json={"email": "ada@example.com", "password": PASSWORD})
        assert created.status_code == 201, created.text
        me = http.get("/users/me", headers=bearer(api_token(http, "ada@example.com")))
        assert me.status_code == 200
        assert me.json() == created.json() | {"last_login_at": me.json()["last_login_at"]}
        assert me.json()["last_login_at"] is not None
        assert_unauthorized(http.get("/users/me"))
    log = served.log.read_text()
    # uvicorn shuts down cleanly, then re-raises SIGTERM so the exit status tells how it ended.
    assert served.process.returncode in (0, -signal.SIGTERM), log
    assert f"Uvicorn running on {served.base_url}" in log, "loopback by default"
    assert "Application shutdown complete." in log


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("forwarded", "recorded"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("a" * 300, "a" * 63 + "…"),
        ("not\tan address", "not\\tan address"),
        ("fe80::1%" + "a" * 300, "fe80::1%" + "a" * 55 + "…"),
        (b"fe80::1%\x9b31m", "fe80::1%\\x9b31m"),
    ],
    ids=["ipv4", "ipv6", "too-long", "not-an-address", "long-ipv6-zone", "ipv6-zone-with-a-c1-control"],
)
def test_a_forwarded_address_is_recorded_as_an_address_or_made_to_fit(
    env: dict[str, str], tmp_path: Path, run: Runner, settings: Settings, forwarded: str | bytes, recorded: str
) -> None:
    """`serve` trusts X-Forwarded-For from 127.0.0.1 by default (and from `*` if told): the
    address an event records is the caller's say. Text that is no address, of any length,
    must neither break the event's transaction (a failed login that is not written does not
    count toward the lockout) nor reach an admin's terminal as it came. An IPv6 address may
    carry a zone (`fe80::1%eth0`) that is any text at all (bytes as latin-1: C1 controls)."""
    create_user(run, "ada@example.com")
    spoofed = {"X-Forwarded-For": forwarded}
    with serving(env, tmp_path / "serve.log") as served, served.client(headers=spoofed) as http:
        for _ in range(settings.lockout_threshold):
            assert api_login(http, "ada@example.com", "wrong password").status_code == 401
        assert api_login(http, "ada@example.com").status_code == 401  # locked, though right
    events = [
        json.loads(line) for line in ok(run("audit", "--user", "ada@example.com", "-o", "jsonl")).stdout.splitlines()
    ]
    failures = [event for event in events if event["action"] == "login.failure"]
    assert len(failures) == settings.lockout_threshold + 1
    assert {event["client_address"] for event in failures} == {recorded}
    assert shown(run, "ada@example.com")["locked_until"] is not None


def test_two_apps_on_two_databases_in_one_process(settings: Settings, tmp_path: Path) -> None:
    """Each app holds its own database: a second app on another database clobbers nothing."""
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    assert run_usermgr("--db", other_url, "init", env={}).returncode == 0
    other = replace(settings, database_url=other_url)
    with TestClient(api.create_app(settings)) as first, TestClient(api.create_app(other)) as second:
        for client, email in ((first, "one@example.com"), (second, "two@example.com"), (first, "three@example.com")):
            assert signup(client, email).status_code == 201
        for client, emails in ((first, ["one@example.com", "three@example.com"]), (second, ["two@example.com"])):
            for email in emails:
                me = client.get("/users/me", headers=bearer(api_token(client, email)))
                assert me.json()["email"] == email
            assert api_login(client, "two@example.com" if client is first else "one@example.com").status_code == 401


def test_importing_the_module_builds_no_app_until_asked(tmp_path: Path) -> None:
    script = "import usermgr.api as m; print('app' in vars(m)); m.app; print('app' in vars(m))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert result.stdout.split() == ["False", "True"], result.stderr


def test_each_route_documents_the_statuses_of_the_errors_it_can_raise(client: TestClient) -> None:
    """api._responses derives them from errors.ERROR_TABLE; these are what the contract says."""
    paths = client.get("/openapi.json").json()["paths"]

    def documented(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    assert documented("/auth/signup", "post") == {"201", "400", "409", "413", "422", "503"}
    assert documented("/auth/login", "post") == {"200", "400", "401", "413", "422", "503"}
    assert documented("/users/{user_id}", "delete") == {"204", "401", "403", "404", "409", "413", "422", "503"}
    assert documented("/healthz", "get") == {"200", "413", "503"}
    assert paths["/users/me"]["get"]["responses"]["401"]["description"].startswith("Bad signature, expired")
