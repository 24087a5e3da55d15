"""Account expiry: `users.expires_at`, a UTC time after which the account cannot log in.

Nullable (no expiry) for every existing user, and indexed: `list --expired` and
`list --expires-before T` are range scans on it, on a million users too.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from usermgr.database import UtcDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("expires_at", UtcDateTime(), nullable=True))
    op.create_index("ix_users_expires_at", "users", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_users_expires_at", table_name="users")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("expires_at")
