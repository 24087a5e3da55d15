"""Fixtures: every database test runs on a real SQLite file and a real PostgreSQL server.

The PostgreSQL server is started by the test session on 127.0.0.1 (see pg_server.py)
unless USERMGR_TEST_POSTGRES_URL names one. In CI its half must run, never skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

# Keep the caller's USERMGR_* settings out of the suite, and hash cheaply everywhere,
# subprocesses included.
for _name in [name for name in os.environ if name.startswith("USERMGR_") and name != "USERMGR_TEST_POSTGRES_URL"]:
    del os.environ[_name]
os.environ["USERMGR_HASH_PROFILE"] = "test"

from usermgr import database, migrations, tokens  # noqa: E402
from usermgr.cli import cli  # noqa: E402
from usermgr.config import Settings, load_settings  # noqa: E402
from usermgr.models import User  # noqa: E402

BACKENDS = ["sqlite", "postgres"]
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
)
USERMGR = Path(sys.executable).with_name("usermgr")


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresAdmin]:
    external = os.environ.get("USERMGR_TEST_POSTGRES_URL")
    if external:
        yield PostgresAdmin(external)
        return
    from tests.pg_server import PostgresServer, find_pg_bin

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
        engine = database._engine
        if engine is not None and engine.url.database == make_url(url).database:
            engine.dispose()
        admin.drop(url)


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
def db(settings: Settings) -> Iterator[database.Session]:
    database.configure(settings.database_url)
    session = database.SessionLocal()
    try:
        yield session
    finally:
        session.close()


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


def uid_of(run: Runner, ref: str) -> str:
    """The stable identity (`uid`) of the user `ref` names, as `show` prints it."""
    result = run("show", ref, "-o", "json")
    assert result.exit_code == 0, result.stderr
    uid: str = json.loads(result.stdout)["uid"]
    return uid


def run_usermgr(
    *args: str, env: dict[str, str], input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Runs the installed `usermgr` executable as a subprocess."""
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("USERMGR_")}
    full_env.update(env)
    return subprocess.run(
        [str(USERMGR), *args], input=input, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def user_count(url: str) -> int:
    """How many users the database at `url` holds, read through a connection of its own."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(User)).scalar_one()
    finally:
        engine.dispose()
