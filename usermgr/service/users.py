"""Creating and changing users: unique and unmistakable emails, profile, password, activation, deletion."""

from __future__ import annotations

import re
from collections.abc import Container, Sequence
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from usermgr.config import Settings, parse_duration
from usermgr.database import utcnow
from usermgr.errors import Conflict, InvalidInput
from usermgr.models import User

if TYPE_CHECKING:
    from usermgr.schemas import UserCreate, UserUpdate
from usermgr.service.audit import audited, diff, event_for, record, record_events, state_of
from usermgr.service.core import checked, reading, resolve_many, storable, user_named, validated, writing
from usermgr.service.revocation import revoking_tokens_on_change
from usermgr.service.roles import ensured_role, granted_role_names, keeping_an_admin, validated_role


def _ensure_unique(db: Session, email: str | None, username: str | None, except_id: int | None = None) -> None:
    if email is not None:
        other = db.scalar(select(User.id).where(User.email == email))
        if other is not None and other != except_id:
            raise Conflict(f"a user with email {email!r} already exists")
        refuse_lookalike(db, email)
    if username is not None:
        other = db.scalar(select(User.id).where(User.username == username))
        if other is not None and other != except_id:
            raise Conflict(f"a user with username {username!r} already exists")


def refuse_lookalike(db: Session, email: str, line: int | None = None, pending: Container[str] = ()) -> None:
    """Refuse an email that reads as an existing user's (`аda@` with a Cyrillic а beside
    `ada@`): an admin or a mail reader could not tell the two accounts apart. `pending`:
    emails about to be written in the same transaction (an import's earlier rows), which
    count as existing."""
    from usermgr.schemas import latin_lookalike

    lookalike = latin_lookalike(email)
    if lookalike is not None and (
        lookalike in pending or db.scalar(select(User.id).where(User.email == lookalike)) is not None
    ):
        where = f"line {line}: " if line is not None else ""
        raise Conflict(
            f"{where}{email!r} looks like the existing user {lookalike!r} (letters from another script); "
            "use a different email"
        )


_DURATION_LIKE = re.compile(r"\s*[0-9]+\s*[smhd]?\s*", re.ASCII)
MAX_WHEN_LENGTH = 64  # far longer than any ISO 8601 time or duration


def expiry(text: str, *, what: str = "--expires", never: bool = True) -> datetime | None:
    """The UTC time a WHEN names: `never` (None, where `never` is allowed), a duration from
    now with its unit (`90d`, as --ttl takes them), or an ISO 8601 date (its start, in UTC)
    or date and time (in UTC unless it has an offset). A bare number is refused: it reads
    as seconds and as a date (20270131) alike."""
    from usermgr.schemas import utc_time

    shown = repr(text if len(text) <= 40 else text[:40] + "...")
    forms = "an ISO 8601 date or time (2027-01-31, 2027-01-31T17:00Z), a duration such as 90d"
    advice = f"use {forms}{', or never' if never else ''}"
    word = text.strip()
    if never and word == "never":
        return None
    if _DURATION_LIKE.fullmatch(word):
        if word.isdigit():
            raise InvalidInput(f"invalid {what} {shown}: give a unit (90d) or a date (2027-01-31)")
        return utcnow() + timedelta(seconds=parse_duration(word, what=what))
    if len(text) > MAX_WHEN_LENGTH or not storable(text):
        raise InvalidInput(f"invalid {what} {shown}: {advice}")
    try:
        return utc_time(word)
    except ValueError as error:
        raise InvalidInput(f"invalid {what} {shown}: {error}; {advice}") from None


def _check_ahead(expires_at: datetime | None) -> None:
    """A new account expires in the future: one that is expired at birth could never be
    used, so its time is a typo (2025 for 2027) far more often than a wish."""
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidInput(
            f"expiry {expires_at.isoformat()} is not in the future: a new account must expire later than now"
        )


def check_new_user(
    db: Session, data: UserCreate, *, roles: Sequence[str] = (), expires_at: datetime | None = None
) -> None:
    """Fail now if `create_user` would fail on these fields, so that a face can say so
    before it asks a person for a password. `create_user` checks again, in its transaction."""
    for name in roles:
        validated_role(name)
    _check_ahead(expires_at)
    with reading(db):
        _ensure_unique(db, data.email, data.username)


def create_user(
    db: Session,
    settings: Settings,
    data: UserCreate,
    *,
    roles: Sequence[str] = (),
    admin: bool = False,
    expires_at: datetime | None = None,
) -> User:
    """A new user. `expires_at` (None: never) must be in the future; the signup route never
    passes one, so that nobody sets their own account's expiry."""
    from usermgr import security

    role_names = granted_role_names(roles, admin)
    _check_ahead(expires_at)
    hashed = security.hash_password(data.password, settings.hash_profile) if data.password else None
    with writing(db):
        _ensure_unique(db, data.email, data.username)
        user = User(
            email=data.email,
            username=data.username,
            full_name=data.full_name,
            hashed_password=hashed,
            expires_at=expires_at,
        )
        user.roles = [ensured_role(db, name) for name in role_names]
        db.add(user)
        db.flush()
        record(db, "user.create", user, diff(None, state_of(user)))
    return user


def new_user(
    email: str, username: str | None = None, full_name: str | None = None, password: str | None = None
) -> UserCreate:
    """Validate the fields of a new user; InvalidInput with a one-line message if bad."""
    from usermgr.schemas import UserCreate

    return validated(UserCreate, email=email, username=username, full_name=full_name, password=password)


def user_changes(*, expires: str | None = None, **fields: Any) -> UserUpdate:
    """Validate the given fields (only those given are applied). A profile field given as
    None is not given; `expires_at` given as None clears the expiry. `expires` is a WHEN
    as `update --expires` takes it (see `expiry`; `never` clears the expiry).

    An expiry may be in the past: that ends the account's logins now, and says since when.
    Setting one does not revoke tokens: the holder check refuses them once it has passed."""
    from usermgr.schemas import UserUpdate

    given = {name: value for name, value in fields.items() if value is not None or name == "expires_at"}
    if expires is not None:
        given["expires_at"] = expiry(expires)
    return validated(UserUpdate, **given)


def update_user(db: Session, ref: str, changes: UserUpdate) -> User:
    if not changes.model_fields_set:
        raise InvalidInput("nothing to change: give a new email, username, full name or expiry")
    expiring = "expires_at" in changes.model_fields_set  # an expiry may end the last admin's logins
    with writing(db), keeping_an_admin(db) if expiring else nullcontext():
        user = user_named(db, ref, lock=True)
        values = changes.model_dump(include=changes.model_fields_set)
        _ensure_unique(db, values.get("email"), values.get("username"), except_id=user.id)
        with audited(db, [user], "user.update"), revoking_tokens_on_change([user]):
            for name, value in values.items():
                setattr(user, name, value)
        db.flush()
    return user


def set_password(db: Session, settings: Settings, ref: str, password: str) -> User:
    """A new password; every token issued before it stops working."""
    from usermgr import security
    from usermgr.schemas import validate_password

    hashed = security.hash_password(checked(validate_password, password), settings.hash_profile)
    with writing(db):
        user = user_named(db, ref, lock=True)
        with audited(db, [user], "user.password"), revoking_tokens_on_change([user]):
            user.hashed_password = hashed
    return user


def set_active(db: Session, refs: Sequence[str | None], active: bool, origin: str = "argument") -> list[User]:
    """Enable or disable users; disabling ends their tokens. A lock is left as it is."""
    with writing(db), keeping_an_admin(db):
        users = resolve_many(db, refs, origin)
        action = "user.enable" if active else "user.disable"
        with audited(db, users, action), revoking_tokens_on_change(users):
            for user in users:
                user.is_active = active
    return users


def unlock(db: Session, refs: Sequence[str | None], origin: str = "argument") -> list[User]:
    with writing(db):
        users = resolve_many(db, refs, origin)
        with audited(db, users, "user.unlock"):
            for user in users:
                user.failed_logins = 0
                user.locked_until = None
    return users


def delete_users(db: Session, refs: Sequence[str | None], origin: str = "argument") -> list[User]:
    with writing(db), keeping_an_admin(db):
        users = resolve_many(db, refs, origin)
        record_events(db, [event_for("user.delete", user, diff(state_of(user), None)) for user in users])
        for user in users:
            db.delete(user)
    return users
