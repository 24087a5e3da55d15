"""Logins, lockout and token holders."""

from __future__ import annotations

import unicodedata
from datetime import datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy import bindparam, case, null, or_, select, update
from sqlalchemy.orm import Session, joinedload

from usermgr.config import Settings
from usermgr.contract import USER_FIELDS, is_uid
from usermgr.database import Database, UtcDateTime, earlier_than, utcnow
from usermgr.errors import AuthenticationFailed, Forbidden, InvalidInput, TokenInvalid
from usermgr.models import Role, User, user_roles
from usermgr.service.audit import jsonable, record
from usermgr.service.core import find_user, reading, unexpired, writing


def _is_locked(user: User, now: datetime) -> bool:
    return user.locked_until is not None and user.locked_until > now


def _is_expired(user: User, now: datetime) -> bool:
    return user.expires_at is not None and user.expires_at <= now


def _unlocked(now: datetime) -> Any:
    """The SQL condition "no lock, or an expired one", stored times compared as instants
    (a lock SQLite cannot read as a time has not ended)."""
    return or_(User.locked_until.is_(None), earlier_than(User.locked_until, now))


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

    with reading(db):
        user = find_user(db, ref, email_only=email_only)
    candidate = _login_password(password)
    if user is None:
        security.verify_dummy(candidate, settings.hash_profile)
        _refuse(db, None, "unknown user")
    hashed, my_lock = user.hashed_password, None
    if settings.lockout_threshold:
        reservation = _reserve_guess(db, settings, user, utcnow())
        if reservation is None:  # locked: the guess is never checked
            security.verify_dummy(candidate, settings.hash_profile)
            _refuse(db, user, "locked")
        hashed, my_lock = reservation
    ok, new_hash = security.verify_password(candidate, hashed, settings.hash_profile)
    if not ok:
        _refuse(db, user, "wrong password" if hashed else "no password set")  # already counted by the reservation
    return _take_success(db, user.id, hashed, my_lock, new_hash)


def _refuse(db: Session, user: User | None, reason: str) -> NoReturn:
    """Record a failed login with the reason the caller is never told (one insert, its own
    transaction: the password check ran outside any), then fail with the one message for all."""
    with writing(db):
        record(db, "login.failure", user, {"reason": reason})
    raise AuthenticationFailed()


def _login_password(password: str) -> str:
    """The login password as it was hashed: NFKC-normalised, but no policy enforced
    (an imported hash may predate the policy)."""
    return unicodedata.normalize("NFKC", password)


def _reserve_guess(
    db: Session, settings: Settings, user: User, now: datetime
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
    with writing(db):
        row = db.execute(
            update(User)
            .where(User.id == user.id, _unlocked(now))
            .values(
                failed_logins=case((reaches, 0), else_=User.failed_logins + 1),
                locked_until=case((reaches, lock_end), else_=null()),
            )
            .returning(User.hashed_password, User.locked_until)
            .execution_options(synchronize_session=False)
        ).first()
        if row is not None and row.locked_until is not None:  # this guess locked the account
            record(db, "login.locked", user, {"locked_until": [None, jsonable(row.locked_until)]})
    return None if row is None else (row.hashed_password, row.locked_until)


def _take_success(
    db: Session, user_id: int, checked: str | None, my_lock: datetime | None, new_hash: str | None
) -> User:
    """Record a right password, atomically: only for an active, unexpired user that is unlocked,
    or locked by this guess's own reservation, and whose hash is still the one `checked` (a
    password set meanwhile wins, and a rehash never overwrites it); else AuthenticationFailed,
    the answer of every other failure, after the same password check.
    Returns the user as the same transaction left it (roles and token_version for the token)."""
    now = utcnow()
    may_enter = _unlocked(now) if my_lock is None else or_(_unlocked(now), User.locked_until == my_lock)
    values: dict[str, Any] = {"failed_logins": 0, "locked_until": None, "last_login_at": now}
    if new_hash is not None:
        values["hashed_password"] = new_hash
    with writing(db):
        taken = db.scalars(
            update(User)
            .where(
                User.id == user_id,
                User.is_active.is_(True),
                unexpired(now),
                User.hashed_password == checked,
                may_enter,
            )
            .values(**values)
            .returning(User.id)
            .execution_options(synchronize_session=False)
        ).first()
        if taken is not None:
            entered = db.scalars(select(User).where(User.id == user_id).execution_options(populate_existing=True)).one()
            changes: dict[str, Any] = {"password": "rehashed"} if new_hash is not None else {}
            if my_lock is not None:  # this guess locked the account, and being right it ends that lock
                changes["locked_until"] = [jsonable(my_lock), None]
            record(db, "login.success", entered, changes)
            return entered
        now_is = db.scalars(select(User).where(User.id == user_id).execution_options(populate_existing=True)).first()
    _refuse(db, now_is, _refusal(now_is, checked, now))


def _refusal(now_is: User | None, checked: str | None, now: datetime) -> str:
    """Why a right password was not taken, for the audit trail only (the opposite of each
    condition of `_take_success`, the lock last: it is what is left)."""
    if now_is is None:
        return "deleted meanwhile"
    if not now_is.is_active:
        return "disabled"
    if now_is.hashed_password != checked:
        return "password changed meanwhile"
    return "expired" if now_is.expires_at is not None and now_is.expires_at <= now else "locked"


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


_HOLDER = select(User).where(User.uid == bindparam("uid")).options(joinedload(User.roles))
"""A token's holder with their roles joined in: one read per authenticated request, where the
relationship's own (selectin) loading takes two. Built once: no request builds it or its cache key again."""

_HOLDER_ROWS = (
    select(
        *(getattr(User, name) for name in USER_FIELDS if name != "roles"), User.token_version, Role.name.label("role")
    )
    .outerjoin(user_roles, user_roles.c.user_id == User.id)
    .outerjoin(Role, Role.id == user_roles.c.role_id)
    .where(User.uid == bindparam("uid"))
)
"""The same read in Core for `holder_record`: the record's fields and the token version, one
row a role (one row with no role name for a user without roles). Built once."""


_GONE = "token invalid: the user no longer exists"


def check_token_holder(db: Session, claims: dict[str, Any], required_role: str | None = None) -> User:
    """The token's user, if it still exists, is enabled, is not locked, has not expired, has
    not revoked the token and (when asked) still holds the role.

    The holder is found by `sub`, the user's `uid`: never reused, so a deleted user's token
    can never pass as whoever is created next, here or in another database.
    """
    subject = claims.get("sub")
    with reading(db):
        user = db.scalars(_HOLDER, {"uid": subject}).unique().first() if is_uid(subject) else None
    if user is None:
        raise TokenInvalid(_GONE)
    _check_holder(user, user.role_names, claims, required_role)
    return user


def holder_record(
    database: Database, settings: Settings, token: str, keys: Any, *, required_role: str | None = None
) -> dict[str, Any]:
    """A token's holder as the contract's record (contract.USER_FIELDS), both checked as
    `holder_of_token` checks them, with one Core SELECT of the user and their roles on a
    pooled connection, taken only once the token checks out: no ORM session or object, at a
    third of the cost of loading a `User`. What `GET /users/me` answers. One statement reads
    one consistent state on either backend."""
    from usermgr.tokens import decode_token

    claims = decode_token(token, settings, keys)
    subject = claims.get("sub")
    if not is_uid(subject):
        raise TokenInvalid(_GONE)
    with database.engine.connect() as connection:
        rows = connection.execute(_HOLDER_ROWS, {"uid": subject}).all()
    if not rows:
        raise TokenInvalid(_GONE)
    holder, roles = rows[0], sorted(row.role for row in rows if row.role is not None)
    _check_holder(holder, roles, claims, required_role)
    return {name: roles if name == "roles" else getattr(holder, name) for name in USER_FIELDS}


def _check_holder(holder: Any, roles: list[str], claims: dict[str, Any], required_role: str | None) -> None:
    """The holder rules on a `User` or a row with its fields: enabled, not locked, not
    expired, the token not revoked (its version and its email the holder's), and (when
    asked) the role held now."""
    from usermgr.tokens import VERSION_CLAIM

    if not holder.is_active:
        raise TokenInvalid("token invalid: the user is disabled")
    now = utcnow()
    if _is_locked(holder, now):
        raise TokenInvalid("token invalid: the user is locked")
    if _is_expired(holder, now):
        raise TokenInvalid("token invalid: the user's account expired")
    # A token names its email: one naming another was issued before an email change (which
    # revokes), or in another database to whoever held this uid there (an edited export).
    if claims.get(VERSION_CLAIM, 0) != holder.token_version or claims.get("email") != holder.email:
        raise TokenInvalid("token invalid: revoked")
    if required_role is not None and required_role not in roles:
        raise Forbidden(f"forbidden: the user does not have the role {required_role!r}")


def holder_of_token(
    db: Session,
    settings: Settings,
    token: str,
    keys: Any,
    *,
    required_role: str | None = None,
    role_in_token: bool = False,
) -> tuple[dict[str, Any], User]:
    """A token's claims and its holder, both checked: the token's signature, expiry, issuer
    and audience, then the holder as `check_token_holder` checks them (the role as the
    database has it now). What `verify --check-db` and the API ask; `verify` also wants the
    token itself to name the role (`role_in_token`), as its offline check does. `keys` is the
    `usermgr.keyring.KeySet` the token's `kid` picks its one key from."""
    from usermgr.tokens import decode_token

    claims = decode_token(token, settings, keys, required_role=required_role if role_in_token else None)
    return claims, check_token_holder(db, claims, required_role)
