"""Alembic environment: usermgr passes its engine in; there is no alembic.ini."""

from alembic import context

from usermgr import models  # noqa: F401  (registers the tables on Base.metadata)
from usermgr.database import WRITE, Base

_MIGRATION_LOCK = 0x7573_6D67_726D_6967  # "usmgrmig": the PostgreSQL advisory lock that orders migrations
engine = context.config.attributes["engine"]

with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # A table rebuild (batch mode) drops the old table: with foreign keys on, that would
        # cascade to user_roles. The pragma only takes effect outside a transaction, so it is
        # set on the driver's connection before SQLAlchemy begins one, and restored after.
        connection.connection.driver_connection.execute("PRAGMA foreign_keys = OFF")
    try:
        connection = connection.execution_options(**WRITE)
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=sqlite)
        with context.begin_transaction():
            if not sqlite:  # one migrator at a time: a second `init` waits, then finds the schema at head
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"a migration left {len(broken)} rows whose foreign keys point nowhere")
        connection.commit()
    finally:
        if sqlite:
            connection.connection.driver_connection.execute("PRAGMA foreign_keys = ON")
