"""Totals from the usage ledger: per caller, model and outcome."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select

from .database import usage

_TOTALS = (
    func.count().label("requests"),
    func.coalesce(func.sum(usage.c.prompt_tokens), 0).label("prompt_tokens"),
    func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion_tokens"),
    func.coalesce(func.sum(usage.c.cost), 0.0).label("cost"),
)


def _totals(row: Any) -> dict[str, Any]:
    return {
        "requests": row.requests,
        "prompt_tokens": int(row.prompt_tokens),
        "completion_tokens": int(row.completion_tokens),
        "cost": round(float(row.cost), 8),
    }


def usage_rows(
    engine: Engine, *, since: datetime | None = None, caller: str | None = None
) -> list[dict[str, Any]]:
    """Totals grouped by caller and model, for the CLI report."""
    query = select(usage.c.caller, usage.c.model_requested, *_TOTALS).group_by(
        usage.c.caller, usage.c.model_requested
    )
    query = _filtered(query, since, caller).order_by(usage.c.caller, usage.c.model_requested)
    with engine.connect() as connection:
        return [
            {"caller": row.caller, "model": row.model_requested, **_totals(row)}
            for row in connection.execute(query)
        ]


def caller_summary(engine: Engine, caller: str, since: datetime | None = None) -> dict[str, Any]:
    """One caller's totals: overall, by model and by outcome."""
    with engine.connect() as connection:
        overall = connection.execute(_filtered(select(*_TOTALS), since, caller)).one()
        by = {}
        for name, column in (
            ("by_model", usage.c.model_requested),
            ("by_outcome", usage.c.outcome),
        ):
            query = _filtered(select(column.label("key"), *_TOTALS).group_by(column), since, caller)
            by[name] = {row.key: _totals(row) for row in connection.execute(query)}
    return {
        "caller": caller,
        "since": since.isoformat() if since else None,
        **_totals(overall),
        **by,
    }


def parse_moment(text: str) -> datetime:
    """An ISO 8601 date or time; ValueError unless it is one that has a UTC equivalent."""
    moment = datetime.fromisoformat(text)
    try:
        _as_utc(moment)  # 9999-12-31T23:59-05:00 is past the last moment a datetime can hold
    except OverflowError:
        raise ValueError(f"{text!r} is out of range") from None
    return moment


def _as_utc(moment: datetime) -> datetime:
    """`moment` in UTC; without a time zone it is taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _filtered(query: Any, since: datetime | None, caller: str | None) -> Any:
    if since is not None:
        # Rows are stored in UTC, and SQLite keeps only their wall time: compare in UTC.
        query = query.where(usage.c.at >= _as_utc(since))
    if caller is not None:
        query = query.where(usage.c.caller == caller)
    return query
