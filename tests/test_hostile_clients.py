"""What careless or hostile clients send, through the deployed relay (gunicorn, gevent) and the
app: each gets a clear 4xx naming what is wrong, never a 500, a stalled worker or a stream that
looks complete when it is not."""

from __future__ import annotations

import gzip
import json
import socket

import pytest
import requests

from app.bounds import MAX_BODY_ITEMS, MAX_ITEMS, MAX_MESSAGES
from app.schemas import MAX_PROBLEMS_LISTED
from tests.fake_openrouter import Scenario, wait_for
from tests.test_end_to_end import ENDPOINT, body, start_raw_stream

OPENAI = "/v1/chat/completions"


def raw_exchange(port: int, head: str, payload: bytes, half_close_after: bytes = b"") -> bytes:
    """Send a request as bytes and read until the relay closes the connection; with
    `half_close_after`, close the sending side once the answer holds those bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        client.sendall(head.encode() + payload)
        received, sending = b"", bool(half_close_after)
        while piece := client.recv(65536):
            received += piece
            if sending and half_close_after in received:
                client.shutdown(socket.SHUT_WR)
                sending = False
    return received


def chunked_head(path: str) -> str:
    return (
        f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )


def as_chunks(data: bytes, size: int = 4096) -> bytes:
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, rest = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"chunked" in head.lower():
        size, _, rest = rest.partition(b"\r\n")
        rest = rest[: int(size, 16)]
    return status, json.loads(rest)


@pytest.mark.parametrize("path", [ENDPOINT, OPENAI])
def test_a_malformed_chunked_body_is_a_400_naming_the_body(module_relay, fake, path):
    response = raw_exchange(module_relay.port, chunked_head(path), b"zz\r\n{}\r\n0\r\n\r\n")
    status, payload = status_and_json(response)
    assert status == 400
    assert "body" in json.dumps(payload)
    assert "Traceback" not in module_relay.log()
    assert fake.received == []


def test_a_chunked_body_over_the_limit_is_refused_not_cut(start_relay, fake):
    relay = start_relay(MAX_REQUEST_BYTES="2000")
    fake.script("m/limit", Scenario(tokens=["fits"]))
    fits = json.dumps(body("m/limit")).encode()
    fits += b" " * (2000 - len(fits))  # exactly the limit: whitespace after the object is JSON
    response = raw_exchange(relay.port, chunked_head(ENDPOINT), as_chunks(fits))
    assert response.startswith(b"HTTP/1.1 200 OK")
    over = raw_exchange(relay.port, chunked_head(ENDPOINT), as_chunks(fits + b" "))
    status, payload = status_and_json(over)
    assert status == 413
    assert payload["errors"] == {"body": ["Too large."]}
    assert len(fake.requests_for("m/limit")) == 1


@pytest.mark.parametrize("path", [ENDPOINT, OPENAI])
def test_a_body_nested_too_deeply_to_send_on_is_a_400_not_a_500(module_relay, fake, path):
    """The JSON decoder takes a little more depth than the encoder can give back in the worker:
    those bodies, and those too deep to read at all, are the client's 400."""
    fake.script("m/deep", Scenario(tokens=["ok"]))
    for depth in [*range(925, 960, 2), 5000]:
        nested = "[" * depth + "]" * depth
        message = '{"role": "user", "content": "hi", "x": ' + nested + "}"
        data = (
            '{"model": "m/deep", "stream": true, "messages": [' + message + "]}"
            if path == OPENAI
            else '{"chatSettings": {"model": "m/deep"}, "messages": [' + message + "]}"
        )
        response = requests.post(module_relay.url + path, data=data, timeout=10)
        assert response.status_code in (200, 400), depth
        if response.status_code == 400:
            assert "body" in response.text
    assert "Traceback" not in module_relay.log()


def test_too_many_messages_are_refused_at_once_naming_messages(client, fake):
    payload = {"model": "m/x", "messages": [{}] * (MAX_MESSAGES + 1)}
    response = client.post(OPENAI, json=payload)
    assert response.status_code == 400
    assert response.json["error"]["param"] == "messages"
    assert str(MAX_MESSAGES) in response.json["error"]["message"]
    assert fake.received == []


def test_lists_within_lists_share_one_budget(client, fake):
    parts = [{"type": "text", "text": "hi"}] * 256
    payload = {"model": "m/x", "messages": [{"role": "user", "content": parts}] * 256}
    response = client.post(OPENAI, json=payload)
    assert response.status_code == 400
    assert response.json["error"]["param"].startswith("messages.")
    assert f"{MAX_BODY_ITEMS} items in all" in response.json["error"]["message"]
    assert fake.received == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("models", ["m/x"] * (MAX_ITEMS + 1)),
        ("transforms", ["middle-out"] * (MAX_ITEMS + 1)),
        ("plugins", [{}] * (MAX_ITEMS + 1)),
        ("tools", [{}] * (MAX_ITEMS + 1)),
        ("logit_bias", {str(token): 1 for token in range(MAX_ITEMS + 1)}),
    ],
)
def test_every_list_is_bounded(client, fake, field, value):
    payload = {"model": "m/x", "messages": [{"role": "user", "content": "hi"}], field: value}
    response = client.post(OPENAI, json=payload)
    assert response.status_code == 400
    assert response.json["error"]["param"] == field
    assert fake.received == []


def test_a_body_with_thousands_of_problems_lists_a_hundred_and_counts_them_all(client):
    payload = {"chatSettings": {"model": "m/x"}, "messages": [{}] * 3000}
    response = client.post(ENDPOINT, json=payload)
    assert response.status_code == 400
    assert len(response.json["errors"]) == MAX_PROBLEMS_LISTED
    assert "(and 2999 more problems)" in response.json["message"]


def test_lists_at_their_bounds_still_pass(client, fake):
    fake.script("m/long", Scenario(tokens=["ok"]))
    messages = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES - 1)
    messages.append({"role": "user", "content": [{"type": "text", "text": "hi"}] * MAX_ITEMS})
    assert len(messages) + MAX_ITEMS <= MAX_BODY_ITEMS
    response = client.post(OPENAI, json={"model": "m/long", "messages": messages})
    assert response.status_code == 200
    assert response.data.startswith(b"{")
    assert len(fake.requests_for("m/long")[0].body["messages"]) == MAX_MESSAGES


def test_a_compressed_body_is_a_415_naming_content_encoding(client, fake):
    data = gzip.compress(json.dumps(body("m/x")).encode())
    response = client.post(ENDPOINT, data=data, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 415
    assert list(response.json["errors"]) == ["Content-Encoding"]
    plain = client.post(ENDPOINT, json=body("m/x"), headers={"Content-Encoding": "br"})
    assert plain.status_code == 415
    assert fake.received == []


def test_a_compressed_transfer_coding_is_a_415_naming_it(module_relay, fake):
    head = chunked_head(OPENAI).replace("chunked", "gzip, chunked")
    compressed = gzip.compress(json.dumps(body("m/gzip")).encode())
    status, payload = status_and_json(raw_exchange(module_relay.port, head, as_chunks(compressed)))
    assert status == 415
    assert payload["error"]["param"] == "Transfer-Encoding"
    assert fake.requests_for("m/gzip") == []


def test_a_number_with_too_many_digits_is_named_plainly(client):
    response = client.post(ENDPOINT, data='{"chatSettings": {"temperature": ' + "1" * 5000 + "}}")
    assert response.status_code == 400
    assert "too many digits" in response.json["message"]
    assert "sys." not in response.json["message"]


@pytest.mark.parametrize("since", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+14:00"])
def test_usage_since_out_of_range_is_a_400_naming_since(client, since):
    response = client.get("/v1/usage", query_string={"since": since})
    assert response.status_code == 400
    assert response.json["error"]["param"] == "since"


def test_a_405_names_the_methods_the_path_takes(client):
    response = client.get(ENDPOINT)
    assert response.status_code == 405
    assert "POST" in response.headers["Allow"]


def test_a_newline_in_a_path_cannot_forge_a_text_log_line(start_relay):
    relay = start_relay(LOG_FORMAT="text")
    requests.get(relay.url + "/x%0A2026-01-01 00:00:00,000 INFO relay: FORGED", timeout=10)
    # The access line is written when the response closes, after the client has it.
    assert wait_for(lambda: any("FORGED" in line for line in relay.stdout_lines()))
    assert not any(line.startswith("2026-01-01") for line in relay.stdout_lines())


def test_a_choice_that_is_not_an_object_is_the_upstreams_fault_not_a_500(module_relay, fake):
    fake.script("m/null", Scenario(tokens=[], raw_events=[b'data: {"choices": [null]}\n\n']))
    response = requests.post(module_relay.url + ENDPOINT, json=body("m/null"), timeout=10)
    assert response.status_code == 502
    assert "choice" in response.json()["message"]


def test_an_event_whose_data_spans_lines_keeps_a_data_field_per_line(module_relay, fake):
    event = b'data: {"id": "g", "object": "chat.completion.chunk",\ndata: "choices": []}\n\n'
    fake.script("m/lines", Scenario(tokens=["a"], raw_events=[event]))
    payload = {"model": "m/lines", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    response = requests.post(module_relay.url + OPENAI, json=payload, timeout=10)
    events = [e for e in response.text.split("\n\n") if e.startswith("data:")]
    datas = ["\n".join(line[6:] for line in e.split("\n")) for e in events]
    assert datas[-1] == "[DONE]"
    assert {"id": "g", "object": "chat.completion.chunk", "choices": []} in [
        json.loads(d) for d in datas[:-1]
    ]


@pytest.mark.parametrize(
    ("path", "first"), [(ENDPOINT, b"\r\na\r\n"), (OPENAI, b"data:")], ids=["text", "sse"]
)
def test_a_half_closed_client_never_sees_a_clean_end_of_a_cut_answer(
    module_relay, fake, path, first
):
    """A client that closes its side for sending looks gone; the relay stops, and cuts the
    connection instead of ending the answer as if it were whole."""
    fake.script("m/half", Scenario(tokens=["a", "b", "c", "d", "e"], interval=0.3))
    payload = json.dumps(
        {"model": "m/half", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        if path == OPENAI
        else body("m/half")
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    response = raw_exchange(module_relay.port, head, payload, half_close_after=first)
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert not response.endswith(b"0\r\n\r\n")
    assert b"[DONE]" not in response
    assert fake.wait_for(lambda: fake.requests_for("m/half")[0].client_gone is not None, 5)


def test_the_line_saying_a_client_went_away_names_its_request(module_relay, fake):
    fake.script("m/leave", Scenario(tokens=["word "] * 200, interval=0.05))
    mark = module_relay.log_mark()
    with start_raw_stream(module_relay.port, body("m/leave")) as client:
        assert b"200 OK" in client.recv(4096)
    assert fake.wait_for(lambda: fake.requests_for("m/leave")[0].client_gone is not None, 5)

    def records() -> list[dict]:
        lines = module_relay.log(since=mark).splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    assert wait_for(lambda: any(r.get("model") == "m/leave" for r in records()))
    gone = [r for r in records() if r["message"].startswith("client went away")]
    access = [r for r in records() if r.get("model") == "m/leave"]
    assert len(gone) == 1
    assert gone[0]["request_id"] == access[0]["request_id"]


_TOKEN = "tok-never-echoed-4711"


@pytest.mark.parametrize(
    ("head", "status", "param"),
    [
        # A header typed without its colon: gunicorn logged and echoed the whole line.
        (
            f"POST {ENDPOINT} HTTP/1.1\r\nHost: r\r\nAuthorization Bearer {_TOKEN}\r\n\r\n",
            400,
            "headers",
        ),
        (f"POST {OPENAI} HTTP/1.1\r\nHost: r\r\nX-Big: {'a' * 9000}\r\n\r\n", 431, "headers"),
        (f"GET /{'a' * 5000} HTTP/1.1\r\nHost: r\r\n\r\n", 414, "url"),
        (f"POST {OPENAI} HTTP/1.1\r\nHost: r\r\nContent-Length: zz\r\n\r\n", 400, "content-length"),
        (
            f"POST {OPENAI} HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer {_TOKEN}\x01\r\n\r\n",
            400,
            "headers",
        ),
    ],
    ids=["no-colon", "header-too-large", "line-too-long", "bad-length", "control-character"],
)
def test_what_gunicorn_refuses_is_json_naming_the_part_at_fault_never_echoed(
    module_relay, head, status, param
):
    mark = module_relay.log_mark()
    response = raw_exchange(module_relay.port, head, b"")
    got, payload = status_and_json(response)
    assert got == status
    assert payload["error"]["param"] == param
    assert payload["message"] == payload["error"]["message"]
    assert b"application/json" in response.partition(b"\r\n\r\n")[0]
    assert _TOKEN.encode() not in response
    log = module_relay.log(since=mark)
    assert f"refused a request gunicorn could not parse: {status}" in log
    assert _TOKEN not in log


def test_a_malformed_body_left_unread_gets_no_second_answer(module_relay):
    """The 404 needs no body; gunicorn finds the chunks malformed only when it reads past them
    for the next request. The connection closes then, without an answer nothing asked for."""
    head = chunked_head("/nowhere").replace("Connection: close\r\n", "")
    pipelined = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
    response = raw_exchange(module_relay.port, head, b"zz\r\nhello\r\n0\r\n\r\n" + pipelined)
    assert response.startswith(b"HTTP/1.1 404 ")
    assert response.count(b"HTTP/1.1 ") == 1
