"""POST /api/chat/openrouter through Flask's test client, against the fake OpenRouter."""

import json
import logging
import time

import pytest

from app import create_app
from app.errors import StreamCutOff
from tests.conftest import SERVER_KEY
from tests.fake_openrouter import Scenario

ENDPOINT = "/api/chat/openrouter"


def chatbot_body(model="openai/gpt-4o-mini", **settings):
    return {
        "chatSettings": {
            "model": model,
            "temperature": 0.5,
            "prompt": "You are a friendly assistant.",
            "contextLength": 4096,
            "includeProfileContext": True,
            "includeWorkspaceInstructions": True,
            "embeddingsProvider": "openai",
            **settings,
        },
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ],
    }


def post(client, body, **kwargs):
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return client.post(ENDPOINT, data=data, **kwargs)


def test_the_reply_streams_back_as_plain_text(client, fake):
    fake.script("openai/gpt-4o-mini", Scenario(tokens=["Hel", "lo", " there", "!"]))
    response = post(client, chatbot_body())
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["X-Generation-Id"] == fake.received[0].generation_id
    assert response.get_data(as_text=True) == "Hello there!"


def test_only_model_messages_temperature_and_stream_go_upstream(client, fake):
    body = chatbot_body()
    post(client, body).get_data()
    (received,) = fake.requests_for("openai/gpt-4o-mini")
    assert received.path == "/api/v1/chat/completions"
    assert received.body == {
        "model": "openai/gpt-4o-mini",
        "messages": body["messages"],
        "temperature": 0.5,
        "usage": {"include": True},
        "stream": True,
    }
    assert received.header("Authorization") == f"Bearer {SERVER_KEY}"
    assert received.header("HTTP-Referer") is None
    assert received.header("X-Title") is None


def test_the_upstream_call_sends_only_the_headers_it_needs(client, fake):
    post(client, chatbot_body(), headers={"X-Request-ID": "req-1"}).get_data()
    (received,) = fake.received
    assert sorted(name.lower() for name in received.headers) == [
        "accept-encoding",
        "authorization",
        "content-length",
        "content-type",
        "host",
        "user-agent",
        "x-request-id",
    ]
    assert received.header("Accept-Encoding") == "identity"  # relayed bytes as sent


def test_attribution_headers_come_from_the_environment(relay_env, fake):
    app = create_app(
        {**relay_env, "OPENROUTER_APP_URL": "https://chat.example", "OPENROUTER_APP_TITLE": "Chat"}
    )
    post(app.test_client(), chatbot_body()).get_data()
    (received,) = fake.received
    assert received.header("HTTP-Referer") == "https://chat.example"
    assert received.header("X-Title") == "Chat"


def test_leading_whitespace_before_the_first_visible_token_is_dropped(client, fake):
    fake.script("m/space", Scenario(tokens=["\n", "  Hi", " you"]))
    assert post(client, chatbot_body("m/space")).get_data(as_text=True) == "Hi you"


def test_multibyte_characters_split_across_network_reads_arrive_intact(client, fake):
    tokens = ["héllo ", "wörld ", "✓ ", "日本語 ", "🙂"]
    fake.script("m/utf8", Scenario(tokens=tokens, split_writes=3))
    assert post(client, chatbot_body("m/utf8")).get_data(as_text=True) == "".join(tokens)


def test_image_parts_are_accepted_and_forwarded(client, fake):
    body = chatbot_body()
    body["messages"][-1]["content"] = [
        {"type": "text", "text": "What is this?"},
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
        },
    ]
    assert post(client, body).status_code == 200
    assert fake.received[0].body["messages"] == body["messages"]


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda b: b["chatSettings"].update(model=""), "chatSettings.model"),
        (lambda b: b["chatSettings"].pop("model"), "chatSettings.model"),
        (lambda b: b["chatSettings"].update(model="m/" + "x" * 199), "chatSettings.model"),
        (lambda b: b["chatSettings"].update(temperature=2.5), "chatSettings.temperature"),
        (lambda b: b["chatSettings"].update(temperature="0.5"), "chatSettings.temperature"),
        (lambda b: b.pop("chatSettings"), "chatSettings"),
        (lambda b: b.update(messages=[]), "messages"),
        (lambda b: b.update(messages="Hello"), "messages"),
        (lambda b: b["messages"][1].update(role="robot"), "messages.1.role"),
        (lambda b: b["messages"][1].update(content=42), "messages.1.content"),
        (lambda b: b["messages"][1].pop("content"), "messages.1.content"),
        (
            lambda b: b["messages"][1].update(content=[{"type": "image_url", "image_url": {}}]),
            "messages.1.content.0.image_url.url",
        ),
        (
            lambda b: b["messages"][1].update(content=[{"type": "text"}]),
            "messages.1.content.0.text",
        ),
        (
            lambda b: b["messages"].append({"role": "tool", "content": "42"}),
            "messages.2.tool_call_id",
        ),
        (
            lambda b: b["messages"][1].update(content=[{"type": {"a": 1}}]),
            "messages.1.content.0.type",
        ),
        (
            lambda b: b["messages"][1].update(content=[{"type": ["text"], "text": "Hi"}]),
            "messages.1.content.0.type",
        ),
    ],
)
def test_an_invalid_payload_is_refused_naming_the_field(client, fake, mutate, path):
    body = chatbot_body()
    mutate(body)
    response = post(client, body)
    assert response.status_code == 400
    answer = response.get_json()
    assert path in answer["errors"]
    assert answer["message"].startswith(f"Invalid request: {path}: ")
    assert fake.received == []


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b'{"chatSettings": \xff}', "not valid UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"hello"', "must be a JSON object"),
        (b'{"chatSettings": {"model": "m", "temperature": NaN}, "messages": []}', "NaN"),
        (
            b'{"chatSettings": {"model": "m"}, "messages": [{"role": "user", "content": "Hi", '
            b'"x": -1e400}]}',
            "-1e400 is too large",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_400(client, fake, raw, says):
    response = post(client, raw)
    assert response.status_code == 400
    assert says in response.get_json()["message"]
    assert fake.received == []


@pytest.mark.parametrize(
    ("escaped", "path"),
    [
        (r'"content": "\ud800"', "messages.1.content"),
        (r'"content": "ok \uDFFF then"', "messages.1.content"),
        (r'"content": [{"type": "text", "text": "\udc00\ud800"}]', "messages.1.content.0.text"),
        (r'"content": "Hello", "name": "\ud83d"', "messages.1.name"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_the_field(client, fake, escaped, path):
    raw = json.dumps(chatbot_body()).replace('"content": "Hello"', escaped)
    response = post(client, raw)
    assert response.status_code == 400
    answer = response.get_json()
    assert list(answer["errors"]) == [path]
    assert "not valid Unicode" in answer["message"]
    assert fake.received == []


def test_escaped_surrogate_pairs_and_backslashes_are_plain_text(client, fake):
    raw = json.dumps(chatbot_body()).replace(
        '"content": "Hello"', r'"content": "\ud83d\ude42 and \\ud800"'
    )
    assert post(client, raw).status_code == 200
    assert fake.received[0].body["messages"][1]["content"] == "\U0001f642 and \\ud800"


def test_a_body_over_the_limit_is_a_413(relay_env, fake):
    client = create_app({**relay_env, "MAX_REQUEST_BYTES": "1000"}).test_client()
    body = chatbot_body()
    body["messages"][1]["content"] = "x" * 2000
    response = post(client, body)
    assert response.status_code == 413
    assert "1000-byte limit" in response.get_json()["message"]
    assert fake.received == []


def test_without_a_key_the_seed_message_comes_back(relay_env, fake):
    client = create_app({**relay_env, "OPENROUTER_API_KEY": ""}).test_client()
    response = post(client, chatbot_body())
    assert response.status_code == 500
    assert response.get_json() == {
        "message": "OpenRouter API Key not found. Please set it in your profile settings."
    }
    assert fake.received == []


@pytest.mark.parametrize("status", [400, 401, 402, 403, 408, 429, 502, 503])
def test_an_upstream_error_keeps_its_status_and_message(client, fake, status):
    fake.script("m/err", Scenario(status=status, error_message=f"Nope {status}", retry_after="7"))
    response = post(client, chatbot_body("m/err"))
    assert response.status_code == status
    assert response.get_json() == {"message": f"Nope {status}"}
    assert response.headers["Retry-After"] == "7"


def test_an_unreachable_upstream_is_a_502(relay_env, fake):
    client = create_app(
        {**relay_env, "OPENROUTER_BASE_URL": "http://127.0.0.1:9/api/v1"}
    ).test_client()
    response = post(client, chatbot_body())
    assert response.status_code == 502
    assert response.get_json() == {"message": "Could not connect to OpenRouter"}


def test_an_upstream_slower_than_the_read_timeout_is_a_504(relay_env, fake):
    client = create_app({**relay_env, "UPSTREAM_READ_TIMEOUT": "0.3"}).test_client()
    fake.script("m/slow", Scenario(headers_delay=2))
    response = post(client, chatbot_body("m/slow"))
    assert response.status_code == 504
    assert response.get_json() == {"message": "OpenRouter did not answer in time"}


def test_a_client_slower_than_the_read_timeout_still_gets_the_whole_answer(relay_env, fake):
    """Only a read waiting on OpenRouter can time out, not a stream the client holds back."""
    client = create_app({**relay_env, "UPSTREAM_READ_TIMEOUT": "0.4"}).test_client()
    tokens = [f" {n}" for n in range(12)]  # 0.2 s apart: the answer takes 2.4 s
    fake.script("m/long", Scenario(tokens=tokens, interval=0.2))
    response = post(client, chatbot_body("m/long"), buffered=False)
    pieces = iter(response.response)
    first = next(pieces)
    time.sleep(1.2)  # the relay reads nothing meanwhile: the client has not asked for more
    assert (first + b"".join(pieces)).decode() == "".join(tokens).lstrip()


@pytest.mark.parametrize(
    "scenario",
    [
        Scenario(raw_body=b"<html>Bad gateway</html>", raw_content_type="text/html"),
        Scenario(raw_body=b'{"id": "x"}', raw_content_type="application/json"),
        Scenario(error_after=0),
        Scenario(drop_after=0),
        Scenario(send_done=False, tokens=[]),
    ],
)
def test_a_failure_before_the_first_byte_is_an_error_response(client, fake, scenario):
    fake.script("m/bad", scenario)
    response = post(client, chatbot_body("m/bad"))
    assert response.status_code >= 500
    assert set(response.get_json()) == {"message"}


def test_a_finish_reason_of_error_without_an_error_object_is_an_upstream_error(client, fake):
    fake.script("m/err", Scenario(error_after=0, error_object=False))
    response = post(client, chatbot_body("m/err"))
    assert response.status_code == 502
    assert response.get_json() == {"message": "OpenRouter reported an error mid-stream"}


def test_unknown_chat_settings_are_accepted_and_not_forwarded(client, fake):
    body = chatbot_body(topP=0.9, assistantId="a-1", someSettingFromNextYear={"on": [True]})
    assert post(client, body).status_code == 200
    (received,) = fake.received
    assert set(received.body) == {"model", "messages", "temperature", "usage", "stream"}


def test_a_failure_after_the_first_byte_cuts_the_response_off(client, fake, caplog):
    fake.script("m/cut", Scenario(tokens=["Hel", "lo", " there"], error_after=2))
    response = post(client, chatbot_body("m/cut"), buffered=False)
    assert response.status_code == 200
    received = b""
    with pytest.raises(StreamCutOff), caplog.at_level(logging.WARNING, logger="relay"):
        for piece in response.response:
            received += piece
    assert received == b"Hello"
    assert "cutting off the response" in caplog.text


def test_the_key_appears_in_no_response_or_log_line(client, fake, caplog):
    fake.script("m/err", Scenario(status=401, error_message="No auth credentials found"))
    with caplog.at_level(logging.DEBUG):
        response = post(client, chatbot_body("m/err"))
        fake.script("m/cut", Scenario(drop_after=1))
        post(client, chatbot_body("m/cut"), buffered=False)
    assert SERVER_KEY not in response.get_data(as_text=True)
    assert SERVER_KEY not in caplog.text


def test_healthz_does_not_touch_the_upstream(client, fake):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert fake.received == []


def test_unknown_paths_and_methods_answer_json(client):
    response = client.get("/nope")
    assert response.status_code == 404
    assert set(response.get_json()) == {"message"}
    response = client.get(ENDPOINT)
    assert response.status_code == 405
    assert "message" in response.get_json()
