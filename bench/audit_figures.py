"""Figures for the audit trail (issue 12): what auditing adds to an import, and reading a
million events by user. Registered in run.py's FIGURES."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import statistics
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


AUDIT_PARTS = """
import json, sqlite3, sys, time
from contextlib import closing
from usermgr.database import Database
from usermgr.models import new_uids
from usermgr.service import audit
from usermgr.service.core import insert_many

count, indexed, bare = int(sys.argv[1]), sys.argv[2], sys.argv[3]
columns = {name: [None] * count for name in audit.COLUMN_FIELDS}
columns.update(
    email=[f"user{n:07d}@example.com" for n in range(count)],
    username=[f"user{n:07d}" for n in range(count)],
    full_name=[f"Zo\u00eb \u00c5ngstr\u00f6m {n}" for n in range(count)],
    is_active=[True] * count,
    hashed_password=[None] * count,
)
uids = new_uids(count)
parts = {}
started = time.process_time()
texts = audit.created_changes_texts(columns, [()] * count)
parts["changes texts"] = time.process_time() - started
rows = []
audit.insert_many = lambda db, table, keys, batch: rows.extend(batch)  # record_stored's rows, kept
with Database(f"sqlite:///{indexed}").SessionLocal() as db:
    events = list(zip(["user.create"] * count, uids, columns["email"], texts))
    started = time.process_time()
    for start in range(0, count, 1000):  # the import's chunks
        audit.record_stored(db, events[start : start + 1000], head=rows[-1][-1] if rows else None)
    parts["chain hashes"] = time.process_time() - started
for label, path in (("SQLite: rows with their indexes", indexed), ("SQLite: rows alone, no secondary index", bare)):
    if path == bare:
        with closing(sqlite3.connect(path)) as plain, plain:
            query = "SELECT name FROM sqlite_master WHERE tbl_name = 'audit_events' AND type = 'index' AND sql NOT NULL"
            for (name,) in plain.execute(query).fetchall():
                plain.execute(f"DROP INDEX {name}")
    with Database(f"sqlite:///{path}").SessionLocal() as db:
        started = time.process_time()
        for start in range(0, count, 1000):
            insert_many(db, audit.EVENTS, audit._EVENT_COLUMNS, rows[start : start + 1000])
        db.commit()
        parts[label] = time.process_time() - started
print(json.dumps(parts))
"""
"""Where the CPU an import's audit events cost goes, measured in one process: the Python that
makes them (their changes texts, their chain hashes) and SQLite writing them, with the
table's indexes and without any (the floor of one stored row per user)."""


def audit_parts(ws: Workspace, count: int) -> dict[str, float]:
    indexed, bare = ws.new_db("audit-parts-indexed"), ws.new_db("audit-parts-bare")
    proc = run([PYTHON, "-c", AUDIT_PARTS, str(count), str(indexed), str(bare)], capture=True)
    return {name: float(seconds) for name, seconds in json.loads(proc.stdout).items()}


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
    parts = audit_parts(ws, count)
    budget = 0.15 * statistics.median(proc.cpu_seconds for proc in unaudited)
    figure.note = (
        f"CPU of {count:,} import events by part, in one process: "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in parts.items())
        + f"; the goal leaves them {budget:.2f} s (15% of the unaudited import's median CPU)"
    )
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
