"""The audit trail: `audit_events`, one hash-chained row per change, login and prune.

Indexes on the columns `usermgr audit` and `GET /audit` filter by (the time, the actor and
on-behalf-of, the action, the target's uid), so that reading stays fast on a million events.

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from usermgr.database import UtcDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_INDEXED = ("occurred_at", "actor", "on_behalf_of", "action", "target_uid")


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("occurred_at", UtcDateTime(), nullable=False),
        sa.Column("actor", sa.String(400), nullable=False),
        sa.Column("on_behalf_of", sa.String(400), nullable=True),
        sa.Column("client_address", sa.String(64), nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target_uid", sa.String(36), nullable=True),
        sa.Column("target_email", sa.String(320), nullable=True),
        sa.Column("changes", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sqlite_autoincrement=True,
    )
    for column in _INDEXED:
        op.create_index(f"ix_audit_events_{column}", "audit_events", [column])


def downgrade() -> None:
    op.drop_table("audit_events")
