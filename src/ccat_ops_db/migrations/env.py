"""Alembic environment of the operations database.

The URL is handed in by ``ccat_ops_db.migrate`` (``config.attributes['url']`` or the
``sqlalchemy.url`` option); this file reads no environment itself.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from ccat_ops_db.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.attributes.get("url") or config.get_main_option("sqlalchemy.url")


def _migrate(**how: object) -> None:
    """Run the migrations, offline (``url``, ``literal_binds``) or on a ``connection``."""
    context.configure(
        target_metadata=target_metadata, render_as_batch=True, compare_type=True, **how
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    _migrate(url=_url(), literal_binds=True)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection=connection)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as conn:
        _migrate(connection=conn)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
