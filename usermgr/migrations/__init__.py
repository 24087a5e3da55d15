"""Alembic migrations shipped inside the package; `usermgr init` upgrades to head."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from usermgr.errors import ConfigurationError, cut_repr


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", "usermgr:migrations")
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to `revision`; a database already there is left as it is.

    A SQLite database is switched to write-ahead logging, which the file keeps: readers
    then never wait for a writer.
    A database at a revision this usermgr does not know (a newer usermgr wrote it) is
    refused before anything is written, the journal mode included.
    """
    _refuse_unknown_revisions(engine)
    if engine.dialect.name == "sqlite":
        connection = engine.raw_connection()  # outside any transaction, as SQLite requires
        try:
            connection.cursor().execute("PRAGMA journal_mode = WAL")
        finally:
            connection.close()
    command.upgrade(alembic_config(engine), revision)


def _refuse_unknown_revisions(engine: Engine) -> None:
    """ConfigurationError when the database names a revision none of our scripts has: alembic
    would fail inside with a bare CommandError, and an older usermgr must not touch a newer schema."""
    script = ScriptDirectory.from_config(alembic_config(engine))
    known = {rev.revision for rev in script.walk_revisions()}
    with engine.connect() as connection:
        unknown = [head for head in MigrationContext.configure(connection).get_current_heads() if head not in known]
    if unknown:
        raise ConfigurationError(
            f"the database is at schema revision {cut_repr(unknown[0])}, which this usermgr does not know"
            " (a newer usermgr wrote it): use that usermgr or a newer one; nothing was changed"
        )


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def revisions_oldest_first(engine: Engine) -> list[str]:
    script = ScriptDirectory.from_config(alembic_config(engine))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]
