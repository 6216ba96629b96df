"""A streamed response's headers and first piece leave as one TCP segment (Linux's TCP_CORK).

gunicorn writes a response's headers, then its first piece of body, with two sends. The first
wakes the client; on a busy machine the client may then run on the worker's own core before the
worker makes the second send, and reads the headers and the first piece in two turns. Corked,
the two sends leave together when the server comes back for the next piece.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

_CORK = getattr(socket, "TCP_CORK", None)


def corked_first_write(body: Iterator[bytes], environ: dict[str, Any]) -> Iterator[bytes]:
    """`body`, its first piece written corked with the headers when the server is gunicorn."""
    sock = environ.get("gunicorn.socket")
    if sock is None or _CORK is None:
        return body
    return _corked(body, sock)


def _corked(body: Iterator[bytes], sock: socket.socket) -> Iterator[bytes]:
    try:
        _set_cork(sock, 1)
        try:
            for piece in body:
                yield piece  # the server writes the headers and this piece, both held back
                break
        finally:
            _set_cork(sock, 0)  # the server has written them: they leave now, as one segment
        yield from body
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


def _set_cork(sock: socket.socket, on: int) -> None:
    with contextlib.suppress(OSError):  # a socket the client has closed: nothing to send
        sock.setsockopt(socket.IPPROTO_TCP, _CORK, on)
