"""Ways to present a ChatStream to a client; each presenter owns and closes its stream."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from .errors import RelayError, StreamCutOff
from .events import ChatStream

log = logging.getLogger("relay")


def present_as_text(stream: ChatStream) -> Iterator[bytes]:
    """The content deltas as UTF-8, the way chatbot-ui's StreamingTextResponse sends them.

    Like the Vercel AI SDK, leading whitespace before the first visible token is dropped.
    """
    started = False
    try:
        for chunk in stream:
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
    connection (StreamCutOff) so that the client can never mistake the answer for complete.
    """
    first = next(pieces, None)
    return _cut_off_on_failure(first, pieces)


def _cut_off_on_failure(first: bytes | None, pieces: Iterator[bytes]) -> Iterator[bytes]:
    try:
        if first is not None:
            yield first
        yield from pieces
    except RelayError as error:
        log.warning("cutting off the response after its first byte: %s", error.message)
        raise StreamCutOff(error.message) from None
    finally:
        pieces.close()
