"""Which changes end a user's tokens: one rule for the commands, import and the API."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from usermgr.models import User

if TYPE_CHECKING:
    pass
from usermgr.service.audit import audited
from usermgr.service.core import resolve_many, writing


@dataclass(frozen=True)
class Access:
    """What a user's tokens vouch for: who they are, how they prove it, and what they may do."""

    email: str
    hashed_password: str | None
    is_active: bool
    roles: frozenset[str]


def access_of(user: User) -> Access:
    return Access(
        email=user.email,
        hashed_password=user.hashed_password,
        is_active=user.is_active,
        roles=frozenset(user.role_names),
    )


def revokes_tokens(before: Access, after: Access) -> bool:
    """The one rule for every path (commands, import, the API): a user's earlier tokens end
    when their password is set, when they are disabled, when they lose a role (a token
    names its roles) or when their email changes (a token names its email). Enabling
    again, gaining a role or other profile changes revoke nothing; a revoked token never
    comes back."""
    return (
        after.hashed_password != before.hashed_password
        or (before.is_active and not after.is_active)
        or bool(before.roles - after.roles)
        or after.email != before.email
    )


@contextmanager
def revoking_tokens_on_change(users: Sequence[User]) -> Iterator[None]:
    """Apply `revokes_tokens` to the changes made to `users` inside the block."""
    before = {user.id: access_of(user) for user in users}
    yield
    for user in users:
        if revokes_tokens(before[user.id], access_of(user)):
            user.token_version += 1


def revoke_tokens(db: Session, refs: Sequence[str | None], origin: str = "argument") -> list[User]:
    """End every token issued to these users so far."""
    with writing(db):
        users = resolve_many(db, refs, origin)
        with audited(db, users, "tokens.revoke"):
            for user in users:
                user.token_version += 1
    return users
