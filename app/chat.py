"""chatbot-ui's surface: POST /api/chat/openrouter answers with the reply as plain streamed text."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from .bodies import read_json_object
from .disconnects import watch_for_disconnect
from .errors import handle_errors_as, render_message
from .keys import resolve_key
from .presenters import commit_on_first_piece, present_as_text
from .schemas import ChatbotRequest, load

bp = Blueprint("chat", __name__)
handle_errors_as(bp, render_message)

_chatbot_request = ChatbotRequest()

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@bp.post("/api/chat/openrouter")
def chat() -> Response:
    payload = load(_chatbot_request, read_json_object(request))
    settings = current_app.extensions["relay.settings"]
    key = resolve_key(request, settings)
    chat_settings = payload["chatSettings"]
    upstream_payload = {"model": chat_settings["model"], "messages": payload["messages"]}
    if chat_settings.get("temperature") is not None:
        upstream_payload["temperature"] = chat_settings["temperature"]
    stream = current_app.extensions["relay.openrouter"].open_chat_stream(upstream_payload, key)
    stream.on_close(watch_for_disconnect(request.environ, stream.abandon))
    body = commit_on_first_piece(present_as_text(stream))
    headers = {**STREAM_HEADERS, "X-Generation-Id": stream.generation_id or ""}
    return Response(body, content_type="text/plain; charset=utf-8", headers=headers)
