"""The API beyond one request at a time: what an authenticated request costs the database,
and `usermgr serve --workers N`, whose processes share every rule through the database.

Nothing here times anything: the figures are bench/'s (figure api, `make loadtest`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

from tests.conftest import ADMIN, ADMIN_PASSWORD, Runner, api_token, bearer, create_user


@contextmanager
def selects() -> Iterator[list[str]]:
    """The SELECT statements every engine of this process sends while the block runs."""
    sent: list[str] = []

    def record(_connection: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def test_an_authenticated_request_reads_its_holder_and_their_roles_in_one_select(
    client: TestClient, run: Runner
) -> None:
    create_user(run, "ada@example.com", "--role", "staff", "--role", "beta")
    headers = bearer(api_token(client, "ada@example.com"))
    with selects() as sent:
        me = client.get("/users/me", headers=headers)
    assert me.status_code == 200, me.text
    assert me.json()["roles"] == ["beta", "staff"]
    assert len(sent) == 1, sent


def test_an_admin_route_checks_its_holder_in_one_select(client: TestClient, run: Runner, admin_id: int) -> None:
    headers = bearer(api_token(client, ADMIN, ADMIN_PASSWORD))
    with selects() as sent:
        shown = client.get(f"/users/{admin_id}", headers=headers)
    assert shown.status_code == 200, shown.text
    assert shown.json()["roles"] == ["admin"]
    assert len(sent) == 1 + 2, sent  # the holder; then the user shown and their roles (the service's get_user)


@pytest.mark.parametrize("roles", [[], ["staff"]])
def test_the_joined_read_gives_each_holder_exactly_their_roles(
    client: TestClient, run: Runner, roles: list[str]
) -> None:
    """No role of another user, and none twice, however the join's rows come back."""
    create_user(run, "other@example.com", "--role", "beta", "--role", "staff")
    create_user(run, "ada@example.com", *[option for role in roles for option in ("--role", role)])
    me = client.get("/users/me", headers=bearer(api_token(client, "ada@example.com")))
    assert me.json()["roles"] == roles
