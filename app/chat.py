"""chatbot-ui's surface: POST /api/chat/openrouter answers with the reply as plain streamed text."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from .bodies import read_json_object
from .calls import open_stream, streamed_response
from .corking import corked_first_write
from .errors import handle_errors_as, render_message
from .keys import resolve_caller
from .presenters import commit_on_first_piece, present_as_text
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
    body = corked_first_write(commit_on_first_piece(present_as_text(stream)), request.environ)
    return streamed_response(body, stream, "text/plain; charset=utf-8", headers)
