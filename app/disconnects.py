"""Noticing at once that a client went away, even while nothing is being written to it.

Without this a relay only learns of it at its next write, which can be minutes away while a
reasoning model thinks, and OpenRouter keeps generating (and billing) all that time.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("relay")


def _keep_going() -> None:
    pass


def watch_for_disconnect(
    environ: Mapping[str, Any], on_disconnect: Callable[[], None]
) -> Callable[[], None]:
    """Call `on_disconnect` as soon as the client closes its connection; return a stop function.

    Works where the server hands over the client socket (gunicorn's `gunicorn.socket`) and gevent
    runs the process; elsewhere it does nothing and a gone client is noticed at the next write.
    The watch is a bare event-loop watcher, not a greenlet of its own: a greenlet is started
    only in the rare case that the client's socket becomes readable mid-response.
    """
    client = environ.get("gunicorn.socket")
    if client is None or not _gevent_is_running():
        return _keep_going
    from gevent import get_hub, spawn

    watcher = get_hub().loop.io(client.fileno(), _READABLE)
    checks = []

    def readable() -> None:
        watcher.stop()  # one look tells all this watch can tell
        checks.append(spawn(_check, client, on_disconnect))  # a callback must not block

    def stop() -> None:
        watcher.close()
        for check in checks:
            check.kill(block=False)

    watcher.start(readable)
    return stop


_READABLE = 1  # libev's EV_READ


@functools.cache
def _gevent_is_running() -> bool:
    """Whether gevent patched this process (once patched, always: the worker patches first)."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("socket")


def _check(client: socket.socket, on_disconnect: Callable[[], None]) -> None:
    try:
        # Readable with nothing to read is the client's FIN. Bytes mean a pipelined request:
        # the client is still there, and this watch can tell no more.
        gone = client.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        gone = True
    if gone:
        on_disconnect()
