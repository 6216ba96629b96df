"""Ways to present a ChatStream to a client; each presenter owns and closes its stream."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

from .errors import ClientDisconnected, RelayError, StreamCutOff, error_kind
from .events import ChatStream
from .heartbeats import HEARTBEAT

log = logging.getLogger("relay")


def present_as_text(stream: ChatStream) -> Iterator[bytes]:
    """The content deltas as UTF-8, the way chatbot-ui's StreamingTextResponse sends them.

    Like the Vercel AI SDK, leading whitespace before the first visible token is dropped.
    """
    started = False
    try:
        for _, chunk in stream:
            choices = chunk["choices"]
            if not choices:
                continue
            content = (choices[0].get("delta") or {}).get("content")
            if not content or not isinstance(content, str):
                continue
            if not started:
                content = content.lstrip()
                if not content:
                    continue
                started = True
            yield content.encode()
    finally:
        stream.close()


def commit_on_first_piece(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Read up to the first piece now, so that a failure before it is still an error response.

    Returns the whole body as an iterator. Once the first piece is out, a failure cuts the
    connection (StreamCutOff) so that the client can never mistake the answer for complete:
    also when the client seemed to have gone (it may only have closed its side for sending).
    """
    first = next(pieces, None)
    return _cut_off_on_failure(first, pieces)


def _cut_off_on_failure(first: bytes | None, pieces: Iterator[bytes]) -> Iterator[bytes]:
    try:
        if first is not None:
            yield first
        yield from pieces
    except ClientDisconnected:
        raise StreamCutOff("the client went away") from None
    except RelayError as error:
        log.warning("cutting off the response after its first byte: %s", error.message)
        raise StreamCutOff(error.message) from None
    finally:
        pieces.close()


def present_as_sse(batches: Iterator, first: list | None = None) -> Iterator[bytes]:
    """OpenAI's event stream: OpenRouter's events relayed as they come, then `data: [DONE]`.

    `batches` iterates a HeartbeatReader over the stream; `first` is the batch the caller
    already took from it, if any. A comment goes out at once (so that the headers leave now) and
    again whenever nothing arrived for a heartbeat interval, even while the stream is still being
    opened. A failure, before the first event or after it, becomes one error event and the
    stream ends without `[DONE]`, which the OpenAI SDKs raise as an APIError.
    """
    try:
        yield b": connected\n\n"
        if first:
            yield _events(first)
        for batch in batches:
            if batch is HEARTBEAT:
                yield b": keep-alive\n\n"
            elif batch:
                yield _events(batch)
        yield b"data: [DONE]\n\n"
    except ClientDisconnected:
        # Cut, not ended: a client that only closed its side for sending still reads.
        raise StreamCutOff("the client went away") from None
    except RelayError as error:
        log.warning("ending the event stream with an error event: %s", error.message)
        yield b"data: " + json.dumps(stream_error_body(error)).encode() + b"\n\n"
    finally:
        batches.close()


def _events(batch: list) -> bytes:
    """Events as sent; an event whose data spans lines keeps a `data:` field per line."""
    return "".join(
        [
            f"data: {_one_field_per_line(data)}\n\n" if "\n" in data else f"data: {data}\n\n"
            for data, _ in batch
        ]
    ).encode()


def _one_field_per_line(data: str) -> str:
    return data.replace("\n", "\ndata: ")


def stream_error_body(error: RelayError) -> dict[str, object]:
    """The OpenAI error object sent inside an event stream."""
    code = getattr(error, "code", None)
    return {"error": {"message": error.message, "type": error_kind(error), "code": code}}
