"""Figures for the audit trail's indexes (issue 12): `audit --actor` and `audit --action`
among a million events, each against `usermgr show USER` on the same database, like 12b.
Registered in run.py's FIGURES."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import data
from audit_figures import RUNS, fill_events
from harness import Figure, Goal, alternate, progress, run, versus

if TYPE_CHECKING:
    from workspace import Workspace

EVERY = 1000
"""One event in EVERY is by the bot (on behalf of), another one a disable: 1,000 each, spread."""
BOT = "deploy-bot"
RARE_ACTION = "user.disable"


def mark_events(path: Path, count: int) -> None:
    """Spread two rare kinds of event over fill_events' uniform ones: `on_behalf_of` BOT (what
    USERMGR_ACTOR records) on ids 3, 1003, ..., and the action RARE_ACTION on ids 7, 1007, ....
    Their hashes no longer match (reading does not verify the chain)."""
    with closing(sqlite3.connect(path)) as db, db:
        db.executemany(
            "UPDATE audit_events SET on_behalf_of = ? WHERE id = ?", ((BOT, n) for n in range(3, count + 1, EVERY))
        )
        db.executemany(
            "UPDATE audit_events SET action = ? WHERE id = ?", ((RARE_ACTION, n) for n in range(7, count + 1, EVERY))
        )


def audit_by_actor_and_action(ws: Workspace) -> list[Figure]:
    count, users = 1_000_000, 1000
    progress(
        f"  writing {count:,} audit events (12b's builder), {count // EVERY:,} by {BOT}, {count // EVERY:,} disables"
    )
    db = ws.new_db("auditidx-1m")
    data.fill_database(db, users)
    fill_events(db, count, users)
    mark_events(db, count)
    user = data.email(7)
    by_actor, by_action, showing = alternate(
        RUNS,
        lambda _index: run(ws.usermgr(db, "audit", "--actor", BOT, "-o", "jsonl")),
        lambda _index: run(ws.usermgr(db, "audit", "--action", RARE_ACTION, "-o", "jsonl")),
        lambda _index: run(ws.usermgr(db, "show", user, "-o", "json")),
    )
    baseline = "`usermgr show USER` on the same database"
    return [
        versus(
            "12c",
            f"`usermgr audit --actor A -o jsonl` among {count:,} events ({count // EVERY:,} on behalf of A)",
            by_actor,
            showing,
            baseline,
            Goal(high=1.5),
        ),
        versus(
            "12d",
            f"`usermgr audit --action X -o jsonl` among {count:,} events ({count // EVERY:,} of them X)",
            by_action,
            showing,
            baseline,
            Goal(high=1.5),
        ),
    ]
