"""A database (its engine and `SessionLocal`), the declarative `Base`, and SQLite's
connection settings."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

from sqlalchemy import URL, Boolean, DateTime, Engine, and_, bindparam, create_engine, event, exc
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, sessionmaker
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator, TypeEngine

from usermgr.config import ACCEPTED_DATABASE_URLS, normalize_database_url
from usermgr.errors import ConfigurationError, DatabaseUnavailable, UnreadableTimestamp

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.pool import ConnectionPoolEntry
    from sqlalchemy.sql import ColumnElement
    from sqlalchemy.sql.compiler import SQLCompiler

SQLITE_BUSY_TIMEOUT_MS = 30_000

WRITE = {"usermgr_write": True}
"""Execution options a write transaction starts with: on SQLite it takes the write lock
at BEGIN (BEGIN IMMEDIATE), so two writers queue on busy_timeout instead of one failing
with "database is locked" when it upgrades a read lock."""

_DRIVERS = {"sqlite": ("", "pysqlite"), "postgresql": ("psycopg",)}
"""The databases usermgr keeps users in, with the drivers it ships (psycopg 3: the
`postgres` extra). `postgresql://` means psycopg 3 (config.normalize_database_url)."""


class Base(DeclarativeBase):
    pass


class _SqliteStoredTime(sqlite.DATETIME):
    """SQLite's DATETIME (its text written and parsed exactly as SQLAlchemy does), a stored
    value that is not a timestamp (text that is none, a number, bytes, a time with an offset
    that is beyond year 9999 in UTC) raised as UnreadableTimestamp rather than a bare error."""

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        parse = super().result_processor(dialect, coltype)
        if parse is None:
            return None

        def process(value: Any) -> Any:
            try:
                moment = parse(value)
                return moment if moment is None or moment.tzinfo is None else moment.astimezone(UTC)
            except (ValueError, TypeError, OverflowError):
                raise UnreadableTimestamp(value) from None

        return process


class StrictBoolean(Boolean):
    """A true/false column that reads only true or false: on SQLite, which keeps any value in
    it, a value other than 0 or 1 is UnreadableBoolean (output.stored_truth), where
    SQLAlchemy's own reading, `bool(value)`, made another tool's 'no' or 'false' an enabled
    user. A Boolean itself (not a TypeDecorator), so `is_(True)` still compiles as `IS true`."""

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)
        from usermgr.output import stored_truth

        return stored_truth


class UtcDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and always handed back timezone-aware.

    SQLite keeps no zone, so it stores the UTC wall time; PostgreSQL uses timestamptz.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(_SqliteStoredTime())
        return dialect.type_descriptor(self.impl)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: usermgr stores only timezone-aware UTC times")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Instant(FunctionElement[Any]):
    """A stored time as the instant it names, for comparing in SQL (see `earlier_than`)."""

    name = "usermgr_instant"
    inherit_cache = True


@compiles(_Instant)
def _instant_as_stored(element: _Instant, compiler: SQLCompiler, **kw: Any) -> str:
    """A database that keeps times as times (PostgreSQL's timestamptz) compares them as they are."""
    return compiler.process(element.clauses, **kw)


@compiles(_Instant, "sqlite")
def _instant_on_sqlite(element: _Instant, compiler: SQLCompiler, **kw: Any) -> str:
    """SQLite keeps text: julianday() reads the layouts another tool may write (`T` for the
    space, `Z`, an offset, no fraction) as the instant UtcDateTime reads, to the millisecond.
    Text it cannot read is NULL, which compares as neither earlier nor later (a value that
    is no time at all is refused anyway as soon as the row is read: UnreadableTimestamp)."""
    return f"julianday({compiler.process(element.clauses, **kw)})"


_SLACK = timedelta(days=2)
"""More than any offset a stored local time may carry (julianday reads up to ±14:00): a time
stored with its date as text is within a day of its UTC date, so the plain text comparison
with a bound moved by this much keeps every row the exact one does, and an index can answer it."""


def earlier_than(column: Any, moment: datetime) -> ColumnElement[bool]:
    """`column < moment` for a stored UtcDateTime, compared as instants.

    On SQLite a plain comparison compares text: a time another tool stored as
    `2026-01-02T09:00:00` or with an offset compared wrong by up to a day, so an account
    expired an hour ago could still log in. The text comparison with a slack bound stays in
    front (an index answers it); the exact one decides. A value SQLite cannot read as a time
    is in neither `earlier_than` nor `later_than`: a rule built on them fails closed."""
    return and_(column < _bound(_shifted(moment, _SLACK)), _Instant(column) < _Instant(_bound(moment)))


def later_than(column: Any, moment: datetime) -> ColumnElement[bool]:
    """`column > moment` for a stored UtcDateTime, compared as instants (see `earlier_than`)."""
    return and_(column > _bound(_shifted(moment, -_SLACK)), _Instant(column) > _Instant(_bound(moment)))


def _bound(moment: datetime) -> Any:
    return bindparam(None, moment, type_=UtcDateTime())


def _shifted(moment: datetime, by: timedelta) -> datetime:
    """`moment + by`, held at the ends of the calendar."""
    try:
        return moment + by
    except OverflowError:
        return (datetime.max if by > timedelta(0) else datetime.min).replace(tzinfo=UTC)


def _on_sqlite_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
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


@contextmanager
def undecodable_text_as_bytes(connection: Connection) -> Iterator[None]:
    """While it holds, SQLite TEXT that is no UTF-8 (usermgr never writes it: another tool or an
    edit did) comes back from `connection` as its bytes, which the reader can name, instead of
    failing the whole read in the driver ("Could not decode to UTF-8"). A BLOB is bytes anyway."""
    if connection.dialect.name != "sqlite":
        yield
        return
    driver = cast(sqlite3.Connection, connection.connection.driver_connection)
    before = driver.text_factory
    driver.text_factory = _text_or_bytes
    try:
        yield
    finally:
        driver.text_factory = before


def _text_or_bytes(stored: bytes) -> str | bytes:
    try:
        return stored.decode()
    except UnicodeDecodeError:
        return stored


def make_engine(url: str | URL, *, pool_size: int | None = None) -> Engine:
    """A new engine for `url`, with SQLite's pragmas and write locking wired in. `pool_size`:
    at most that many connections, kept open once made (a server with that many threads: none
    waits for a connection); None: SQLAlchemy's pool (5, and 10 more while busy)."""
    pool = {} if pool_size is None else {"pool_size": pool_size, "max_overflow": 0}
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, hide_parameters=True, **pool
        )
        event.listen(engine, "connect", _on_sqlite_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
        return engine
    # READ COMMITTED whatever the server's default: a writer reads the audit chain's head after
    # it takes the chain's lock, and must see the event the writer before it committed.
    return create_engine(url, pool_pre_ping=True, hide_parameters=True, isolation_level="READ COMMITTED", **pool)


def masked(url: URL) -> str:
    """`url` as messages and logs may show it: the password as `***`."""
    return url.render_as_string(hide_password=True)


def _scrub(text: str, url: URL | None) -> str:
    """`text` with `url`'s password masked wherever it appears, as text or percent-encoded.

    A password shorter than 4 characters is left alone: it turns up inside ordinary words,
    and masking it there would garble the message without hiding anything."""
    password = url.password if url is not None else None
    if not password or len(password) < 4:
        return text
    for form in (password, quote(password, safe="")):
        text = text.replace(form, "***")
    return text


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_url(url: str) -> URL:
    """The parsed URL of a database usermgr can keep users in, or ConfigurationError saying
    what is accepted. Never names the password, nor an unparsed URL that may hold one."""
    try:
        parsed = make_url(normalize_database_url(url))
    except (exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigurationError(f"the database URL cannot be read: {ACCEPTED_DATABASE_URLS}") from None
    backend, _, driver = parsed.drivername.partition("+")
    if driver not in _DRIVERS.get(backend, ()):
        raise ConfigurationError(
            f"unsupported database {parsed.drivername!r} in {masked(parsed)}: {ACCEPTED_DATABASE_URLS}"
        )
    if parsed.host is not None and "@" in parsed.host:
        raise ConfigurationError(
            f"the database URL has an '@' after the password: write it as %40 in the password; {ACCEPTED_DATABASE_URLS}"
        )
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ConfigurationError(f"port {parsed.port} in {masked(parsed)} is not 1 to 65535: {ACCEPTED_DATABASE_URLS}")
    if backend == "sqlite" and (parsed.host or parsed.username or parsed.password or parsed.port):
        raise ConfigurationError(f"a SQLite URL names a file only, no host or user: {ACCEPTED_DATABASE_URLS}")
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "an in-memory SQLite database (sqlite:///:memory:, sqlite://) vanishes when usermgr exits:"
            " give a file path, such as sqlite:///users.db"
        )
    return parsed


def _check_sqlite_file(url: URL, must_exist: bool) -> None:
    if url.get_backend_name() != "sqlite" or url.database is None:
        return
    path = Path(url.database)
    if must_exist and not path.exists():
        raise DatabaseUnavailable(
            f"no database at {path}: create it with `usermgr init` or point --db at an existing one"
        )
    if not path.parent.is_dir():
        raise DatabaseUnavailable(f"cannot create a database at {path}: the directory {path.parent} does not exist")


class Database:
    """One database: its engine, and `SessionLocal` (the name the FastAPI tutorial uses)
    to open sessions on it. The CLI holds one for its process, each `api.create_app` its
    own, so two apps on two databases in one process never share an engine.

    With `must_exist`, a SQLite path that does not exist is an error rather than a new
    empty file: only `usermgr init` creates a database. An in-memory database is refused:
    every command that opens a database means to keep what it does.
    """

    def __init__(self, url: str, *, must_exist: bool = True, pool_size: int | None = None) -> None:
        parsed = check_url(url)
        _check_sqlite_file(parsed, must_exist)
        try:
            self.engine = make_engine(parsed, pool_size=pool_size)
        except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as error:
            raise ConfigurationError(
                f"cannot use database URL {masked(parsed)}: {_scrub(_first_line(error), parsed)}"
            ) from None
        # expire_on_commit=False: the service hands committed users back to the faces to render.
        self.SessionLocal = sessionmaker(bind=self.engine, expire_on_commit=False)

    def dispose(self) -> None:
        """Close every pooled connection (a test drops the database after)."""
        self.engine.dispose()


def as_domain_error(error: BaseException, url: URL | None = None) -> DatabaseUnavailable | None:
    """A user-facing error for a failure of the database itself, or None if it is not one;
    the password of `url` (the database's, when one was opened) is masked in its text.

    Raw sqlite3 errors count too: `init` sets the journal mode on the driver's connection.
    """
    failures = (exc.OperationalError, exc.DatabaseError, exc.InterfaceError, sqlite3.DatabaseError)
    if not isinstance(error, failures) or isinstance(error, (exc.IntegrityError, sqlite3.IntegrityError)):
        return None
    text = _first_line(getattr(error, "orig", error)) if str(error) else type(error).__name__
    text = _scrub(text, url)
    lowered = text.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return DatabaseUnavailable("the database has no usermgr schema: run `usermgr init` first")
    if "not a database" in lowered or "malformed" in lowered:
        return DatabaseUnavailable(f"the database file is corrupt or not SQLite ({text}): restore it from a backup")
    return DatabaseUnavailable(f"cannot use the database: {text}")
