"""chatbot-ui's surface: POST /api/chat/openrouter answers with the reply as plain streamed text."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from .bodies import read_json_object
from .disconnects import watch_for_disconnect
from .errors import handle_errors_as, render_message
from .keys import resolve_caller
from .ledger import UsageRow
from .presenters import commit_on_first_piece, present_as_text
from .schemas import ChatbotRequest, load

bp = Blueprint("chat", __name__)
handle_errors_as(bp, render_message)

_chatbot_request = ChatbotRequest()

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@bp.post("/api/chat/openrouter")
def chat() -> Response:
    payload = load(_chatbot_request, read_json_object(request))
    extensions = current_app.extensions
    caller = resolve_caller(request, extensions["relay.settings"], extensions["relay.profiles"])
    chat_settings = payload["chatSettings"]
    caller.check_models([chat_settings["model"]])
    upstream_payload = {
        "model": chat_settings["model"],
        "messages": payload["messages"],
        "usage": {"include": True},
    }
    if chat_settings.get("temperature") is not None:
        upstream_payload["temperature"] = chat_settings["temperature"]

    admission = extensions["relay.quotas"].admit(caller)
    ledger = extensions["relay.ledger"]
    row = UsageRow(caller.name, "chatbot", chat_settings["model"])
    with admission.released_on_failure(), ledger.recording_failures(row):
        stream = extensions["relay.openrouter"].open_chat_stream(upstream_payload, caller.key)
    stream.on_close(admission.release)
    ledger.follow(stream, row)
    stream.on_close(watch_for_disconnect(request.environ, stream.abandon))
    body = commit_on_first_piece(present_as_text(stream))
    headers = {
        **STREAM_HEADERS,
        **admission.headers,
        "X-Generation-Id": stream.generation_id or "",
    }
    response = Response(body, content_type="text/plain; charset=utf-8", headers=headers)
    # The stream is closed even when the server closes the body without reading it.
    response.call_on_close(stream.close)
    return response
