"""Roles, and the guard that keeps at least one active admin."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from usermgr.contract import ADMIN_ROLE
from usermgr.errors import Conflict
from usermgr.models import Role, User, user_roles

if TYPE_CHECKING:
    pass
from usermgr.service.audit import audited
from usermgr.service.core import checked, resolve_many, writing
from usermgr.service.revocation import revoking_tokens_on_change


def validated_role(name: str) -> str:
    from usermgr.schemas import validate_role_name

    return checked(validate_role_name, name)


def named_role(db: Session, name: str) -> Role | None:
    return db.scalars(select(Role).where(Role.name == name)).first()


def ensured_role(db: Session, name: str) -> Role:
    """The role called `name`, created now if there is none yet."""
    role = named_role(db, name)
    if role is None:
        role = Role(name=name)
        db.add(role)
    return role


def has_role(name: str) -> Any:
    return exists(
        select(user_roles.c.user_id)
        .join(Role, Role.id == user_roles.c.role_id)
        .where(user_roles.c.user_id == User.id, Role.name == name)
    )


def _active_admin_count(db: Session) -> int:
    return db.scalar(select(func.count()).select_from(User).where(User.is_active.is_(True), has_role(ADMIN_ROLE))) or 0


@contextmanager
def keeping_an_admin(db: Session) -> Iterator[None]:
    """Refuse a change that takes the number of active admins from some to none.

    The admin role's row is locked first (FOR UPDATE on PostgreSQL; SQLite's write
    transaction already serialises), so two admins demoting each other at once cannot
    both succeed.
    """
    db.execute(select(Role.id).where(Role.name == ADMIN_ROLE).with_for_update())
    before = _active_admin_count(db)
    yield
    db.flush()
    if before and not _active_admin_count(db):
        raise Conflict("refused: this would remove the last active admin; grant admin to another user first")


def granted_role_names(roles: Sequence[str], admin: bool) -> list[str]:
    return sorted({validated_role(name) for name in roles} | ({ADMIN_ROLE} if admin else set()))


def grant_role(db: Session, refs: Sequence[str | None], role_name: str, origin: str = "argument") -> list[User]:
    name = validated_role(role_name)
    with writing(db):
        users = resolve_many(db, refs, origin)
        if users:  # a role comes into being with its first member
            role = ensured_role(db, name)
            with audited(db, users, "role.grant"):
                for user in users:
                    if role not in user.roles:
                        user.roles.append(role)
    return users


def revoke_role(db: Session, refs: Sequence[str | None], role_name: str, origin: str = "argument") -> list[User]:
    """Take a role away, ending the tokens that name it; a user without it is left as it is."""
    name = validated_role(role_name)
    with writing(db), keeping_an_admin(db):
        users = resolve_many(db, refs, origin)
        role = named_role(db, name)
        with audited(db, users, "role.revoke"), revoking_tokens_on_change(users):
            for user in users:
                if role is not None and role in user.roles:
                    user.roles.remove(role)
    return users
