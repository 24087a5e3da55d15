"""Audit events: index `on_behalf_of` only where it is set (a partial index).

Most events have no USERMGR_ACTOR (every API event, every CLI run that acts for no one), yet
the full index took an entry for each: an import of 100,000 rows paid for 100,000 NULLs that no
filter ever looks up. `--actor A` matches `actor = A OR on_behalf_of = A`, and `on_behalf_of = A`
implies `on_behalf_of IS NOT NULL`, so SQLite and PostgreSQL still answer it from this index.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_NAME = "ix_audit_events_on_behalf_of"
_SET = sa.text("on_behalf_of IS NOT NULL")


def upgrade() -> None:
    op.drop_index(_NAME, table_name="audit_events")
    op.create_index(_NAME, "audit_events", ["on_behalf_of"], sqlite_where=_SET, postgresql_where=_SET)


def downgrade() -> None:
    op.drop_index(_NAME, table_name="audit_events")
    op.create_index(_NAME, "audit_events", ["on_behalf_of"])
