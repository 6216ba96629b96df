"""A real HTTP/1.1 server on loopback that speaks OpenRouter's protocol, scripted per model.

Tests point the relay at it and then look at what it received and whether its client went away.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_MODELS = [
    {
        "id": "openai/gpt-4o-mini",
        "name": "OpenAI: GPT-4o-mini",
        "created": 1721260800,
        "description": "A small, fast model.",
        "context_length": 128000,
        "pricing": {"prompt": "0.00000015", "completion": "0.0000006"},
        "architecture": {"modality": "text->text"},
        "top_provider": {"context_length": 128000},
        "supported_parameters": ["temperature", "top_p"],
    },
    {
        "id": "anthropic/claude-3.5-sonnet",
        "name": "Anthropic: Claude 3.5 Sonnet",
        "created": 1718841600,
        "description": "A capable model.",
        "context_length": 200000,
        "pricing": {"prompt": "0.000003", "completion": "0.000015"},
        "architecture": {"modality": "text+image->text"},
        "top_provider": {"context_length": 200000},
        "supported_parameters": ["temperature", "tools"],
    },
]


class ClientGone(Exception):
    """The relay closed its connection to the fake."""


@dataclass
class Scenario:
    """How the fake answers one model's requests."""

    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    interval: float = 0.0
    headers_delay: float = 0.0
    comments: int = 1
    status: int = 200
    error_message: str = "Upstream says no"
    error_metadata: dict | None = None
    retry_after: str | None = None
    error_after: int | None = None
    error_code: int | str = 502
    error_object: bool = True  # False: the error event has finish_reason "error" but no `error`
    drop_after: int | None = None
    stall_after: int | None = None
    raw_body: bytes | None = None
    raw_content_type: str = "text/html"
    split_writes: int | None = None
    raw_events: list[bytes] = field(default_factory=list)  # sent verbatim after the tokens
    drop_before_headers: bool = False
    send_usage: bool = True
    send_done: bool = True


@dataclass
class Received:
    """One request as the fake saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    started: float
    finished: float | None = None
    client_gone: float | None = None
    # When the relay closed the TCP connection that carried this request, during or after the
    # response (noted on the connection's last request: one given back to the pool stays open).
    connection_closed: float | None = None
    completed: bool = False
    tokens_sent: int = 0
    generation_id: str = ""

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether `predicate` came true within `timeout` seconds (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class FakeOpenRouter:
    """OpenRouter on 127.0.0.1: chat completions (streamed or not) and the model list."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.connections = 0
        # The client ports of connections waiting for their next request (idle in a pool).
        self.idle_ports: set[int] = set()
        self.models: list[dict] = [dict(model) for model in DEFAULT_MODELS]
        self.models_status = 200
        self.models_delay = 0.0
        self._scripts: dict[str, list[Scenario]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None

    def __enter__(self) -> FakeOpenRouter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> FakeOpenRouter:
        fake = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024

            def process_request(self, request, client_address):
                with fake._lock:
                    fake.connections += 1
                super().process_request(request, client_address)

        class Handler(_Handler):
            owner = fake

        self._server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    @property
    def port(self) -> int:
        assert self._server, "start() the fake first"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    def script(self, model: str, *scenarios: Scenario) -> None:
        """Answer `model`'s requests with these scenarios in turn; the last one then repeats."""
        self._scripts[model] = list(scenarios)

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self.received.clear()
            self.connections = 0
            self.models = [dict(model) for model in DEFAULT_MODELS]
            self.models_status = 200
            self.models_delay = 0.0

    def requests_for(self, model: str) -> list[Received]:
        return [r for r in list(self.received) if _model_of(r.body) == model]

    wait_for = staticmethod(wait_for)

    def scenario_for(self, body: Any) -> Scenario:
        with self._lock:
            scenarios = self._scripts.get(_model_of(body) or "")
            if not scenarios:
                return Scenario()
            return scenarios.pop(0) if len(scenarios) > 1 else scenarios[0]

    def record(self, received: Received) -> None:
        with self._lock:
            self.received.append(received)

    def next_generation_id(self) -> str:
        return f"gen-fake-{next(self._ids)}"


def _model_of(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("models"), list) and body["models"]:
        return body["models"][0]
    return body.get("model")


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOpenRouter
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        self._received: Received | None = None
        try:
            super().handle()
        except (ClientGone, ConnectionError, TimeoutError):
            self.close_connection = True
        self.owner.idle_ports.discard(self.client_address[1])
        self._await_close()

    def handle_one_request(self) -> None:
        self.owner.idle_ports.add(self.client_address[1])
        super().handle_one_request()

    def parse_request(self) -> bool:
        self.owner.idle_ports.discard(self.client_address[1])
        return super().parse_request()

    def _await_close(self) -> None:
        """Half-close the connection (if the relay has not closed it) and note when the relay
        closes its end: a relay that keeps a failed stream's connection never does."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
        if self._received is None:
            return
        while not self._relay_closed():
            if self.owner._stopping.is_set():
                return
        self._received.connection_closed = time.monotonic()

    def _relay_closed(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0.1)
        try:
            return bool(readable) and not self.connection.recv(65536)
        except OSError:
            return True

    def do_GET(self) -> None:
        received = self._receive(None)
        if self.path.split("?")[0] == "/api/v1/models":
            self._pause(received, self.owner.models_delay)
            if self.owner.models_status != 200:
                self._send_error(received, self.owner.models_status, "Models unavailable", None)
                return
            self._send_json(received, 200, {"data": self.owner.models})
        else:
            self._send_error(received, 404, "Not Found", None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        received = self._receive(body)
        if self.path != "/api/v1/chat/completions":
            self._send_error(received, 404, "Not Found", None)
            return
        scenario = self.owner.scenario_for(body)
        if scenario.drop_before_headers:
            self._drop()
        self._pause(received, scenario.headers_delay)
        if scenario.raw_body is not None:  # with any status: a proxy's page, a broken body
            self._send_raw(received, scenario.raw_content_type, scenario.raw_body, scenario.status)
        elif scenario.status != 200:
            headers = {"Retry-After": scenario.retry_after} if scenario.retry_after else {}
            self._send_error(
                received, scenario.status, scenario.error_message, scenario.error_metadata, headers
            )
        elif isinstance(body, dict) and body.get("stream"):
            self._stream(received, scenario, body)
        else:
            self._send_json(received, 200, _completion(scenario, body, self._generation_id))

    def _receive(self, body: Any) -> Received:
        self._generation_id = self.owner.next_generation_id()
        received = Received(
            self.command, self.path, dict(self.headers.items()), body, time.monotonic()
        )
        received.generation_id = self._generation_id
        self._received = received
        self.owner.record(received)
        return received

    def _send_json(self, received: Received, status: int, payload: Any, headers=None) -> None:
        self._send_raw(received, "application/json", json.dumps(payload).encode(), status, headers)

    def _send_error(self, received, status, message, metadata, headers=None) -> None:
        error: dict[str, Any] = {"code": status, "message": message}
        if metadata is not None:
            error["metadata"] = metadata
        self._send_json(received, status, {"error": error}, headers)

    def _send_raw(self, received, content_type, data, status=200, headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Generation-Id", self._generation_id)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self._write(received, data)
        received.finished = time.monotonic()
        received.completed = True

    def _stream(self, received: Received, scenario: Scenario, body: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Generation-Id", self._generation_id)
        self.end_headers()
        for _ in range(scenario.comments):
            self._chunk(received, scenario, b": OPENROUTER PROCESSING\n\n")
        model = body.get("model") or _model_of(body)
        for index, token in enumerate(scenario.tokens):
            if index == scenario.stall_after:
                self._stall(received)
                return
            if index == scenario.drop_after:
                self._drop()
                return
            if index == scenario.error_after:
                self._error_event(received, scenario, model)
                return
            if index:
                self._pause(received, scenario.interval)
            delta = {"role": "assistant", "content": token} if index == 0 else {"content": token}
            self._event(received, scenario, self._chunk_of(model, [_choice(delta, None)]))
            received.tokens_sent += 1
        for raw in scenario.raw_events:
            self._chunk(received, scenario, raw)
        end = len(scenario.tokens)
        if end in (scenario.stall_after, scenario.drop_after, scenario.error_after):
            handlers = {
                scenario.stall_after: lambda: self._stall(received),
                scenario.drop_after: self._drop,
                scenario.error_after: lambda: self._error_event(received, scenario, model),
            }
            handlers[end]()
            return
        self._event(received, scenario, self._chunk_of(model, [_choice({"content": ""}, "stop")]))
        if scenario.send_usage:
            usage_chunk = self._chunk_of(model, [])
            usage_chunk["usage"] = _usage(scenario, body)
            self._event(received, scenario, usage_chunk)
        if scenario.send_done:
            self._chunk(received, scenario, b"data: [DONE]\n\n")
        self._write(received, b"0\r\n\r\n")
        received.finished = time.monotonic()
        received.completed = True

    def _chunk_of(self, model: str, choices: list) -> dict:
        return {
            "id": self._generation_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "provider": "FakeProvider",
            "choices": choices,
        }

    def _error_event(self, received: Received, scenario: Scenario, model: str) -> None:
        chunk = self._chunk_of(model, [_choice({"content": ""}, "error")])
        if scenario.error_object:
            chunk["error"] = {"code": scenario.error_code, "message": scenario.error_message}
        self._event(received, scenario, chunk)
        self._write(received, b"0\r\n\r\n")
        received.finished = time.monotonic()

    def _event(self, received: Received, scenario: Scenario, chunk: dict) -> None:
        data = json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
        self._chunk(received, scenario, f"data: {data}\n\n".encode())

    def _chunk(self, received: Received, scenario: Scenario, data: bytes) -> None:
        size = scenario.split_writes or len(data)
        for start in range(0, len(data), size):
            piece = data[start : start + size]
            self._write(received, b"%x\r\n%s\r\n" % (len(piece), piece))
            if scenario.split_writes:
                self._pause(received, 0.005)

    def _write(self, received: Received, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self._gone(received)

    def _pause(self, received: Received, seconds: float) -> None:
        """Wait, but notice at once if the client closes its connection meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.owner._stopping.is_set():
                raise ClientGone()
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable and self._peer_closed():
                self._gone(received)

    def _stall(self, received: Received) -> None:
        self.close_connection = True
        while True:
            self._pause(received, 1.0)

    def _drop(self) -> None:
        """End the connection mid-response; handle() then waits for the relay to close its end."""
        self.close_connection = True
        raise ClientGone()

    def _peer_closed(self) -> bool:
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except ConnectionError:
            return True

    def _gone(self, received: Received) -> None:
        if received.client_gone is None:
            received.client_gone = time.monotonic()
        raise ClientGone()


def _choice(delta: dict, finish_reason: str | None) -> dict:
    return {"index": 0, "delta": delta, "finish_reason": finish_reason}


def _usage(scenario: Scenario, body: Any) -> dict:
    prompt = len(json.dumps(body.get("messages", []))) // 4 if isinstance(body, dict) else 0
    completion = len(scenario.tokens)
    total = prompt + completion
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total,
        "cost": round(total * 0.00001, 8),
    }


def _completion(scenario: Scenario, body: Any, generation_id: str) -> dict:
    model = (body or {}).get("model") or _model_of(body)
    return {
        "id": generation_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "provider": "FakeProvider",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(scenario.tokens)},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(scenario, body),
    }
