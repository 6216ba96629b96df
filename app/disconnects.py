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
    """
    client = environ.get("gunicorn.socket")
    if client is None or not _gevent_is_running():
        return _keep_going
    from gevent import spawn

    watcher = spawn(_wait_until_closed, client, on_disconnect)
    return lambda: watcher.kill(block=False)


@functools.cache
def _gevent_is_running() -> bool:
    """Whether gevent patched this process (once patched, always: the worker patches first)."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("socket")


def _wait_until_closed(client: socket.socket, on_disconnect: Callable[[], None]) -> None:
    from gevent.socket import wait_read

    try:
        wait_read(client.fileno())
        # Readable with nothing to read is the client's FIN. Bytes mean a pipelined request:
        # the client is still there, and this watcher can tell no more.
        gone = client.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        gone = True
    if gone:
        on_disconnect()
