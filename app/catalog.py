"""The model list, cached per worker: one upstream fetch at a time, stale rather than nothing."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import UpstreamError

log = logging.getLogger("relay")

_RETRY_FAILED_AFTER = 10.0

Fetch = Callable[[], list[dict[str, Any]]]


class ModelCatalog:
    """OpenRouter's models in OpenAI's list shape, refreshed at most every `ttl` seconds."""

    def __init__(self, fetch: Fetch, ttl: float) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._models: list[dict[str, Any]] | None = None
        self._fetched_at = float("-inf")
        self._refreshing = threading.Lock()

    def models(self) -> list[dict[str, Any]]:
        """The cached list; refreshed first when it is older than the TTL.

        While one caller refreshes, the others get the stale list (or wait, if there is none yet).
        A failed refresh serves the stale list; with nothing cached, the failure is raised.
        """
        if not self._is_stale():
            return self._models  # type: ignore[return-value]
        if not self._refreshing.acquire(blocking=self._models is None):
            return self._models  # type: ignore[return-value]
        try:
            if self._is_stale():
                self._refresh()
            return self._models  # type: ignore[return-value]
        finally:
            self._refreshing.release()

    def find(self, model_id: str) -> dict[str, Any] | None:
        return next((model for model in self.models() if model["id"] == model_id), None)

    def _is_stale(self) -> bool:
        return self._models is None or time.monotonic() - self._fetched_at >= self._ttl

    def _refresh(self) -> None:
        try:
            listing = self._fetch()
        except UpstreamError as error:
            if self._models is None:
                raise
            log.warning("serving the stale model list; refresh failed: %s", error.message)
            # Try again soon, but not on every request while OpenRouter is failing.
            self._fetched_at = time.monotonic() - self._ttl + min(self._ttl, _RETRY_FAILED_AFTER)
            return
        self._models = [as_openai_model(model) for model in listing if isinstance(model, dict)]
        self._fetched_at = time.monotonic()


def as_openai_model(model: dict[str, Any]) -> dict[str, Any]:
    """One OpenRouter model as an OpenAI model object, keeping OpenRouter's extra fields."""
    model_id = str(model.get("id", ""))
    return {
        "id": model_id,
        "object": "model",
        "created": model.get("created", 0),
        "owned_by": model_id.split("/", 1)[0] if "/" in model_id else "openrouter",
        **{key: value for key, value in model.items() if key not in ("id", "object")},
    }
