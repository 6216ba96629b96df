"""A fast stand-in for OpenRouter's chat completions on loopback, the upstream of every benchmark.

It speaks just enough HTTP/1.1 on raw asyncio (keep-alive, Content-Length request bodies, chunked
responses) to cost far less per token than the relay it measures, and it needs nothing beyond the
standard library, so the smoke run installs nothing for it. Each event is encoded once per model
name and reused for every response.

A response's timing comes from the model name, so one server serves every scenario:
`bench/ttft=0.05;tokens=20;gap=0.02` waits 50 ms, then sends 20 content events 20 ms apart;
any other name gets the defaults given on the command line. (Semicolons, not commas: LiteLLM's
proxy reads a comma-separated model name as several models.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from dataclasses import dataclass, replace

TOKEN = "tok "
"""Every content delta is this text, so a plain-text body's length counts its tokens."""

_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"X-Generation-Id: gen-bench\r\nTransfer-Encoding: chunked\r\n\r\n"
)
_LAST_CHUNK = b"0\r\n\r\n"
_MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Timing:
    """How one answer unfolds: seconds to the first token, how many tokens, seconds between."""

    ttft: float = 0.0
    tokens: int = 20
    gap: float = 0.0

    @property
    def duration(self) -> float:
        """When the last token goes out; a non-streamed answer is sent whole at that moment."""
        return self.ttft + self.gap * max(self.tokens - 1, 0)


def timing_for(model: str, default: Timing) -> Timing:
    """The timing a model name asks for (`bench/ttft=..;tokens=..;gap=..`), else `default`."""
    _, _, spec = model.rpartition("/")
    changes: dict[str, float | int] = {}
    for item in spec.replace(",", ";").split(";"):
        name, sep, value = item.partition("=")
        if not sep:
            continue
        if name == "tokens":
            changes["tokens"] = int(value)
        elif name in ("ttft", "gap"):
            changes[name] = float(value)
    return replace(default, **changes)


def model_name(timing: Timing) -> str:
    """The model name that asks this server for `timing`."""
    return f"bench/ttft={timing.ttft:g};tokens={timing.tokens};gap={timing.gap:g}"


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(model: str, choice: dict | None, usage: dict | None = None) -> bytes:
    chunk: dict = {
        "id": "gen-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "provider": "Bench",
        "choices": [choice] if choice else [],
    }
    if usage:
        chunk["usage"] = usage
    return _http_chunk(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")


class Script:
    """The pre-encoded pieces of every answer for one model name and token count."""

    def __init__(self, model: str, tokens: int) -> None:
        usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
        usage["cost"] = 0.0
        self.opening = _STREAM_HEAD + _http_chunk(b": OPENROUTER PROCESSING\n\n")
        first = {"role": "assistant", "content": TOKEN}
        self.first = _event(model, {"index": 0, "delta": first, "finish_reason": None})
        self.token = _event(model, {"index": 0, "delta": {"content": TOKEN}, "finish_reason": None})
        finish = _event(model, {"index": 0, "delta": {"content": ""}, "finish_reason": "stop"})
        self.ending = finish + _event(model, None, usage) + _http_chunk(b"data: [DONE]\n\n")
        self.ending += _LAST_CHUNK
        self.whole = self.first + self.token * max(tokens - 1, 0) + self.ending
        completion = {
            "id": "gen-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "provider": "Bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": TOKEN * tokens},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        body = json.dumps(completion, separators=(",", ":")).encode()
        self.completion = _response(200, "application/json", body)


def _response(status: int, content_type: str, body: bytes) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"X-Generation-Id: gen-bench\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_MODELS = _response(
    200,
    "application/json",
    json.dumps({"data": [{"id": "bench/model", "name": "Bench", "context_length": 8192}]}).encode(),
)
_HEALTHY = _response(200, "application/json", b'{"status":"ok"}')


class Upstream:
    """The server's shared state: default timing and the scripts encoded so far."""

    def __init__(self, default: Timing) -> None:
        self.default = default
        self._scripts: dict[tuple[str, int], Script] = {}

    def script(self, model: str, tokens: int) -> Script:
        key = (model, tokens)
        if key not in self._scripts:
            self._scripts[key] = Script(model, tokens)
        return self._scripts[key]


class Connection(asyncio.Protocol):
    """One client connection: requests answered one at a time, in order (no pipelining)."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._serve_next()

    def _serve_next(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > _MAX_HEAD_BYTES:
                self._finish(_response(400, "text/plain", b"head too large"), close=True)
            return
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        method, target = lines[0].split(" ")[:2]
        length = 0
        self.close_after = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                self.close_after = True
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        self.busy = True
        self._route(method, target.split("?")[0], body)

    def _route(self, method: str, path: str, body: bytes) -> None:
        if method == "POST" and path.endswith("/chat/completions"):
            self._chat(body)
        elif method == "GET" and path.endswith("/models"):
            self._finish(_MODELS)
        elif method == "GET" and path == "/healthz":
            self._finish(_HEALTHY)
        else:
            self._finish(_response(404, "text/plain", b"not found"))

    def _chat(self, body: bytes) -> None:
        try:
            request = json.loads(body)
            model = str(request.get("model") or request["models"][0])
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            self._finish(_response(400, "application/json", b'{"error":{"code":400}}'))
            return
        timing = timing_for(model, self.upstream.default)
        script = self.upstream.script(model, timing.tokens)
        if not request.get("stream"):
            self.timer = self.loop.call_later(timing.duration, self._finish, script.completion)
            return
        self._write(script.opening)
        if timing.gap <= 0:
            self.timer = self.loop.call_later(timing.ttft, self._finish, script.whole)
        else:
            self.timer = self.loop.call_later(timing.ttft, self._tick, script, timing, 0)

    def _tick(self, script: Script, timing: Timing, sent: int) -> None:
        if sent + 1 >= timing.tokens:
            self._finish((script.first if sent == 0 else script.token) + script.ending)
            return
        self._write(script.first if sent == 0 else script.token)
        self.timer = self.loop.call_later(timing.gap, self._tick, script, timing, sent + 1)

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _finish(self, data: bytes, close: bool = False) -> None:
        self.timer = None
        self._write(data)
        self.busy = False
        if (close or self.close_after) and self.transport is not None:
            self.transport.close()
        elif self.buffer:
            self._serve_next()


async def serve(host: str, port: int, default: Timing) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    upstream = Upstream(default)
    server = await loop.create_server(lambda: Connection(upstream), host, port, backlog=4096)
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    print(f"fake upstream on http://{host}:{port}/api/v1", flush=True)
    await stopped.wait()
    server.close()


def run_event_loop(main: object) -> None:
    """Run a coroutine on uvloop when it is installed (cheaper per event), else on asyncio's."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)  # type: ignore[arg-type]
    else:
        uvloop.run(main)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds to the first token")
    parser.add_argument("--tokens", type=int, default=20, help="content events per answer")
    parser.add_argument("--gap", type=float, default=0.0, help="seconds between tokens")
    args = parser.parse_args()
    run_event_loop(serve(args.host, args.port, Timing(args.ttft, args.tokens, args.gap)))


if __name__ == "__main__":
    main()
