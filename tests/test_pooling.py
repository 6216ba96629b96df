"""The upstream pools' check of a reused connection, under gevent as the worker runs it."""

from __future__ import annotations

import textwrap

from tests.conftest import run_under_gevent

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
    printed = run_under_gevent(_UNDER_GEVENT)
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
