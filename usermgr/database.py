"""The engine, `SessionLocal`, the declarative `Base`, and SQLite's connection settings."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Engine, create_engine, event, exc
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, sessionmaker
from sqlalchemy.types import TypeDecorator

from usermgr.config import sqlite_path
from usermgr.errors import DatabaseUnavailable

SQLITE_BUSY_TIMEOUT_MS = 30_000

# expire_on_commit=False: the service hands committed users back to the faces to render.
SessionLocal = sessionmaker(expire_on_commit=False)

WRITE = {"usermgr_write": True}
"""Execution options a write transaction starts with: on SQLite it takes the write lock
at BEGIN (BEGIN IMMEDIATE), so two writers queue on busy_timeout instead of one failing
with "database is locked" when it upgrades a read lock."""

_engine: Engine | None = None


class Base(DeclarativeBase):
    pass


class UtcDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and always handed back timezone-aware.

    SQLite keeps no zone, so it stores the UTC wall time; PostgreSQL uses timestamptz.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: usermgr stores only timezone-aware UTC times")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event emit BEGIN itself (see _on_sqlite_begin); on Python
    # 3.11 that is isolation_level=None, then plain cursor.execute for the pragmas.
    # WAL is not set here: it is stored in the file, so `usermgr init` sets it once
    # (migrations.upgrade), and a read-only command never rewrites a file it only reads.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


def _on_sqlite_begin(connection: Connection) -> None:
    mode = "IMMEDIATE" if connection.get_execution_options().get("usermgr_write") else "DEFERRED"
    connection.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str) -> Engine:
    """A new engine for `url`, with SQLite's pragmas and write locking wired in."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _on_sqlite_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _check_sqlite_path(url: str, must_exist: bool) -> None:
    if not url.startswith("sqlite"):
        return
    path = sqlite_path(url)
    if path is None:
        raise DatabaseUnavailable("an in-memory SQLite database vanishes when usermgr exits: give a file path")
    if must_exist and not path.exists():
        raise DatabaseUnavailable(
            f"no database at {path}: create it with `usermgr init` or point --db at an existing one"
        )
    if not path.parent.is_dir():
        raise DatabaseUnavailable(f"cannot create a database at {path}: the directory {path.parent} does not exist")


def configure(url: str, *, must_exist: bool = True) -> Engine:
    """Bind `SessionLocal` to the process's one engine for `url`.

    With `must_exist`, a SQLite path that does not exist is an error rather than a new
    empty file: only `usermgr init` creates a database.
    """
    global _engine
    path = sqlite_path(url)
    if must_exist and path is not None and not path.exists():
        raise DatabaseUnavailable(
            f"no database at {path}: create it with `usermgr init` or point --db at an existing one"
        )
    if _engine is not None and str(_engine.url) == url:
        return _engine
    if _engine is not None:
        _engine.dispose()
    try:
        _engine = make_engine(url)
    except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as error:
        raise DatabaseUnavailable(f"cannot use database URL {url!r}: {error}") from None
    SessionLocal.configure(bind=_engine)
    return _engine


def as_domain_error(error: BaseException) -> DatabaseUnavailable | None:
    """A user-facing error for a failure of the database itself, or None if it is not one.

    Raw sqlite3 errors count too: `init` sets the journal mode on the driver's connection.
    """
    failures = (exc.OperationalError, exc.DatabaseError, exc.InterfaceError, sqlite3.DatabaseError)
    if not isinstance(error, failures) or isinstance(error, (exc.IntegrityError, sqlite3.IntegrityError)):
        return None
    text = str(getattr(error, "orig", error)).strip().splitlines()[0] if str(error) else type(error).__name__
    lowered = text.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return DatabaseUnavailable("the database has no usermgr schema: run `usermgr init` first")
    if "not a database" in lowered or "malformed" in lowered:
        return DatabaseUnavailable(f"the database file is corrupt or not SQLite ({text}): restore it from a backup")
    return DatabaseUnavailable(f"cannot use the database: {text}")
