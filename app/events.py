"""What OpenRouter's stream events mean: chunks, the end, errors (sseclient-py frames them)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from http.client import HTTPException, HTTPResponse
from typing import Any

import requests
from sseclient import SSEClient
from urllib3.exceptions import HTTPError as TransportError
from urllib3.exceptions import ReadTimeoutError

from .errors import ClientDisconnected, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from .metrics import count_upstream_error
from .wakeups import HIGHEST_PRIORITY

log = logging.getLogger("relay")

_READ_SIZE = 64 * 1024
# A stream whose reads never wait (OpenRouter sending faster than the client takes it) would
# otherwise hold the worker until its answer ends, and new requests' first tokens wait for it.
_READS_PER_TURN = 32
MAX_EVENT_BYTES = 8 * 1024 * 1024
_DRAIN_WAIT = 0.25  # seconds for the body's end after [DONE]
# sseclient joins an event's lines one by one, in time that grows with the square of their count:
# 200,000 lines (1.6 MB) held a worker for over 30 s. OpenRouter's events are one line each.
MAX_EVENT_LINES = 1_000


class ChatStream:
    """The chunks of one streamed completion, in order; owns the upstream response.

    Iterating yields each event as `(data, chunk)`: its JSON text as sent, and that text parsed
    (see `skim`).
    It ends normally only at OpenRouter's `[DONE]`.
    Anything else (an error event, a dropped connection, a stall past the read timeout,
    an event that is not a chunk) raises an UpstreamError.
    """

    def __init__(self, response: requests.Response) -> None:
        self._response = response
        self.generation_id: str | None = response.headers.get("X-Generation-Id")
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.abandoned = False
        self.closed = False
        # How it failed, not the error itself: the error's traceback holds this stream's frames,
        # a reference cycle that only the worker's rarely run garbage collector would free.
        self.failed_as: str | None = None
        self.model_served: str | None = None
        self.first_event_at: float | None = None
        self.retries: int = getattr(response, "relay_retries", 0)
        self.waiting_since: float | None = None  # when the read in progress began, if one is
        self.stalled = False
        self._on_close: list[Callable[[], None]] = []
        self._skimming = False

    def skim(self) -> None:
        """Parse only the events the relay must act on, for a presenter that relays events as
        sent: the first, any naming an error or usage, and any not shaped like a chunk (an object
        whose braces balance, naming choices). The others are yielded with `None` for their
        parsed chunk.

        Parsing is most of a relayed event's cost, and an ordinary content delta holds nothing the
        relay needs. An error hidden inside message text cannot trigger this: in a JSON string
        its quotes are escaped.
        """
        self._skimming = True

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        try:
            yield from self._chunks()
        except UpstreamError as error:
            if self.abandoned:
                raise ClientDisconnected() from None
            self.failed_as = error.outcome
            count_upstream_error(error, "mid_stream")
            raise

    @property
    def outcome(self) -> str:
        """How the stream ended, as the usage ledger records it."""
        if self.done:
            return "completed"
        if self.failed_as is not None and not self.abandoned:
            return self.failed_as
        return ClientDisconnected.outcome

    def _chunks(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        try:
            for event in SSEClient(self._reads()).events():
                if event.data == "[DONE]":
                    self.done = True
                    return
                data = event.data
                if self._skimming and self.first_event_at is not None and _plain_delta(data):
                    yield data, None
                else:
                    yield data, self._interpret(data)
        except UnicodeDecodeError:
            raise _protocol_error("an event that is not valid UTF-8") from None
        except (ReadTimeoutError, TimeoutError):
            raise _stall() from None
        except (TransportError, HTTPException, OSError) as error:
            if self.abandoned:
                raise ClientDisconnected() from None
            if self.stalled:
                raise _stall() from None
            log.warning("upstream connection dropped mid-stream: %s", type(error).__name__)
            raise UpstreamProtocolError("OpenRouter's stream was cut off") from None
        raise _protocol_error("an end without [DONE]", "OpenRouter's stream was cut off")

    def on_close(self, callback: Callable[[], None]) -> None:
        """Have `callback` called when the stream is closed."""
        self._on_close.append(callback)

    def read_without_timeout(self) -> None:
        """Let reads wait as long as it takes: a StallWatch notices silence instead."""
        connection = getattr(self._response.raw, "_connection", None)
        if getattr(connection, "sock", None) is not None:
            connection.sock.settimeout(None)

    def stall(self) -> None:
        """OpenRouter sent nothing for too long: the read in progress ends, and the stream with
        UpstreamTimeout. From any thread or greenlet."""
        if not self.done and not self.closed:
            self.stalled = True
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                self._response.raw.shutdown()  # wakes the read

    def abandon(self) -> None:
        """The client went away: close the upstream now, from any thread or greenlet."""
        if not self.abandoned and not self.done:
            self.abandoned = True
            log.info("client went away; closing the upstream connection")
            self._release()

    def close(self) -> None:
        """Give the connection back to the pool after `[DONE]`; otherwise close it, which tells
        OpenRouter to stop generating. Safe to call more than once, and from another thread
        than the reader's."""
        if self.closed:
            return
        self.closed = True
        if not self.done and self.failed_as is None:
            self.abandoned = True  # whoever closes it mid-stream stopped reading: a client abort
        while True:
            try:
                callback = self._on_close.pop()  # atomic: two threads closing at once split them
            except IndexError:
                break
            try:
                callback()
            except Exception:  # the other callbacks (ledger row, slot) must still run
                log.exception("a stream's close callback failed")
        self._release()

    def _release(self) -> None:
        raw = self._response.raw
        if self.done and raw.connection is not None and self._ended_after_done():
            raw.release_conn()
            return
        with contextlib.suppress(ValueError, RuntimeError, OSError):
            raw.shutdown()  # wakes a read blocked in another thread
        # While that read still holds the body's buffer, closing it raises ("reentrant call"):
        # the connection itself is closed then, which is what tells OpenRouter to stop.
        with contextlib.suppress(ValueError, RuntimeError, OSError):
            self._response.close()
        connection = getattr(raw, "_connection", None)
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.close()

    def _ended_after_done(self) -> bool:
        """Whether the body ends right after [DONE], so that its connection can be pooled.

        Its end (the chunked terminator) follows at once, normally already buffered. An upstream
        (a proxy) that sends more, or keeps the body open, must not hold up the answer's end: one
        read, each of its waits bounded (urllib3 sets the socket's timeout again for the
        connection's next request), and the connection is closed instead.
        """
        raw = self._response.raw
        sock = getattr(raw.connection, "sock", None)
        if sock is not None:
            sock.settimeout(_DRAIN_WAIT)
        try:
            return raw.read1(_READ_SIZE) == b""
        except (TransportError, HTTPException, OSError):
            return False

    def _reads(self) -> Iterator[bytes]:
        """The body as it arrives, one network read at a time (never waiting to fill a buffer).

        Reads go straight to http.client's response under urllib3's: urllib3's read1 adds only
        error translation (done in _chunks) and bookkeeping the relay does not need, at a cost
        as high as the read itself, once per upstream chunk.
        """
        raw = self._response.raw
        body = getattr(raw, "_fp", None)
        read = body.read1 if isinstance(body, HTTPResponse) else raw.read1
        unterminated = 0  # bytes since the last event boundary: an event may not grow forever
        run_on_lines = 0  # lines of an event in the reads after the one it began in
        data = b""
        now = time.monotonic
        reads = 0
        first_event_pending = _served_first(self._response)
        try:
            while True:
                self.waiting_since = now()
                previous = data
                try:
                    data = read(_READ_SIZE)
                except (AttributeError, ValueError):
                    # Closed by another greenlet (the disconnect watch) while this one was away
                    # or in the middle of a read: http.client has let go of its file.
                    if not self.abandoned:
                        raise
                    raise ClientDisconnected() from None
                self.waiting_since = None
                if not data:
                    # Raised here, not at the end of the events: sseclient would first hand
                    # over a half-read event as a whole one, and it would be blamed on OpenRouter.
                    if self.abandoned:
                        raise ClientDisconnected()
                    if self.stalled:
                        raise _stall()
                    return
                if first_event_pending is not None and b"data:" in data:
                    _prioritise(first_event_pending, 0)
                    first_event_pending = None
                boundary = data.rfind(b"\n\n")
                end = boundary + 2 if boundary >= 0 else _other_event_end(data, previous)
                if end >= 0:
                    unterminated = len(data) - end
                    run_on_lines = 0
                else:
                    unterminated += len(data)
                    run_on_lines += max(data.count(b"\n"), data.count(b"\r"))
                    if run_on_lines > MAX_EVENT_LINES:
                        raise _protocol_error(f"an event of more than {MAX_EVENT_LINES} lines")
                if unterminated > MAX_EVENT_BYTES:
                    raise _protocol_error(f"an event larger than {MAX_EVENT_BYTES} bytes")
                yield data
                reads += 1
                if not reads % _READS_PER_TURN:
                    time.sleep(0)  # under gevent: let the worker's other requests run
        finally:  # a stream that ends before its first event must not keep the head start
            if first_event_pending is not None:
                _prioritise(first_event_pending, 0)

    def _interpret(self, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
            raise _protocol_error("an event that is not JSON") from None
        if not isinstance(chunk, dict):
            raise _protocol_error("an event that is not a JSON object")
        if "error" in chunk:
            raise _stream_error(chunk["error"])
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise _protocol_error("an event without choices")
        if choices:
            choice = choices[0]
            if not isinstance(choice, dict) or not isinstance(choice.get("delta") or {}, dict):
                raise _protocol_error("a choice that is not an object with a delta object")
            if choice.get("finish_reason") == "error":
                raise _stream_error(None)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if self.first_event_at is None:
            self.first_event_at = time.monotonic()
            self.model_served = chunk.get("model")
        return chunk


def _served_first(response: requests.Response) -> Any:
    """Under gevent, put the upstream socket's reads ahead of other streams' until the first
    event: returns the socket's read watcher, to be set back to 0 then, or None.

    When several sockets are ready at once, gevent's libev loop wakes the greenlets waiting on
    them in order of their watchers' priority (its libuv loop has no priorities: no effect there).
    So a stream waiting for its first token is relayed before later tokens of streams already
    under way, which are ready in bunches on a busy worker. A/B at 200 req/s of 20-token streams,
    three rounds: time to first token's overhead p50 1.55-1.65 -> 1.26-1.30 ms on text, 1.9 ->
    1.7-1.8 ms on SSE (whose reader then handed the event to the response's greenlet through the
    loop's callbacks, after the turn's other watchers; see wakeups.py for how it is handed over
    now). "First event" is the first read holding `data:`, so a read ending inside that
    prefix keeps the head start one read longer.
    """
    connection = getattr(response.raw, "_connection", None)
    watcher = getattr(getattr(connection, "sock", None), "_read_event", None)
    return watcher if _prioritise(watcher, HIGHEST_PRIORITY) else None


def _prioritise(watcher: Any, priority: int) -> bool:
    try:
        watcher.priority = priority
    except (AttributeError, ValueError, TypeError):  # no gevent socket, or a watcher in use
        return False
    return True


_BLANK_LINES = (b"\n\n", b"\r\n\r\n", b"\r\r")  # where sseclient ends an event


def _other_event_end(data: bytes, previous: bytes) -> int:
    """Where the last event ending in `data` ends, or -1, for a read without "\\n\\n" in it: an
    event ending in CRLF or CR line ends (which the SSE standard allows and OpenRouter does not
    send), or one whose blank line began in the `previous` read (a server that wrote it apart)."""
    ends = [data.rfind(blank) + len(blank) for blank in _BLANK_LINES[1:] if blank in data]
    if ends:
        return max(ends)
    edge = previous[-3:]
    joined = edge + data[:3]
    for blank in _BLANK_LINES:
        at = joined.rfind(blank)
        if at >= 0 and at + len(blank) > len(edge):
            return at + len(blank) - len(edge)
    return -1


def _plain_delta(data: str) -> bool:
    """Whether an event can be relayed unread: shaped like a chunk (an object whose braces
    balance, naming choices) and naming neither an error nor usage."""
    return (
        data[:1] == "{"
        and data[-1:] == "}"
        and data.count("{") == data.count("}")
        and '"choices"' in data
        and '"error"' not in data
        and '"usage"' not in data
    )


def _stall() -> UpstreamTimeout:
    log.warning("upstream went silent for longer than the read timeout")
    return UpstreamTimeout("OpenRouter went silent for too long")


def _stream_error(error: Any) -> UpstreamError:
    """An error OpenRouter reported inside the stream, after its 200."""
    failure = UpstreamError.from_body(error if isinstance(error, dict) else {})
    failure.reported_in_stream = True
    if failure.message == UpstreamError.message:
        failure.message = "OpenRouter reported an error mid-stream"
    log.warning(
        "upstream reported an error mid-stream: %s (code %s)", failure.message, failure.code
    )
    return failure


def _protocol_error(what: str, message: str | None = None) -> UpstreamProtocolError:
    log.warning("upstream sent %s", what)
    return UpstreamProtocolError(message or f"OpenRouter sent {what}")
