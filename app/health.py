"""Liveness: answers without touching the upstream or any store."""

from flask import Blueprint

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}
