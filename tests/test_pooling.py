"""The upstream pools' check of a reused connection, under gevent as the worker runs it."""

from __future__ import annotations

import textwrap

from tests.conftest import run_python

_UNDER_GEVENT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import socket

    import gevent
    import requests

    from app.pooling import PooledAdapter

    adapter = PooledAdapter(pool_connections=1, pool_maxsize=4)
    ways = {
        "http": ("http://upstream.test/api/v1/chat/completions", {}),
        "https": ("https://openrouter.ai/api/v1/chat/completions", {}),
        "https via proxy": (
            "https://openrouter.ai/api/v1/chat/completions",
            {"https": "http://127.0.0.1:3128"},
        ),
        "http via proxy": (
            "http://upstream.test/api/v1/chat/completions",
            {"http": "http://127.0.0.1:3128"},
        ),
    }
    for way, (url, proxies) in ways.items():
        request = requests.Request("POST", url).prepare()
        pool = adapter.get_connection_with_tls_context(request, True, proxies=proxies)
        connection = pool.ConnectionCls(host="upstream.test", port=443)
        ours, peer = socket.socketpair()
        connection.sock = ours
        others = []
        gevent.spawn(others.append, "ran")
        assert connection.is_connected, way
        assert not others, f"{way}: checking an idle connection let another greenlet run"
        peer.close()
        assert not connection.is_connected, f"{way}: a connection the peer closed looks open"
        assert not others, f"{way}: checking a closed connection let another greenlet run"
        ours.close()
    print("checked", len(ways))
    """
)


def test_every_pool_checks_a_reused_connection_without_going_round_the_event_loop():
    printed = run_python(_UNDER_GEVENT)
    assert printed.strip() == "checked 4"


def test_the_adapter_finds_the_pool_and_path_requests_would_and_remembers_them():
    import requests
    from requests.adapters import HTTPAdapter

    from app.pooling import PooledAdapter

    ours, plain = PooledAdapter(pool_connections=1), HTTPAdapter(pool_connections=1)
    chat = requests.Request("POST", "https://openrouter.ai/api/v1/chat/completions?x=1").prepare()
    models = requests.Request("GET", "http://upstream.test:8080/api/v1/models").prepare()
    for request in (chat, models, chat):
        pool = ours.get_connection_with_tls_context(request, True)
        expected = plain.get_connection_with_tls_context(request, True)
        assert (pool.scheme, pool.host, pool.port) == (
            expected.scheme,
            expected.host,
            expected.port,
        )
        assert ours.request_url(request, {}) == plain.request_url(request, {})
        assert ours.get_connection_with_tls_context(request, True) is pool
    assert ours.request_url(chat, {}) == "/api/v1/chat/completions?x=1"
    proxy = {"http": "http://127.0.0.1:3128"}
    assert ours.request_url(models, proxy) == "http://upstream.test:8080/api/v1/models"
    first = ours.get_connection_with_tls_context(chat, True)
    ours.close()
    assert ours.get_connection_with_tls_context(chat, True) is not first


class _Writes:
    """A real socket that notes what each write handed it."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.writes: list[bytes] = []

    def sendall(self, data) -> None:
        self.writes.append(bytes(data))
        self.sock.sendall(data)

    def settimeout(self, timeout) -> None:
        self.sock.settimeout(timeout)


def writes_of(connection_class, method, path, body, headers) -> list[bytes]:
    """What one request handed the socket, write by write."""
    import socket

    connection = connection_class(host="upstream.test", port=443)
    ours, peer = socket.socketpair()
    connection.sock = _Writes(ours)
    connection.request(method, path, body, headers)
    assert peer.recv(4096) == b"".join(connection.sock.writes)  # sent, not just noted
    ours.close()
    peer.close()
    return connection.sock.writes


def test_a_request_goes_out_in_one_write_with_its_body():
    import requests

    from app.pooling import PooledAdapter

    adapter = PooledAdapter(pool_connections=1)
    body = b'{"model":"m/ok","messages":[]}'
    for url in ("http://upstream.test/api/v1", "https://openrouter.ai/api/v1"):
        request = requests.Request("GET", url).prepare()
        connection_class = adapter.get_connection_with_tls_context(request, True).ConnectionCls
        (post,) = writes_of(
            connection_class, "POST", "/api/v1/chat/completions", body, {"Content-Length": "31"}
        )
        assert post.startswith(b"POST /api/v1/chat/completions HTTP/1.1\r\n")
        assert post.endswith(b"\r\n\r\n" + body)
        (get,) = writes_of(connection_class, "GET", "/api/v1/models", None, {})
        assert get.endswith(b"\r\n\r\n")
        chunked = writes_of(connection_class, "POST", "/upload", iter([b"ab", b"cd"]), {})
        assert len(chunked) == 4  # head, two chunks, the end: as urllib3 sends them
