"""The users table and its roles, as SQLAlchemy 2 typed ORM models."""

from __future__ import annotations

import os
import uuid
from datetime import datetime

from sqlalchemy import Column, ForeignKey, Index, Integer, String, Table, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from usermgr.contract import ADMIN_ROLE, UID_LENGTH
from usermgr.database import Base, StrictBoolean, UtcDateTime, utcnow

ADDRESS_LENGTH = 64  # an audit event's client address: any IPv6 address's text, with room to spare


def new_uid() -> str:
    """A user's stable identity: a random UUID, never reused, kept by export and import."""
    return str(uuid.uuid4())


def new_uids(count: int) -> list[str]:
    """`count` of new_uid's random version-4 UUIDs, from one os.urandom call (uuid4's source,
    16 bytes each) with the version and variant bits set as uuid4 sets them: a bulk import's
    uids at a third of uuid4's cost a UUID (no UUID object, no call for each)."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = bytes(byte & 0x0F | 0x40 for byte in raw[6::16])  # version 4
    raw[8::16] = bytes(byte & 0x3F | 0x80 for byte in raw[8::16])  # variant RFC 4122
    hexed = raw.hex()
    return [
        f"{hexed[at : at + 8]}-{hexed[at + 8 : at + 12]}-{hexed[at + 12 : at + 16]}-{hexed[at + 16 : at + 20]}-"
        f"{hexed[at + 20 : at + 32]}"
        for at in range(0, 32 * count, 32)
    ]


user_roles = Table(
    "user_roles",
    Base.metadata,
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("role_id", Integer, ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True, index=True),
)


class Role(Base):
    __tablename__ = "roles"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)


class User(Base):
    __tablename__ = "users"
    # AUTOINCREMENT: SQLite never hands a deleted user's id to the next one.
    __table_args__ = (UniqueConstraint("uid", name="uq_users_uid"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = mapped_column(String(UID_LENGTH), default=new_uid)
    email: Mapped[str] = mapped_column(String(320), unique=True)  # always stored lowercased
    username: Mapped[str | None] = mapped_column(String(150), unique=True)
    full_name: Mapped[str | None] = mapped_column(String(300))
    hashed_password: Mapped[str | None] = mapped_column(String(512))
    is_active: Mapped[bool] = mapped_column(StrictBoolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    failed_logins: Mapped[int] = mapped_column(default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)  # None: never expires
    token_version: Mapped[int] = mapped_column(default=0)

    roles: Mapped[list[Role]] = relationship(secondary=user_roles, lazy="selectin", order_by=Role.name)

    @property
    def role_names(self) -> list[str]:
        return sorted(role.name for role in self.roles)

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.role_names


class DeletedUid(Base):
    """A deleted user's uid, kept so that it is never given again: a token names its holder
    by uid (`sub`), so the uid handed to someone else, or back to the person deleted, would
    let a token issued before the delete pass again. Written by a trigger on `users` (migration
    0006), so a row deleted by anything sharing the table counts; `import`, the one way a uid
    is given from outside, refuses these (service/bulk.py)."""

    __tablename__ = "deleted_uids"

    uid: Mapped[str] = mapped_column(String(UID_LENGTH), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AuditEvent(Base):
    """One entry of the audit trail: who did what to whom, when, and the hash that chains it
    to the entry before it (service/audit.py). Never holds a password, a hash or a token."""

    __tablename__ = "audit_events"
    # AUTOINCREMENT: a pruned event's id is never handed out again. `on_behalf_of` is indexed
    # only where it is set (most events have none): `--actor A` looks it up as `= A`, which the
    # partial index answers, and an import does not pay an index entry per row for NULLs.
    # The migrations create the schema (0005 made this index partial); the condition is held
    # in `info`, not as `postgresql_where=`, because naming a dialect's option loads that
    # dialect: SQLAlchemy's PostgreSQL support, ~40 ms, in every start-up on SQLite.
    # tests/test_migrations.py checks that each backend's index has this very condition.
    __table_args__ = (
        Index("ix_audit_events_on_behalf_of", "on_behalf_of", info={"where": "on_behalf_of IS NOT NULL"}),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(400), index=True)  # "os:alice@host", "uid:<uuid>", "anonymous"
    on_behalf_of: Mapped[str | None] = mapped_column(String(400))  # USERMGR_ACTOR, beside the actor
    client_address: Mapped[str | None] = mapped_column(String(ADDRESS_LENGTH))  # the API caller, as the server saw it
    action: Mapped[str] = mapped_column(String(32), index=True)
    target_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH), index=True)
    # The email at the time; not indexed: each index costs every import row, and only a
    # deleted user is looked up by it (their uid is the indexed way).
    target_email: Mapped[str | None] = mapped_column(String(320))
    changes: Mapped[str] = mapped_column(Text)  # canonical JSON text: the hash covers these very bytes
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
