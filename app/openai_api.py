"""The OpenAI-compatible surface: /v1/chat/completions (SSE or JSON) and /v1/models."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from .bodies import read_json_object
from .disconnects import watch_for_disconnect
from .errors import RelayError, handle_errors_as, render_openai_error
from .keys import resolve_key
from .presenters import present_as_sse
from .schemas import ChatCompletionRequest, load

bp = Blueprint("openai", __name__, url_prefix="/v1")

_chat_completion_request = ChatCompletionRequest()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


handle_errors_as(bp, render_openai_error)


@bp.post("/chat/completions")
def chat_completions() -> Response:
    payload = read_json_object(request)
    load(_chat_completion_request, payload)
    key = resolve_key(request, current_app.extensions["relay.settings"])
    openrouter = current_app.extensions["relay.openrouter"]
    if payload.get("stream"):
        payload.setdefault("usage", {"include": True})
        stream = openrouter.open_chat_stream(payload, key)
        stream.on_close(watch_for_disconnect(request.environ, stream.abandon))
        interval = current_app.extensions["relay.settings"].heartbeat_interval
        headers = {**SSE_HEADERS, "X-Generation-Id": stream.generation_id or ""}
        return Response(
            present_as_sse(stream, interval), content_type="text/event-stream", headers=headers
        )
    completion = openrouter.complete_chat(payload, key)
    return Response(completion.strip(), content_type="application/json")


@bp.get("/models")
def list_models() -> Response:
    models = current_app.extensions["relay.models"].models()
    return jsonify({"object": "list", "data": models})


@bp.get("/models/<path:model_id>")
def retrieve_model(model_id: str) -> Response:
    model = current_app.extensions["relay.models"].find(model_id)
    if model is None:
        error = RelayError(f"The model '{model_id}' does not exist", status=404)
        error.kind = "invalid_request_error"
        raise error
    return jsonify(model)
