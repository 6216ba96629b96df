"""One upstream call made for a caller, the same way on every surface: admitted by the caller's
limits, recorded in the usage ledger, counted, and ended when the client goes away."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, current_app, request

from .disconnects import DisconnectWatch
from .events import ChatStream
from .heartbeats import HEARTBEAT, HeartbeatReader
from .keys import Caller
from .ledger import UsageRow
from .metrics import count_open_stream
from .presenters import present_as_sse
from .requestlog import current_request_id, note_usage

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def open_stream(
    caller: Caller, surface: str, model: str, payload: dict[str, Any]
) -> tuple[ChatStream, dict[str, str]]:
    """Start a chat stream for `caller`; returns it with the headers its response carries.

    Raises the caller's refusal (RateLimited, BudgetExhausted, ...), the UpstreamError that
    kept the stream from starting, or ClientDisconnected when the client left before it started;
    either way nothing is left held.
    """
    extensions = current_app.extensions
    row = UsageRow(caller.name, surface, model)
    note_usage(row)
    admission = extensions["relay.quotas"].admit(caller)
    ledger = extensions["relay.ledger"]
    watch = DisconnectWatch(request.environ)
    with admission.released_on_failure(), ledger.recording_failures(row), watch.interrupting():
        stream = extensions["relay.openrouter"].open_chat_stream(
            payload, caller.key, current_request_id.get()
        )
    stream.on_close(watch.stop)
    stream.on_close(admission.release)
    ledger.follow(stream, row)
    try:
        count_open_stream(stream, surface)
        watch.hand_over(stream.abandon)  # the same watch, so that no moment goes unwatched
    except BaseException:
        stream.close()
        raise
    headers = {
        **STREAM_HEADERS,
        **admission.headers,
        "X-Generation-Id": stream.generation_id or "",
    }
    return stream, headers


def streamed_response(
    body: Iterator[bytes], stream: ChatStream, content_type: str, headers: dict[str, str]
) -> Response:
    """The response that sends `body`; closing it closes the stream, even if it was never read."""
    response = Response(body, content_type=content_type, headers=headers)
    response.call_on_close(stream.close)
    return response


def event_stream_response(
    open_: Callable[[], tuple[ChatStream, dict[str, str]]], heartbeat_interval: float
) -> Response:
    """The SSE response for a stream that `open_` starts, opened in the heartbeat reader's thread.

    When OpenRouter answers within a heartbeat interval (it normally answers at once), a refusal
    or an upstream error before the stream is still an error response with its status, which the
    SDKs turn into typed errors and retry. When it takes longer (retries, a slow provider), the
    response starts anyway with a comment and heartbeats, because a router drops a request that
    sent nothing for 30 s; a failure then arrives as an error event.
    """
    headers = STREAM_HEADERS

    def open_source() -> ChatStream:
        nonlocal headers
        stream, headers = open_()
        stream.skim()  # the events are relayed as sent
        return stream

    reader = HeartbeatReader(open_source, heartbeat_interval)
    batches = iter(reader)
    first = next(batches)  # raises what kept the stream from starting
    if first is HEARTBEAT:  # still opening: the response starts now, heartbeats meanwhile
        first = None
    response = Response(
        present_as_sse(batches, first), content_type="text/event-stream", headers=headers
    )
    response.call_on_close(reader.stop)
    return response


def complete(
    caller: Caller, surface: str, model: str, payload: dict[str, Any]
) -> tuple[bytes, dict[str, str]]:
    """A whole chat completion for `caller`: OpenRouter's JSON as sent, and the headers to send."""
    extensions = current_app.extensions
    row = UsageRow(caller.name, surface, model)
    note_usage(row)
    admission = extensions["relay.quotas"].admit(caller)
    ledger = extensions["relay.ledger"]
    watch = DisconnectWatch(request.environ)
    try:
        with ledger.recording_failures(row), watch.interrupting():
            raw, completion, retries = extensions["relay.openrouter"].complete_chat(
                payload, caller.key, current_request_id.get()
            )
    finally:
        watch.stop()
        admission.release()
    row.take_completion(completion, retries)
    ledger.record(row)
    generation = completion.get("id")
    if isinstance(generation, str) and generation.isprintable() and len(generation) <= 200:
        return raw, {**admission.headers, "X-Generation-Id": generation}
    return raw, admission.headers
