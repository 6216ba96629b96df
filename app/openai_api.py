"""The OpenAI-compatible surface: /v1/chat/completions (SSE or JSON) and /v1/models."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError

from .bodies import read_json_object
from .calls import complete, event_stream_response, open_stream
from .database import database_away
from .errors import (
    BadRequest,
    RelayError,
    StorageUnavailable,
    handle_errors_as,
    render_openai_error,
)
from .keys import Caller, resolve_caller
from .reports import caller_summary, parse_moment
from .schemas import ChatCompletionRequest, load

log = logging.getLogger("relay")
bp = Blueprint("openai", __name__, url_prefix="/v1")

_chat_completion_request = ChatCompletionRequest()

handle_errors_as(bp, render_openai_error)


@bp.post("/chat/completions")
def chat_completions() -> Response:
    extensions = current_app.extensions
    settings = extensions["relay.settings"]
    caller = resolve_caller(request, settings, extensions["relay.profiles"])
    payload = read_json_object(request)
    load(_chat_completion_request, payload)
    named = [payload["model"]] if "model" in payload else []
    caller.check_models([*named, *payload.get("models", [])])
    model = payload.get("model") or payload["models"][0]
    # Costs and budgets come from the usage OpenRouter reports: a caller cannot turn it off.
    payload["usage"] = {**payload.get("usage", {}), "include": True}
    if payload.get("stream"):
        return event_stream_response(
            lambda: open_stream(caller, "openai", model, payload), settings.heartbeat_interval
        )
    raw, headers = complete(caller, "openai", model, payload)
    return Response(raw.strip(), content_type="application/json", headers=headers)


@bp.get("/models")
def list_models() -> Response:
    _require_caller()
    models = current_app.extensions["relay.models"].models()
    return jsonify({"object": "list", "data": models})


@bp.get("/models/<path:model_id>")
def retrieve_model(model_id: str) -> Response:
    _require_caller()
    model = current_app.extensions["relay.models"].find(model_id)
    if model is None:
        error = RelayError(f"The model '{model_id}' does not exist", status=404)
        error.kind = "invalid_request_error"
        raise error
    return jsonify(model)


@bp.get("/usage")
def usage_summary() -> Response:
    """The calling profile's own totals, overall and by model and outcome."""
    caller = _require_caller()
    since = request.args.get("since")
    try:
        start = parse_moment(since) if since else None
    except ValueError:
        raise BadRequest(
            "since must be an ISO 8601 date or time", {"since": ["Not a date."]}
        ) from None
    try:
        summary = caller_summary(current_app.extensions["relay.database"], caller.name, start)
    except SQLAlchemyError as error:
        if not database_away(error):
            raise
        log.warning("usage totals unavailable: %s", type(error).__name__)
        raise StorageUnavailable(
            "The relay's usage ledger cannot be read right now; try again shortly"
        ) from None
    return jsonify(summary)


def _require_caller() -> Caller:
    """The caller of a request that spends nothing upstream: valid (401 otherwise), no key."""
    extensions = current_app.extensions
    return resolve_caller(
        request, extensions["relay.settings"], extensions["relay.profiles"], paying=False
    )
