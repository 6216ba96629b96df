"""The text surface's first write is corked until gunicorn has written the headers and the first
piece, and uncorked before anything else: on a real TCP socket."""

from __future__ import annotations

import socket
import time

import pytest

from app.corking import corked_first_write

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="Linux only")


@pytest.fixture
def connected():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    yield server, client
    for sock in (server, client, listener):
        sock.close()


def corked(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))


class Pieces:
    def __init__(self, *pieces: bytes) -> None:
        self.pieces = iter(pieces)
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return next(self.pieces)

    def close(self) -> None:
        self.closed = True


def test_the_first_piece_is_written_corked_and_the_rest_uncorked(connected):
    server, client = connected
    body = Pieces(b"Hel", b"lo")
    pieces = corked_first_write(body, {"gunicorn.socket": server})
    assert next(pieces) == b"Hel"
    assert corked(server)
    server.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    server.sendall(b"Hel")
    sent = time.monotonic()
    client.setblocking(False)
    try:
        early = client.recv(100, socket.MSG_PEEK)
    except BlockingIOError:  # held back, for at most 200 ms: asked at once
        early = b""
    assert not early or time.monotonic() - sent > 0.2, "a corked write went out at once"
    assert next(pieces) == b"lo"
    assert not corked(server)
    client.setblocking(True)
    assert client.recv(100) == b"HTTP/1.1 200 OK\r\n\r\nHel"  # released together
    assert list(pieces) == [] and body.closed


def test_a_body_closed_after_its_first_piece_is_uncorked_and_closed(connected):
    server, _ = connected
    body = Pieces(b"Hel", b"lo")
    pieces = corked_first_write(body, {"gunicorn.socket": server})
    next(pieces)
    pieces.close()
    assert not corked(server) and body.closed


def test_without_gunicorns_socket_the_body_is_untouched():
    body = Pieces(b"Hel")
    assert corked_first_write(body, {}) is body
