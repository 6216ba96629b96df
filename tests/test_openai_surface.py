"""The OpenAI-compatible surface through Flask's test client, against the fake OpenRouter."""

import json
import threading
import time

import jsonschema_rs
import pytest

from app import create_app
from tests.fake_openrouter import Scenario

COMPLETIONS = "/v1/chat/completions"


def request_body(**fields):
    return {
        "model": "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hi"}],
        **fields,
    }


def sse_events(raw: str) -> list[str]:
    """The blocks of an event stream, each without its blank-line terminator."""
    assert raw.endswith("\n\n")
    return raw[:-2].split("\n\n")


def test_a_streamed_completion_relays_every_event_then_done(client, fake):
    fake.script("openai/gpt-4o-mini", Scenario(tokens=["Hel", "lo"]))
    response = client.post(COMPLETIONS, json=request_body(stream=True))
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    events = sse_events(response.get_data(as_text=True))
    assert events[0].startswith(":")
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[1:-1]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]) == "Hello"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 2


def test_words_like_error_in_the_text_are_relayed_as_text(client, fake):
    """The SSE relay reads only the events that can matter; a reply quoting "error" or "usage"
    is not one of them, and the usage chunk still is."""
    tokens = ["Hi", ' it said "error"', ' and {"usage": 1}', " done"]
    fake.script("m/q", Scenario(tokens=tokens))
    response = client.post(COMPLETIONS, json=request_body(model="m/q", stream=True))
    events = sse_events(response.get_data(as_text=True))
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[1:-1]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]) == "".join(
        tokens
    )
    assert chunks[-1]["usage"]["completion_tokens"] == len(tokens)


def test_the_stream_asks_openrouter_for_usage_and_forwards_unknown_fields(client, fake):
    extra = {
        "provider": {"order": ["openai"], "allow_fallbacks": False},
        "plugins": [{"id": "web"}],
        "a_parameter_from_next_week": {"nested": [1, 2.5, None]},
    }
    client.post(COMPLETIONS, json=request_body(stream=True, **extra)).get_data()
    (received,) = fake.received
    assert received.body == {**request_body(stream=True, **extra), "usage": {"include": True}}


@pytest.mark.parametrize("stream", [True, False])
def test_usage_is_always_asked_for_keeping_the_callers_other_usage_fields(client, fake, stream):
    usage = {"include": False, "something_new": [1]}
    client.post(COMPLETIONS, json=request_body(stream=stream, usage=usage)).get_data()
    assert fake.received[0].body["usage"] == {"include": True, "something_new": [1]}


def test_a_mid_stream_error_is_one_error_event_and_no_done(client, fake):
    fake.script("m/err", Scenario(tokens=["a", "b", "c"], error_after=2, error_message="Boom"))
    response = client.post(COMPLETIONS, json=request_body(model="m/err", stream=True))
    events = sse_events(response.get_data(as_text=True))
    assert "data: [DONE]" not in events
    assert json.loads(events[-1].removeprefix("data: ")) == {
        "error": {"message": "Boom", "type": "upstream_error", "code": 502}
    }
    assert len([event for event in events if '"delta"' in event]) == 2


def test_a_finish_reason_of_error_without_an_error_object_is_an_upstream_error(client, fake):
    fake.script("m/err", Scenario(tokens=["a", "b", "c"], error_after=2, error_object=False))
    response = client.post(COMPLETIONS, json=request_body(model="m/err", stream=True))
    events = sse_events(response.get_data(as_text=True))
    assert "data: [DONE]" not in events
    assert json.loads(events[-1].removeprefix("data: ")) == {
        "error": {
            "message": "OpenRouter reported an error mid-stream",
            "type": "upstream_error",
            "code": None,
        }
    }
    assert len([event for event in events if '"delta"' in event]) == 2


@pytest.mark.parametrize(
    "scenario",
    [
        Scenario(tokens=["a", "b"], drop_after=1),
        Scenario(tokens=["a", "b"], send_done=False),
        Scenario(tokens=["a", "b"], stall_after=1),
    ],
    ids=["dropped", "no-done", "stalled"],
)
def test_a_cut_off_stream_ends_with_an_error_event(relay_env, fake, scenario):
    client = create_app({**relay_env, "UPSTREAM_READ_TIMEOUT": "0.5"}).test_client()
    fake.script("m/cut", scenario)
    response = client.post(COMPLETIONS, json=request_body(model="m/cut", stream=True))
    last = sse_events(response.get_data(as_text=True))[-1]
    assert json.loads(last.removeprefix("data: "))["error"]["message"].startswith("OpenRouter")


def test_an_error_before_the_stream_is_an_openai_error_with_its_status(client, fake):
    fake.script("m/limited", Scenario(status=429, error_message="Slow down", retry_after="2"))
    response = client.post(COMPLETIONS, json=request_body(model="m/limited", stream=True))
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2"
    assert response.get_json() == {
        "error": {"message": "Slow down", "type": "rate_limit_exceeded", "code": 429, "param": None}
    }


def test_a_whole_completion_is_the_upstreams_json(client, fake):
    fake.script("openai/gpt-4o-mini", Scenario(tokens=["All ", "at ", "once"]))
    response = client.post(COMPLETIONS, json=request_body())
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    completion = response.get_json()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "All at once"
    assert "stream" not in fake.received[0].body
    assert response.headers["X-Generation-Id"] == completion["id"] == fake.received[0].generation_id


@pytest.mark.parametrize(
    ("scenario", "status"),
    [
        (Scenario(raw_body=b"<html>proxy error</html>", raw_content_type="text/html"), 502),
        (Scenario(raw_body=b'{"error": {"code": 503, "message": "No provider"}}'), 503),
        (Scenario(raw_body=b"[" * 5000, raw_content_type="application/json"), 502),
        (Scenario(status=402, error_message="Insufficient credits"), 402),
    ],
)
def test_a_whole_completion_that_failed_is_an_openai_error(client, fake, scenario, status):
    fake.script("m/bad", scenario)
    response = client.post(COMPLETIONS, json=request_body(model="m/bad"))
    assert response.status_code == status
    assert set(response.get_json()["error"]) == {"message", "type", "code", "param"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", ""),
        ("model", "m/" + "x" * 199),
        ("models", []),
        ("models", ["ok", 3]),
        ("models", ["ok", "m/" + "x" * 199]),
        ("temperature", 2.1),
        ("temperature", "1"),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 1.5),
        ("min_p", 1.1),
        ("top_a", -0.1),
        ("frequency_penalty", -2.5),
        ("presence_penalty", 3),
        ("repetition_penalty", 0),
        ("repetition_penalty", 2.5),
        ("max_tokens", 0),
        ("max_completion_tokens", 0),
        ("seed", "42"),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", 7),
        ("n", 0),
        ("logit_bias", {"50256": 101}),
        ("logprobs", "yes"),
        ("top_logprobs", 21),
        ("response_format", {"type": "xml"}),
        ("tools", [{"type": "function", "function": {}}]),
        ("tool_choice", "sometimes"),
        ("parallel_tool_calls", 1),
        ("user", 12),
        ("stream", "true"),
        ("route", "random"),
        ("reasoning", {"effort": "extreme"}),
        ("transforms", "middle-out"),
        ("messages", [{"role": "user"}]),
        ("messages", [{"role": "user", "content": [{"type": {"a": 1}}]}]),
    ],
)
def test_each_known_parameter_is_checked(client, fake, field, value):
    body = request_body(**{field: value})
    response = client.post(COMPLETIONS, json=body)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"].split(".")[0] == field
    assert fake.received == []


@pytest.mark.parametrize(
    ("escaped", "param"),
    [
        (r'"content": "\ud800"', "messages.0.content"),
        (r'"content": "Hi", "a_new_field": {"\udead": 1}', "messages.0.a_new_field"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_the_field(client, fake, escaped, param):
    raw = json.dumps(request_body(stream=True)).replace('"content": "Hi"', escaped)
    response = client.post(COMPLETIONS, data=raw, content_type="application/json")
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "not valid Unicode" in error["message"]
    assert fake.received == []


def test_a_model_or_a_fallback_list_is_required(client, fake):
    response = client.post(COMPLETIONS, json={"messages": [{"role": "user", "content": "Hi"}]})
    assert response.get_json()["error"]["param"] == "model"
    body = {"models": ["a/one", "b/two"], "messages": [{"role": "user", "content": "Hi"}]}
    assert client.post(COMPLETIONS, json=body).status_code == 200
    assert fake.received[0].body["models"] == ["a/one", "b/two"]


def test_routing_errors_under_v1_use_the_openai_shape(client):
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.get_json()["error"]["type"] == "not_found_error"
    response = client.get(COMPLETIONS)
    assert response.status_code == 405
    assert set(response.get_json()["error"]) == {"message", "type", "code", "param"}


def test_models_are_listed_in_openais_shape_keeping_openrouters_fields(client, fake):
    listing = client.get("/v1/models").get_json()
    assert listing["object"] == "list"
    first = listing["data"][0]
    assert first["id"] == "openai/gpt-4o-mini"
    assert first["object"] == "model"
    assert first["owned_by"] == "openai"
    assert first["context_length"] == 128000
    assert first["pricing"]["prompt"] == "0.00000015"
    model = client.get("/v1/models/anthropic/claude-3.5-sonnet").get_json()
    assert model["id"] == "anthropic/claude-3.5-sonnet"
    missing = client.get("/v1/models/nobody/nothing")
    assert missing.status_code == 404
    assert "nobody/nothing" in missing.get_json()["error"]["message"]


def test_concurrent_callers_share_one_fetch_of_the_model_list(client, fake):
    fake.models_delay = 0.3
    answers = []
    threads = [
        threading.Thread(target=lambda: answers.append(client.get("/v1/models").status_code))
        for _ in range(5)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200] * 5
    assert len([r for r in fake.received if r.path == "/api/v1/models"]) == 1


def test_the_model_list_is_refreshed_after_its_ttl_and_served_stale_when_that_fails(
    relay_env, fake
):
    client = create_app({**relay_env, "MODELS_CACHE_TTL": "0.2"}).test_client()
    assert len(client.get("/v1/models").get_json()["data"]) == 2
    fake.models = fake.models[:1]
    time.sleep(0.3)
    assert len(client.get("/v1/models").get_json()["data"]) == 1
    fake.models_status = 500
    time.sleep(0.3)
    response = client.get("/v1/models")
    assert response.status_code == 200
    assert len(response.get_json()["data"]) == 1
    assert len([r for r in fake.received if r.path == "/api/v1/models"]) == 3


def test_without_any_cached_list_a_failed_fetch_is_an_error(client, fake):
    fake.models_status = 503
    response = client.get("/v1/models")
    assert response.status_code == 503
    assert response.get_json()["error"]["message"] == "Models unavailable"


def test_the_openapi_document_describes_both_surfaces_from_the_schemas(client):
    document = client.get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.")
    assert {"/api/chat/openrouter", "/v1/chat/completions", "/v1/models"} <= set(document["paths"])
    completion = document["components"]["schemas"]["ChatCompletionRequest"]
    assert completion["properties"]["temperature"] == {"type": "number", "minimum": 0, "maximum": 2}
    assert completion["properties"]["top_p"]["exclusiveMinimum"] is True
    assert completion["additionalProperties"] is True
    chatbot = document["components"]["schemas"]["ChatSettings"]
    assert chatbot["required"] == ["model"]


@pytest.mark.parametrize(
    ("part", "valid"),
    [
        ({"type": "text", "text": "Hi"}, True),
        ({"type": "text"}, False),
        ({"type": "text", "text": 3}, False),
        ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, True),
        ({"type": "image_url", "image_url": "https://example.com/a.png"}, False),
        ({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}, True),
        (
            {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf,x"}},
            True,
        ),
        ({"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}, True),
        ({"type": ""}, False),
        ({"type": 7}, False),
        ({"type": {"a": 1}}, False),
        ({"text": "no type"}, False),
        ("just text", False),
    ],
    ids=lambda value: json.dumps(value) if not isinstance(value, bool) else str(value),
)
def test_the_document_accepts_exactly_the_content_parts_validation_accepts(
    client, fake, part, valid
):
    components = client.get("/openapi.json").get_json()["components"]
    document = jsonschema_rs.Draft4Validator(
        {"$ref": "#/components/schemas/ChatCompletionRequest", "components": components}
    )
    body = request_body(messages=[{"role": "user", "content": [part]}])
    accepted = client.post(COMPLETIONS, json=body).status_code == 200
    assert accepted == valid
    assert document.is_valid(body) == accepted
