"""Settings that cannot work are refused up front, in one line that says what would.

Database URLs (bad port, unknown dialect, garbage, empty, in-memory), their passwords
(never in a message or a log line), durations too long for a datetime, and the key file
(written whole or not at all, never over an existing one). Through the installed
`usermgr` wherever the command line is what is being tested.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sqlite3
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from tests.conftest import (
    PASSWORD,
    PostgresAdmin,
    Runner,
    create_user,
    login_process,
    run_usermgr,
)
from tests.pg_server import free_port
from usermgr import api
from usermgr.config import Settings

SECRET = "s3cr3t-PW"
ACCEPTED = ("sqlite:///PATH", "postgresql://")


def refusal(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The one `usermgr: error:` line of a clean refusal with `code` (after any notes, such as
    init's); no traceback, no secret anywhere."""
    assert SECRET not in result.stdout + result.stderr
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert all(line.startswith("usermgr: ") for line in lines), result.stderr
    errors = [line for line in lines if line.startswith("usermgr: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert "unexpected" not in errors[0]
    return errors[0]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty directory, so that a wrongly used default ./users.db would show up."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- database URLs that cannot work: exit 2, one line saying what is accepted ------------------

BAD_URLS = {
    "port-too-big": (f"postgresql://u:{SECRET}@localhost:99999/db", "port 99999"),
    "port-not-a-number": (f"postgresql://u:{SECRET}@localhost:abc/db", "cannot be read"),
    "mysql": (f"mysql://u:{SECRET}@localhost/db", "unsupported database 'mysql'"),
    "oracle": (f"oracle://u:{SECRET}@localhost/db", "unsupported database 'oracle'"),
    "driver-not-shipped": (f"postgresql+psycopg2://u:{SECRET}@localhost/db", "unsupported database"),
    "unknown-scheme": ("foo://", "unsupported database 'foo'"),
    "no-scheme": ("://", "cannot be read"),
    "scheme-only": ("sqlite:", "cannot be read"),
    "unencoded-at-in-password": (f"postgresql://u:{SECRET}@x@localhost/db", "%40"),
    "sqlite-with-a-host": (f"sqlite://u:{SECRET}@localhost/users.db", "names a file only"),
    "empty": ("", "is empty"),
    "blank": ("  ", "is empty"),
}


@pytest.mark.parametrize(("url", "says"), BAD_URLS.values(), ids=BAD_URLS.keys())
@pytest.mark.parametrize(
    ("given_as", "command"),
    [("--db", "init"), ("--db", "list"), ("USERMGR_DATABASE_URL", "list")],
    ids=["db-init", "db-list", "env-list"],
)
def test_an_unusable_database_url_is_a_configuration_error(
    in_tmp: Path, url: str, says: str, given_as: str, command: str
) -> None:
    if given_as == "--db":
        result = run_usermgr("--db", url, command, env={"USERMGR_HASH_PROFILE": "test"})
    else:
        result = run_usermgr(command, env={"USERMGR_DATABASE_URL": url, "USERMGR_HASH_PROFILE": "test"})
    line = refusal(result, 2)
    assert says in line
    assert all(accepted in line for accepted in ACCEPTED), line
    assert list(in_tmp.iterdir()) == [], "nothing created: no ./users.db, no key file"


def test_without_a_database_url_the_default_is_used(in_tmp: Path) -> None:
    """Only an explicitly empty value is refused: unset, it is ./users.db as documented."""
    result = run_usermgr("init", env={"USERMGR_HASH_PROFILE": "test"})
    assert result.returncode == 0, result.stderr
    assert (in_tmp / "users.db").is_file() and (in_tmp / "usermgr.key").is_file()


def test_a_file_name_with_a_colon_is_reached_with_a_leading_dot_slash(in_tmp: Path) -> None:
    assert "cannot be read" in refusal(run_usermgr("--db", "backup:1.db", "init", env={}), 2)
    result = run_usermgr("--db", "./backup:1.db", "init", env={"USERMGR_HASH_PROFILE": "test"})
    assert result.returncode == 0, result.stderr
    assert (in_tmp / "backup:1.db").is_file()


# ---- an in-memory database, for every command that opens one ------------------------------------

OPENING_COMMANDS = [
    (["init"], None),
    (["create", "--email", "ada@example.com", "--no-password"], None),
    (["show", "1"], None),
    (["list"], None),
    (["update", "1", "--full-name", "Ada"], None),
    (["set-password", "1", "--password-stdin"], f"{PASSWORD}\n"),
    (["disable", "1"], None),
    (["enable", "1"], None),
    (["unlock", "1"], None),
    (["delete", "1", "--yes"], None),
    (["grant-admin", "1"], None),
    (["revoke-admin", "1"], None),
    (["grant-role", "1", "beta"], None),
    (["revoke-role", "1", "beta"], None),
    (["revoke-tokens", "1"], None),
    (["roles"], None),
    (["login", "1", "--password-stdin"], f"{PASSWORD}\n"),
    (["import", "-", "--format", "jsonl"], '{"email": "ada@example.com"}\n'),
    (["export"], None),
    (["serve", "--port", str(free_port())], None),  # refused before it listens
]


@pytest.mark.parametrize(
    ("url", "command", "stdin"),
    [("sqlite:///:memory:", *case) for case in OPENING_COMMANDS]
    + [("sqlite://", *case) for case in OPENING_COMMANDS[:2]],
    ids=[f"memory-{case[0][0]}" for case in OPENING_COMMANDS]
    + [f"empty-{case[0][0]}" for case in OPENING_COMMANDS[:2]],
)
def test_an_in_memory_database_is_refused(in_tmp: Path, url: str, command: list[str], stdin: str | None) -> None:
    key_file = in_tmp / "k.key"
    key_file.write_text("k" * 43 + "\n")
    key_file.chmod(0o600)
    env = {"USERMGR_DATABASE_URL": url, "USERMGR_KEY_FILE": str(key_file), "USERMGR_HASH_PROFILE": "test"}
    line = refusal(run_usermgr(*command, env=env, input=stdin), 2)
    assert "in-memory SQLite database" in line and "give a file path" in line


# ---- a database URL's password never reaches a message or a log line ---------------------------


def _pg_url(postgres: PostgresAdmin, **parts: object) -> str:
    return postgres.admin_url.set(password=SECRET, **parts).render_as_string(hide_password=False)


def test_no_password_when_the_server_is_unreachable(in_tmp: Path) -> None:
    url = f"postgresql://u:{SECRET}@127.0.0.1:{free_port()}/db"
    for command in (["init"], ["list"]):
        assert "cannot use the database" in refusal(run_usermgr("--db", url, *command, env={}), 1)


def test_no_password_when_the_database_does_not_exist(in_tmp: Path, postgres: PostgresAdmin) -> None:
    for database in ("usermgr_no_such_database", SECRET):  # the second: a driver message that quotes it
        url = _pg_url(postgres, database=database)
        for command in (["init"], ["list"]):
            line = refusal(run_usermgr("--db", url, *command, env={}), 1)
            assert "does not exist" in line


def test_no_password_in_inits_note(in_tmp: Path, postgres: PostgresAdmin) -> None:
    url = postgres.create(migrated=False)
    try:
        with_password = make_url(url).set(password=SECRET).render_as_string(hide_password=False)
        result = run_usermgr("--db", with_password, "--key-file", str(in_tmp / "k.key"), "init", env={})
        assert result.returncode == 0, result.stderr
        assert ":***@" in result.stderr
        assert SECRET not in result.stdout + result.stderr
    finally:
        postgres.drop(url)


@pytest.mark.parametrize("kind", ["unsupported dialect", "database quoted by the driver"])
def test_no_password_in_the_apis_log(
    kind: str, postgres: PostgresAdmin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"mysql://u:{SECRET}@localhost/db" if kind == "unsupported dialect" else _pg_url(postgres, database=SECRET)
    settings = Settings(database_url=url, key_file=tmp_path / "k.key", hash_profile="test")
    with caplog.at_level(logging.INFO), TestClient(api.create_app(settings)) as client:
        response = client.get("/healthz")
    assert response.status_code in (500, 503)
    assert "usermgr:" in caplog.text, "the reason is logged"
    assert SECRET not in caplog.text + response.text


# ---- durations that do not fit a datetime ---------------------------------------------------------


# Settings are read before any database is touched: one backend is enough for these.
one_backend = pytest.mark.parametrize("backend", ["sqlite"])


@one_backend
@pytest.mark.parametrize("name", ["USERMGR_LOCKOUT_PERIOD", "USERMGR_TOKEN_TTL", "USERMGR_TOKEN_MAX_TTL"])
@pytest.mark.parametrize(
    "value", ["99999999999d", "36501d", "9" * 5000], ids=["11-digit-days", "36501d", "5000-digits"]
)
def test_a_duration_setting_too_long_for_a_datetime_is_a_configuration_error(
    env: dict[str, str], name: str, value: str
) -> None:
    create_user(Runner(env), "ada@example.com")
    for command in (["list"], ["login", "ada@example.com", "--password-stdin"]):
        line = refusal(run_usermgr(*command, env={**env, name: value}, input="wrong password\n"), 2)
        assert name in line and "36500d" in line
        assert len(line) < 200, "a long value is shown cut short"


@one_backend
@pytest.mark.parametrize("name", ["USERMGR_LOCKOUT_PERIOD", "USERMGR_TOKEN_MAX_TTL"])
def test_the_longest_duration_is_accepted(env: dict[str, str], name: str) -> None:
    assert run_usermgr("list", env={**env, name: "36500d"}).returncode == 0


def test_a_lockout_of_the_longest_period_locks(env: dict[str, str]) -> None:
    env = {**env, "USERMGR_LOCKOUT_PERIOD": "36500d", "USERMGR_LOCKOUT_THRESHOLD": "1"}
    create_user(Runner(env), "ada@example.com")
    assert login_process(env, "ada@example.com", "wrong").returncode == 6
    locked = login_process(env, "ada@example.com")
    assert locked.returncode == 6, "locked for 100 years, not 'no lockout'"


@one_backend
@pytest.mark.parametrize("ttl", ["99999999999d", "36501d", "9" * 5000], ids=["11-digit-days", "36501d", "5000-digits"])
def test_a_login_ttl_too_long_for_a_datetime_is_invalid_input(env: dict[str, str], ttl: str) -> None:
    create_user(Runner(env), "ada@example.com")
    env = {**env, "USERMGR_TOKEN_MAX_TTL": "36500d"}
    result = run_usermgr("login", "ada@example.com", "--password-stdin", "--ttl", ttl, env=env, input=f"{PASSWORD}\n")
    line = refusal(result, 3)
    assert "--ttl" in line and "36500d" in line


# ---- the key file: whole or absent, 0600, never over an existing one ------------------------------


def _limit_file_size(limit: int) -> Callable[[], None]:
    """For preexec_fn: files this process writes may not grow past `limit` bytes; a write past
    it fails with EFBIG (the signal that would kill the process is ignored), as on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.fixture
def database_held_open(db_url: str) -> Iterator[str]:
    """`db_url`, with SQLite's WAL side files kept by an open connection: an `init` of a
    database already at head then writes no file of its own but the key."""
    path = make_url(db_url).database
    if make_url(db_url).get_backend_name() != "sqlite" or path is None:
        yield db_url
        return
    connection = sqlite3.connect(path)
    connection.execute("SELECT count(*) FROM users").fetchall()
    try:
        yield db_url
    finally:
        connection.close()


@pytest.mark.parametrize("algorithm", ["HS256", "EdDSA"])
def test_a_key_write_that_fails_leaves_no_key_file(database_held_open: str, tmp_path: Path, algorithm: str) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    key_file = keys / "usermgr.key"
    env = {
        "USERMGR_DATABASE_URL": database_held_open,
        "USERMGR_KEY_FILE": str(key_file),
        "USERMGR_TOKEN_ALGORITHM": algorithm,
        "USERMGR_HASH_PROFILE": "test",
    }
    result = run_usermgr("init", env=env, preexec_fn=_limit_file_size(16))  # a key is longer than 16 bytes
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("usermgr: error:")]
    assert errors == [f"usermgr: error: cannot create key file {key_file}: File too large; no key file was left behind"]
    assert list(keys.iterdir()) == [], "no key, no public key, no temporary file"

    again = run_usermgr("init", env=env)
    assert again.returncode == 0, again.stderr
    assert key_file.stat().st_size > 16


def test_a_public_key_that_cannot_be_written_takes_its_private_key_with_it(tmp_path: Path) -> None:
    key_file = tmp_path / "usermgr.key"
    (tmp_path / "usermgr.key.pub").mkdir()  # in the way: the public key cannot take this name
    env = {"USERMGR_DATABASE_URL": str(tmp_path / "users.db"), "USERMGR_TOKEN_ALGORITHM": "EdDSA"}
    line = refusal(run_usermgr("init", env=env), 2)
    assert line.startswith(f"usermgr: error: cannot create key file {key_file}: ")
    assert sorted(path.name for path in tmp_path.iterdir() if "usermgr.key" in path.name) == ["usermgr.key.pub"]


def test_the_key_files_are_0600_and_0644_whatever_the_umask(tmp_path: Path) -> None:
    env = {"USERMGR_DATABASE_URL": str(tmp_path / "users.db"), "USERMGR_TOKEN_ALGORITHM": "EdDSA"}
    result = run_usermgr("init", env=env, preexec_fn=lambda: os.umask(0))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((tmp_path / "usermgr.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "usermgr.key.pub").stat().st_mode) == 0o644
    assert "created key file" in result.stderr


@pytest.mark.parametrize("algorithm", ["HS256", "EdDSA"])
def test_an_existing_key_is_never_overwritten(tmp_path: Path, algorithm: str) -> None:
    key_file = tmp_path / "usermgr.key"
    key_file.write_bytes(b"the key tokens in the wild were signed with\n")
    key_file.chmod(0o600)
    env = {"USERMGR_DATABASE_URL": str(tmp_path / "users.db"), "USERMGR_TOKEN_ALGORITHM": algorithm}
    result = run_usermgr("init", env=env)
    assert result.returncode == 0, result.stderr
    assert key_file.read_bytes() == b"the key tokens in the wild were signed with\n"
    assert "created key file" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir() if "usermgr.key" in path.name) == ["usermgr.key"]


def test_a_key_name_held_by_a_dangling_link_is_neither_followed_nor_replaced(tmp_path: Path) -> None:
    """A dangling symlink looks absent to `exists()` but holds the name: the new key must not
    replace it, nor follow it. `init` said nothing and exited 0, and every later command
    then asked for `init` again: it now says what holds the name (exit 2)."""
    key_file = tmp_path / "usermgr.key"
    elsewhere = tmp_path / "elsewhere"
    key_file.symlink_to(elsewhere)
    result = run_usermgr("init", env={"USERMGR_DATABASE_URL": str(tmp_path / "users.db")})
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"usermgr: error: key file {key_file} is a symbolic link to a missing file: usermgr makes no key"
        " through a link; make the key where it points (--key-file with that path) or remove the link"
    )
    assert key_file.is_symlink() and not elsewhere.exists()
    assert "created key file" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir() if "key" in path.name) == ["usermgr.key"]
