"""alembic environment: flagsched hands it a connection (online) or a dialect (--sql).

One transaction per revision (`transaction_per_migration`), so a revision may run
`CREATE INDEX CONCURRENTLY` inside `op.get_context().autocommit_block()`. Online, the
connection comes outside any transaction: alembic begins each one (flagsched.migrate takes
the migration lock at every begin)."""

from alembic import context

from flagsched.schema import metadata

config = context.config


def run_offline() -> None:
    context.configure(
        dialect_name="postgresql",
        target_metadata=metadata,
        literal_binds=True,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes["connection"]
    context.configure(
        connection=connection, target_metadata=metadata, transaction_per_migration=True
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
