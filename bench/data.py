"""The workloads: generated users as CSV, databases filled in bulk, and minted tokens.

User n is the same everywhere: `user0000042@example.com`, username `user0000042`, a full
name (some not ASCII, so that NFKC has work to do), every 10th in role `staff` and every
25th in `beta`; user 1 is the one admin.
"""

from __future__ import annotations

import csv
import sqlite3
import uuid
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

NAMES = ("Ada Lovelace", "Zoë Ångström", "Grace Hopper", "Jürgen Müller", "Li Wei", "Siobhán Ní Bhriain")
ROLE_EVERY = {"staff": 10, "beta": 25}
ADMIN_USER = 1


def email(n: int) -> str:
    return f"user{n:07d}@example.com"


def full_name(n: int) -> str:
    return f"{NAMES[n % len(NAMES)]} {n}"


def roles(n: int) -> list[str]:
    return [name for name, every in ROLE_EVERY.items() if n % every == 0]


def password(n: int) -> str:
    return f"bench-password-{n:04d}"


def write_csv(path: Path, count: int, *, with_passwords: bool = False) -> Path:
    """`count` users as `usermgr import` takes them: email, username, full_name, roles[, password]."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["email", "username", "full_name", "roles", *(["password"] if with_passwords else [])])
        for n in range(1, count + 1):
            row = [email(n), f"user{n:07d}", full_name(n), ";".join(roles(n))]
            writer.writerow([*row, password(n)] if with_passwords else row)
    return path


def fill_database(path: Path, count: int) -> None:
    """Add `count` password-less users to a database that `usermgr init` made, with sqlite3's
    executemany: about ten times faster than `usermgr import`, which figure 4 measures anyway.

    Rows are as SQLAlchemy writes them: naive UTC timestamps with microseconds, booleans as 0/1.
    """
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    users = (
        (n, str(uuid.UUID(int=n, version=4)), email(n), f"user{n:07d}", full_name(n), now, now)
        for n in range(1, count + 1)
    )
    with closing(sqlite3.connect(path)) as db, db:
        role_ids = {name: _role_id(db, name) for name in ("admin", *ROLE_EVERY)}
        db.executemany(
            "INSERT INTO users (id, uid, email, username, full_name, hashed_password, is_active, created_at,"
            " updated_at, last_login_at, failed_logins, locked_until, token_version)"
            " VALUES (?, ?, ?, ?, ?, NULL, 1, ?, ?, NULL, 0, NULL, 0)",
            users,
        )
        links = ((n, role_ids[name]) for n in range(1, count + 1) for name in roles(n))
        db.executemany("INSERT INTO user_roles (user_id, role_id) VALUES (?, ?)", links)
        db.execute("INSERT INTO user_roles (user_id, role_id) VALUES (?, ?)", (ADMIN_USER, role_ids["admin"]))


def _role_id(db: sqlite3.Connection, name: str) -> int:
    db.execute("INSERT OR IGNORE INTO roles (name) VALUES (?)", (name,))
    return db.execute("SELECT id FROM roles WHERE name = ?", (name,)).fetchone()[0]


def mint_tokens(path: Path, count: int, database: Path) -> Path:
    """`count` valid tokens, one a line, minted in this process by usermgr's own issue_token
    with the settings every usermgr subprocess here gets (the same key file)."""
    from usermgr.config import load_settings
    from usermgr.tokens import issue_token

    settings = load_settings(database_url=str(database))
    with path.open("w", encoding="ascii") as handle:
        for n in range(1, count + 1):
            token = issue_token(
                settings, subject=str(uuid.UUID(int=n)), email=email(n), roles=roles(n), token_version=0, ttl=3600
            )
            handle.write(token + "\n")
    return path


def json_lines_query() -> str:
    """SQL that has SQLite itself write `usermgr list -o jsonl`'s lines (timestamps as stored)."""
    roles_array = (
        "(SELECT json_group_array(name) FROM (SELECT r.name FROM user_roles ur JOIN roles r ON r.id = ur.role_id"
        " WHERE ur.user_id = u.id ORDER BY r.name))"
    )
    return (
        "SELECT json_object('id', u.id, 'email', u.email, 'username', u.username, 'full_name', u.full_name,"
        " 'is_active', json(CASE WHEN u.is_active THEN 'true' ELSE 'false' END), 'roles', json(" + roles_array + "),"
        " 'created_at', u.created_at, 'last_login_at', u.last_login_at) FROM users u ORDER BY u.id"
    )
