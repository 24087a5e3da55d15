"""Figures for the audit trail (issue 12): what auditing adds to an import, and reading a
million events by user. Registered in run.py's FIGURES."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import data
from harness import Figure, Goal, Proc, alternate, progress, run, versus

if TYPE_CHECKING:
    from workspace import Workspace

PYTHON = sys.executable
RUNS = 3

UNAUDITED = """
import sys
from usermgr.lazy import import_once

# The service module loaded the way usermgr loads it (usermgr/lazy.py: the collector paused,
# then what the import made frozen); a plain import here left SQLAlchemy's objects to every
# later collection and made this baseline slower than the import it stands for.
bulk = import_once("usermgr.service.bulk")

def nothing(*args, **kwargs):
    return None

# The import exactly as usermgr runs it, without writing its audit events or working out
# what they say (the event tuples it still gathers cost a fraction of a microsecond a row).
bulk.record_stored = nothing
bulk.created_changes_texts = lambda columns, roles: [""] * len(roles)
bulk.diff = lambda *args: {}
from usermgr.cli import main
main(sys.argv[1:])
"""
"""`usermgr` with the import's audit events switched off, in this process only: the baseline."""


def audited_import(ws: Workspace) -> list[Figure]:
    count = 100_000
    source = data.write_csv(ws.root / "audit-users-100k.csv", count)

    def importing(argv0: list[str], label: str) -> Callable[[int], Proc]:
        def once(index: int) -> Proc:
            db = ws.new_db(f"audit-import-{label}-{index}")  # not timed: a fresh, empty database
            return run([*argv0, "--db", str(db), "import", str(source)])

        return once

    usermgr = [str(Path(PYTHON).parent / "usermgr")]
    audited, unaudited = alternate(
        RUNS, importing(usermgr, "audited"), importing([PYTHON, "-c", UNAUDITED], "unaudited")
    )
    what = f"`usermgr import` of {count:,} rows with its audit events (one per user and a summary)"
    baseline_what = "the same import with the audit events switched off in the process"
    figure = versus("12a", what, audited, unaudited, baseline_what, Goal(high=1.15))
    return [figure]


def fill_events(path: Path, count: int, users: int) -> None:
    """`count` audit events about `users` users (by uid), chained, written with sqlite3."""
    start = datetime.now(UTC) - timedelta(days=365)
    previous = "0" * 64

    def rows() -> Iterator[tuple[str, ...]]:
        nonlocal previous
        for n in range(1, count + 1):
            target = str(uuid.UUID(int=n % users + 1, version=4))
            changes = json.dumps({"full_name": [None, f"name {n}"]})
            digest = hashlib.sha256(f"{previous}{n}{changes}".encode()).hexdigest()
            moment = (start + timedelta(seconds=n * 30)).strftime("%Y-%m-%d %H:%M:%S.%f")
            yield (moment, "os:bench@host", "user.update", target, data.email(n % users + 1), changes, previous, digest)
            previous = digest

    with closing(sqlite3.connect(path)) as db, db:
        db.executemany(
            "INSERT INTO audit_events (occurred_at, actor, action, target_uid, target_email, changes, prev_hash, hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows(),
        )


def audit_by_user(ws: Workspace) -> list[Figure]:
    count, users = 1_000_000, 1000
    progress(f"  writing {count:,} audit events (sqlite3 bulk insert into `usermgr init`'s schema)")
    db = ws.new_db("audit-1m")
    data.fill_database(db, users)
    fill_events(db, count, users)
    user = data.email(7)
    reading, showing = alternate(
        RUNS,
        lambda _index: run(ws.usermgr(db, "audit", "--user", user, "-o", "jsonl")),
        lambda _index: run(ws.usermgr(db, "show", user, "-o", "json")),
    )
    what = f"`usermgr audit --user USER -o jsonl` among {count:,} events ({count // users:,} of them the user's)"
    return [versus("12b", what, reading, showing, "`usermgr show USER` on the same database", Goal(high=1.5))]
