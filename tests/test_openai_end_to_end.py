"""The OpenAI surface as deployed (gunicorn, gevent), driven by the official openai package."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import openai
import pytest
import requests

from tests.conftest import SERVER_KEY
from tests.fake_openrouter import Scenario
from tests.test_end_to_end import start_raw_stream

MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def sdk(module_relay, fake) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=module_relay.url + "/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


def test_the_sdk_streams_a_completion_with_its_usage(sdk, fake):
    fake.script("m/s", Scenario(tokens=["One", " two", " three"]))
    stream = sdk.chat.completions.create(model="m/s", messages=MESSAGES, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "One two three"
    assert chunks[-1].usage.completion_tokens == 3


def test_the_sdk_gets_a_whole_completion(sdk, fake):
    fake.script("m/w", Scenario(tokens=["All", " of", " it"]))
    completion = sdk.chat.completions.create(model="m/w", messages=MESSAGES)
    assert completion.choices[0].message.content == "All of it"
    assert completion.usage.completion_tokens == 3


def test_the_sdk_lists_models(sdk):
    assert [model.id for model in sdk.models.list()] == [
        "openai/gpt-4o-mini",
        "anthropic/claude-3.5-sonnet",
    ]
    assert sdk.models.retrieve("openai/gpt-4o-mini").owned_by == "openai"


def test_an_invalid_payload_raises_bad_request_naming_the_param(sdk, fake):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model="m/x", messages=MESSAGES, temperature=5)
    assert raised.value.param == "temperature"
    assert fake.received == []


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (401, openai.AuthenticationError),
        (402, openai.APIStatusError),
        (403, openai.PermissionDeniedError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (502, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_upstream_errors_raise_the_matching_sdk_error(sdk, fake, status, error_class, stream):
    fake.script("m/e", Scenario(status=status, error_message=f"Upstream {status}"))
    with pytest.raises(error_class) as raised:
        sdk.chat.completions.create(model="m/e", messages=MESSAGES, stream=stream)
    assert raised.value.status_code == status
    assert raised.value.body["message"] == f"Upstream {status}"


def test_a_mid_stream_error_raises_while_iterating(sdk, fake):
    fake.script("m/mid", Scenario(tokens=["a", "b", "c"], error_after=2, error_message="Gone"))
    stream = sdk.chat.completions.create(model="m/mid", messages=MESSAGES, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="Gone"):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["a", "b"]


def test_openrouter_fields_arrive_upstream_unchanged(sdk, fake):
    extra = {
        "provider": {"order": ["anthropic", "openai"], "data_collection": "deny"},
        "models": ["m/first", "m/second"],
        "reasoning": {"effort": "low"},
        "transforms": ["middle-out"],
        "brand_new_option": {"x": [1, "two"]},
    }
    sdk.chat.completions.create(model="m/first", messages=MESSAGES, extra_body=extra)
    (received,) = fake.received
    assert {key: received.body[key] for key in extra} == extra
    assert received.header("Authorization") == f"Bearer {SERVER_KEY}"


def read_chunked_body(client: socket.socket) -> bytes:
    """Read a whole chunked HTTP/1.1 response off a raw socket and return its de-chunked body."""
    return read_chunked_body_after(client, b"")


def read_chunked_body_after(client: socket.socket, raw: bytes) -> bytes:
    """read_chunked_body for a response whose first bytes (`raw`) were read already."""
    while b"\r\n0\r\n\r\n" not in raw:
        data = client.recv(65536)
        assert data, "connection closed before the end of the body"
        raw += data
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    body = b""
    while True:
        size_line, _, rest = chunked.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return body
        body, chunked = body + rest[:size], rest[size + 2 :]


def test_the_sse_wire_format_byte_by_byte(module_relay, fake):
    relay = module_relay
    fake.script("m/wire", Scenario(tokens=["a", "b"]))
    payload = {"model": "m/wire", "messages": MESSAGES, "stream": True}
    with start_raw_stream(relay.port, payload, path="/v1/chat/completions") as client:
        body = read_chunked_body(client).decode()
    blocks = body.split("\n\n")
    assert blocks[-1] == ""
    events = blocks[:-1]
    assert events[0] == ": connected"
    assert events[-1] == "data: [DONE]"
    assert all(event.startswith("data: {") and "\n" not in event for event in events[1:-1])
    chunks = [json.loads(event[len("data: ") :]) for event in events[1:-1]]
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:2]] == ["a", "b"]
    assert chunks[-1]["choices"] == [] and "usage" in chunks[-1]


def test_heartbeats_flow_while_the_upstream_is_silent(start_relay, fake):
    relay = start_relay(HEARTBEAT_INTERVAL="0.2")
    fake.script("m/think", Scenario(tokens=["deep", " thought"], interval=1.5))
    payload = {"model": "m/think", "messages": MESSAGES, "stream": True}
    with start_raw_stream(relay.port, payload, path="/v1/chat/completions") as client:
        body = read_chunked_body(client).decode()
    events = body.split("\n\n")[:-1]
    first, second = [i for i, event in enumerate(events) if '"delta"' in event][:2]
    assert events[first + 1 : second].count(": keep-alive") >= 3
    assert events[-1] == "data: [DONE]"


def test_a_fast_stream_flows_through_without_waiting_for_a_heartbeat(start_relay, fake):
    """Its events outrun the response: the reader holds back, and each wakes the other."""
    relay = start_relay(HEARTBEAT_INTERVAL="3")
    fake.script("m/fast", Scenario(tokens=[f"t{i} " for i in range(2000)]))
    payload = {"model": "m/fast", "messages": MESSAGES, "stream": True}
    with start_raw_stream(relay.port, payload, path="/v1/chat/completions") as client:
        body = read_chunked_body(client).decode()
    events = body.split("\n\n")[:-1]
    assert ": keep-alive" not in events  # nothing waited a heartbeat interval
    contents = [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[1:-2]]
    assert "".join(contents) == "".join(f"t{i} " for i in range(2000))


def test_a_slow_upstream_cannot_delay_the_first_byte_past_a_heartbeat(start_relay, fake):
    """A router drops a request that sent nothing for 30 s: the response starts within a
    heartbeat interval even while OpenRouter has not answered yet."""
    relay = start_relay(HEARTBEAT_INTERVAL="0.3")
    fake.script("m/late", Scenario(headers_delay=2.5, tokens=["late"]))
    payload = {"model": "m/late", "messages": MESSAGES, "stream": True}
    with start_raw_stream(relay.port, payload, path="/v1/chat/completions") as client:
        sent = time.monotonic()
        first = client.recv(65536)
        waited = time.monotonic() - sent
        body = read_chunked_body_after(client, first).decode()
    assert first.startswith(b"HTTP/1.1 200") and waited < 2.0
    events = body.split("\n\n")[:-1]
    assert events[0] == ": connected" and ": keep-alive" in events
    assert '"late"' in body and events[-1] == "data: [DONE]"


def test_a_refusal_after_the_first_byte_is_an_error_event(start_relay, fake):
    relay = start_relay(HEARTBEAT_INTERVAL="0.3")
    fake.script("m/late", Scenario(headers_delay=1.5, status=503, error_message="No provider"))
    payload = {"model": "m/late", "messages": MESSAGES, "stream": True}
    with start_raw_stream(relay.port, payload, path="/v1/chat/completions") as client:
        body = read_chunked_body(client).decode()
    events = body.split("\n\n")[:-1]
    assert events[0] == ": connected" and "data: [DONE]" not in events
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["message"] == "No provider" and error["code"] == 503


def test_a_client_gone_while_the_stream_opens_closes_the_upstream(start_relay, fake):
    relay = start_relay(HEARTBEAT_INTERVAL="0.2")
    fake.script("m/late", Scenario(headers_delay=1.5, tokens=["w "] * 200, interval=0.05))
    payload = {"model": "m/late", "messages": MESSAGES, "stream": True}
    with start_raw_stream(relay.port, payload, path="/v1/chat/completions") as client:
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
    assert fake.wait_for(lambda: fake.requests_for("m/late"), 5)
    (upstream,) = fake.requests_for("m/late")
    # Closed as soon as OpenRouter answers, long before its 200 tokens (10 s) are through.
    assert fake.wait_for(lambda: upstream.client_gone is not None, 5)


@pytest.mark.parametrize("silent", [False, True], ids=["streaming", "silent-upstream"])
def test_a_client_that_goes_away_closes_the_upstream_within_a_second(start_relay, fake, silent):
    relay = start_relay(HEARTBEAT_INTERVAL="0.2")
    scenario = Scenario(tokens=["w "] * 10, stall_after=1) if silent else None
    fake.script("m/long", scenario or Scenario(tokens=["w "] * 2000, interval=0.02))
    payload = {"model": "m/long", "messages": MESSAGES, "stream": True}
    with start_raw_stream(relay.port, payload, path="/v1/chat/completions") as client:
        received = b""
        while b'"delta"' not in received:
            received += client.recv(4096)
    left = time.monotonic()
    assert fake.wait_for(lambda: fake.requests_for("m/long")[0].client_gone is not None, 5)
    assert fake.requests_for("m/long")[0].client_gone - left < 1.0


def test_the_openapi_document_is_served_by_the_live_app(module_relay):
    document = requests.get(module_relay.url + "/openapi.json", timeout=5).json()
    assert "/v1/chat/completions" in document["paths"]
