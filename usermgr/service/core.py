"""Transactions, finding the users a USER names, and the multi-row insert every batch writes
with (users, their roles, audit events): what every rule starts from."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from itertools import chain
from typing import Any, cast

from sqlalchemy import func, insert, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from usermgr.database import WRITE, later_than, undecodable_text_as_bytes
from usermgr.errors import AlreadyExists, InvalidInput, NotFound
from usermgr.models import User

_LOOKUP_CHUNK = 500


MAX_USER_ID = 2**31 - 1  # users.id is INTEGER: 32 bits on PostgreSQL


MAX_ROW_COUNT = 2**63 - 1  # the largest LIMIT and OFFSET that SQLite and PostgreSQL take


@contextmanager
def writing(db: Session, *, dry_run: bool = False) -> Iterator[None]:
    """One write transaction, rolled back instead of committed for a dry run; a
    unique-constraint race surfaces as AlreadyExists (a Conflict)."""
    try:
        with db.begin() as transaction:
            db.connection(execution_options=WRITE)
            yield
            if dry_run:
                transaction.rollback()
    except IntegrityError as error:
        raise AlreadyExists(_constrained_field(error)) from None


@contextmanager
def reading(db: Session) -> Iterator[None]:
    with db.begin():
        yield


def _constrained_field(error: IntegrityError) -> str | None:
    """The column of the index that refused: from the error's first line, which names the
    index (PostgreSQL's next line quotes the value, which may itself say 'email')."""
    text = str(error.orig).partition("\n")[0].lower()
    return next((field for field in ("email", "username", "uid") if field in text), None)


def validated(model: type, **fields: Any) -> Any:
    from pydantic import ValidationError

    from usermgr.schemas import first_error

    try:
        return model(**fields)
    except ValidationError as error:
        raise InvalidInput(first_error(error)) from None


def checked(validate: Callable[[str], str], value: str) -> str:
    """A schemas.py validator's result, its ValueError turned into InvalidInput."""
    try:
        return validate(value)
    except ValueError as error:
        raise InvalidInput(str(error)) from None


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
    if len(ref) > MAX_REF_LENGTH or not storable(ref):
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


def email_named(ref: str) -> str | None:
    """The email `ref` names as a USER (normalised exactly as on write), or None when it
    names no email: how a deleted user, whom no lookup finds any more, is named."""
    key = _key_of(ref)
    return cast(str, key.value) if key is not None and key.column == "email" else None


def unexpired(now: datetime) -> Any:
    """The SQL condition "no expiry, or one still ahead" at `now` (an expiry SQLite cannot read
    as a time is not ahead): who may log in, and who counts as an admin kept (roles)."""
    return or_(User.expires_at.is_(None), later_than(User.expires_at, now))


def storable(text: str) -> bool:
    """False for text no database column can hold: a NUL (PostgreSQL refuses it) or a lone
    surrogate (what Python makes of bytes that are not UTF-8)."""
    return "\x00" not in text and not any("\ud800" <= char <= "\udfff" for char in text)


def _normalized_email(text: str) -> str | None:
    from usermgr.schemas import normalize_email

    return normalize_email(text)


def _column(key: _Key) -> Any:
    return getattr(User, key.column)


def find_user(db: Session, ref: str, *, email_only: bool = False, lock: bool = False) -> User | None:
    """The user `ref` names; with `email_only`, only when it names them by email. With
    `lock`, their row is locked for the transaction (see `resolve_many`)."""
    key = _key_of(ref)
    if key is None or (email_only and key.column != "email"):
        return None
    statement = select(User).where(_column(key) == key.value)
    return db.scalars(statement.with_for_update() if lock else statement).first()


def unreachable_usernames(db: Session, examples: int) -> tuple[int, list[tuple[int, str]]]:
    """How many users have a username no USER argument names, and the first `examples` of them
    (id, username): stored before usernames were checked, or by another tool. All digits
    reads as an id, text with `@` as an email, and a USER's surrounding spaces are dropped;
    each such user is still named by id; so is a spelling that NFKC changes (only another
    tool writes one: a USER is normalised), and on SQLite a value that is no UTF-8 text (a
    BLOB, a number, undecodable bytes), which no USER equals and which must not fail `init`.
    Found by SQL among the candidates (a digit first, an `@`, a space at either end, any
    character beyond printable ASCII), then judged by `_key_of`, the rule lookups use."""
    name = User.username
    # `name != trim(name)` also holds for a SQLite BLOB: trim() returns text, never equal to a BLOB.
    conditions = [name.like("%@%"), func.substr(name, 1, 1).between("0", "9"), name != func.trim(name)]
    sqlite = db.get_bind().dialect.name == "sqlite"
    conditions.append(name.op("GLOB")("*[^ -~]*") if sqlite else name.regexp_match("[^ -~]"))
    candidates = select(User.id, name).where(or_(*conditions)).order_by(User.id)
    count, found = 0, list[tuple[int, str]]()
    with reading(db), undecodable_text_as_bytes(db.connection()):
        rows = cast(Iterable[tuple[int, str | bytes]], db.execute(candidates))  # a NULL meets no condition
        for user_id, stored in rows:
            if not (isinstance(stored, str) and _key_of(stored) == _Key("username", stored)):
                count += 1
                if len(found) < examples:
                    shown = stored if isinstance(stored, str) else stored.decode("utf-8", "backslashreplace")
                    found.append((user_id, shown))
    return count, found


SHOWN_REF_LENGTH = 60


def shown_ref(ref: str) -> str:
    """A USER as an error message quotes it: its first characters only, so that a megabyte
    line of input is not echoed whole to a terminal or a log."""
    text = ref.strip()
    return repr(text if len(text) <= SHOWN_REF_LENGTH else text[:SHOWN_REF_LENGTH] + "...")


def user_named(db: Session, ref: str, *, lock: bool = False) -> User:
    user = find_user(db, ref, lock=lock)
    if user is None:
        raise NotFound(f"no user matches {shown_ref(ref)}: give an email, a username or a numeric id")
    return user


def resolve_many(db: Session, refs: Sequence[str | None], origin: str) -> list[User]:
    """The users named by `refs` (emails, usernames or ids), in order and without repeats.

    An unknown one is a NotFound naming its position (`line 3` of standard input). A None
    ref (a blank line of input) names no one, and no ref at all changes nothing: an empty
    pipeline is not an error.

    The users are about to be changed, so their rows are locked (FOR UPDATE; SQLite's write
    transaction already runs alone): a user that a concurrent transaction deletes (or renames
    away from the email or username given) is then either found and kept until this one ends,
    or not found (exit 4), never found and then written as a row that is gone (the ORM's
    "0 rows matched": exit 1). The rows are locked in id order, all of them, whatever forms
    named them: locked a form at a time (emails, then ids), two batches naming the same users
    in other forms could each hold one and wait on the other (PostgreSQL: `deadlock detected`).
    """
    keys = [None if ref is None else _key_of(ref) for ref in refs]
    wanted: dict[str, list[Any]] = {}
    for key in keys:
        if key is not None:
            wanted.setdefault(key.column, []).append(key.value)
    ids_by: dict[_Key, int] = {}
    for column, values in wanted.items():
        named = getattr(User, column)
        for start in range(0, len(values), _LOOKUP_CHUNK):
            for user_id, value in db.execute(
                select(User.id, named).where(named.in_(values[start : start + _LOOKUP_CHUNK]))
            ):
                ids_by[_Key(column, value)] = user_id
    ids = sorted(set(ids_by.values()))
    locked: dict[int, User] = {}
    for start in range(0, len(ids), _LOOKUP_CHUNK):
        statement = select(User).where(User.id.in_(ids[start : start + _LOOKUP_CHUNK])).order_by(User.id)
        locked.update((user.id, user) for user in db.scalars(statement.with_for_update()))
    found_by = {
        key: user
        for key, user_id in ids_by.items()
        if (user := locked.get(user_id)) is not None and getattr(user, key.column) == key.value
    }
    found: dict[int, User] = {}
    for position, (ref, key) in enumerate(zip(refs, keys, strict=True), start=1):
        if ref is None:
            continue  # a blank line of input: no one, and an empty argument is still a mistake
        match = found_by.get(key) if key is not None else None
        if match is None:
            raise NotFound(f"no user matches {shown_ref(ref)} ({origin} {position}); nothing was changed")
        found.setdefault(match.id, match)
    return list(found.values())


def get_user(db: Session, ref: str) -> User:
    with reading(db):
        return user_named(db, ref)


def ping(db: Session) -> None:
    """Raise unless the database answers: what a health check asks."""
    with reading(db):
        db.execute(select(1))


def insert_many(db: Session, table: Any, keys: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    """Insert `rows` (tuples of `keys`, values already as the driver takes them: see each
    column type's bind_processor) straight through the driver. SQLAlchemy's executemany
    would run each value of each row through its type's processing; a batch binds its shared
    values once. Columns left out get no Python-side default: give every column that has one.

    On SQLite many rows go in each statement (`INSERT ... VALUES (...), (...)`): an
    executemany runs the statement once a row, and each run pays its own statement overhead
    (for audit_events' AUTOINCREMENT, an update of sqlite_sequence): about a quarter of the
    CPU SQLite spent writing 100,000 import events with their indexes (measured for figure
    12a). Elsewhere, one executemany (psycopg pipelines it)."""
    connection = db.connection()
    statement, order = _insert_statement(table, tuple(keys), connection.dialect)
    if order is None:
        connection.exec_driver_sql(statement, [dict(zip(keys, row, strict=True)) for row in rows])
        return
    if order != tuple(range(len(keys))):  # give `keys` in the table's column order to skip this
        rows = [tuple(row[index] for index in order) for row in rows]
    if connection.dialect.name != "sqlite":
        connection.exec_driver_sql(statement, rows)
        return
    import sqlite3  # the driver's own module, loaded already

    driver = cast("sqlite3.Connection", connection.connection.driver_connection)
    limit = driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    per = max(1, min(_ROWS_A_STATEMENT, limit // len(keys)))
    head, values = statement.split(" VALUES ", 1)
    for start in range(0, len(rows), per):
        part = rows[start : start + per]
        connection.exec_driver_sql(f"{head} VALUES {','.join([values] * len(part))}", tuple(chain.from_iterable(part)))


_ROWS_A_STATEMENT = 500
"""Rows in one multi-row INSERT on SQLite: past a few hundred a statement saves no more."""


@lru_cache(maxsize=64)
def _insert_statement(table: Any, keys: tuple[str, ...], dialect: Any) -> tuple[str, tuple[int, ...] | None]:
    """The INSERT of `keys` into `table` as `dialect` writes it, and where each of its
    positional parameters is in `keys` (None: the parameters are named), compiled once: an
    import inserts a chunk at a time, three statements a chunk."""
    compiled = insert(table).compile(dialect=dialect, column_keys=list(keys))
    if compiled.positiontup is None:
        return compiled.string, None
    return compiled.string, tuple(keys.index(name) for name in compiled.positiontup)
