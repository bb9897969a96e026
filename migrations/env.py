"""alembic environment: flagsched hands it a connection (online) or a dialect (--sql)."""

from alembic import context

from flagsched.schema import metadata

config = context.config


def run_offline() -> None:
    context.configure(dialect_name="postgresql", target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes["connection"]
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
