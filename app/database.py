"""The relay's tables and its SQLAlchemy engine: SQLite by default, PostgreSQL to scale out."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

metadata = MetaData()

profiles = Table(
    "profiles",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("openrouter_key", Text),  # encrypted with a key derived from SECRET_KEY
    Column("models", Text, nullable=False, default="[]"),  # JSON list of glob patterns
    Column("rpm", Integer),
    Column("concurrency", Integer),
    Column("monthly_budget", Float),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

usage = Table(
    "usage",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("caller", String(100), nullable=False, index=True),
    Column("surface", String(20), nullable=False),
    Column("model_requested", String(200)),
    Column("model_served", String(200)),
    Column("generation_id", String(100)),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("total_tokens", Integer),
    Column("cost", Float),
    Column("outcome", String(20), nullable=False),
    Column("upstream_status", Integer),
    Column("ttft_ms", Float),
    Column("duration_ms", Float),
    Column("retries", Integer, nullable=False, default=0),
)


def engine_for(database_url: str, instance_path: str) -> Engine:
    """The engine for DATABASE_URL; without one, an SQLite file in the instance folder."""
    if not database_url:
        Path(instance_path).mkdir(parents=True, exist_ok=True)
        database_url = f"sqlite:///{Path(instance_path) / 'relay.sqlite3'}"
    if database_url.startswith("sqlite"):
        engine = create_engine(database_url, connect_args={"timeout": 5})
        event.listen(engine, "connect", _sqlite_for_a_busy_service)
        return engine
    scheme, rest = database_url.split("://", 1)
    if scheme in ("postgres", "postgresql"):
        database_url = f"postgresql+psycopg://{rest}"  # Heroku still sets postgres://
    return create_engine(
        database_url,
        pool_size=10,
        max_overflow=40,
        pool_timeout=5,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 3},
    )


def _sqlite_for_a_busy_service(connection, _record) -> None:
    """WAL: readers never wait for the ledger's writer, and a commit syncs the log only at
    checkpoints. sqlite3 is not cooperative under gevent, so every fsync a commit waits for
    stalls all the worker's streams."""
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")


_DATABASE_AWAY = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout, OSError)
_SCHEMA_BEHIND = ("42P01", "42703")  # PostgreSQL: no such table or column (not migrated yet)


def database_away(error: Exception) -> bool:
    """Whether `error` means "try again later" (unreachable, locked, not migrated) rather than
    a fault of the statement or its values."""
    if isinstance(error, _DATABASE_AWAY):
        return True
    return getattr(getattr(error, "orig", None), "sqlstate", None) in _SCHEMA_BEHIND
