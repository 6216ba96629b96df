"""chatbot-ui's surface: POST /api/chat/openrouter answers with the reply as plain streamed text."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from .bodies import read_json_object
from .calls import open_stream
from .errors import handle_errors_as, render_message
from .first_piece import FirstPieceResponse
from .keys import resolve_caller
from .presenters import present_as_text
from .schemas import ChatbotRequest, load

bp = Blueprint("chatbot", __name__)
handle_errors_as(bp, render_message)

_chatbot_request = ChatbotRequest()


@bp.post("/api/chat/openrouter")
def chat() -> Response:
    extensions = current_app.extensions
    caller = resolve_caller(request, extensions["relay.settings"], extensions["relay.profiles"])
    payload = load(_chatbot_request, read_json_object(request))
    chat_settings = payload["chatSettings"]
    caller.check_models([chat_settings["model"]])
    upstream_payload = {
        "model": chat_settings["model"],
        "messages": payload["messages"],
        "usage": {"include": True},
    }
    if chat_settings.get("temperature") is not None:
        upstream_payload["temperature"] = chat_settings["temperature"]
    stream, headers = open_stream(caller, "chatbot", chat_settings["model"], upstream_payload)
    response = FirstPieceResponse(
        present_as_text(stream), render_message, content_type="text/plain; charset=utf-8"
    )
    response.headers.update(headers)
    response.call_on_close(stream.close)  # even if the body is never read
    return response
