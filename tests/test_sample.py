"""users.db.sample: what `make run` shows, rebuilt deterministically by `make sample`."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.build_sample import SAMPLE_USERS, build
from tests.conftest import run_usermgr

SAMPLE = Path(__file__).resolve().parent.parent / "users.db.sample"


def records(path: Path, tmp_path: Path) -> list[dict]:
    copy = tmp_path / f"copy-of-{path.name}"
    shutil.copy(path, copy)
    result = run_usermgr("--db", str(copy), "list", "-o", "jsonl", env={})
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_sample_is_small_and_sound() -> None:
    assert SAMPLE.stat().st_size < 200_000
    with sqlite3.connect(f"file:{SAMPLE}?mode=ro", uri=True) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("delete",)


def test_sample_holds_the_documented_users(tmp_path: Path) -> None:
    users = records(SAMPLE, tmp_path)
    assert [(u["email"], u["roles"], u["is_active"]) for u in users] == [
        (email, sorted(roles), active) for email, _username, _name, roles, active, _password in SAMPLE_USERS
    ]
    assert sum(1 for u in users if "admin" in u["roles"]) == 1
    assert sum(1 for u in users if not u["is_active"]) == 1


@pytest.mark.parametrize("email, password", [(u[0], u[5]) for u in SAMPLE_USERS if u[4]][:2])
def test_sample_passwords_log_in(tmp_path: Path, email: str, password: str) -> None:
    copy = tmp_path / "users.db"
    shutil.copy(SAMPLE, copy)
    env = {"USERMGR_DATABASE_URL": str(copy)}
    assert run_usermgr("init", env=env).returncode == 0
    result = run_usermgr("login", email, "--password-stdin", input=password + "\n", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(".") == 2 and result.stdout.endswith("\n")


def test_disabled_sample_user_cannot_log_in(tmp_path: Path) -> None:
    copy = tmp_path / "users.db"
    shutil.copy(SAMPLE, copy)
    env = {"USERMGR_DATABASE_URL": str(copy)}
    run_usermgr("init", env=env)
    result = run_usermgr("login", "ken@example.com", "--password-stdin", input="ken-sample-pw\n", env=env)
    assert result.returncode == 6
    assert result.stdout == ""


def test_rebuild_is_deterministic(tmp_path: Path) -> None:
    rebuilt = tmp_path / "rebuilt.db.sample"
    build(rebuilt)
    assert records(rebuilt, tmp_path) == records(SAMPLE, tmp_path)


def test_reading_a_database_leaves_its_file_as_it_was(tmp_path: Path) -> None:
    """`usermgr --db users.db.sample list` must not rewrite the file it only reads."""
    copy = tmp_path / "users.db.sample"
    shutil.copy(SAMPLE, copy)
    before = copy.read_bytes()
    for command in (["list"], ["show", "1"], ["roles"], ["export"]):
        assert run_usermgr("--db", str(copy), *command, env={}).returncode == 0
    assert copy.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["users.db.sample"]


def test_init_switches_sqlite_to_write_ahead_logging(tmp_path: Path) -> None:
    copy = tmp_path / "users.db"
    shutil.copy(SAMPLE, copy)
    assert run_usermgr("--db", str(copy), "init", env={}).returncode == 0
    with sqlite3.connect(copy) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
