"""A relayed stream is freed when its response closes, whatever ended it: the worker's garbage
collector runs rarely (wsgi.py), so whatever a request leaves in reference cycles stays in
memory for minutes, a failed stream's whole upstream request with it."""

from __future__ import annotations

import contextlib
import gc
import time
from collections import Counter

import pytest

from app.errors import StreamCutOff
from tests.fake_openrouter import Scenario
from tests.test_chat_surface import chatbot_body
from tests.test_openai_surface import request_body

# What one stream holds; any of it in the cyclic garbage means the stream was not freed.
_STREAM_PARTS = {"ChatStream", "HeartbeatReader", "Response", "PreparedRequest", "SSEClient"}


def _left_in_cycles(relay) -> Counter:
    relay()  # warm: first-use objects (caches, lazy threads) are not the request's
    time.sleep(0.2)
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            relay()
        time.sleep(0.3)  # the SSE surface's reader thread ends after the response
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = Counter(type(thing).__name__ for thing in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return left


@pytest.mark.parametrize(
    "scenario",
    [
        Scenario(tokens=["a"] * 8),
        Scenario(tokens=["a"] * 8, drop_after=3),
        Scenario(tokens=["a"] * 8, error_after=3),
    ],
    ids=["completed", "cut off", "error event"],
)
@pytest.mark.parametrize("surface", ["chatbot", "openai"])
def test_a_stream_leaves_nothing_for_the_garbage_collector(client, fake, scenario, surface):
    fake.script("m/x", scenario)
    if surface == "chatbot":
        path, body = "/api/chat/openrouter", chatbot_body("m/x")
    else:
        path, body = "/v1/chat/completions", request_body(model="m/x", stream=True)

    def relay():
        response = client.post(path, json=body)
        assert response.status_code == 200
        with contextlib.suppress(StreamCutOff):  # how the text surface ends a failed answer
            response.get_data()
        response.close()

    left = _left_in_cycles(relay)
    assert not _STREAM_PARTS & set(left), left.most_common(12)
