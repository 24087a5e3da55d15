"""The HTTP edge of usermgr.api: what a 422 may say, and text that is no valid Unicode
(lone surrogates) refused at every face."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import Runner, run_usermgr
from tests.test_api import (
    ADMIN,
    ADMIN_PASSWORD,
    PASSWORD,
    bearer,
    cli_users,
    create_user,
    token_for,
)
from usermgr import api, service
from usermgr.config import Settings
from usermgr.errors import InvalidInput

LONE_SURROGATE = "\udcff"  # what Python makes of the byte 0xff in an argument: no valid Unicode
NOT_UNICODE = "is not valid Unicode: it holds a surrogate code point (U+D800 to U+DFFF)"


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return api.create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def admin(client: TestClient, run: Runner) -> dict[str, str]:
    create_user(run, ADMIN, ADMIN_PASSWORD, "--admin")
    return bearer(token_for(client, ADMIN, ADMIN_PASSWORD))


# ---- a 422 says where and why, never what was sent ----------------------------------------------


@pytest.mark.parametrize("password", ["hunter2", "p" * 2000], ids=["too-short", "too-long"])
def test_a_422_never_echoes_the_password(client: TestClient, run: Runner, password: str) -> None:
    response = client.post("/auth/signup", json={"email": "ada@example.com", "password": password})
    assert response.status_code == 422
    assert password not in response.text
    issues = response.json()["detail"]
    assert [issue["loc"] for issue in issues] == [["body", "password"]]
    assert all(set(issue) == {"loc", "msg", "type"} for issue in issues)
    assert cli_users(run) == []


def test_a_422_echoes_no_other_input_either(client: TestClient, admin: dict[str, str], run: Runner) -> None:
    user_id = create_user(run, "ada@example.com")
    for response in (
        client.post("/auth/signup", json={"email": "not-an-email-SECRET", "password": PASSWORD}),
        client.patch(f"/users/{user_id}", headers=admin, json={"full_name": "SECRET" * 100}),
        client.get("/users", headers=admin, params={"limit": "SECRET"}),
        client.post("/auth/signup", content=b'{"email": "SECRET', headers={"content-type": "application/json"}),
    ):
        assert response.status_code == 422, response.text
        assert "SECRET" not in response.text
        assert all(set(issue) == {"loc", "msg", "type"} for issue in response.json()["detail"])


def test_the_openapi_422_schema_says_exactly_what_a_422_holds(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    issue = schemas["ValidationIssue"]
    assert set(issue["properties"]) == {"loc", "msg", "type"}
    assert issue.get("additionalProperties") is False
    assert "HTTPValidationError" not in schemas


# ---- lone surrogates: no valid Unicode, refused as invalid input everywhere ---------------------


def _raw_json(body: dict[str, Any]) -> bytes:
    """JSON text with a lone surrogate written as the escape `\\udcff`, as a hostile client sends it."""
    return json.dumps(body).encode("ascii")


@pytest.mark.parametrize("field", ["email", "username", "full_name", "password"])
def test_a_lone_surrogate_in_signup_is_422(client: TestClient, run: Runner, field: str) -> None:
    body = {"email": "ada@example.com", "password": PASSWORD, field: f"ada{LONE_SURROGATE}"}
    raw = _raw_json(body)
    assert b"\\udcff" in raw
    response = client.post("/auth/signup", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert [issue["loc"] for issue in response.json()["detail"]] == [["body", field]]
    what = "password" if field == "password" else "text"
    assert response.json()["detail"][0]["msg"] == f"{what} {NOT_UNICODE}"
    assert cli_users(run) == []


def test_surrogates_anywhere_in_a_signup_body_are_a_clean_answer(client: TestClient, run: Runner) -> None:
    """As a key (echoed in `loc`), and as UTF-8-encoded surrogate bytes, which Python's JSON
    decoder lets through."""
    as_key = client.post(
        "/auth/signup",
        content=_raw_json({"email": "ada@example.com", "password": PASSWORD, LONE_SURROGATE: 1}),
        headers={"content-type": "application/json"},
    )
    assert as_key.status_code == 422, as_key.text
    as_bytes = client.post(
        "/auth/signup",
        content=b'{"email": "ada@example.com", "password": "' + PASSWORD.encode() + b'", "full_name": "\xed\xb3\xbf"}',
        headers={"content-type": "application/json"},
    )
    assert as_bytes.status_code in (400, 422), as_bytes.text
    assert cli_users(run) == []


@pytest.mark.parametrize("field", ["email", "username", "full_name"])
def test_a_lone_surrogate_in_an_admin_patch_is_422(
    client: TestClient, run: Runner, admin: dict[str, str], field: str
) -> None:
    user_id = create_user(run, "ada@example.com", PASSWORD, "--username", "ada", "--full-name", "Ada")
    before = cli_users(run)
    response = client.patch(
        f"/users/{user_id}",
        headers={**admin, "content-type": "application/json"},
        content=_raw_json({field: f"ada{LONE_SURROGATE}"}),
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == [{"loc": ["body", field], "msg": f"text {NOT_UNICODE}", "type": "value_error"}]
    assert cli_users(run) == before


@pytest.mark.parametrize("command", ["create", "update"])
def test_a_lone_surrogate_in_full_name_is_invalid_input_on_the_cli(run: Runner, command: str) -> None:
    if command == "create":
        args = ["create", "--email", "ada@example.com", "--no-password"]
    else:
        create_user(run, "ada@example.com")
        args = ["update", "ada@example.com"]
    before = cli_users(run)
    result = run(*args, "--full-name", f"Ada{LONE_SURROGATE}")
    assert result.exit_code == 3, result.stderr
    assert result.stderr.startswith("usermgr: error: ")
    assert "surrogate" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert cli_users(run) == before


@pytest.mark.e2e
def test_an_undecodable_full_name_argument_is_invalid_input(env: dict[str, str], run: Runner) -> None:
    """The byte 0xff in argv, as a shell passes it: the installed `usermgr` exits 3."""
    result = run_usermgr("create", "--email", "ada@example.com", "--no-password", "--full-name", "Ada\udcff", env=env)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("usermgr: error: ")
    assert "unexpected" not in result.stderr
    assert cli_users(run) == []


def test_a_lone_surrogate_in_a_password_is_invalid_input_for_the_service(
    db: Any, settings: Settings, run: Runner
) -> None:
    create_user(run, "ada@example.com")
    with pytest.raises(InvalidInput, match="surrogate"):
        service.set_password(db, settings, "ada@example.com", f"long enough{LONE_SURROGATE}")
    with pytest.raises(InvalidInput, match="surrogate"):
        service.create_user(db, settings, service.new_user("bob@example.com", password=f"long enough{LONE_SURROGATE}"))
    assert [user["email"] for user in cli_users(run)] == ["ada@example.com"]
