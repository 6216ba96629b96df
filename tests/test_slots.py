"""A concurrency slot comes back however its stream ends, on both surfaces, in a real gunicorn,
with the slots counted in-process and in Redis."""

from __future__ import annotations

import contextlib
import time
import uuid

import pytest
import requests

from tests.conftest import RelayProcess, own_redis_url
from tests.fake_openrouter import Scenario
from tests.test_faults import (
    AFTER_FIRST_BYTE,
    BEFORE_FIRST_BYTE,
    READ_TIMEOUT,
    SSE,
    TEXT,
    payload,
    relay_for_the_module,
)

LONG = Scenario(tokens=["w "] * 1000, interval=0.02)

ENDINGS = {
    "finished": Scenario(tokens=["a", "b", "c"]),
    "upstream-error-status": BEFORE_FIRST_BYTE["upstream-503"][0],
    **{
        name: AFTER_FIRST_BYTE[name]
        for name in ("drop-mid-stream", "error-event", "stall", "no-done")
    },
    "client-abort": LONG,
}
STILL_RUNNING_AFTER_THE_FIRST_PIECE = {"stall", "client-abort"}


@pytest.fixture(scope="module", params=["in-process", "redis"])
def one_slot_relay(request, fake_server, tmp_path_factory):
    """A relay whose callers get one concurrent stream each."""
    shared = {}
    if request.param == "redis":
        shared["REDIS_URL"] = own_redis_url() or pytest.skip(
            "REDIS_URL does not name a Redis server"
        )
    yield from relay_for_the_module(
        fake_server,
        tmp_path_factory,
        DEFAULT_CONCURRENCY="1",
        UPSTREAM_READ_TIMEOUT=str(READ_TIMEOUT),
        **shared,
    )


@pytest.fixture
def caller() -> dict[str, str]:
    """The headers of a caller of this test's own (its own OpenRouter key): a slot one test
    leaks cannot fail the next."""
    return {"Authorization": f"Bearer sk-or-v1-slots-{uuid.uuid4().hex}"}


def quick_request(relay: RelayProcess, caller: dict[str, str]) -> int:
    body = {"model": "m/ok", "messages": [{"role": "user", "content": "Hi"}]}
    return requests.post(relay.url + SSE, json=body, headers=caller, timeout=10).status_code


def slot_comes_back(relay: RelayProcess, caller: dict[str, str], within: float = 5.0) -> bool:
    """The slot is free again (a new request is served) within `within` seconds."""
    deadline = time.monotonic() + within
    while (status := quick_request(relay, caller)) == 429 and time.monotonic() < deadline:
        time.sleep(0.1)
    return status == 200


@pytest.mark.parametrize("surface", [TEXT, SSE], ids=["text", "sse"])
@pytest.mark.parametrize("ending", ENDINGS, ids=str)
def test_the_slot_comes_back_however_the_stream_ends(one_slot_relay, fake, caller, ending, surface):
    fake.script("m/end", ENDINGS[ending])
    url, body = one_slot_relay.url + surface, payload(surface, "m/end")
    response = requests.post(url, json=body, headers=caller, stream=True, timeout=30)
    pieces = response.iter_content(chunk_size=None)
    with response, contextlib.suppress(requests.RequestException):  # how cut-off answers end
        next(pieces, None)
        if ending in STILL_RUNNING_AFTER_THE_FIRST_PIECE:
            assert quick_request(one_slot_relay, caller) == 429, "the stream holds the one slot"
        if ending != "client-abort":
            for _ in pieces:
                pass
    if ending == "client-abort":
        assert fake.wait_for(lambda: fake.requests_for("m/end")[-1].client_gone, 5)
    assert slot_comes_back(one_slot_relay, caller), f"the slot was kept after: {ending}"
