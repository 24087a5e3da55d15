"""The API beyond one request at a time: what an authenticated request costs the database,
and `usermgr serve --workers N`, whose processes share every rule through the database.

Nothing here times anything: the figures are bench/'s (figure api, `make loadtest`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from anyio import to_thread
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

from tests.conftest import (
    ADMIN,
    ADMIN_PASSWORD,
    HANG_TIMEOUT,
    PASSWORD,
    Runner,
    Served,
    api_token,
    bearer,
    create_user,
    run_usermgr,
    serving,
)
from tests.pg_server import free_port
from tests.test_lockout import EMAIL, THRESHOLD, WRONG, Probe, all_at_once, api_guess
from usermgr import api


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


def test_each_server_thread_has_a_database_connection_of_its_own(app: FastAPI, client: TestClient) -> None:
    """As many threads for blocking work as pooled connections, and no overflow: no request
    waits for a connection (nor fails with a 500 after pool_timeout), and N workers open at
    most N x API_THREADS connections."""

    async def threads() -> float:
        return to_thread.current_default_thread_limiter().total_tokens

    assert client.portal is not None
    assert client.portal.call(threads) == api.API_THREADS
    assert client.get("/healthz").status_code == 200
    pool = app.state.usermgr.database.engine.pool
    assert (pool.size(), pool._max_overflow) == (api.API_THREADS, 0)  # QueuePool keeps its limit private


# ---- usermgr serve --workers ------------------------------------------------------------------


def wait_for_log(served: Served, text: str, count: int) -> None:
    """Until `text` shows `count` times in the server's log (each worker logs its own start-up)."""
    deadline = time.monotonic() + HANG_TIMEOUT
    while served.log.read_text().count(text) < count:
        if served.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{text!r} never showed {count} times:\n{served.log.read_text()}")
        time.sleep(0.1)


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["postgres"])
def test_two_workers_on_postgresql_answer_and_count_one_lockout_across_them(
    env: dict[str, str], db_url: str, key_file: Path, tmp_path: Path
) -> None:
    """24 wrong guesses at once, each on a new connection (so the kernel hands them to both
    workers): THRESHOLD are counted, one lock stands in both, and the right password stays
    out until `usermgr unlock`. The database and key file reach the workers as --db and
    --key-file only, not as variables."""
    lock_env = {**env, "USERMGR_LOCKOUT_THRESHOLD": str(THRESHOLD)}
    create_user(Runner(lock_env), EMAIL)
    probe = Probe(db_url)
    probe.slow_down()
    options_only = {
        name: value for name, value in lock_env.items() if name not in ("USERMGR_DATABASE_URL", "USERMGR_KEY_FILE")
    }
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    global_options = ("--db", db_url, "--key-file", str(key_file))
    with (
        serving(options_only, tmp_path / "serve.log", "--workers", "2", global_options=global_options) as served,
        served.client(limits=limits) as http,
        ThreadPoolExecutor(max_workers=24) as pool,
    ):
        wait_for_log(served, "Application startup complete.", 2)
        wrong = all_at_once(pool, [lambda: api_guess(http, WRONG)] * 24)
        lock = probe.wait_for_lock()
        assert {future.result() for future in wrong} == {401}
        assert probe.state() == (0, lock), "a guess was counted after the lock: it was checked"
        assert api_guess(http, PASSWORD) == 401
        assert run_usermgr("unlock", EMAIL, env=lock_env).returncode == 0
        me = http.get("/users/me", headers=bearer(api_token(http, EMAIL)))
        assert (me.status_code, me.json()["email"]) == (200, EMAIL)
    probe.engine.dispose()


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_serve_refuses_a_bad_worker_count(value: str, tmp_path: Path) -> None:
    port = str(free_port())  # were the value taken, the server would start here and the test hang, then fail
    result = run_usermgr("--db", str(tmp_path / "users.db"), "serve", "--port", port, "--workers", value, env={})
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.startswith("usermgr: error: Invalid value for '--workers'"), result.stderr
    assert len(result.stderr.splitlines()) == 1
