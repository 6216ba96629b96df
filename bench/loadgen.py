"""A streaming-aware HTTP load generator: open loop (a fixed arrival rate) or closed loop.

It runs in its own process on raw asyncio protocols, parsing status line, headers and chunked
bodies itself: per network read it only takes a timestamp, counts bytes and `data: ` events, and
looks for the first token until it has seen one. That keeps its own cost per chunk a few
microseconds, far below the relay's, on the two cores it shares with the relay and the upstream.

Per request it records the time to the first response byte (ttfb), to the first token (ttft),
the gaps between reads after the first token, the total time and an error, if any:
- `text` surface: the first non-empty body bytes are the first token;
- `sse` surface: the first `data:` event whose delta has content (`: connected` and keep-alive
  comments are bytes, not tokens); a stream must end with `data: [DONE]` and carry no error event;
- `json` surface: a whole non-streamed answer; ttft is its total time.

Usage: `python -m bench.loadgen SPEC.json OUT.json` (see `LoadSpec` for the fields).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

_FIRST_CONTENT = re.compile(rb'"content":\s*"[^"]')
_POOL_IDLE_MAX = 2.0  # seconds an idle keep-alive connection may wait for reuse


@dataclass
class LoadSpec:
    """One load run against one target."""

    port: int
    path: str
    body: dict[str, Any]
    surface: str  # text | sse | json
    mode: str = "open"  # open: `rate` arrivals per second; closed: `concurrency` loops
    rate: float = 10.0
    concurrency: int = 1
    duration: float = 5.0
    timeout: float = 30.0
    record_gaps: bool = False
    host: str = "127.0.0.1"
    label: str = ""


@dataclass
class Record:
    """What happened to one request; times in seconds from its start."""

    start: float
    ttfb: float | None = None
    ttft: float | None = None
    total: float | None = None
    error: str | None = None
    events: int = 0
    bytes: int = 0
    gaps: list[float] = field(default_factory=list)


class Exchange(asyncio.Protocol):
    """One keep-alive connection that carries one request at a time and times the answer."""

    def __init__(self, surface: str, record_gaps: bool) -> None:
        self.surface = surface
        self.record_gaps = record_gaps
        self.transport: asyncio.Transport | None = None
        self.record: Record | None = None
        self.done: asyncio.Future | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, record: Record, done: asyncio.Future) -> None:
        """Send `request`; `done` resolves when the answer is complete or has failed."""
        self.record, self.done = record, done
        self.buffer = bytearray()
        self.in_body = False
        self.status = 0
        self.length: int | None = None
        self.chunked = False
        self.chunk_left = 0
        self.skip = 0
        self.ending = False
        self.keep_alive = True
        self.carry = b""
        self.scan = b""
        self.saw_done = False
        self.last_read = 0.0
        self.got_bytes = False
        self.transport.write(request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        record = self.record
        if record is None:
            return  # bytes while idle: the server misbehaved; the next request will notice
        if not self.got_bytes:
            self.got_bytes = True
            record.ttfb = now - record.start
        if self.in_body:
            self._body_bytes(data, now)
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        rest = bytes(self.buffer[end + 4 :])
        self.status = int(lines[0].split(" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == "content-length":
                self.length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                self.chunked = True
            elif name == "connection" and value == "close":
                self.keep_alive = False
        self.in_body = True
        self.buffer = bytearray()
        if self.status != 200:
            record.error = f"status {self.status}"
        if self.length == 0 and not self.chunked:
            self._complete(now)
        elif rest:
            self._body_bytes(rest, now)

    def _body_bytes(self, data: bytes, now: float) -> None:
        if not self.chunked:
            self._payload(data, now)
            if self.length is not None and self.record and self.record.bytes >= self.length:
                self._complete(now)
            return
        buffer = self.buffer
        buffer += data
        pos, size = 0, len(buffer)
        while pos < size:
            if self.chunk_left:
                take = min(self.chunk_left, size - pos)
                self._payload(bytes(buffer[pos : pos + take]), now)
                pos += take
                self.chunk_left -= take
                if not self.chunk_left:
                    self.skip = 2
            elif self.skip:
                step = min(self.skip, size - pos)
                pos += step
                self.skip -= step
                if not self.skip and self.ending:
                    self._complete(now)
                    return
            else:
                line_end = buffer.find(b"\r\n", pos)
                if line_end < 0:
                    break
                chunk_size = int(bytes(buffer[pos:line_end]).split(b";", 1)[0], 16)
                pos = line_end + 2
                if chunk_size:
                    self.chunk_left = chunk_size
                else:
                    self.ending, self.skip = True, 2
        del buffer[:pos]

    def _payload(self, piece: bytes, now: float) -> None:
        record = self.record
        if record is None or not piece:
            return
        record.bytes += len(piece)
        if self.surface == "json":
            self.scan += piece
            return
        if self.surface == "sse":
            window = self.carry + piece
            record.events += window.count(b"data: ")
            if b"[DONE]" in window:
                self.saw_done = True
            if b'data: {"error"' in window and record.error is None:
                record.error = "error event"
            self.carry = window[-6:]
        if record.ttft is None:
            if self.surface == "text" or _FIRST_CONTENT.search(self.scan[-64:] + piece):
                record.ttft = now - record.start
            elif self.surface == "sse":
                self.scan = self.scan[-64:] + piece
        elif self.record_gaps and now > self.last_read:
            record.gaps.append(now - self.last_read)
        self.last_read = now

    def _complete(self, now: float) -> None:
        record = self.record
        if record is None:
            return
        record.total = now - record.start
        if self.surface == "json":
            record.ttft = record.total
            if record.error is None and b'"choices"' not in self.scan:
                record.error = "no choices"
        elif self.surface == "sse" and record.error is None and not self.saw_done:
            record.error = "no [DONE]"
        elif record.error is None and record.ttft is None:
            record.error = "no token"
        self._settle()
        if not self.keep_alive and self.transport is not None:
            self.transport.close()

    def _settle(self) -> None:
        self.record = None
        self.idle_since = time.perf_counter()
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def expire(self) -> None:
        """The request ran out of time: drop the connection."""
        if self.record is not None:
            self.record.error = "timeout"
            self._settle()
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.record is not None:
            self.record.error = "cut off" if self.got_bytes else "closed before answer"
            self._settle()


class LoadGenerator:
    """Fires requests at one target and keeps a Record of each."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        body = json.dumps(spec.body).encode()
        head = (
            f"POST {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n"
            f"Content-Type: application/json\r\nAccept: */*\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.request = head.encode() + body
        self.records: list[Record] = []
        self.idle: list[Exchange] = []
        self.lateness: list[float] = []

    async def run(self) -> dict[str, Any]:
        """Run the load as the spec says and return every record with the run's facts."""
        started = time.perf_counter()
        if self.spec.mode == "open":
            await self._open_loop()
        else:
            await self._closed_loop()
        elapsed = time.perf_counter() - started
        for exchange in self.idle:
            if exchange.transport is not None:
                exchange.transport.close()
        self.lateness.sort()
        return {
            "spec": asdict(self.spec),
            "elapsed": elapsed,
            "lateness_p99": self.lateness[int(0.99 * (len(self.lateness) - 1))]
            if self.lateness
            else 0.0,
            "records": [asdict(record) for record in self.records],
        }

    async def _open_loop(self) -> None:
        """Requests arrive on a fixed schedule, whatever the earlier ones are doing."""
        loop = asyncio.get_running_loop()
        count = max(1, round(self.spec.rate * self.spec.duration))
        tasks = set()
        begin = loop.time()
        for index in range(count):
            due = begin + index / self.spec.rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.lateness.append(max(0.0, loop.time() - due))
            task = asyncio.ensure_future(self._one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def _closed_loop(self) -> None:
        """`concurrency` clients, each sending its next request when its last one ended."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.spec.duration

        async def client() -> None:
            while loop.time() < end:
                await self._one()

        await asyncio.gather(*(client() for _ in range(self.spec.concurrency)))

    async def _one(self) -> None:
        record = Record(start=time.perf_counter())
        exchange = self._idle_exchange()
        await self._exchange(exchange, record)
        if exchange is not None and record.error == "closed before answer":
            record.error = None  # a kept-alive connection the server had closed: retry once
            await self._exchange(None, record)
        self.records.append(record)

    def _idle_exchange(self) -> Exchange | None:
        now = time.perf_counter()
        while self.idle:
            exchange = self.idle.pop()
            if not exchange.closed and now - exchange.idle_since < _POOL_IDLE_MAX:
                return exchange
            if exchange.transport is not None:
                exchange.transport.close()
        return None

    async def _exchange(self, exchange: Exchange | None, record: Record) -> None:
        loop = asyncio.get_running_loop()
        spec = self.spec
        if exchange is None:
            try:
                _, exchange = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: Exchange(spec.surface, spec.record_gaps), spec.host, spec.port
                    ),
                    spec.timeout,
                )
            except (TimeoutError, OSError) as error:
                record.error = f"connect: {type(error).__name__}"
                return
        done = loop.create_future()
        exchange.send(self.request, record, done)
        timer = loop.call_later(
            max(0.0, spec.timeout - (time.perf_counter() - record.start)), exchange.expire
        )
        await done
        timer.cancel()
        if not exchange.closed and exchange.keep_alive and record.error is None:
            self.idle.append(exchange)
        elif exchange.transport is not None and not exchange.closed:
            exchange.transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="a JSON file with LoadSpec's fields")
    parser.add_argument("out", help="where to write the records (JSON)")
    args = parser.parse_args()
    with open(args.spec) as file:
        spec = LoadSpec(**json.load(file))
    from bench.fake_upstream import run_event_loop

    result: dict[str, Any] = {}

    async def go() -> None:
        result.update(await LoadGenerator(spec).run())

    run_event_loop(go())
    with open(args.out, "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main()
