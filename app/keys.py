"""Which OpenRouter key pays for a request."""

from __future__ import annotations

from flask import Request

from .config import Settings
from .errors import KeyNotFound


def resolve_key(request: Request, settings: Settings) -> str:
    """The OpenRouter key for this request: for now the server's own `OPENROUTER_API_KEY`."""
    if not settings.openrouter_api_key:
        raise KeyNotFound()
    return settings.openrouter_api_key
