"""A stable identity for every user: `users.uid`, and ids that SQLite never reuses.

Every existing user gets a random UUID (version 4) in `uid`, made by the database itself
so that a million users take one statement. On SQLite the users table is rebuilt with
AUTOINCREMENT (PostgreSQL's sequences never reuse a value); its rows, ids and role links
are kept. Tokens issued before this revision carry the numeric id as `sub`: `--check-db`
and the API refuse them, so their holders log in again.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# RFC 4122 version 4 from SQLite's randomblob(): 8-4-4-4-12 hex digits, the version nibble
# 4 and the variant nibble one of 8, 9, a, b.
_SQLITE_UUID4 = (
    "lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4' || "
    "substr(lower(hex(randomblob(2))), 2) || '-' || substr('89ab', 1 + (abs(random()) % 4), 1) || "
    "substr(lower(hex(randomblob(2))), 2) || '-' || lower(hex(randomblob(6)))"
)
_POSTGRESQL_UUID4 = "gen_random_uuid()::text"  # built in since PostgreSQL 13


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.add_column("users", sa.Column("uid", sa.String(36), nullable=True))
    op.execute(f"UPDATE users SET uid = {_SQLITE_UUID4 if sqlite else _POSTGRESQL_UUID4}")
    # SQLite: the rebuild runs with foreign keys off (migrations/env.py), so dropping the
    # old table does not cascade to user_roles.
    with op.batch_alter_table(
        "users", recreate="always" if sqlite else "auto", table_kwargs={"sqlite_autoincrement": True}
    ) as batch:
        batch.alter_column("uid", existing_type=sa.String(36), nullable=False)
        batch.create_unique_constraint("uq_users_uid", ["uid"])


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint("uq_users_uid", type_="unique")
        batch.drop_column("uid")
