"""Issue 13's CLI and data-layer figures: the last-admin rule and `list --role` at 10k to 1M users,
`export` near sqlite3, every format's memory at a million users, and an import that conflicts.

Each figure is a ratio against a baseline measured in the same run, taking turns with it
(harness.alternate); the databases are bench/data.py's, built once per run (Workspace).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import data
from harness import Figure, Goal, Proc, alternate, peak_rss, run, versus
from workspace import sqlite_json_command

PYTHON = sys.executable
USERMGR = str(Path(sys.executable).parent / "usermgr")
FLOOR = "import click, sqlalchemy.orm"
FLOOR_WHAT = f'`python -c "{FLOOR}"`'
RUNS = 5
SIZES = (10_000, 100_000, 1_000_000)
FEW_ROLE, FEW_MEMBERS = "few", 10


def users_db(ws: Any, count: int) -> Path:
    """The workspace's database of `count` users (bench/data.py), built once per run."""
    if count == 100_000:
        return ws.users_100k
    if count == 1_000_000:
        return ws.users_1m
    cache = ws.__dict__.setdefault("perfcli_dbs", {})
    if count not in cache:
        cache[count] = ws.users_db(count)
    return cache[count]


def _each_run(make: Callable[[int], list[str]], **options: Any) -> Callable[[int], Proc]:
    """A step for `alternate` whose command depends on the run's index (-1 for the warm-up)."""
    return lambda index: run(make(index + 1), **options)


def last_admin_rule(ws: Any) -> list[Figure]:
    """disable/delete/revoke-admin/revoke-role of one user: each runs the last-admin rule."""
    figures: list[Figure] = []
    for count in SIZES:
        db = users_db(ws, count)
        promoted = [data.email(n) for n in range(301, 302 + RUNS)]
        run(ws.usermgr(db, "grant-admin", *promoted))  # not timed: admins that revoke-admin then demotes
        steps = {
            "disable": lambda i, db=db: ws.usermgr(db, "disable", data.email(100 + i)),
            "delete --yes": lambda i, db=db: ws.usermgr(db, "delete", "--yes", data.email(200 + i)),
            "revoke-admin": lambda i, db=db: ws.usermgr(db, "revoke-admin", data.email(301 + i)),
            "revoke-role staff": lambda i, db=db: ws.usermgr(db, "revoke-role", data.email(10 * (40 + i)), "staff"),
        }
        floor, *measured = alternate(
            RUNS,
            _each_run(lambda _i: [PYTHON, "-c", FLOOR]),
            *(_each_run(step) for step in steps.values()),
            warmup=True,
        )
        for letter, name, procs in zip("abcd", steps, measured, strict=True):
            what = f"`usermgr {name}` of one user at {count:,} users"
            figures.append(versus(f"13{letter}-{count // 1000}k", what, procs, floor, FLOOR_WHAT, Goal(high=1.3)))
    return figures


def list_by_role(ws: Any) -> list[Figure]:
    """`list --role R` where R has 10 members, at 10k and at 1M users."""
    figures: list[Figure] = []
    for count in (SIZES[0], SIZES[-1]):
        db = users_db(ws, count)
        members = [data.email(n) for n in range(count // FEW_MEMBERS, count + 1, count // FEW_MEMBERS)]
        run(ws.usermgr(db, "grant-role", *members, FEW_ROLE))  # not timed
        listing, floor = alternate(
            RUNS,
            _each_run(lambda _i, db=db: ws.usermgr(db, "list", "--role", FEW_ROLE, "-o", "jsonl")),
            _each_run(lambda _i: [PYTHON, "-c", FLOOR]),
            warmup=True,
        )
        what = f"`usermgr list --role {FEW_ROLE} -o jsonl` ({FEW_MEMBERS} members) at {count:,} users"
        figures.append(versus(f"13e-{count // 1000}k", what, listing, floor, FLOOR_WHAT, Goal(high=1.3)))
    return figures


def export_1m(ws: Any) -> list[Figure]:
    """`export` (JSON lines) of a million users against sqlite3 writing the same lines."""
    db = users_db(ws, SIZES[-1])
    baseline, baseline_what = sqlite_json_command(db)
    exports, baselines = alternate(RUNS, _each_run(lambda _i: ws.usermgr(db, "export")), _each_run(lambda _i: baseline))
    what = "`usermgr export` of 1,000,000 users > /dev/null"
    figure = versus("13f", what, exports, baselines, baseline_what, Goal(low=0.5), count=SIZES[-1], unit="rows/s")
    figure.note = f"peak RSS {peak_rss(exports):.0f} MiB"
    return [figure]


def memory_1m(ws: Any) -> list[Figure]:
    """Peak RSS of `list` at a million users in every format but jsonl (figure 5b-rss has it)."""
    db = users_db(ws, SIZES[-1])
    baseline, _ = sqlite_json_command(db)
    sqlite_rss = run(baseline).peak_rss_mib
    figures = []
    for fmt in ("table", "json", "csv", "email", "id"):
        listing = run(ws.usermgr(db, "list", "-o", fmt))
        what = f"peak RSS of `usermgr list -o {fmt}` (1,000,000 users)"
        figure = Figure(
            f"13g-{fmt}", what, "MiB", listing.peak_rss_mib, sqlite_rss, "the sqlite3 JSON lines baseline's"
        )
        figure.goal = Goal(high=80, on_ratio=False, unit="MiB")
        figure.note = f"one run, {listing.seconds:.1f} s"
        figures.append(figure)
    return figures


def conflicting_import(ws: Any) -> list[Figure]:
    """An import of plaintext passwords whose last row conflicts, against its own --dry-run."""
    count = 200
    source = data.write_csv(ws.root / "conflicting-200.csv", count, with_passwords=True)
    with source.open("a", encoding="utf-8") as handle:
        handle.write(f"{data.email(1)},,,,{data.password(1)}\n")  # the email of the first row again
    db = ws.new_db("conflicting")
    importing, dry_runs = alternate(
        3,
        _each_run(lambda _i: ws.usermgr(db, "import", str(source)), ok=(5,)),
        _each_run(lambda _i: ws.usermgr(db, "import", str(source), "--dry-run"), ok=(5,)),
    )
    what = f"`usermgr import` of {count} plaintext passwords, the last row a conflict (exit 5)"
    return [versus("13h", what, importing, dry_runs, "the same import with --dry-run (exit 5)", Goal(high=2))]
