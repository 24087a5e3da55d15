"""Roles, and the guard that keeps at least one active admin."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from usermgr.contract import ADMIN_ROLE, validate_role_name
from usermgr.database import utcnow
from usermgr.errors import Conflict
from usermgr.models import Role, User, user_roles
from usermgr.service.audit import audited
from usermgr.service.core import checked, resolve_many, unexpired, writing
from usermgr.service.revocation import revoking_tokens_on_change


def validated_role(name: str) -> str:
    return checked(validate_role_name, name)


def named_role(db: Session, name: str) -> Role | None:
    return db.scalars(select(Role).where(Role.name == name)).first()


def ensured_role(db: Session, name: str) -> Role:
    """The role called `name`, created now if there is none yet.

    The insert runs in a savepoint: when a concurrent transaction creates the same role
    first (PostgreSQL; SQLite's writers queue), the unique name refuses ours, and the
    winner's row, committed by then, is the role."""
    role = named_role(db, name)
    if role is not None:
        return role
    try:
        with db.begin_nested():
            role = Role(name=name)
            db.add(role)
    except IntegrityError:
        role = named_role(db, name)
        if role is None:
            raise
    return role


def has_role(name: str) -> Any:
    """Users with role `name`, found through the role index (roles -> user_roles(role_id) ->
    users by primary key): a role's few members at a million users cost what they cost at ten."""
    members = select(user_roles.c.user_id).join(Role).where(Role.name == name)
    return User.id.in_(members)


def _an_active_admin(db: Session) -> bool:
    """Whether some user who can log in holds the admin role: enabled and not expired (an
    expired admin counted, and the last admin who could log in was disabled beside them).
    Stops at the first one found."""
    can_log_in = (User.is_active.is_(True), unexpired(utcnow()))
    return bool(db.scalar(select(select(User.id).where(has_role(ADMIN_ROLE), *can_log_in).exists())))


def lock_admin_role(db: Session) -> None:
    """Lock the admin role's row until the transaction ends (FOR UPDATE on PostgreSQL), before
    any user's row: the last-admin rule's lock. A writer that links a user to the role takes it
    first too, since PostgreSQL then locks the role's row to keep the link's key; taken after
    the user's row, it would wait on a `disable` that holds the role and waits on that user."""
    db.execute(select(Role.id).where(Role.name == ADMIN_ROLE).with_for_update())


@contextmanager
def keeping_an_admin(db: Session) -> Iterator[None]:
    """Refuse a change that takes the number of active admins from some to none.

    Two existence checks through the role index, the second only when there was an admin
    to keep: no count, so the rule costs the same at ten users and at a million.
    The admin role's row is locked first (FOR UPDATE on PostgreSQL; SQLite's write
    transaction already serialises), so two admins demoting each other at once cannot
    both succeed.
    """
    lock_admin_role(db)
    before = _an_active_admin(db)
    yield
    db.flush()
    if before and not _an_active_admin(db):
        raise Conflict("refused: this would remove the last active admin; grant admin to another user first")


def granted_role_names(roles: Sequence[str], admin: bool) -> list[str]:
    return sorted({validated_role(name) for name in roles} | ({ADMIN_ROLE} if admin else set()))


def grant_role(db: Session, refs: Sequence[str | None], role_name: str, origin: str = "argument") -> list[User]:
    name = validated_role(role_name)
    with writing(db):
        if name == ADMIN_ROLE:
            lock_admin_role(db)
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
