"""Fixtures: every database test runs on a real SQLite file and a real PostgreSQL server.

The PostgreSQL server is started by the test session on 127.0.0.1 (see pg_server.py)
unless USERMGR_TEST_POSTGRES_URL names one. In CI its half must run, never skip.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from click.testing import CliRunner, Result
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

# Keep the caller's USERMGR_* settings out of the suite, and hash cheaply everywhere,
# subprocesses included.
for _name in [name for name in os.environ if name.startswith("USERMGR_") and name != "USERMGR_TEST_POSTGRES_URL"]:
    del os.environ[_name]
os.environ["USERMGR_HASH_PROFILE"] = "test"

# Property tests get no time budget: Hypothesis's per-example deadline and its "input
# generation is slow" health check both fail a test when a loaded machine is slow.
hypothesis_settings.register_profile("usermgr", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("usermgr")

from tests.pg_server import PostgresServer, find_pg_bin  # noqa: E402
from tests.server_process import running  # noqa: E402
from usermgr import api, database, migrations, tokens  # noqa: E402
from usermgr.cli import cli  # noqa: E402
from usermgr.config import Settings, load_settings  # noqa: E402
from usermgr.models import User  # noqa: E402

BACKENDS = ["sqlite", "postgres"]
# ../shared/spec/api.md, the table: every route of the contract, as (method, path).
CONTRACT_ROUTES = {
    ("POST", "/auth/signup"),
    ("POST", "/auth/login"),
    ("GET", "/users/me"),
    ("GET", "/users"),
    ("GET", "/users/{user_id}"),
    ("PATCH", "/users/{user_id}"),
    ("DELETE", "/users/{user_id}"),
    ("PUT", "/users/{user_id}/roles/{role}"),
    ("DELETE", "/users/{user_id}/roles/{role}"),
    ("GET", "/healthz"),
    ("GET", "/.well-known/jwks.json"),
    ("GET", "/audit"),
}
# ../shared/spec/cli.md, Output: written out here, so that a field dropped from the one
# declaration (usermgr/contract.py) fails the tests instead of vanishing everywhere at once.
CONTRACT_USER_FIELDS = (
    "id",
    "uid",
    "email",
    "username",
    "full_name",
    "is_active",
    "roles",
    "created_at",
    "last_login_at",
    "locked_until",
    "expires_at",
)
USERMGR = Path(sys.executable).with_name("usermgr")
HANG_TIMEOUT = 300.0
"""Seconds: the one guard against a hang. It never measures speed: a wait this long is a
hang, not a loaded machine, and every wait in the suite is for a signal, not a budget."""

# The suite's one password, admin and failure message: a test that needs another says why.
PASSWORD = "correct horse battery"
ADMIN = "admin@example.com"
ADMIN_PASSWORD = "admin-password-1"  # not PASSWORD: a mix-up between the two logins fails
AUTH_FAILED = "authentication failed: wrong email or password, or the account is disabled or locked"
AUTH_FAILED_LINE = f"usermgr: error: {AUTH_FAILED}\n"


class PostgresAdmin:
    """Creates and drops test databases on a PostgreSQL server, from a migrated template."""

    TEMPLATE = "usermgr_template"

    def __init__(self, admin_url: str) -> None:
        self.admin_url = make_url(admin_url)
        self.engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self._execute(f'DROP DATABASE IF EXISTS "{self.TEMPLATE}"')
        self._execute(f'CREATE DATABASE "{self.TEMPLATE}"')
        template = create_engine(self.url_of(self.TEMPLATE))
        migrations.upgrade(template)
        template.dispose()

    def _execute(self, sql: str) -> None:
        with self.engine.connect() as connection:
            connection.execute(text(sql))

    def url_of(self, name: str) -> str:
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def create(self, *, migrated: bool) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        template = self.TEMPLATE if migrated else "template0"
        self._execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url_of(name)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        self._execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        self._execute(f'DROP DATABASE IF EXISTS "{name}"')


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the PostgreSQL server `postgres`, so that `-m "not postgres"`
    (as `make mutate` runs) leaves out exactly the tests that would start it."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("backend") == "postgres"
        if on_postgres or "postgres" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


OPEN_FILES_BETWEEN_COLLECTIONS = 256
_open_after_collecting = [0]


@pytest.fixture(autouse=True)
def _few_open_files() -> Iterator[None]:
    """Close what finished tests left for the garbage collector: each in-process command opens a
    database engine (SQLite: the file, its WAL and shared memory) that lives in reference cycles
    until a full collection, and one worker reached file descriptor 1024 between collections,
    where `select()` fails (tests/test_e2e.py). Counted after each test; collected once 256 more
    are open than after the last collection (files that stay open are not collected again and again)."""
    yield
    if len(os.listdir("/proc/self/fd")) > _open_after_collecting[0] + OPEN_FILES_BETWEEN_COLLECTIONS:
        gc.collect()
        _open_after_collecting[0] = len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresAdmin]:
    external = os.environ.get("USERMGR_TEST_POSTGRES_URL")
    if external:
        yield PostgresAdmin(external)
        return
    if find_pg_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries are missing: .ci/run must install them")
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    server = PostgresServer()
    try:
        admin = PostgresAdmin(server.start())
        yield admin
        admin.engine.dispose()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "users.db"
    engine = database.make_engine(f"sqlite:///{path}")
    migrations.upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def _fresh_database(backend: str, request: pytest.FixtureRequest, tmp_path: Path, *, migrated: bool) -> Iterator[str]:
    if backend == "sqlite":
        path = tmp_path / "users.db"
        if migrated:
            shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    admin: PostgresAdmin = request.getfixturevalue("postgres")
    url = admin.create(migrated=migrated)
    try:
        yield url
    finally:
        admin.drop(url)  # it ends the connections that are still open


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database at the latest schema, on each backend."""
    yield from _fresh_database(backend, request, tmp_path, migrated=True)


@pytest.fixture
def empty_db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database with no schema at all, on each backend (SQLite: the file is absent)."""
    yield from _fresh_database(backend, request, tmp_path, migrated=False)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "usermgr.key"
    tokens.create_key_file(path, "HS256")
    return path


@pytest.fixture
def settings(db_url: str, key_file: Path) -> Settings:
    return replace(load_settings(database_url=db_url, key_file=str(key_file)), hash_profile="test")


@pytest.fixture
def db(settings: Settings) -> Iterator[Session]:
    opened = database.Database(settings.database_url)
    session = opened.SessionLocal()
    try:
        yield session
    finally:
        session.close()
        opened.dispose()


@pytest.fixture
def env(db_url: str, key_file: Path) -> dict[str, str]:
    """The environment a CLI run (in process or as a subprocess) points at the test database."""
    return {"USERMGR_DATABASE_URL": db_url, "USERMGR_KEY_FILE": str(key_file), "USERMGR_HASH_PROFILE": "test"}


class Runner:
    """Runs the CLI in process; stdout and stderr are kept apart."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
        return self.runner.invoke(cli, list(args), input=input, env={**self.env, **(env or {})}, catch_exceptions=False)


@pytest.fixture
def run(env: dict[str, str]) -> Runner:
    return Runner(env)


# ---- the CLI in process: one helper per idea, for every test file ----------------------------

Ran = TypeVar("Ran", Result, subprocess.CompletedProcess)


def ok(result: Ran) -> Ran:
    """Assert that a command (in process or a real process) succeeded without a traceback."""
    code = result.exit_code if isinstance(result, Result) else result.returncode
    assert code == 0, (code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result


def error_line(result: Result, code: int) -> str:
    """Assert a clean refusal: exit `code`, nothing on stdout, no traceback, and one
    `usermgr: error:` line that echoes no raw control or formatting character (a
    right-to-left override must not reach the terminal); that line."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usermgr: error: ") and result.stderr.endswith("\n"), result.stderr
    line = result.stderr.removesuffix("\n")
    assert not [char for char in line if unicodedata.category(char) in ("Cc", "Cf")], ascii(line)
    return line


def create_user(run: Runner, email: str, *options: str, password: str | None = PASSWORD) -> int:
    """Create a user with the CLI (`password=None`: without a password); its id."""
    secret = ["--password-stdin"] if password is not None else ["--no-password"]
    result = ok(run("create", "--email", email, *secret, *options, "-o", "id", input=f"{password}\n"))
    return int(result.stdout)


def login(run: Runner, user: str, password: str = PASSWORD, *options: str, env: dict[str, str] | None = None) -> Result:
    """`usermgr login` with the password on stdin; the result, success or not."""
    return run("login", user, "--password-stdin", *options, input=f"{password}\n", env=env)


def token_of(run: Runner, user: str, password: str = PASSWORD, *options: str, env: dict[str, str] | None = None) -> str:
    """The token a successful `usermgr login` prints."""
    return ok(login(run, user, password, *options, env=env)).stdout.strip()


def users(run: Runner) -> list[dict[str, Any]]:
    """Every user as `list -o json` shows them."""
    listed: list[dict[str, Any]] = json.loads(ok(run("list", "-o", "json")).stdout)
    return listed


def emails(run: Runner, *filters: str) -> list[str]:
    """The emails `list` shows, with its `filters`."""
    return ok(run("list", *filters, "-o", "email")).stdout.splitlines()


def shown(run: Runner, ref: str) -> dict[str, Any]:
    """The user `ref` names, as `show -o json` prints it."""
    record: dict[str, Any] = json.loads(ok(run("show", ref, "-o", "json")).stdout)
    return record


def uid_of(run: Runner, ref: str) -> str:
    """The stable identity (`uid`) of the user `ref` names, as `show` prints it."""
    uid: str = shown(run, ref)["uid"]
    return uid


# ---- the installed `usermgr` as a real process -----------------------------------------------


def process_env(env: dict[str, str]) -> dict[str, str]:
    """The environment of a `usermgr` process: this one's, without its USERMGR_* settings, plus `env`."""
    return {key: value for key, value in os.environ.items() if not key.startswith("USERMGR_")} | env


def run_usermgr(
    *args: str, env: dict[str, str], input: str | None = None, preexec_fn: Callable[[], Any] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the installed `usermgr` executable as a subprocess (`preexec_fn`: run in the child first)."""
    return subprocess.run(
        [str(USERMGR), *args],
        input=input,
        env=process_env(env),
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
        preexec_fn=preexec_fn,
    )


def usermgr_bytes(*args: str | bytes, env: dict[str, str], input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The installed `usermgr` with a bytes argv and raw bytes on standard input (run_usermgr takes text)."""
    argv = [os.fsencode(USERMGR), *(arg if isinstance(arg, bytes) else os.fsencode(arg) for arg in args)]
    return subprocess.run(argv, input=input, env=process_env(env), capture_output=True, timeout=HANG_TIMEOUT)


def login_process(env: dict[str, str], user: str, password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    """`usermgr login` as a real process, with the password on stdin."""
    return run_usermgr("login", user, "--password-stdin", env=env, input=f"{password}\n")


@dataclass(frozen=True)
class Served:
    """A running `usermgr serve`: its process, port, base URL and log file."""

    process: subprocess.Popen[bytes]
    port: int
    base_url: str
    log: Path

    def client(self, **options: Any) -> httpx.Client:
        """An HTTP client for the server, patient enough for a loaded machine."""
        return httpx.Client(base_url=self.base_url, timeout=HANG_TIMEOUT, **options)


@contextmanager
def serving(
    env: dict[str, str], log: Path, *serve_options: str, global_options: Sequence[str] = ()
) -> Iterator[Served]:
    """A real `usermgr [global_options] serve --port PORT [serve_options]` on a free loopback
    port, healthy, logging to `log` (tests/server_process.py: ServerFailed with the log's end
    if it exits or never answers); stopped (SIGTERM) on leaving, and its log printed, which
    pytest shows when the test fails."""
    command = [str(USERMGR), *global_options, "serve", "--port", "{port}", *serve_options]
    try:
        with running("usermgr serve", command, process_env(env), log, HANG_TIMEOUT) as (process, port):
            yield Served(process, port, f"http://127.0.0.1:{port}", log)
    finally:
        print(log.read_text())


# ---- the HTTP API -----------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def api_login(http: httpx.Client, email: str, password: str = PASSWORD) -> httpx.Response:
    """POST /auth/login, on a TestClient or on a real server."""
    return http.post("/auth/login", data={"username": email, "password": password})


def api_token(http: httpx.Client, email: str, password: str = PASSWORD) -> str:
    """The access token a successful POST /auth/login returns."""
    response = api_login(http, email, password)
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return api.create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def admin_id(run: Runner) -> int:
    return create_user(run, ADMIN, "--admin", password=ADMIN_PASSWORD)


@pytest.fixture
def admin(client: TestClient, admin_id: int) -> dict[str, str]:
    """Headers of a logged-in admin."""
    return bearer(api_token(client, ADMIN, ADMIN_PASSWORD))


def user_count(url: str) -> int:
    """How many users the database at `url` holds, read through a connection of its own."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(User)).scalar_one()
    finally:
        engine.dispose()
