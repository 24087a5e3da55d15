"""Deleted users' uids, kept so that no import gives one again (`deleted_uids`).

A token names its holder by uid; `import` keeps a row's uid, so a row naming a deleted user's
uid (an old or edited export) made their tokens pass again, as that person or as whoever the
row was. A trigger records the uid of every users row deleted, by usermgr or by anything else
that shares the table (the web app, plain SQL; on PostgreSQL a TRUNCATE too). The table starts with every uid the audit
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
# PostgreSQL's TRUNCATE fires no row trigger: a statement trigger keeps every uid first.
# (SQLite has no TRUNCATE; its DELETE without WHERE runs row by row once a trigger exists.)
_TRUNCATE = "users_keep_truncated_uids"
_POSTGRESQL_TRUNCATE_FUNCTION = f"""
CREATE FUNCTION {_TRUNCATE}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO deleted_uids (uid, deleted_at) SELECT uid, now() FROM users ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$
"""
_POSTGRESQL_TRUNCATE_TRIGGER = (
    f"CREATE TRIGGER {_TRUNCATE} BEFORE TRUNCATE ON users FOR EACH STATEMENT EXECUTE FUNCTION {_TRUNCATE}()"
)


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
        for statement in (
            _POSTGRESQL_FUNCTION,
            _POSTGRESQL_TRIGGER,
            _POSTGRESQL_TRUNCATE_FUNCTION,
            _POSTGRESQL_TRUNCATE_TRIGGER,
        ):
            op.execute(statement)
    else:
        op.execute(_SQLITE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name in (_TRIGGER, _TRUNCATE):
            op.execute(f"DROP TRIGGER {name} ON users")
            op.execute(f"DROP FUNCTION {name}()")
    else:
        op.execute(f"DROP TRIGGER {_TRIGGER}")
    op.drop_table("deleted_uids")
