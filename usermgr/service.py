"""The rules. Every operation is one transaction; every failure is a domain error.

Both faces (cli.py, api.py) call these functions and add no rule of their own.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from usermgr import security, tokens
from usermgr.config import Settings
from usermgr.database import WRITE, utcnow
from usermgr.errors import AuthenticationFailed, Conflict, Forbidden, InvalidInput, NotFound, TokenInvalid
from usermgr.models import ADMIN_ROLE, Role, User, user_roles
from usermgr.schemas import UserCreate, UserUpdate, first_error, validate_password, validate_role_name

RECORD_FIELDS = ("id", "email", "username", "full_name", "is_active", "roles", "created_at", "last_login_at")
_LOOKUP_CHUNK = 500
_STREAM_CHUNK = 2000


# ---- transactions -------------------------------------------------------------------


@contextmanager
def _writing(db: Session) -> Iterator[None]:
    """One write transaction; a unique-constraint race surfaces as a Conflict."""
    try:
        with db.begin():
            db.connection(execution_options=WRITE)
            yield
    except IntegrityError as error:
        raise Conflict(f"already exists: {_constraint_hint(error)}") from None


@contextmanager
def _reading(db: Session) -> Iterator[None]:
    with db.begin():
        yield


def _constraint_hint(error: IntegrityError) -> str:
    text = str(error.orig).lower()
    if "email" in text:
        return "a user with that email"
    if "username" in text:
        return "a user with that username"
    return "a row with those values"


def _validated(model: type, **fields: Any) -> Any:
    try:
        return model(**fields)
    except ValidationError as error:
        raise InvalidInput(first_error(error)) from None


# ---- records: what the faces render -------------------------------------------------


def user_record(user: User) -> dict[str, Any]:
    """A user as the contract's output fields; never the hash."""
    return {
        "id": user.id,
        "email": user.email,
        "username": user.username,
        "full_name": user.full_name,
        "is_active": user.is_active,
        "roles": user.role_names,
        "created_at": user.created_at,
        "last_login_at": user.last_login_at,
    }


# ---- finding users --------------------------------------------------------------------


def _lookup_clause(ref: str) -> Any:
    ref = ref.strip()
    if ref.isdigit():
        return User.id == int(ref)
    return User.email == ref.lower()


def _find(db: Session, ref: str) -> User | None:
    return db.scalars(select(User).where(_lookup_clause(ref))).first()


def _get(db: Session, ref: str) -> User:
    user = _find(db, ref)
    if user is None:
        raise NotFound(f"no user matches {ref.strip()!r}: give an email or a numeric id")
    return user


def _resolve_many(db: Session, refs: Sequence[str], origin: str) -> list[User]:
    """The users named by `refs` (emails or ids), in order and without repeats.

    An unknown one is a NotFound naming its position (`line 3` of standard input).
    """
    if not refs:
        raise InvalidInput("no user given: name at least one, or `-` to read them from standard input")
    cleaned = [ref.strip() for ref in refs]
    by_id: dict[int, User] = {}
    by_email: dict[str, User] = {}
    ids = [int(ref) for ref in cleaned if ref.isdigit()]
    emails = [ref.lower() for ref in cleaned if ref and not ref.isdigit()]
    for start in range(0, len(ids), _LOOKUP_CHUNK):
        for user in db.scalars(select(User).where(User.id.in_(ids[start : start + _LOOKUP_CHUNK]))):
            by_id[user.id] = user
    for start in range(0, len(emails), _LOOKUP_CHUNK):
        for user in db.scalars(select(User).where(User.email.in_(emails[start : start + _LOOKUP_CHUNK]))):
            by_email[user.email] = user
    found: dict[int, User] = {}
    for position, ref in enumerate(cleaned, start=1):
        user = by_id.get(int(ref)) if ref.isdigit() else by_email.get(ref.lower())
        if user is None:
            raise NotFound(f"no user matches {ref!r} ({origin} {position}); nothing was changed")
        found.setdefault(user.id, user)
    return list(found.values())


def get_user(db: Session, ref: str) -> User:
    with _reading(db):
        return _get(db, ref)


@dataclass(frozen=True)
class UserFilter:
    role: str | None = None
    admin: bool = False
    active: bool | None = None
    search: str | None = None
    limit: int | None = None
    offset: int = 0


def _has_role(name: str) -> Any:
    return exists(
        select(user_roles.c.user_id)
        .join(Role, Role.id == user_roles.c.role_id)
        .where(user_roles.c.user_id == User.id, Role.name == name)
    )


def _roles_column() -> Any:
    return (
        select(func.aggregate_strings(Role.name, ","))
        .select_from(user_roles.join(Role, Role.id == user_roles.c.role_id))
        .where(user_roles.c.user_id == User.id)
        .scalar_subquery()
        .label("roles")
    )


def _filtered(statement: Any, filters: UserFilter) -> Any:
    if filters.role is not None:
        statement = statement.where(_has_role(filters.role))
    if filters.admin:
        statement = statement.where(_has_role(ADMIN_ROLE))
    if filters.active is not None:
        statement = statement.where(User.is_active.is_(filters.active))
    if filters.search:
        text = filters.search
        statement = statement.where(
            or_(
                User.email.icontains(text, autoescape=True),
                User.username.icontains(text, autoescape=True),
                User.full_name.icontains(text, autoescape=True),
            )
        )
    if filters.offset:
        statement = statement.offset(filters.offset)
    if filters.limit is not None:
        statement = statement.limit(filters.limit)
    return statement


def iter_user_records(db: Session, filters: UserFilter = UserFilter(), *, with_hashes: bool = False) -> Iterator[dict[str, Any]]:
    """Users oldest first (in the order they were added), streamed with Core rows."""
    if filters.limit is not None and filters.limit < 0 or filters.offset < 0:
        raise InvalidInput("--limit and --offset must not be negative")
    if filters.role is not None:
        _validated_role(filters.role)
    columns = [User.id, User.email, User.username, User.full_name, User.is_active, _roles_column(), User.created_at, User.last_login_at]
    if with_hashes:
        columns.append(User.hashed_password)
    statement = _filtered(select(*columns).order_by(User.id), filters)
    with _reading(db):
        for row in db.execute(statement.execution_options(yield_per=_STREAM_CHUNK)):
            record = row._asdict()
            record["roles"] = sorted(record["roles"].split(",")) if record["roles"] else []
            yield record


# ---- roles and the last admin --------------------------------------------------------


def _validated_role(name: str) -> str:
    try:
        return validate_role_name(name)
    except ValueError as error:
        raise InvalidInput(str(error)) from None


def _role(db: Session, name: str, *, create: bool) -> Role | None:
    role = db.scalars(select(Role).where(Role.name == name)).first()
    if role is None and create:
        role = Role(name=name)
        db.add(role)
    return role


def _active_admin_count(db: Session) -> int:
    return db.scalar(select(func.count()).select_from(User).where(User.is_active.is_(True), _has_role(ADMIN_ROLE))) or 0


@contextmanager
def _keeping_an_admin(db: Session) -> Iterator[None]:
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


# ---- creating and changing users ------------------------------------------------------


def _ensure_unique(db: Session, email: str | None, username: str | None, except_id: int | None = None) -> None:
    if email is not None:
        other = db.scalar(select(User.id).where(User.email == email))
        if other is not None and other != except_id:
            raise Conflict(f"a user with email {email!r} already exists")
    if username is not None:
        other = db.scalar(select(User.id).where(User.username == username))
        if other is not None and other != except_id:
            raise Conflict(f"a user with username {username!r} already exists")


def create_user(
    db: Session, settings: Settings, data: UserCreate, *, roles: Sequence[str] = (), admin: bool = False
) -> User:
    role_names = sorted({_validated_role(name) for name in roles} | ({ADMIN_ROLE} if admin else set()))
    hashed = security.hash_password(data.password, settings.hash_profile) if data.password else None
    with _writing(db):
        _ensure_unique(db, data.email, data.username)
        user = User(email=data.email, username=data.username, full_name=data.full_name, hashed_password=hashed)
        user.roles = [_role(db, name, create=True) for name in role_names]
        db.add(user)
        db.flush()
    return user


def new_user(email: str, username: str | None = None, full_name: str | None = None, password: str | None = None) -> UserCreate:
    """Validate the fields of a new user; InvalidInput with a one-line message if bad."""
    return _validated(UserCreate, email=email, username=username, full_name=full_name, password=password)


def user_changes(**fields: Any) -> UserUpdate:
    """Validate the given profile fields (only those given are applied)."""
    return _validated(UserUpdate, **{name: value for name, value in fields.items() if value is not None})


def update_user(db: Session, ref: str, changes: UserUpdate) -> User:
    if not changes.model_fields_set:
        raise InvalidInput("nothing to change: give --email, --username or --full-name")
    with _writing(db):
        user = _get(db, ref)
        values = changes.model_dump(include=changes.model_fields_set)
        _ensure_unique(db, values.get("email"), values.get("username"), except_id=user.id)
        for name, value in values.items():
            setattr(user, name, value)
        db.flush()
    return user


def checked_password(password: str) -> str:
    try:
        return validate_password(password)
    except ValueError as error:
        raise InvalidInput(str(error)) from None


def set_password(db: Session, settings: Settings, ref: str, password: str) -> User:
    """A new password; every token issued before it stops working."""
    hashed = security.hash_password(checked_password(password), settings.hash_profile)
    with _writing(db):
        user = _get(db, ref)
        user.hashed_password = hashed
        user.token_version += 1
    return user


def set_active(db: Session, refs: Sequence[str], active: bool, origin: str = "argument") -> list[User]:
    """Enable or disable users; disabling ends their tokens. A lock is left as it is."""
    with _writing(db), _keeping_an_admin(db):
        users = _resolve_many(db, refs, origin)
        for user in users:
            if user.is_active != active:
                user.is_active = active
                if not active:
                    user.token_version += 1
    return users


def unlock(db: Session, refs: Sequence[str], origin: str = "argument") -> list[User]:
    with _writing(db):
        users = _resolve_many(db, refs, origin)
        for user in users:
            user.failed_logins = 0
            user.locked_until = None
    return users


def delete_users(db: Session, refs: Sequence[str], origin: str = "argument") -> list[User]:
    with _writing(db), _keeping_an_admin(db):
        users = _resolve_many(db, refs, origin)
        for user in users:
            db.delete(user)
    return users


def grant_role(db: Session, refs: Sequence[str], role_name: str, origin: str = "argument") -> list[User]:
    name = _validated_role(role_name)
    with _writing(db):
        users = _resolve_many(db, refs, origin)
        role = _role(db, name, create=True)
        for user in users:
            if role not in user.roles:
                user.roles.append(role)
    return users


def revoke_role(db: Session, refs: Sequence[str], role_name: str, origin: str = "argument") -> list[User]:
    """Take a role away; a user without it is left as it is."""
    name = _validated_role(role_name)
    with _writing(db), _keeping_an_admin(db):
        users = _resolve_many(db, refs, origin)
        role = _role(db, name, create=False)
        for user in users:
            if role is not None and role in user.roles:
                user.roles.remove(role)
    return users


def list_roles(db: Session) -> list[dict[str, Any]]:
    """Every role with its member count, by name."""
    members = func.count(user_roles.c.user_id)
    statement = (
        select(Role.name, members.label("members"))
        .outerjoin(user_roles, user_roles.c.role_id == Role.id)
        .group_by(Role.id, Role.name)
        .order_by(Role.name)
    )
    with _reading(db):
        return [row._asdict() for row in db.execute(statement)]


# ---- logins and tokens ------------------------------------------------------------------


def _is_locked(user: User, now: datetime) -> bool:
    return user.locked_until is not None and user.locked_until > now


def authenticate(db: Session, settings: Settings, ref: str, password: str) -> User:
    """The user if the password is right and the account may log in; else one error for all.

    The password is checked outside any transaction (it is slow by design); an unknown
    user is checked against a dummy hash so that it costs the same time.
    """
    with _reading(db):
        user = _find(db, ref) if ref.strip() else None
    candidate = checked_login_password(password)
    if user is None:
        security.verify_dummy(candidate, settings.hash_profile)
        raise AuthenticationFailed()
    ok, new_hash = security.verify_password(candidate, user.hashed_password, settings.hash_profile)
    now = utcnow()
    if not ok:
        _count_failure(db, settings, user.id, now)
        raise AuthenticationFailed()
    if not user.is_active or _is_locked(user, now):
        raise AuthenticationFailed()
    with _writing(db):
        user = _get(db, str(user.id))
        user.failed_logins = 0
        user.locked_until = None
        user.last_login_at = now
        if new_hash is not None:
            user.hashed_password = new_hash
    return user


def checked_login_password(password: str) -> str:
    """The login password as it was hashed: NFKC-normalised, but no policy enforced
    (an imported hash may predate the policy)."""
    return unicodedata.normalize("NFKC", password)


def _count_failure(db: Session, settings: Settings, user_id: int, now: datetime) -> None:
    """Count a failed login atomically; at the threshold, lock the account for a period."""
    if not settings.lockout_threshold:
        return
    with _writing(db):
        failures = db.scalar(
            update(User)
            .where(User.id == user_id)
            .values(failed_logins=User.failed_logins + 1)
            .returning(User.failed_logins)
        )
        if failures is not None and failures >= settings.lockout_threshold:
            db.execute(
                update(User)
                .where(User.id == user_id)
                .values(failed_logins=0, locked_until=now + timedelta(seconds=settings.lockout_period))
            )


def login(db: Session, settings: Settings, ref: str, password: str, ttl: int | None = None) -> str:
    """Authenticate and mint an access token."""
    lifetime = settings.token_ttl if ttl is None else ttl
    if lifetime > settings.token_max_ttl:
        raise InvalidInput(f"token lifetime {lifetime}s is above the maximum of {settings.token_max_ttl}s (USERMGR_TOKEN_MAX_TTL)")
    user = authenticate(db, settings, ref, password)
    return tokens.issue_token(
        settings, user_id=user.id, email=user.email, roles=user.role_names, token_version=user.token_version, ttl=lifetime
    )


def revoke_tokens(db: Session, refs: Sequence[str], origin: str = "argument") -> list[User]:
    """End every token issued to these users so far."""
    with _writing(db):
        users = _resolve_many(db, refs, origin)
        for user in users:
            user.token_version += 1
    return users


def check_token_holder(db: Session, claims: dict[str, Any], required_role: str | None = None) -> User:
    """The token's user, if it still exists, is enabled, is not locked, has not revoked
    the token and (when asked) still holds the role."""
    subject = str(claims.get("sub", ""))
    with _reading(db):
        user = db.get(User, int(subject)) if subject.isdigit() else None
    if user is None:
        raise TokenInvalid("token invalid: the user no longer exists")
    if not user.is_active:
        raise TokenInvalid("token invalid: the user is disabled")
    if _is_locked(user, utcnow()):
        raise TokenInvalid("token invalid: the user is locked")
    if claims.get(tokens.VERSION_CLAIM, 0) != user.token_version:
        raise TokenInvalid("token invalid: revoked")
    if required_role is not None and required_role not in user.role_names:
        raise Forbidden(f"forbidden: the user does not have the role {required_role!r}")
    return user
