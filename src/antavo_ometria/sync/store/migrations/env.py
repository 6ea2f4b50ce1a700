"""Alembic environment for the sync's state store; run through `StateStore.migrate()`."""

from alembic import context

from antavo_ometria.sync.store.state import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
