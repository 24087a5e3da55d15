"""The HTTP edge of usermgr.api: what a 422 may say."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import Runner
from tests.test_api import (
    ADMIN,
    ADMIN_PASSWORD,
    PASSWORD,
    bearer,
    cli_users,
    create_user,
    token_for,
)
from usermgr import api
from usermgr.config import Settings

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
