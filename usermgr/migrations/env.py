"""Alembic environment: usermgr passes its engine in; there is no alembic.ini."""

from alembic import context

from usermgr import models  # noqa: F401  (registers the tables on Base.metadata)
from usermgr.database import WRITE, Base

engine = context.config.attributes["engine"]

with engine.connect() as connection:
    connection = connection.execution_options(**WRITE)
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
