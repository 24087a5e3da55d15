"""Reading users and roles out: the contract's record, filtered lists streamed with Core rows."""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from itertools import chain
from operator import itemgetter
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, func, null, or_, select
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    import sqlite3

from usermgr.contract import ADMIN_ROLE, USER_FIELDS
from usermgr.database import earlier_than, later_than, utcnow
from usermgr.errors import InvalidInput
from usermgr.models import Role, User, user_roles
from usermgr.service.core import MAX_ROW_COUNT, reading, storable
from usermgr.service.roles import has_role, validated_role

_STREAM_CHUNK = 2000


def user_record(user: User) -> dict[str, Any]:
    """A user as the contract's output fields (contract.USER_FIELDS); never the hash."""
    return {name: user.role_names if name == "roles" else getattr(user, name) for name in USER_FIELDS}


@dataclass(frozen=True)
class UserFilter:
    """Which users a list shows. `expired`: their expiry has passed; `expires_before`: their
    expiry is before that time (those already expired included)."""

    role: str | None = None
    admin: bool = False
    active: bool | None = None
    locked: bool = False
    expired: bool = False
    expires_before: datetime | None = None
    search: str | None = None
    limit: int | None = None
    offset: int = 0


def _roles_column(dialect: str) -> Any:
    """A user's role names, NULL for none: a list on PostgreSQL (array_agg), a JSON array on
    SQLite (json_group_array); never names joined by a separator, which a name another tool
    stored may hold (`_role_list` reads either)."""
    names = func.nullif(func.json_group_array(Role.name), "[]") if dialect == "sqlite" else func.array_agg(Role.name)
    return (
        select(names)
        .select_from(user_roles.join(Role))
        .where(user_roles.c.user_id == User.id)
        .scalar_subquery()
        .label("roles")
    )


def _filtered(statement: Any, filters: UserFilter) -> Any:
    if filters.role is not None:
        statement = statement.where(has_role(filters.role))
    if filters.admin:
        statement = statement.where(has_role(ADMIN_ROLE))
    if filters.active is not None:
        # `IS NOT` the other state, not `IS` this one: a value that is neither (another tool's
        # 'no' on SQLite) is then listed, and refused as it is read, instead of going unseen.
        statement = statement.where(User.is_active.is_not(not filters.active))
    if filters.locked:
        statement = statement.where(later_than(User.locked_until, utcnow()))
    if filters.expired:
        statement = statement.where(earlier_than(User.expires_at, utcnow()))
    if filters.expires_before is not None:
        statement = statement.where(earlier_than(User.expires_at, filters.expires_before))
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
    if not storable(text):
        raise InvalidInput("search text must not contain a NUL character or bytes that are not UTF-8")


def iter_user_records(
    db: Session, filters: UserFilter = UserFilter(), *, with_hashes: bool = False
) -> Iterator[dict[str, Any]]:
    """Users oldest first (in the order they were added), streamed: `iter_user_rows` as dicts."""
    names = (*USER_FIELDS, "hashed_password") if with_hashes else USER_FIELDS
    for row in iter_user_rows(db, filters, with_hashes=with_hashes):
        yield dict(zip(names, row, strict=True))


def iter_user_rows(
    db: Session, filters: UserFilter = UserFilter(), *, with_hashes: bool = False, stored: bool = False
) -> Iterator[tuple[Any, ...]]:
    """Users oldest first (in the order they were added), streamed as tuples in the order of
    USER_FIELDS (then `hashed_password`): no dict a row, for `list`/`export` of a million users.

    With `stored`, a value may come in the compact form of its type that output.write_rows
    takes: on SQLite the rows are the driver's own, as stored (`_stored_chunks`); otherwise
    they come through the Core connection in the record's form. Either way they are read a
    chunk at a time and handed on by itertools.chain: no Python frame a row."""
    if (filters.limit is not None and filters.limit < 0) or filters.offset < 0:
        raise InvalidInput("limit and offset must not be negative")
    if filters.role is not None:
        validated_role(filters.role)
    if filters.search is not None:
        _check_search(filters.search)
    if filters.offset > MAX_ROW_COUNT or (filters.limit or 0) > MAX_ROW_COUNT:
        raise InvalidInput(f"limit and offset must be at most {MAX_ROW_COUNT}")
    return chain.from_iterable(_user_chunks(db, filters, with_hashes, stored))


def _user_chunks(db: Session, filters: UserFilter, with_hashes: bool, stored: bool) -> Iterator[list[tuple[Any, ...]]]:
    with reading(db):
        connection = db.connection()
        if stored and connection.dialect.name == "sqlite":
            yield from _stored_chunks(connection, filters, with_hashes)
            return
        statement = _filtered(
            select(*_columns(_roles_column(connection.dialect.name), with_hashes)).order_by(User.id), filters
        )
        result = connection.execute(statement.execution_options(yield_per=_STREAM_CHUNK))
        for rows in result.partitions():
            yield [_roles_listed(row) for row in rows]


_ROLES_AT = USER_FIELDS.index("roles")


def _columns(roles: Any, with_hashes: bool) -> list[Any]:
    """The columns of USER_FIELDS (then the hash), `roles` in the roles' place."""
    columns = [roles if name == "roles" else getattr(User, name) for name in USER_FIELDS]
    return [*columns, User.hashed_password] if with_hashes else columns


def _role_list(names: list[str] | str | None) -> list[str]:
    """The roles column (`_roles_column`: a list, a JSON array or None) as the record's sorted list."""
    if names is None:
        return []
    return sorted(json.loads(names) if isinstance(names, str) else names)


def _stored_chunks(connection: Connection, filters: UserFilter, with_hashes: bool) -> Iterator[list[tuple[Any, ...]]]:
    """`iter_user_rows` with `stored` on SQLite: the users' statement executed as usual (binds
    and all), then its sqlite3 cursor read directly, each row as stored (is_active 0/1,
    timestamps as text). SQLAlchemy's result layer (a Row and its type processing a value)
    was a third of `list -o jsonl`'s time a row.

    Roles: for every user (limit and offset aside), a second cursor reads user_roles by user
    then name and `_with_roles` puts each user's names in its row: one pass instead of a
    subquery a user, most of whom have no role. A filter that picks users (by role, search,
    state...) keeps the subquery, run for the users it picks only: the pass would read every
    user's roles, or run the filter's scan twice."""
    picks = replace(filters, limit=None, offset=0) != UserFilter()
    roles = _roles_column(connection.dialect.name) if picks else null()
    users = connection.execute(_filtered(select(*_columns(roles, with_hashes)).order_by(User.id), filters))
    rows = cast("sqlite3.Cursor", users.cursor)  # whose fetchmany gives a list of tuples, in C
    chunks = iter(lambda: rows.fetchmany(_STREAM_CHUNK), [])
    try:
        if picks:
            yield from ([row if row[_ROLES_AT] is None else _roles_listed(row) for row in chunk] for chunk in chunks)
            return
        links = connection.execute(
            select(user_roles.c.user_id, Role.name).join(Role).order_by(user_roles.c.user_id, Role.name)
        )
        try:
            yield from _with_roles(chunks, cast("sqlite3.Cursor", links.cursor))
        finally:
            links.close()
    finally:
        users.close()


def _roles_listed(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row with the roles column (`_roles_column`) as the record's sorted list."""
    return (*row[:_ROLES_AT], _role_list(row[_ROLES_AT]), *row[_ROLES_AT + 1 :])


def _with_roles(
    chunks: Iterable[list[tuple[Any, ...]]], links: Iterable[tuple[int, str]]
) -> Iterator[list[tuple[Any, ...]]]:
    """Chunks of rows by id, each row with its user's role names (from `links`, (user id,
    name) by id then name) in the roles' place, or as it is (None there) for a user with none.
    A row with roles is found by its id (bisect), so a row without costs nothing in Python."""
    links = iter(links)
    link = next(links, None)
    for rows in chunks:
        last = rows[-1][0]
        if link is None or link[0] > last:  # no role in this chunk
            yield rows
            continue
        names: dict[int, list[str]] = {}
        while link is not None and link[0] <= last:
            names.setdefault(link[0], []).append(link[1])
            link = next(links, None)
        ids = list(map(_first, rows))
        for user_id, its_names in names.items():
            at = bisect_left(ids, user_id)
            if at < len(ids) and ids[at] == user_id:  # else a user the filters or the offset left out
                row = rows[at]
                rows[at] = (*row[:_ROLES_AT], its_names, *row[_ROLES_AT + 1 :])
        yield rows


_first = itemgetter(0)


def list_roles(db: Session) -> list[dict[str, Any]]:
    """Every role with its member count, by name."""
    members = func.count(user_roles.c.user_id)
    statement = select(Role.name, members.label("members")).outerjoin(user_roles).group_by(Role.id).order_by(Role.name)
    with reading(db):
        return [row._asdict() for row in db.execute(statement)]
