"""Fault injection against the relay as deployed: every fault, both surfaces, a real gunicorn.

For each fault: what the client sees, what the upstream saw, and that the worker let go of
everything the request held: its streams and sockets return to their baseline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from app.database import engine_for, usage
from tests.conftest import SERVER_KEY, RelayProcess, env_for, sqlite_url
from tests.fake_openrouter import Scenario, wait_for
from tests.tcp_proxy import TcpProxy
from tests.test_end_to_end import start_raw_stream
from tests.test_observability import request_lines

TEXT = "/api/chat/openrouter"
SSE = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello"}]
READ_TIMEOUT = 1.0


def payload(surface: str, model: str) -> dict:
    if surface == TEXT:
        return {"chatSettings": {"model": model}, "messages": MESSAGES}
    return {"model": model, "messages": MESSAGES, "stream": True}


def chat(relay, surface: str, model: str, **options) -> requests.Response:
    """Ask the relay for a chat completion, and for the connection to be closed after the answer:
    afterwards the worker holds no socket of it (unless it leaks one)."""
    return requests.post(
        relay.url + surface,
        json=payload(surface, model),
        headers={"Connection": "close"},
        timeout=30,
        **options,
    )


def worker_pid(relay) -> int:
    master = relay.process.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def worker_sockets(relay, fake) -> Counter[str]:
    """The worker's sockets by kind (from /proc): listening, from a client, pooled (connected to
    the fake, which waits for the next request on it), and any other."""
    pid = worker_pid(relay)
    tcp = {}
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        local, remote, state, *_, inode = line.split()[1:10]
        tcp[f"socket:[{inode}]"] = (int(local[-4:], 16), int(remote[-4:], 16), state)
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(fd)
            if target.startswith("socket:"):
                port, peer, state = tcp.get(target, (0, 0, "not TCP"))
                if state == "0A":
                    kinds["listening"] += 1
                elif port == relay.port:
                    kinds["from a client"] += 1
                elif peer == fake.port and state == "01" and port in fake.idle_ports:
                    kinds["pooled"] += 1
                else:
                    kinds[f"other ({peer=}, {state=})"] += 1
    return kinds


def open_streams(relay) -> float:
    text = requests.get(relay.url + "/metrics", headers={"Connection": "close"}, timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "relay_open_streams"
        for sample in family.samples
    )


# A worker at rest holds its listening socket and idle upstream connections, nothing else.
AT_REST = Counter({"listening": 1})


def assert_nothing_left(relay, fake) -> None:
    """The worker let go of every stream and socket of the requests before (a stuck greenlet
    would hold one of them)."""
    assert fake.wait_for(lambda: open_streams(relay) == 0, 5)

    def at_rest() -> bool:
        held = worker_sockets(relay, fake)
        del held["pooled"]
        return held == AT_REST

    assert fake.wait_for(at_rest, 5), worker_sockets(relay, fake)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError("VmRSS")


def relay_for_the_module(fake_server, tmp_path_factory, **overrides: str) -> Iterator:
    folder = tmp_path_factory.mktemp("faults")
    relay = RelayProcess(
        {**env_for(fake_server, sqlite_url(folder)), **overrides}, folder / "gunicorn.log"
    )
    yield relay.start()
    relay.stop()


@pytest.fixture(scope="module")
def faulty_relay(fake_server, tmp_path_factory):
    yield from relay_for_the_module(
        fake_server, tmp_path_factory, UPSTREAM_READ_TIMEOUT=str(READ_TIMEOUT)
    )


@pytest.fixture(scope="module")
def retrying_relay(fake_server, tmp_path_factory):
    yield from relay_for_the_module(
        fake_server, tmp_path_factory, UPSTREAM_RETRIES="2", UPSTREAM_RETRY_BACKOFF="0.05"
    )


BEFORE_FIRST_BYTE = {
    "upstream-400": (Scenario(status=400, error_message="Bad model"), 400),
    "upstream-401": (Scenario(status=401, error_message="No auth"), 401),
    "upstream-402": (Scenario(status=402, error_message="No credits"), 402),
    "upstream-403": (Scenario(status=403, error_message="Flagged"), 403),
    "upstream-408": (Scenario(status=408, error_message="Timed out"), 408),
    "upstream-429": (Scenario(status=429, error_message="Slow down"), 429),
    "upstream-500": (Scenario(status=500, error_message="Oops"), 500),
    "upstream-502": (Scenario(status=502, error_message="Model down"), 502),
    "upstream-503": (Scenario(status=503, error_message="No provider"), 503),
    "html-error-page": (Scenario(status=502, raw_body=b"<html>502 Bad Gateway</html>"), 502),
    "error-json-too-deep": (
        Scenario(status=503, raw_body=b"[" * 5000, raw_content_type="application/json"),
        503,
    ),
    "200-not-sse": (Scenario(raw_body=b"<html>hello</html>"), 502),
    "drop-before-headers": (Scenario(drop_before_headers=True), 502),
    "slow-headers": (Scenario(headers_delay=READ_TIMEOUT * 3), 504),
}
# Faults after which the connection cannot carry another request: the relay must close it.
CONNECTION_UNUSABLE = {"200-not-sse", "drop-before-headers", "slow-headers"}

# JSON deeper than Python's parser can go (it raises RecursionError, not ValueError).
TOO_DEEP = b"data: " + b"[" * 5000 + b"\n\n"
# A whole event (it ends in a blank line) that is not UTF-8: a sequence cut short by the quote.
NOT_UTF8 = b'data: {"choices":[{"index":0,"delta":{"content":"\xe2\x9c"}}]}\n\n'
NOT_JSON = b"data: {not json\n\n"
NO_CHOICES = b'data: {"id": "gen-1"}\n\n'
# Shaped like a chunk at both ends, with an object cut short inside: the SSE surface must not
# relay it unread.
JSON_CUT_SHORT = b'data: {"id":"g","choices":[{"delta":{"content":"b"}}\n\n'

# The first event itself is bad: the chatbot surface has sent nothing yet, so it still answers
# with an error status; the /v1 surface's event stream has begun (an error event, see below).
BAD_FIRST_EVENT = {
    "first-event-not-json": (Scenario(tokens=[], raw_events=[NOT_JSON]), 502),
    "first-event-without-choices": (Scenario(tokens=[], raw_events=[NO_CHOICES]), 502),
    "first-event-not-utf8": (Scenario(tokens=[], raw_events=[NOT_UTF8]), 502),
    "first-event-too-deep": (Scenario(tokens=[], raw_events=[TOO_DEEP]), 502),
}

AFTER_FIRST_BYTE = {
    "drop-mid-stream": Scenario(tokens=["a", "b", "c"], drop_after=2),
    "error-event": Scenario(tokens=["a", "b", "c"], error_after=2, error_message="Provider died"),
    "error-event-string-code": Scenario(
        tokens=["a", "b"], error_after=1, error_code="server_error"
    ),
    "stall": Scenario(tokens=["a", "b", "c"], stall_after=2),
    "no-done": Scenario(tokens=["a", "b"], send_done=False),
    "data-not-json": Scenario(tokens=["a", "b"], raw_events=[NOT_JSON]),
    "no-choices": Scenario(tokens=["a", "b"], raw_events=[NO_CHOICES]),
    "json-cut-short": Scenario(tokens=["a", "b"], raw_events=[JSON_CUT_SHORT]),
    "not-utf8": Scenario(tokens=["a", "b"], raw_events=[NOT_UTF8]),
    "json-too-deep": Scenario(tokens=["a", "b"], raw_events=[TOO_DEEP]),
    # sseclient's time grows with the square of an event's lines: this one held a worker 30 s.
    "event-of-many-lines": Scenario(tokens=["a", "b"], raw_events=[b"data: x\n" * 200_000 + b"\n"]),
    "cut-in-utf8": Scenario(
        tokens=["a", "b"],
        raw_events=[b'data: {"choices":[{"index":0,"delta":{"content":"\xe2\x9c'],
        drop_after=2,
    ),
    "oversized-event": Scenario(
        tokens=["a", "b"], raw_events=[b"data: " + b"x" * (9 * 1024 * 1024) + b"\n\n"]
    ),
}


def assert_ends_with_an_error_event(body: bytes) -> None:
    events = [event for event in body.decode().split("\n\n")[:-1] if not event.startswith(":")]
    assert events[-1] != "data: [DONE]"
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert set(error) == {"message", "type", "code"} and error["message"]


@pytest.mark.parametrize("surface", [TEXT, SSE], ids=["text", "sse"])
@pytest.mark.parametrize("fault", BEFORE_FIRST_BYTE, ids=str)
def test_a_fault_before_the_first_byte_is_an_error_status(faulty_relay, fake, surface, fault):
    scenario, status = BEFORE_FIRST_BYTE[fault]
    fake.script("m/fault", scenario)
    response = chat(faulty_relay, surface, "m/fault")
    assert response.status_code == status
    answer = response.json()
    if surface == TEXT:
        assert set(answer) == {"message"} and answer["message"]
    else:
        assert set(answer["error"]) == {"message", "type", "code", "param"}
    assert "Traceback" not in response.text
    if fault in CONNECTION_UNUSABLE:
        (upstream,) = fake.requests_for("m/fault")
        assert fake.wait_for(lambda: upstream.connection_closed is not None, 3)
    assert_nothing_left(faulty_relay, fake)


@pytest.mark.parametrize("surface", [TEXT, SSE], ids=["text", "sse"])
@pytest.mark.parametrize("fault", BAD_FIRST_EVENT, ids=str)
def test_a_bad_first_event_is_an_error_status_or_once_the_stream_began_an_error_event(
    faulty_relay, fake, surface, fault
):
    scenario, status = BAD_FIRST_EVENT[fault]
    fake.script("m/fault", scenario)
    response = chat(faulty_relay, surface, "m/fault")
    if surface == TEXT:
        assert response.status_code == status
        answer = response.json()
        assert set(answer) == {"message"} and answer["message"]
    else:
        assert response.status_code == 200
        assert_ends_with_an_error_event(response.content)
    (upstream,) = fake.requests_for("m/fault")
    assert fake.wait_for(lambda: upstream.connection_closed is not None, 3)
    assert_nothing_left(faulty_relay, fake)


@pytest.mark.parametrize("surface", [TEXT, SSE], ids=["text", "sse"])
@pytest.mark.parametrize("fault", AFTER_FIRST_BYTE, ids=str)
def test_a_fault_after_the_first_byte_never_looks_complete(faulty_relay, fake, surface, fault):
    fake.script("m/fault", AFTER_FIRST_BYTE[fault])
    mark = faulty_relay.log_mark()
    started = time.monotonic()
    body = b""
    with chat(faulty_relay, surface, "m/fault", stream=True) as response:
        assert response.status_code == 200
        if surface == TEXT:
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                for piece in response.iter_content(chunk_size=None):
                    body += piece
            assert body.startswith(b"a")
        else:
            assert_ends_with_an_error_event(response.content)
    assert time.monotonic() - started < READ_TIMEOUT + 5
    # A cut-off the relay chose, not a crash that happens to close the connection as well.
    assert "Traceback" not in faulty_relay.log(since=mark)
    (upstream,) = fake.requests_for("m/fault")
    # The relay closed the connection of the failed stream (never back into the pool): that is
    # also what tells OpenRouter to stop generating.
    assert fake.wait_for(lambda: upstream.connection_closed is not None, 3)
    assert_nothing_left(faulty_relay, fake)


# Failures before the first byte that a retry hides, and the least time the retry must wait
# (the backoff, 0.05 s less its jitter of up to half; Retry-After in full).
RETRIED = {
    "503-then-success": (Scenario(status=503, error_message="No provider"), 0.025),
    "429-retry-after-then-success": (Scenario(status=429, retry_after="1"), 1.0),
}


@pytest.mark.parametrize("surface", [TEXT, SSE], ids=["text", "sse"])
@pytest.mark.parametrize("fault", RETRIED, ids=str)
def test_a_failure_before_the_first_byte_is_retried_unseen(retrying_relay, fake, surface, fault):
    failure, wait = RETRIED[fault]
    fake.script("m/flaky", failure, Scenario(tokens=["fine"]))
    with chat(retrying_relay, surface, "m/flaky") as response:
        assert response.status_code == 200
        if surface == TEXT:
            assert response.text == "fine"
        else:
            assert '"content":"fine"' in response.text
            assert response.text.endswith("data: [DONE]\n\n")
    first, second = fake.requests_for("m/flaky")
    assert second.started - first.started >= wait
    assert_nothing_left(retrying_relay, fake)


@pytest.mark.parametrize("surface", [TEXT, SSE], ids=["text", "sse"])
@pytest.mark.parametrize("line_end", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_a_long_stream_with_the_standards_other_line_ends_is_relayed_whole(
    faulty_relay, fake, surface, line_end
):
    """Over 8 MiB, and over a thousand lines, in events that each end in a blank line."""
    piece = "x" * 100_000
    event = f'data: {{"choices":[{{"index":0,"delta":{{"content":"{piece}"}}}}]}}'.encode()
    fake.script("m/crlf", Scenario(tokens=[], raw_events=[event + line_end * 2] * 90))
    with chat(faulty_relay, surface, "m/crlf") as response:
        assert response.status_code == 200
        if surface == TEXT:
            assert response.text == piece * 90
        else:
            assert response.text.count(piece) == 90
            assert response.text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize("surface", [TEXT, SSE], ids=["text", "sse"])
def test_events_whose_blank_line_comes_in_a_write_of_its_own_are_relayed_whole(
    faulty_relay, fake, surface
):
    """Each read then ends inside an event, and the next begins with its end: 1,200 events are
    not one event of 1,200 lines."""
    event = b'data: {"choices":[{"index":0,"delta":{"content":"w"}}]}\n'
    fake.script("m/apart", Scenario(tokens=[], raw_events=[event, b"\n"] * 1200))
    with chat(faulty_relay, surface, "m/apart") as response:
        assert response.status_code == 200
        if surface == TEXT:
            assert response.text == "w" * 1200
        else:
            assert response.text.count('"content":"w"') == 1200
            assert response.text.endswith("data: [DONE]\n\n")


def test_lines_ending_in_lf_then_a_crlf_line_are_one_event_and_bounded(faulty_relay, fake):
    """sseclient ends an event at a blank line of LF, CRLF or CR line ends, never at LF followed
    by CRLF: these 1,500 lines are one event, over the bound."""
    fake.script("m/mixed", Scenario(tokens=["a"], raw_events=[b"data: x\n\r\n"] * 1500))
    with chat(faulty_relay, SSE, "m/mixed") as response:
        assert_ends_with_an_error_event(response.content)
        assert "more than 1000 lines" in response.text


@pytest.mark.parametrize("surface", [TEXT, SSE], ids=["text", "sse"])
def test_an_upstream_that_keeps_its_body_open_after_done_does_not_hold_the_answer(
    relay, fake, surface
):
    """The answer ends at [DONE], not when the upstream's read timeout (5 s here) runs out."""
    fake.script(
        "m/open", Scenario(tokens=["a", "b"], raw_events=[b"data: [DONE]\n\n"], stall_after=2)
    )
    started = time.monotonic()
    with chat(relay, surface, "m/open") as response:
        assert response.status_code == 200
        expected_end = "ab" if surface == TEXT else "data: [DONE]\n\n"
        assert response.text.endswith(expected_end)
    assert time.monotonic() - started < 2.5
    (upstream,) = fake.requests_for("m/open")
    assert fake.wait_for(lambda: upstream.connection_closed is not None, 3)  # not pooled


def test_a_key_quoted_by_openrouter_reaches_neither_the_caller_nor_the_log(faulty_relay, fake):
    quoted = f"Invalid API key: {SERVER_KEY}"
    fake.script("m/quote", Scenario(status=401, error_message=quoted))
    fake.script("m/quote-later", Scenario(tokens=["a", "b"], error_after=1, error_message=quoted))
    mark = faulty_relay.log_mark()
    answers = [chat(faulty_relay, surface, "m/quote") for surface in (TEXT, SSE)]
    assert [answer.status_code for answer in answers] == [401, 401]
    answers.append(chat(faulty_relay, SSE, "m/quote-later"))
    for answer in answers:
        assert "Invalid API key: sk-or-[redacted]" in answer.text
        assert SERVER_KEY not in answer.text
    assert "Invalid API key: sk-or-[redacted]" in faulty_relay.log(since=mark)
    assert SERVER_KEY not in faulty_relay.log(since=mark)


def test_a_stalled_upstream_is_cut_within_the_read_timeout_and_closed(faulty_relay, fake):
    fake.script("m/stall", Scenario(tokens=["a", "b"], stall_after=1))
    started = time.monotonic()
    with contextlib.suppress(requests.exceptions.ChunkedEncodingError):
        chat(faulty_relay, TEXT, "m/stall")
    assert time.monotonic() - started < READ_TIMEOUT + 2
    (upstream,) = fake.requests_for("m/stall")
    assert fake.wait_for(lambda: upstream.client_gone is not None, 3)
    assert_nothing_left(faulty_relay, fake)


@pytest.mark.parametrize("surface", [TEXT, SSE], ids=["text", "sse"])
def test_a_client_that_vanishes_while_the_upstream_is_silent_closes_it(faulty_relay, fake, surface):
    fake.script("m/silent", Scenario(tokens=["a", "b"], stall_after=1))
    with start_raw_stream(faulty_relay.port, payload(surface, "m/silent"), path=surface) as client:
        received = b""
        while b"a" not in received.partition(b"\r\n\r\n")[2]:
            received += client.recv(4096)
    left = time.monotonic()
    (upstream,) = fake.requests_for("m/silent")
    assert fake.wait_for(lambda: upstream.client_gone is not None, 3)
    assert upstream.client_gone - left < 1.0
    assert_nothing_left(faulty_relay, fake)


def test_a_slow_reader_holds_the_upstream_back_instead_of_filling_memory(faulty_relay, fake):
    token = "x" * 1000
    fake.script("m/firehose", Scenario(tokens=[token] * 30_000))
    pid = worker_pid(faulty_relay)
    before = rss_kib(pid)
    with start_raw_stream(faulty_relay.port, payload(SSE, "m/firehose"), path=SSE) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for _ in range(20):
            client.recv(64)
            time.sleep(0.1)
        (upstream,) = fake.requests_for("m/firehose")
        sent = upstream.tokens_sent
        grew = rss_kib(pid) - before
    assert sent < 30_000 / 2, f"the relay read {sent} of 30000 tokens ahead of its client"
    assert grew < 20_000, f"worker RSS grew by {grew} KiB"
    assert_nothing_left(faulty_relay, fake)


def test_upstream_connections_are_reused_across_requests(faulty_relay, fake):
    fake.script("m/ok", Scenario(tokens=["fine"]))
    for surface in (TEXT, SSE, TEXT, SSE, TEXT):
        assert requests.post(
            faulty_relay.url + surface, json=payload(surface, "m/ok"), timeout=10
        ).ok
    assert requests.post(faulty_relay.url + SSE, json={**payload(SSE, "m/ok"), "stream": False}).ok
    assert fake.connections == 1


def test_a_pooled_connection_the_upstream_closed_is_not_reused(start_relay, fake):
    """With no retry to hide it, a request sent on a connection OpenRouter had closed would fail:
    the pool must notice the close before it reuses the connection."""
    fake.script("m/ok", Scenario(tokens=["fine"]))
    proxy = TcpProxy(("127.0.0.1", fake.port)).up()
    try:
        relay = start_relay(
            UPSTREAM_RETRIES="0", OPENROUTER_BASE_URL=proxy.in_front_of(fake.base_url)
        )
        for surface in (TEXT, SSE):
            assert chat(relay, surface, "m/ok").ok
            proxy.down()  # closes the connection idle in the relay's pool
            proxy.up()
            answer = chat(relay, surface, "m/ok")
            assert answer.status_code == 200, answer.text
        assert fake.connections == 3  # the first, then a new one after each cut
    finally:
        proxy.down()


def test_the_pool_keeps_a_connection_per_concurrent_stream(faulty_relay, fake):
    fake.script("m/ok", Scenario(tokens=["a", "b", "c"], interval=0.1))

    def burst() -> None:
        threads = [
            threading.Thread(
                target=requests.post,
                args=(faulty_relay.url + TEXT,),
                kwargs={"json": payload(TEXT, "m/ok"), "timeout": 20},
            )
            for _ in range(30)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    burst()
    after_first = fake.connections
    # A client has its answer before the worker closes the stream and pools its connection.
    fake.wait_for(lambda: open_streams(faulty_relay) == 0, 5)
    burst()
    assert after_first <= 30
    assert fake.connections == after_first, "the second burst opened new upstream connections"


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_lets_a_running_stream_finish_and_refuses_new_connections(start_relay, fake):
    relay = start_relay(GRACEFUL_TIMEOUT="10")
    tokens = [f"{i} " for i in range(10)]
    fake.script("m/slow", Scenario(tokens=tokens, interval=0.3))
    outcome: dict = {}

    def ask() -> None:
        try:
            outcome["text"] = chat(relay, TEXT, "m/slow").text
        except requests.RequestException as error:
            outcome["error"] = error

    thread = threading.Thread(target=ask)
    thread.start()
    assert fake.wait_for(lambda: bool(fake.requests_for("m/slow")), 5)
    relay.process.send_signal(signal.SIGTERM)
    # gunicorn's gevent worker notices the signal at its next once-a-second check.
    assert fake.wait_for(lambda: refuses_connections(relay.port), 3)
    thread.join(20)
    assert outcome == {"text": "".join(tokens)}


def test_streams_still_running_at_the_graceful_timeout_end_aborted(start_relay, fake):
    graceful = 2
    relay = start_relay(GRACEFUL_TIMEOUT=str(graceful))
    fake.script("m/endless", Scenario(tokens=["w "] * 1000, interval=0.05))
    with chat(relay, TEXT, "m/endless", stream=True) as response:
        pieces = response.iter_content(chunk_size=None)
        next(pieces)
        relay.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for _ in pieces:
                pass
    cut_after = time.monotonic() - signalled
    # The worker cuts its streams at its own GRACEFUL_TIMEOUT (post_worker_init), 2 s late as
    # measured (it looks once a second, then gives them 1 s), not at the master's kill, which
    # comes at GRACEFUL_TIMEOUT + 6.
    assert graceful <= cut_after < graceful + 3.5


# OpenRouter that has not answered yet, and a relay that would wait far longer for it (and retry)
# than a client's going away may take to be noticed.
SILENCE = 60.0
PATIENT_READ_TIMEOUT = 10.0
ENDPOINTS = {"text": TEXT, "json": SSE, "sse": SSE}


@pytest.fixture(scope="module")
def patient_relay(fake_server, tmp_path_factory):
    yield from relay_for_the_module(
        fake_server,
        tmp_path_factory,
        UPSTREAM_READ_TIMEOUT=str(PATIENT_READ_TIMEOUT),
        UPSTREAM_RETRIES="2",
        UPSTREAM_RETRY_BACKOFF="0.05",
        RETRY_AFTER_MAX=str(SILENCE),
        HEARTBEAT_INTERVAL="0.3",  # the event stream begins while OpenRouter is still silent
        DEFAULT_CONCURRENCY="1",  # a request that kept its slot would have the next one refused
    )


def request_of(kind: str, model: str) -> dict:
    if kind == "json":
        return {"model": model, "messages": MESSAGES}
    return payload(ENDPOINTS[kind], model)


def leave_while_openrouter_is_silent(
    relay, fake, kind: str, model: str, until: Callable[[], bool] = lambda: True
) -> float:
    """Send a chat request as a bare socket and close it once OpenRouter has it (and, on the
    event stream, once the response has begun) and `until()` holds; returns when it was closed."""
    with start_raw_stream(relay.port, request_of(kind, model), path=ENDPOINTS[kind]) as client:
        assert fake.wait_for(lambda: bool(fake.requests_for(model)), 5)
        if kind == "sse":
            assert client.recv(65536).startswith(b"HTTP/1.1 200")
        assert wait_for(until, 5)
    return time.monotonic()


def line_of(relay, model: str) -> dict:
    """The request's log line (written once its response closed: the request is over)."""
    lines: list[dict] = []

    def logged() -> bool:
        lines[:] = [line for line in request_lines(relay) if line["model"] == model]
        return bool(lines)

    assert wait_for(logged, 10), f"no log line for {model}"
    (line,) = lines
    return line


def ledger_outcomes(relay, model: str) -> list[str]:
    engine = engine_for(relay.database_url, "")
    try:
        with engine.connect() as connection:
            query = select(usage.c.outcome).where(usage.c.model_requested == model)
            return list(connection.scalars(query))
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ENDPOINTS)
def test_a_client_gone_before_openrouter_answers_ends_the_upstream_call_at_once(
    patient_relay, fake, kind
):
    model = f"m/mute-{kind}"
    fake.script(model, Scenario(headers_delay=SILENCE))
    left = leave_while_openrouter_is_silent(patient_relay, fake, kind, model)
    (upstream,) = fake.requests_for(model)
    assert fake.wait_for(lambda: upstream.client_gone is not None, PATIENT_READ_TIMEOUT / 2)
    assert upstream.client_gone - left < PATIENT_READ_TIMEOUT / 2  # not the read timeout's doing
    line = line_of(patient_relay, model)
    assert (line["outcome"], line["status"]) == ("client_aborted", 200 if kind == "sse" else 499)
    assert len(fake.requests_for(model)) == 1  # never retried
    assert fake.wait_for(lambda: ledger_outcomes(patient_relay, model) == ["client_aborted"], 5)
    assert "Traceback" not in patient_relay.log()
    assert_nothing_left(patient_relay, fake)


@pytest.mark.parametrize("kind", ENDPOINTS)
def test_a_client_gone_while_a_retry_waits_ends_the_wait_and_the_retries(patient_relay, fake, kind):
    model = f"m/busy-{kind}"
    fake.script(model, Scenario(status=503, retry_after=str(SILENCE)), Scenario())
    mark = patient_relay.log_mark()
    leave_while_openrouter_is_silent(
        patient_relay, fake, kind, model, until=lambda: "retry 1 of" in patient_relay.log(mark)
    )
    line = line_of(patient_relay, model)
    assert line["outcome"] == "client_aborted"
    assert line["duration_ms"] < PATIENT_READ_TIMEOUT * 1000 / 2
    assert len(fake.requests_for(model)) == 1
    assert_nothing_left(patient_relay, fake)


@pytest.mark.parametrize("kind", ENDPOINTS)
def test_a_client_that_stays_is_answered_as_ever_after_others_left_early(patient_relay, fake, kind):
    model = f"m/after-{kind}"
    fake.script(model, Scenario(headers_delay=SILENCE), Scenario(headers_delay=0.5))
    leave_while_openrouter_is_silent(patient_relay, fake, kind, model)
    assert line_of(patient_relay, model)["outcome"] == "client_aborted"
    answer = requests.post(
        patient_relay.url + ENDPOINTS[kind],
        json=request_of(kind, model),
        headers={"Connection": "close"},
        timeout=30,
    )
    assert answer.status_code == 200
    if kind == "text":
        assert answer.text == "Hello, world!"
    elif kind == "json":
        assert answer.json()["choices"][0]["message"]["content"] == "Hello, world!"
    else:
        assert answer.text.endswith("data: [DONE]\n\n")
    assert len(fake.requests_for(model)) == 2
    assert_nothing_left(patient_relay, fake)
