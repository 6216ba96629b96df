"""Liveness and readiness: neither ever calls OpenRouter."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import SQLAlchemyError

from .migrations import LATEST, current_version

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive and answering."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    """Ready to serve: the database answers with the current schema, Redis answers when it is
    configured, and the configuration (validated at start-up) is in force. 503 otherwise."""
    extensions = current_app.extensions
    checks = {"configuration": "ok", "database": _database(extensions["relay.database"])}
    if extensions["relay.settings"].redis_url:
        checks["redis"] = _redis(extensions["relay.quotas"])
    ready = all(outcome == "ok" for outcome in checks.values())
    return jsonify({"status": "ready" if ready else "not ready", "checks": checks}), (
        200 if ready else 503
    )


def _database(engine) -> str:
    try:
        version = current_version(engine)
    except SQLAlchemyError as error:
        return f"unavailable ({type(error).__name__})"
    if version != LATEST:
        return f"schema at version {version}, not {LATEST}: run flask db upgrade"
    return "ok"


def _redis(quotas) -> str:
    try:
        quotas.ping()
    except quotas.failures as error:
        return f"unavailable ({type(error).__name__})"
    return "ok"
