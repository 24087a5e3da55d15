"""Deleted users' uids, kept so that no import gives one again (`deleted_uids`).

A token names its holder by uid; `import` keeps a row's uid, so a row naming a deleted user's
uid (an old or edited export) made their tokens pass again, as that person or as whoever the
row was. A trigger records the uid of every users row deleted, by usermgr or by anything else
that shares the table (the web app, plain SQL). The table starts with every uid the audit
trail names that no user holds any more (deleted before this revision, by any path), at the
time of the newest event naming it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from usermgr.database import UtcDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TRIGGER = "users_keep_deleted_uid"
_SQLITE_TRIGGER = f"""
CREATE TRIGGER {_TRIGGER} AFTER DELETE ON users
BEGIN
    INSERT OR IGNORE INTO deleted_uids (uid, deleted_at)
    VALUES (OLD.uid, strftime('%Y-%m-%d %H:%M:%f', 'now') || '000');
END
"""
"""SQLite's time in the layout UtcDateTime stores (UTC, six fractional digits)."""
_POSTGRESQL_FUNCTION = f"""
CREATE FUNCTION {_TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO deleted_uids (uid, deleted_at) VALUES (OLD.uid, now()) ON CONFLICT DO NOTHING;
    RETURN OLD;
END
$$
"""
_POSTGRESQL_TRIGGER = f"CREATE TRIGGER {_TRIGGER} AFTER DELETE ON users FOR EACH ROW EXECUTE FUNCTION {_TRIGGER}()"


def upgrade() -> None:
    op.create_table(
        "deleted_uids",
        sa.Column("uid", sa.String(36), primary_key=True),
        sa.Column("deleted_at", UtcDateTime(), nullable=False),
    )
    op.execute(
        "INSERT INTO deleted_uids (uid, deleted_at)"
        " SELECT target_uid, MAX(occurred_at) FROM audit_events"
        " WHERE target_uid IS NOT NULL AND target_uid NOT IN (SELECT uid FROM users)"
        " GROUP BY target_uid"
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_POSTGRESQL_FUNCTION)
        op.execute(_POSTGRESQL_TRIGGER)
    else:
        op.execute(_SQLITE_TRIGGER)


def downgrade() -> None:
    op.execute(f"DROP TRIGGER {_TRIGGER}" + (" ON users" if op.get_bind().dialect.name == "postgresql" else ""))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION {_TRIGGER}()")
    op.drop_table("deleted_uids")
