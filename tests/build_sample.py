"""Build users.db.sample through the service layer: `make sample` (or python -m tests.build_sample PATH).

Deterministic: the same users, roles, flags and timestamps every time. Only the password
hashes differ between builds, as argon2 salts must. The passwords are for the sample only.
"""

from __future__ import annotations

import sqlite3
import sys
import uuid
from contextlib import closing
from pathlib import Path

from usermgr import database, migrations, service
from usermgr.config import load_settings
from usermgr.output import InputRow

SAMPLE_USERS = [
    # email, username, full name, roles, active, sample-only password
    ("ada@example.com", "ada", "Ada Lovelace", ["admin"], True, "ada-sample-pw"),
    ("grace@example.com", "grace", "Grace Hopper", ["beta", "staff"], True, "grace-sample-pw"),
    ("linus@example.com", "linus", "Linus Torvalds", ["staff"], True, "linus-sample-pw"),
    ("margaret@example.com", "margaret", "Margaret Hamilton", ["beta"], True, "margaret-sample-pw"),
    ("barbara@example.com", "barbara", "Barbara Liskov", [], True, "barbara-sample-pw"),
    ("ken@example.com", "ken", "Ken Thompson", ["staff"], False, "ken-sample-pw"),
]


def sample_rows() -> list[InputRow]:
    rows = []
    for number, (email, username, full_name, roles, active, password) in enumerate(SAMPLE_USERS, start=1):
        fields = {
            "email": email,
            "username": username,
            "full_name": full_name,
            "roles": roles,
            "is_active": active,
            "password": password,
            "created_at": f"2026-01-{number:02d}T09:00:00+00:00",
            "uid": str(uuid.UUID(int=number, version=4)),  # fixed, so a rebuild is the same file
        }
        rows.append(InputRow(number, fields))
    return rows


def build(path: Path) -> None:
    path.unlink(missing_ok=True)
    settings = load_settings(database_url=str(path))
    opened = database.Database(settings.database_url, must_exist=False)
    migrations.upgrade(opened.engine)
    plan = service.plan_import(sample_rows())
    try:
        service.hash_passwords(plan, settings)
        with opened.SessionLocal() as db:
            service.apply_import(db, plan)
    finally:
        plan.close()
    opened.dispose()
    # One self-contained file to ship: no -wal/-shm beside it, no free pages.
    with closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode = DELETE")
        connection.execute("VACUUM")


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "users.db.sample"))
