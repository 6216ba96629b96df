"""The upstream connection pool: requests' and urllib3's, minus a trip round the event loop and
a write per request.

Before it reuses a pooled connection, urllib3 asks whether the connection has become readable
(OpenRouter closed it) with `select.poll` and a timeout of 0. Under gevent that poll is gevent's,
which parks the request's greenlet and goes once round the worker's event loop: every other
stream's pending work runs first, on the path to this request's first token. The operating
system's poll answers the same question at once.
"""

from __future__ import annotations

import select
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

try:
    from gevent.monkey import get_original

    _poll = get_original("select", "poll")
except (ImportError, AttributeError):  # pragma: no cover - gevent is a dependency; Linux has poll
    _poll = select.poll


def _is_connected(connection: HTTPConnection) -> bool:
    """Whether a pooled connection is still open: connected, and nothing (EOF) to read."""
    if connection.sock is None:
        return False
    poller = _poll()
    poller.register(connection.sock, select.POLLIN)
    return not poller.poll(0)


class _OneWrite:
    """Sends a request's head and its body (bytes of a known length) in one write.

    urllib3 writes them separately: two system calls, and two TCP segments (or TLS records),
    since it turns Nagle's algorithm off. A server that reads the head apart from the body may go
    round its event loop before it reads the rest: at 200 requests/s the benchmark's upstream, an
    asyncio server, began a request 0.12-0.15 ms (p50) after its first bytes came in two
    segments, 0.06-0.09 ms in one.
    """

    _joining = False
    _head: bytes | None = None

    def request(self, method, url, body=None, headers=None, **kwargs):  # type: ignore[no-untyped-def]
        self._joining = isinstance(body, bytes) and bool(body) and not kwargs.get("chunked")
        try:
            super().request(method, url, body, headers, **kwargs)  # type: ignore[misc]
        finally:
            self._joining = False
            self._head = None

    def send(self, data):  # type: ignore[no-untyped-def]
        if self._joining:
            if self._head is None:  # the head: held back for the body, which comes next
                self._head = data
                return
            data = self._head + data
            self._joining = False
            self._head = None
        super().send(data)  # type: ignore[misc]


class _Connection(_OneWrite, HTTPConnection):
    is_connected = property(_is_connected)  # type: ignore[assignment]


class _TLSConnection(_OneWrite, HTTPSConnection):
    is_connected = property(_is_connected)  # type: ignore[assignment]


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


_POOLS = {"http": _Pool, "https": _TLSPool}
_URLS_REMEMBERED = 16  # the relay calls two; a bound for any other use


class PooledAdapter(HTTPAdapter):
    """requests' HTTPAdapter whose pools check a reused connection without yielding, direct or
    through an HTTP proxy (HTTPS_PROXY).

    Without a proxy it also remembers, per URL, the pool and the path it sends: requests parses
    the URL three times and builds the pool's key on every call to find them, about 20 us of
    the path to each upstream call, for the same one or two URLs all the worker's life. (A pool
    that the manager lets go for another host's stays in use for its URLs, until `close`.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pools: dict[tuple[str, Any, Any], HTTPConnectionPool] = {}
        self._paths: dict[str, str] = {}
        super().__init__(*args, **kwargs)

    def get_connection_with_tls_context(  # type: ignore[no-untyped-def]
        self, request, verify, proxies=None, cert=None
    ) -> HTTPConnectionPool:
        if proxies:
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        key = (request.url, verify, cert)
        pool = self._pools.get(key)
        if pool is None or pool.pool is None:  # new, or closed since
            if len(self._pools) >= _URLS_REMEMBERED:
                self._pools.clear()
            pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            self._pools[key] = pool
        return pool

    def request_url(self, request, proxies) -> str:  # type: ignore[no-untyped-def]
        if proxies:
            return super().request_url(request, proxies)
        path = self._paths.get(request.url)
        if path is None:
            if len(self._paths) >= _URLS_REMEMBERED:
                self._paths.clear()
            path = self._paths[request.url] = super().request_url(request, proxies)
        return path

    def close(self) -> None:
        self._pools.clear()
        self._paths.clear()
        super().close()

    def init_poolmanager(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy, **proxy_kwargs):  # type: ignore[no-untyped-def]
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # a SOCKS manager has pools of its own kind
            manager.pool_classes_by_scheme = _POOLS
        return manager
