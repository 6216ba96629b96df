"""A small versioned schema: each migration runs once, in order, recorded in schema_version.

Run by the Procfile's release command and by `flask db upgrade`; the web process never alters
the schema.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Column, Connection, Engine, Integer, MetaData, Table, inspect, select

from .database import metadata as relay_metadata
from .database import profiles, usage

_versions_metadata = MetaData()
schema_version = Table(
    "schema_version", _versions_metadata, Column("version", Integer, primary_key=True)
)


def _create_profiles_and_usage(connection: Connection) -> None:
    relay_metadata.create_all(connection, tables=[profiles, usage])


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "profiles and the usage ledger", _create_profiles_and_usage),
]

LATEST = MIGRATIONS[-1][0]


def current_version(engine: Engine) -> int:
    """The schema's version: 0 for an empty database."""
    if not inspect(engine).has_table("schema_version"):
        return 0
    with engine.connect() as connection:
        return connection.execute(select(schema_version.c.version)).scalar() or 0


def upgrade(engine: Engine) -> list[str]:
    """Apply the migrations the database has not seen; returns their descriptions."""
    applied = []
    with engine.begin() as connection:
        _versions_metadata.create_all(connection)
        version = connection.execute(select(schema_version.c.version)).scalar()
        if version is None:
            connection.execute(schema_version.insert().values(version=0))
            version = 0
        for number, description, migrate in MIGRATIONS:
            if number > version:
                migrate(connection)
                connection.execute(schema_version.update().values(version=number))
                applied.append(f"{number}: {description}")
    return applied
