"""The rules. Every operation is one transaction; every failure is a domain error.

Both faces (cli.py, api.py) call these functions and add no rule of their own.
"""

from __future__ import annotations

import marshal
import os
import re
import tempfile
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import bindparam, case, delete, exists, func, insert, null, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from usermgr.config import Settings
from usermgr.contract import ADMIN_ROLE, USER_FIELDS
from usermgr.database import WRITE, UtcDateTime, utcnow
from usermgr.errors import AuthenticationFailed, Conflict, Forbidden, InvalidInput, NotFound, TokenInvalid
from usermgr.models import UID_LENGTH, Role, User, new_uid, user_roles

if TYPE_CHECKING:
    from usermgr.schemas import ImportRow, UserCreate, UserUpdate

# security, tokens and schemas (passlib, PyJWT, pydantic) are imported inside the functions
# that use them: `usermgr show` and `usermgr list` never pay for loading them.

_LOOKUP_CHUNK = 500
_STREAM_CHUNK = 2000
MAX_USER_ID = 2**31 - 1  # users.id is INTEGER: 32 bits on PostgreSQL
MAX_ROW_COUNT = 2**63 - 1  # the largest LIMIT and OFFSET that SQLite and PostgreSQL take


# ---- transactions -------------------------------------------------------------------


@contextmanager
def _writing(db: Session, *, dry_run: bool = False) -> Iterator[None]:
    """One write transaction, rolled back instead of committed for a dry run; a
    unique-constraint race surfaces as a Conflict."""
    try:
        with db.begin() as transaction:
            db.connection(execution_options=WRITE)
            yield
            if dry_run:
                transaction.rollback()
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
    if "uid" in text:
        return "a user with that uid"
    return "a row with those values"


def _validated(model: type, **fields: Any) -> Any:
    from pydantic import ValidationError

    from usermgr.schemas import first_error

    try:
        return model(**fields)
    except ValidationError as error:
        raise InvalidInput(first_error(error)) from None


# ---- records: what the faces render -------------------------------------------------


def user_record(user: User) -> dict[str, Any]:
    """A user as the contract's output fields (contract.USER_FIELDS); never the hash."""
    return {name: user.role_names if name == "roles" else getattr(user, name) for name in USER_FIELDS}


# ---- finding users --------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    """What a USER names: a value of one of the users table's unique columns."""

    column: str  # "id", "email" or "username"
    value: int | str


MAX_REF_LENGTH = 2048  # longer than any email, username or id can be written
_SIMPLE_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")
"""An ASCII email whose write-time normalisation is lowercasing it: checked without
loading email-validator (pydantic), so that `usermgr show ada@example.com` starts fast."""


def _key_of(ref: str) -> _Key | None:
    """What a USER names: all digits an id, text with `@` an email, anything else a
    username; each normalised exactly as on write (NFKC, and an email as `create` stores
    it). None for text that can name nobody (no user's id, email or username is like it)."""
    if len(ref) > MAX_REF_LENGTH or not _storable(ref):
        return None
    text = unicodedata.normalize("NFKC", ref).strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        user_id = int(text)
        return _Key("id", user_id) if user_id <= MAX_USER_ID else None  # beyond the column: nobody
    if "@" in text:
        simple = _SIMPLE_EMAIL.fullmatch(text) and "xn--" not in text.lower()  # punycode is stored decoded
        email = text.lower() if simple else _normalized_email(ref)
        return None if email is None else _Key("email", email)
    return _Key("username", text)


def _storable(text: str) -> bool:
    """False for text no database column can hold: a NUL (PostgreSQL refuses it) or a lone
    surrogate (what Python makes of bytes that are not UTF-8)."""
    return "\x00" not in text and not any("\ud800" <= char <= "\udfff" for char in text)


def _normalized_email(text: str) -> str | None:
    from usermgr.schemas import normalize_email

    return normalize_email(text)


def _column(key: _Key) -> Any:
    return getattr(User, key.column)


def _find(db: Session, ref: str, *, email_only: bool = False) -> User | None:
    """The user `ref` names; with `email_only`, only when it names them by email."""
    key = _key_of(ref)
    if key is None or (email_only and key.column != "email"):
        return None
    return db.scalars(select(User).where(_column(key) == key.value)).first()


def _get(db: Session, ref: str) -> User:
    user = _find(db, ref)
    if user is None:
        raise NotFound(f"no user matches {ref.strip()!r}: give an email, a username or a numeric id")
    return user


def _resolve_many(db: Session, refs: Sequence[str | None], origin: str) -> list[User]:
    """The users named by `refs` (emails, usernames or ids), in order and without repeats.

    An unknown one is a NotFound naming its position (`line 3` of standard input). A None
    ref (a blank line of input) names no one, and no ref at all changes nothing: an empty
    pipeline is not an error.
    """
    keys = [None if ref is None else _key_of(ref) for ref in refs]
    wanted: dict[str, list[Any]] = {}
    for key in keys:
        if key is not None:
            wanted.setdefault(key.column, []).append(key.value)
    found_by: dict[_Key, User] = {}
    for column, values in wanted.items():
        for start in range(0, len(values), _LOOKUP_CHUNK):
            chunk = values[start : start + _LOOKUP_CHUNK]
            for user in db.scalars(select(User).where(getattr(User, column).in_(chunk))):
                found_by[_Key(column, getattr(user, column))] = user
    found: dict[int, User] = {}
    for position, (ref, key) in enumerate(zip(refs, keys, strict=True), start=1):
        if ref is None:
            continue  # a blank line of input: no one, and an empty argument is still a mistake
        user = found_by.get(key) if key is not None else None
        if user is None:
            raise NotFound(f"no user matches {ref.strip()!r} ({origin} {position}); nothing was changed")
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
    locked: bool = False
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
    if filters.locked:
        statement = statement.where(User.locked_until > utcnow())
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


MAX_SEARCH_LENGTH = max(User.email.type.length, User.username.type.length, User.full_name.type.length)
"""Longer text is in no field, so a search for it is a mistake (and too long for SQLite's LIKE)."""


def _check_search(text: str) -> None:
    if len(text) > MAX_SEARCH_LENGTH:
        raise InvalidInput(f"search text too long: use at most {MAX_SEARCH_LENGTH} characters")
    if not _storable(text):
        raise InvalidInput("search text must not contain a NUL character or bytes that are not UTF-8")


def iter_user_records(
    db: Session, filters: UserFilter = UserFilter(), *, with_hashes: bool = False
) -> Iterator[dict[str, Any]]:
    """Users oldest first (in the order they were added), streamed with Core rows."""
    if (filters.limit is not None and filters.limit < 0) or filters.offset < 0:
        raise InvalidInput("limit and offset must not be negative")
    if filters.role is not None:
        _validated_role(filters.role)
    if filters.search is not None:
        _check_search(filters.search)
    if filters.offset > MAX_ROW_COUNT or (filters.limit or 0) > MAX_ROW_COUNT:
        raise InvalidInput(f"limit and offset must be at most {MAX_ROW_COUNT}")
    columns = [_roles_column() if name == "roles" else getattr(User, name) for name in USER_FIELDS]
    if with_hashes:
        columns.append(User.hashed_password)
    statement = _filtered(select(*columns).order_by(User.id), filters)
    names = [column.key for column in columns]
    roles_at = names.index("roles")
    with _reading(db):
        for row in db.execute(statement.execution_options(yield_per=_STREAM_CHUNK)):
            values = list(row)
            values[roles_at] = sorted(values[roles_at].split(",")) if values[roles_at] else []
            yield dict(zip(names, values, strict=True))


# ---- roles and the last admin --------------------------------------------------------


def _checked(validate: Callable[[str], str], value: str) -> str:
    """A schemas.py validator's result, its ValueError turned into InvalidInput."""
    try:
        return validate(value)
    except ValueError as error:
        raise InvalidInput(str(error)) from None


def _validated_role(name: str) -> str:
    from usermgr.schemas import validate_role_name

    return _checked(validate_role_name, name)


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


# ---- which changes end a user's tokens ------------------------------------------------


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
def _revoking_tokens_on_change(users: Sequence[User]) -> Iterator[None]:
    """Apply `revokes_tokens` to the changes made to `users` inside the block."""
    before = {user.id: access_of(user) for user in users}
    yield
    for user in users:
        if revokes_tokens(before[user.id], access_of(user)):
            user.token_version += 1


# ---- creating and changing users ------------------------------------------------------


def _ensure_unique(db: Session, email: str | None, username: str | None, except_id: int | None = None) -> None:
    if email is not None:
        other = db.scalar(select(User.id).where(User.email == email))
        if other is not None and other != except_id:
            raise Conflict(f"a user with email {email!r} already exists")
        _refuse_lookalike(db, email)
    if username is not None:
        other = db.scalar(select(User.id).where(User.username == username))
        if other is not None and other != except_id:
            raise Conflict(f"a user with username {username!r} already exists")


def _refuse_lookalike(db: Session, email: str, line: int | None = None) -> None:
    """Refuse an email that reads as an existing user's (`аda@` with a Cyrillic а beside
    `ada@`): an admin or a mail reader could not tell the two accounts apart."""
    from usermgr.schemas import latin_lookalike

    lookalike = latin_lookalike(email)
    if lookalike is not None and db.scalar(select(User.id).where(User.email == lookalike)) is not None:
        where = f"line {line}: " if line is not None else ""
        raise Conflict(
            f"{where}{email!r} looks like the existing user {lookalike!r} (letters from another script); "
            "use a different email"
        )


def _role_names(roles: Sequence[str], admin: bool) -> list[str]:
    return sorted({_validated_role(name) for name in roles} | ({ADMIN_ROLE} if admin else set()))


def check_new_user(db: Session, data: UserCreate, *, roles: Sequence[str] = ()) -> None:
    """Fail now if `create_user` would fail on these fields, so that a face can say so
    before it asks a person for a password. `create_user` checks again, in its transaction."""
    _role_names(roles, admin=False)
    with _reading(db):
        _ensure_unique(db, data.email, data.username)


def create_user(
    db: Session, settings: Settings, data: UserCreate, *, roles: Sequence[str] = (), admin: bool = False
) -> User:
    from usermgr import security

    role_names = _role_names(roles, admin)
    hashed = security.hash_password(data.password, settings.hash_profile) if data.password else None
    with _writing(db):
        _ensure_unique(db, data.email, data.username)
        user = User(email=data.email, username=data.username, full_name=data.full_name, hashed_password=hashed)
        user.roles = [_role(db, name, create=True) for name in role_names]
        db.add(user)
        db.flush()
    return user


def new_user(
    email: str, username: str | None = None, full_name: str | None = None, password: str | None = None
) -> UserCreate:
    """Validate the fields of a new user; InvalidInput with a one-line message if bad."""
    from usermgr.schemas import UserCreate

    return _validated(UserCreate, email=email, username=username, full_name=full_name, password=password)


def user_changes(**fields: Any) -> UserUpdate:
    """Validate the given profile fields (only those given are applied)."""
    from usermgr.schemas import UserUpdate

    return _validated(UserUpdate, **{name: value for name, value in fields.items() if value is not None})


def update_user(db: Session, ref: str, changes: UserUpdate) -> User:
    if not changes.model_fields_set:
        raise InvalidInput("nothing to change: give a new email, username or full name")
    with _writing(db):
        user = _get(db, ref)
        values = changes.model_dump(include=changes.model_fields_set)
        _ensure_unique(db, values.get("email"), values.get("username"), except_id=user.id)
        with _revoking_tokens_on_change([user]):
            for name, value in values.items():
                setattr(user, name, value)
        db.flush()
    return user


def set_password(db: Session, settings: Settings, ref: str, password: str) -> User:
    """A new password; every token issued before it stops working."""
    from usermgr import security
    from usermgr.schemas import validate_password

    hashed = security.hash_password(_checked(validate_password, password), settings.hash_profile)
    with _writing(db):
        user = _get(db, ref)
        with _revoking_tokens_on_change([user]):
            user.hashed_password = hashed
    return user


def set_active(db: Session, refs: Sequence[str | None], active: bool, origin: str = "argument") -> list[User]:
    """Enable or disable users; disabling ends their tokens. A lock is left as it is."""
    with _writing(db), _keeping_an_admin(db):
        users = _resolve_many(db, refs, origin)
        with _revoking_tokens_on_change(users):
            for user in users:
                user.is_active = active
    return users


def unlock(db: Session, refs: Sequence[str | None], origin: str = "argument") -> list[User]:
    with _writing(db):
        users = _resolve_many(db, refs, origin)
        for user in users:
            user.failed_logins = 0
            user.locked_until = None
    return users


def delete_users(db: Session, refs: Sequence[str | None], origin: str = "argument") -> list[User]:
    with _writing(db), _keeping_an_admin(db):
        users = _resolve_many(db, refs, origin)
        for user in users:
            db.delete(user)
    return users


def grant_role(db: Session, refs: Sequence[str | None], role_name: str, origin: str = "argument") -> list[User]:
    name = _validated_role(role_name)
    with _writing(db):
        users = _resolve_many(db, refs, origin)
        role = _role(db, name, create=bool(users))  # a role comes into being with its first member
        for user in users:
            if role not in user.roles:
                user.roles.append(role)
    return users


def revoke_role(db: Session, refs: Sequence[str | None], role_name: str, origin: str = "argument") -> list[User]:
    """Take a role away, ending the tokens that name it; a user without it is left as it is."""
    name = _validated_role(role_name)
    with _writing(db), _keeping_an_admin(db):
        users = _resolve_many(db, refs, origin)
        role = _role(db, name, create=False)
        with _revoking_tokens_on_change(users):
            for user in users:
                if role is not None and role in user.roles:
                    user.roles.remove(role)
    return users


def ping(db: Session) -> None:
    """Raise unless the database answers: what a health check asks."""
    with _reading(db):
        db.execute(select(1))


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


def _unlocked(now: datetime) -> Any:
    """The SQL condition "no lock, or an expired one" (`now` bound as a UtcDateTime, so that
    SQLite's stored strings compare as times)."""
    return or_(User.locked_until.is_(None), User.locked_until <= now)


def authenticate(db: Session, settings: Settings, ref: str, password: str, *, email_only: bool = False) -> User:
    """The user if the password is right and the account may log in; else one error for all.

    With lockout on, a guess is counted *before* its password is checked (`_reserve_guess`),
    in one atomic statement that refuses while the account is locked: however many logins
    arrive at once, through any process, at most `lockout_threshold` guesses are checked per
    lock period. A right password is then taken only if, atomically, the account is still
    unlocked (or the lock is the one this very guess set): a lock that other guesses set
    meanwhile wins. The password is checked outside any transaction (it is slow by design);
    an unknown or locked user is checked against a dummy hash so that it costs the same time.
    With `email_only`, a USER that is not an email (an id, a username) is an unknown user.
    """
    from usermgr import security

    with _reading(db):
        user = _find(db, ref, email_only=email_only)
    candidate = _login_password(password)
    if user is None:
        security.verify_dummy(candidate, settings.hash_profile)
        raise AuthenticationFailed()
    hashed, my_lock = user.hashed_password, None
    if settings.lockout_threshold:
        reservation = _reserve_guess(db, settings, user.id, utcnow())
        if reservation is None:  # locked: the guess is never checked
            security.verify_dummy(candidate, settings.hash_profile)
            raise AuthenticationFailed()
        hashed, my_lock = reservation
    ok, new_hash = security.verify_password(candidate, hashed, settings.hash_profile)
    if not ok:
        raise AuthenticationFailed()  # already counted by the reservation
    return _take_success(db, user.id, hashed, my_lock, new_hash)


def _login_password(password: str) -> str:
    """The login password as it was hashed: NFKC-normalised, but no policy enforced
    (an imported hash may predate the policy)."""
    return unicodedata.normalize("NFKC", password)


def _reserve_guess(
    db: Session, settings: Settings, user_id: int, now: datetime
) -> tuple[str | None, datetime | None] | None:
    """Count one guess before it is checked, in one atomic write; None if the account is locked.

    The T-th guess (T = lockout_threshold) locks the account for lockout_period and restarts
    the count from zero, so when the lock expires the count starts again. Both CASEs read the
    old count. PostgreSQL re-checks the WHERE on the row's newest version after waiting for
    its lock (READ COMMITTED); SQLite's BEGIN IMMEDIATE runs one writer at a time.

    Returns the stored hash (as of this write) and the lock this guess set, if it set one.
    """
    reaches = User.failed_logins + 1 >= settings.lockout_threshold
    lock_end = bindparam("lock_end", now + timedelta(seconds=settings.lockout_period), type_=UtcDateTime())
    with _writing(db):
        row = db.execute(
            update(User)
            .where(User.id == user_id, _unlocked(now))
            .values(
                failed_logins=case((reaches, 0), else_=User.failed_logins + 1),
                locked_until=case((reaches, lock_end), else_=null()),
            )
            .returning(User.hashed_password, User.locked_until)
            .execution_options(synchronize_session=False)
        ).first()
    return None if row is None else (row.hashed_password, row.locked_until)


def _take_success(
    db: Session, user_id: int, checked: str | None, my_lock: datetime | None, new_hash: str | None
) -> User:
    """Record a right password, atomically: only for an active user that is unlocked, or
    locked by this guess's own reservation, and whose hash is still the one `checked` (a
    password set meanwhile wins, and a rehash never overwrites it); else AuthenticationFailed.
    Returns the user as the same transaction left it (roles and token_version for the token)."""
    now = utcnow()
    may_enter = _unlocked(now) if my_lock is None else or_(_unlocked(now), User.locked_until == my_lock)
    values: dict[str, Any] = {"failed_logins": 0, "locked_until": None, "last_login_at": now}
    if new_hash is not None:
        values["hashed_password"] = new_hash
    with _writing(db):
        taken = db.execute(
            update(User)
            .where(User.id == user_id, User.is_active.is_(True), User.hashed_password == checked, may_enter)
            .values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
        if not taken:
            raise AuthenticationFailed()
        return db.scalars(select(User).where(User.id == user_id).execution_options(populate_existing=True)).one()


def login(
    db: Session, settings: Settings, ref: str, password: str, ttl: int | None = None, *, email_only: bool = False
) -> str:
    """Authenticate and mint an access token. `email_only`: USER must be an email (the API's
    rule: an anonymous caller must not lock accounts by counting ids or guessing usernames);
    anything else is then an unknown user, with the same error and the same cost."""
    from usermgr import tokens

    lifetime = settings.token_ttl if ttl is None else ttl
    if lifetime > settings.token_max_ttl:
        raise InvalidInput(
            f"token lifetime {lifetime}s is above the maximum of {settings.token_max_ttl}s (USERMGR_TOKEN_MAX_TTL)"
        )
    key = tokens.signing_key(settings)  # an unusable key fails before the login is recorded
    user = authenticate(db, settings, ref, password, email_only=email_only)
    return tokens.issue_token(
        settings,
        key=key,
        subject=user.uid,
        email=user.email,
        roles=user.role_names,
        token_version=user.token_version,
        ttl=lifetime,
    )


def revoke_tokens(db: Session, refs: Sequence[str | None], origin: str = "argument") -> list[User]:
    """End every token issued to these users so far."""
    with _writing(db):
        users = _resolve_many(db, refs, origin)
        for user in users:
            user.token_version += 1
    return users


def check_token_holder(db: Session, claims: dict[str, Any], required_role: str | None = None) -> User:
    """The token's user, if it still exists, is enabled, is not locked, has not revoked
    the token and (when asked) still holds the role.

    The holder is found by `sub`, the user's `uid`: never reused, so a deleted user's token
    can never pass as whoever is created next, here or in another database.
    """
    from usermgr.tokens import VERSION_CLAIM

    subject = claims.get("sub")
    with _reading(db):
        user = db.scalars(select(User).where(User.uid == subject)).first() if _is_uid(subject) else None
    if user is None:
        raise TokenInvalid("token invalid: the user no longer exists")
    if not user.is_active:
        raise TokenInvalid("token invalid: the user is disabled")
    if _is_locked(user, utcnow()):
        raise TokenInvalid("token invalid: the user is locked")
    if claims.get(VERSION_CLAIM, 0) != user.token_version:
        raise TokenInvalid("token invalid: revoked")
    if required_role is not None and required_role not in user.role_names:
        raise Forbidden(f"forbidden: the user does not have the role {required_role!r}")
    return user


def _is_uid(value: Any) -> bool:
    """True for a UUID in its canonical text form, as `uid` stores it."""
    if not isinstance(value, str) or len(value) != UID_LENGTH:
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


# ---- bulk import ------------------------------------------------------------------------

MAX_REPORTED_ROW_ERRORS = 20
SpooledRow = dict[str, Any]
_IMPORT_CHUNK = 1000
ON_CONFLICT = ("error", "skip", "update")


@dataclass
class ImportPlan:
    """Rows that passed validation, spooled to a private temporary file so memory stays
    flat, and the plaintext passwords still to be hashed (by line number)."""

    spool: IO[bytes]
    rows: int = 0
    passwords: dict[int, str] = field(default_factory=dict, repr=False)
    hashes: dict[int, str] = field(default_factory=dict, repr=False)
    _chunks: int = 0
    _pending: list[SpooledRow] = field(default_factory=list, repr=False)

    def add(self, row: SpooledRow) -> None:
        self._pending.append(row)
        self.rows += 1
        if len(self._pending) == _IMPORT_CHUNK:
            self._spool_pending()

    def _spool_pending(self) -> None:
        # A chunk a record, behind its length: marshal.load on a file reads field by field,
        # marshal.loads of one read is a single call per thousand rows.
        if self._pending:
            record = marshal.dumps(self._pending)
            self.spool.write(len(record).to_bytes(8, "big") + record)
            self._chunks += 1
            self._pending = []

    def chunks(self) -> Iterator[list[SpooledRow]]:
        """The spooled rows, a chunk of up to a thousand at a time, in input order."""
        self._spool_pending()
        self.spool.seek(0)
        for _ in range(self._chunks):
            size = int.from_bytes(self.spool.read(8), "big")
            yield marshal.loads(self.spool.read(size))

    def close(self) -> None:
        self.spool.close()
        self.passwords.clear()


@dataclass
class ImportResult:
    created: int = 0
    updated: int = 0
    skipped: int = 0


def _spooled_row(line: int, row: ImportRow) -> dict[str, Any]:
    """A valid row as it waits in the spool: plain values that marshal can write."""
    return {
        "line": line,
        "uid": row.uid,
        "email": row.email,
        "username": row.username,
        "full_name": row.full_name,
        "roles": sorted(set(row.roles)),
        "is_active": row.is_active,
        "hashed_password": row.hashed_password,
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "last_login_at": row.last_login_at.isoformat() if row.last_login_at else None,
    }


def plan_import(rows: Iterable[Any]) -> ImportPlan:
    """Validate every row first; nothing is written while any row is bad.

    `rows` are `output.InputRow`s. Bad rows are reported with their line numbers, the
    first twenty and then a count, as one InvalidInput.
    """
    from pydantic import ValidationError

    from usermgr.schemas import ImportRow, first_error

    plan = ImportPlan(spool=tempfile.TemporaryFile())  # noqa: SIM115 (ImportPlan.close closes it)
    problems: list[str] = []
    bad = 0
    for row in rows:
        problem = row.problem
        if problem is None:
            try:
                valid = ImportRow.model_validate(row.fields)
            except ValidationError as error:
                problem = first_error(error)
        if problem is not None:
            bad += 1
            if len(problems) < MAX_REPORTED_ROW_ERRORS:
                problems.append(f"line {row.line}: {problem}")
            continue
        if bad:
            continue  # only counting now: nothing of this input will be written
        if valid.password is not None:
            plan.passwords[row.line] = valid.password
        plan.add(_spooled_row(row.line, valid))
    if bad:
        plan.close()
        more = f" (the first {MAX_REPORTED_ROW_ERRORS} shown)" if bad > MAX_REPORTED_ROW_ERRORS else ""
        raise InvalidInput(
            "\n".join([*problems, f"{bad} invalid row{'s' if bad != 1 else ''}{more}; nothing was imported"])
        )
    return plan


def seconds_to_hash(plan: ImportPlan, settings: Settings) -> float:
    """How long hashing the plan's plaintext passwords will take, from one measured hash."""
    from usermgr import security

    if not plan.passwords:
        return 0.0
    started = time.perf_counter()
    security.hash_password("measure-the-cost", settings.hash_profile)
    return (time.perf_counter() - started) * len(plan.passwords) / _hash_workers()


def _hash_workers() -> int:
    return os.cpu_count() or 1


def hash_passwords(plan: ImportPlan, settings: Settings, progress: Callable[[int], None] | None = None) -> None:
    """Hash the plan's plaintext passwords on every core, then forget the plaintext.

    argon2-cffi releases the GIL, so a thread per core adds to argon2's own lanes: by up
    to a third on an idle machine, by little when other work holds the cores (bench/RESULTS.md).
    """
    from usermgr import security

    lines = list(plan.passwords)

    def hash_one(line: int) -> tuple[int, str]:
        return line, security.hash_password(plan.passwords[line], settings.hash_profile)

    with ThreadPoolExecutor(max_workers=_hash_workers()) as pool:
        for line, hashed in pool.map(hash_one, lines):
            plan.hashes[line] = hashed
            if progress is not None:
                progress(1)
    plan.passwords.clear()


class _RoleIds:
    """Role name -> id, creating roles on first use, within the import's transaction."""

    def __init__(self, db: Session) -> None:
        self.db = db
        self.ids = {name: role_id for role_id, name in db.execute(select(Role.id, Role.name))}

    def __call__(self, name: str) -> int:
        if name not in self.ids:
            self.ids[name] = self.db.scalar(insert(Role).values(name=name).returning(Role.id))
        return self.ids[name]


def apply_import(
    db: Session,
    plan: ImportPlan,
    *,
    on_conflict: str = "error",
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Write the plan in one transaction: all of it, or with --dry-run none of it.

    An email already in the database (or earlier in the same input) is a Conflict unless
    `on_conflict` is `skip` or `update`; `update` makes the user match the row, roles included.
    `progress` is told how many rows each chunk held once it is written (not yet committed).
    """
    result = ImportResult()
    with _writing(db, dry_run=dry_run), _keeping_an_admin(db):
        role_ids = _RoleIds(db)
        for chunk in plan.chunks():
            _import_chunk(db, plan, chunk, role_ids, on_conflict, result)
            if progress is not None:
                progress(len(chunk))
    return result


def _import_chunk(
    db: Session,
    plan: ImportPlan,
    chunk: list[SpooledRow],
    role_ids: _RoleIds,
    on_conflict: str,
    result: ImportResult,
) -> None:
    emails = [row["email"] for row in chunk]
    existing: dict[str, int | None] = dict(db.execute(select(User.email, User.id).where(User.email.in_(emails))).all())
    _check_uids(db, chunk)
    pending: list[SpooledRow] = []

    def insert_pending() -> None:
        for row, user_id in zip(pending, _insert_rows(db, plan, pending, role_ids), strict=True):
            existing[row["email"]] = user_id
        result.created += len(pending)
        pending.clear()

    for row in chunk:
        line, email = row["line"], row["email"]
        if email not in existing:
            if not email.isascii():
                _refuse_lookalike(db, email, line)
            existing[email] = None  # to be inserted; a later row with this email conflicts with it
            pending.append(row)
        elif on_conflict == "error":
            raise Conflict(f"line {line}: a user with email {email!r} already exists; use --on-conflict skip or update")
        elif on_conflict == "skip":
            result.skipped += 1
        else:
            if existing[email] is None:
                insert_pending()
            _update_from_row(db, plan, existing[email], row, role_ids)
            result.updated += 1
    if pending:
        insert_pending()


def _check_uids(db: Session, chunk: list[SpooledRow]) -> None:
    """A row's uid may only be its own user's: one that names a user with another email
    (in the database or earlier in the input) is a Conflict, so an import never hands
    one person's identity, and with it their tokens, to another."""
    uids = {row["uid"]: row for row in chunk if row["uid"] is not None}
    owners = dict(db.execute(select(User.uid, User.email).where(User.uid.in_(list(uids)))).all()) if uids else {}
    seen: dict[str, str] = {}
    for row in chunk:
        uid = row["uid"]
        if uid is None:
            continue
        owner = owners.get(uid) or seen.get(uid)
        if owner is not None and owner != row["email"]:
            raise Conflict(f"line {row['line']}: uid {uid} already belongs to another user; nothing was imported")
        seen[uid] = row["email"]


def _user_values(plan: ImportPlan, row: SpooledRow) -> dict[str, Any]:
    values = {name: row[name] for name in ("email", "username", "full_name", "is_active")}
    values["hashed_password"] = plan.hashes.get(row["line"], row["hashed_password"])
    values["last_login_at"] = datetime.fromisoformat(row["last_login_at"]) if row["last_login_at"] else None
    if row["created_at"]:
        values["created_at"] = datetime.fromisoformat(row["created_at"])
    return values


def _insert_rows(db: Session, plan: ImportPlan, rows: list[SpooledRow], role_ids: _RoleIds) -> list[int]:
    now = utcnow()
    values = [
        {
            "created_at": now,
            "updated_at": now,
            "failed_logins": 0,
            "token_version": 0,
            "uid": row["uid"] or new_uid(),
            **_user_values(plan, row),
        }
        for row in rows
    ]
    # One executemany, then the ids by email: RETURNING in parameter order would make
    # SQLAlchemy insert row by row on SQLite, which cannot promise that order.
    db.execute(insert(User.__table__), values)
    emails = [row["email"] for row in rows]
    ids = dict(db.execute(select(User.email, User.id).where(User.email.in_(emails))).all())
    inserted = [ids[email] for email in emails]
    links = [
        {"user_id": user_id, "role_id": role_ids(name)}
        for user_id, row in zip(inserted, rows, strict=True)
        for name in row["roles"]
    ]
    if links:
        db.execute(insert(user_roles), links)
    return inserted


def _update_from_row(db: Session, plan: ImportPlan, user_id: int, row: SpooledRow, role_ids: _RoleIds) -> None:
    """Make an existing user match the row (a row naming another uid is a Conflict), revoking the
    user's tokens where the change calls for it, exactly as the single-user commands do."""
    uid = db.scalar(select(User.uid).where(User.id == user_id))
    if row["uid"] is not None and row["uid"] != uid:
        raise Conflict(f"line {row['line']}: {row['email']} is uid {uid} here, not {row['uid']}; nothing was imported")
    values = _user_values(plan, row)
    if values["hashed_password"] is None:
        del values["hashed_password"]  # a row without a secret keeps the user's password
    values.pop("created_at", None)
    before = _access_of_row(db, user_id)
    after = Access(
        email=values["email"],
        hashed_password=values.get("hashed_password", before.hashed_password),
        is_active=values["is_active"],
        roles=frozenset(row["roles"]),
    )
    if revokes_tokens(before, after):
        values["token_version"] = User.__table__.c.token_version + 1
    db.execute(update(User.__table__).where(User.__table__.c.id == user_id).values(updated_at=utcnow(), **values))
    db.execute(delete(user_roles).where(user_roles.c.user_id == user_id))
    if row["roles"]:
        db.execute(insert(user_roles), [{"user_id": user_id, "role_id": role_ids(name)} for name in row["roles"]])


def _access_of_row(db: Session, user_id: int) -> Access:
    email, hashed, active = db.execute(
        select(User.email, User.hashed_password, User.is_active).where(User.id == user_id)
    ).one()
    names = db.scalars(
        select(Role.name).join(user_roles, user_roles.c.role_id == Role.id).where(user_roles.c.user_id == user_id)
    )
    return Access(email=email, hashed_password=hashed, is_active=active, roles=frozenset(names))
