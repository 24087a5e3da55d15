"""What bench/run.py and its figure modules share: the workspace the figures work in, the
usermgr under test, and the baselines' commands. A module of its own so that the figure
modules need not import run.py, which imports them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import cached_property
from pathlib import Path

import data
from harness import progress, run

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
USERMGR = str(Path(sys.executable).parent / "usermgr")
BASELINES = str(BENCH / "baselines.py")
SMALL_DB_USER = "bench@example.com"
SMALL_DB_PASSWORD = "correct-horse-battery-staple"


class Workspace:
    """The temporary directory the figures work in, and what they share, each made on first use.

    Every usermgr here signs with one key file (USERMGR_KEY_FILE) and hashes with the real
    argon2 profile: the USERMGR_* variables of the caller's environment are dropped.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key_file = root / "usermgr.key"
        for name in [name for name in os.environ if name.startswith("USERMGR_")]:
            del os.environ[name]
        os.environ["USERMGR_KEY_FILE"] = str(self.key_file)

    def usermgr(self, db: Path, *args: str) -> list[str]:
        return [USERMGR, "--db", str(db), *args]

    def new_db(self, name: str) -> Path:
        """An empty database made by `usermgr init` (the first one also makes the key file)."""
        path = self.root / f"{name}.db"
        run(self.usermgr(path, "init"))
        return path

    @cached_property
    def small_db(self) -> Path:
        """One user with a real argon2id password hash."""
        path = self.new_db("small")
        create = self.usermgr(
            path, "create", "--email", SMALL_DB_USER, "--role", "staff", "--password-stdin", "-o", "id"
        )
        run(create, stdin=SMALL_DB_PASSWORD + "\n")
        return path

    @cached_property
    def token(self) -> str:
        login = self.usermgr(self.small_db, "login", SMALL_DB_USER, "--password-stdin")
        return run(login, stdin=SMALL_DB_PASSWORD + "\n", capture=True).stdout.strip()

    def users_db(self, count: int) -> Path:
        progress(f"  building a database of {count:,} users (sqlite3 bulk insert into `usermgr init`'s schema)")
        path = self.new_db(f"users-{count}")
        data.fill_database(path, count)
        return path

    @cached_property
    def users_100k(self) -> Path:
        return self.users_db(100_000)

    @cached_property
    def users_1m(self) -> Path:
        return self.users_db(1_000_000)


def sqlite_json_command(db: Path) -> tuple[list[str], str]:
    """The baseline for `list -o jsonl`: SQLite writing the same JSON lines itself."""
    query = data.json_lines_query()
    cli = shutil.which("sqlite3")
    if cli is not None:
        return [cli, str(db), query], "the `sqlite3` CLI writing the same JSON lines (json_object)"
    return [PYTHON, BASELINES, "sqlite-json", str(db), query], "python's sqlite3 module running json_object (no CLI)"


def commit() -> str:
    """The usermgr commit measured (read-only: `git rev-parse`); uncommitted edits are not shown."""
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True, text=True)
    except OSError:
        return "unknown (no git)"
    return result.stdout.strip() or "unknown"
