"""The relay as deployed: the Procfile's gunicorn command, gevent workers, real sockets."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest
import requests

from tests.conftest import SERVER_KEY
from tests.fake_openrouter import Scenario

ENDPOINT = "/api/chat/openrouter"


def body(model: str) -> dict:
    return {
        "chatSettings": {"model": model, "temperature": 0.2},
        "messages": [{"role": "user", "content": "Hello"}],
    }


def start_raw_stream(port: int, payload: dict, path: str = ENDPOINT) -> socket.socket:
    """A bare HTTP/1.1 client socket that has sent a chat request (to close it at will)."""
    data = json.dumps(payload).encode()
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(
        f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return client


def test_streaming_arrives_while_the_upstream_is_still_generating(relay, fake):
    fake.script("m/stall", Scenario(tokens=["Hel", "lo", " never"], stall_after=2))
    with requests.post(relay.url + ENDPOINT, json=body("m/stall"), stream=True, timeout=10) as r:
        assert r.status_code == 200
        received = b""
        for piece in r.iter_content(chunk_size=None):
            received += piece
            if received == b"Hello":
                break
    assert received == b"Hello"
    (upstream,) = fake.requests_for("m/stall")
    assert not upstream.completed


def test_a_hundred_concurrent_streams_on_one_worker_all_complete(relay, fake):
    tokens = [f"t{i} " for i in range(10)]
    fake.script("m/many", Scenario(tokens=tokens, interval=0.2))
    results: list[str | Exception] = []

    def chat() -> None:
        try:
            r = requests.post(relay.url + ENDPOINT, json=body("m/many"), timeout=60)
            results.append(r.text if r.status_code == 200 else RuntimeError(r.status_code))
        except requests.RequestException as error:
            results.append(error)

    threads = [threading.Thread(target=chat) for _ in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["".join(tokens).lstrip()] * 100
    upstream = fake.requests_for("m/many")
    assert len(upstream) == 100
    # The fake stamps a stream's end after its last write, which the client may read first.
    assert fake.wait_for(lambda: all(r.finished is not None for r in upstream), 5)
    # The streams ran side by side on the single worker, not one after another.
    assert most_at_once(upstream) >= 50


def most_at_once(requests_seen) -> int:
    edges = sorted(
        [(r.started, 1) for r in requests_seen] + [(r.finished, -1) for r in requests_seen]
    )
    open_now = most = 0
    for _, change in edges:
        open_now += change
        most = max(most, open_now)
    return most


def test_a_client_that_goes_away_closes_the_upstream_within_a_second(relay, fake):
    fake.script("m/long", Scenario(tokens=["word "] * 2000, interval=0.02))
    with start_raw_stream(relay.port, body("m/long")) as client:
        assert b"200 OK" in client.recv(4096)
    left = time.monotonic()
    assert fake.wait_for(lambda: fake.requests_for("m/long")[0].client_gone is not None, 5)
    assert fake.requests_for("m/long")[0].client_gone - left < 1.0


@pytest.mark.parametrize(
    "scenario",
    [
        Scenario(tokens=["Hel", "lo", " there"], drop_after=2),
        Scenario(tokens=["Hel", "lo", " there"], error_after=2),
        Scenario(tokens=["Hel", "lo", " there"], send_done=False),
    ],
    ids=["dropped", "error-event", "no-done"],
)
def test_a_cut_off_upstream_makes_the_clients_read_fail(relay, fake, scenario):
    fake.script("m/cut", scenario)
    received = b""
    with requests.post(relay.url + ENDPOINT, json=body("m/cut"), stream=True, timeout=10) as r:
        assert r.status_code == 200
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for piece in r.iter_content(chunk_size=None):
                received += piece
    assert received.startswith(b"Hello")
    assert "cutting off the response" in relay.log()


def test_errors_before_the_first_byte_are_json_with_the_upstream_status(relay, fake):
    fake.script("m/limited", Scenario(status=429, error_message="Rate limited", retry_after="3"))
    r = requests.post(relay.url + ENDPOINT, json=body("m/limited"), timeout=10)
    assert r.status_code == 429
    assert r.json() == {"message": "Rate limited"}
    assert r.headers["Retry-After"] == "3"


def test_the_key_never_reaches_the_logs(relay, fake):
    fake.script("m/cut", Scenario(drop_after=1))
    fake.script("m/denied", Scenario(status=401, error_message="No auth credentials found"))
    for model in ("m/cut", "m/denied", "openai/gpt-4o-mini"):
        with contextlib.suppress(requests.exceptions.ChunkedEncodingError):
            requests.post(relay.url + ENDPOINT, json=body(model), timeout=10)
    requests.post(relay.url + ENDPOINT, data=json.dumps({"bad": 1}), timeout=10)
    assert fake.requests_for("openai/gpt-4o-mini")[0].header("Authorization").endswith(SERVER_KEY)
    log = relay.log()
    assert "POST /api/chat/openrouter" in log
    assert "cutting off the response" in log
    assert SERVER_KEY not in log
    assert "Traceback" not in log
