"""Noticing at once that a client went away, even while nothing is being written to it.

Without this a relay only learns of it at its next write, which can be minutes away while a
reasoning model thinks (or while OpenRouter has not even answered), and OpenRouter keeps
generating (and billing) all that time.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import select
import socket
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from gevent import get_hub, monkey, spawn, spawn_later
from greenlet import getcurrent

from .errors import ClientDisconnected

log = logging.getLogger("relay")


class _ClientGone(BaseException):
    """Thrown into the greenlet making an upstream call when its client left. A BaseException,
    like gevent's Timeout, so that no `except Exception` on the way (requests', urllib3's, ours)
    mistakes it for a failure of the call; `DisconnectWatch` turns it into ClientDisconnected."""


class DisconnectWatch:
    """Watches a request's client socket, from before its upstream call to the end of its stream.

    While a block runs under `interrupting()`, the client's going away raises ClientDisconnected
    there, wherever that block waits (connecting, sending, waiting for OpenRouter's headers or
    body, a retry's back-off): the upstream call is abandoned, its connection closed. After
    `hand_over(on_disconnect)` it calls `on_disconnect` instead. One bare event-loop watcher does
    both, not a greenlet of its own: a greenlet is started only in the rare case that the
    client's socket becomes readable while it is watched.

    Works where the server hands over the client socket (gunicorn's `gunicorn.socket`) and gevent
    runs the process; elsewhere it does nothing and a gone client is noticed at the next write.
    """

    def __init__(self, environ: Mapping[str, Any]) -> None:
        self._client = environ.get("gunicorn.socket")
        self._watcher: Any = None
        self._interrupted: Any = None  # the greenlet an interrupting block runs in, while it runs
        self._on_disconnect: Callable[[], None] | None = None
        self._gone = False
        self._checker: Any = None  # the look at the socket once it is readable (or the next)
        if self._client is not None and _gevent_is_running():
            # The check runs in a greenlet of its own, in the request's context: what it logs
            # names the request.
            self._context = contextvars.copy_context()
            self._watcher = get_hub().loop.io(self._client.fileno(), _READABLE)
            self._watcher.start(self._readable)

    def interrupting(self) -> DisconnectWatch:
        """A context for the upstream call: the client's going away raises ClientDisconnected
        in it. A block that raises ends the watch (there is nothing left to watch for)."""
        return self

    def __enter__(self) -> None:
        if self._watcher is not None:
            self._interrupted = getcurrent()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._interrupted = None
        if kind is None:
            return
        self.stop()
        if kind is _ClientGone:
            log.info("client went away; closing the upstream connection")
            raise ClientDisconnected() from None

    def hand_over(self, on_disconnect: Callable[[], None]) -> None:
        """From now on call `on_disconnect` when the client goes away (at once, if it already
        has), until `stop()`."""
        if self._gone:
            on_disconnect()
        else:
            self._on_disconnect = on_disconnect

    def stop(self) -> None:
        """End the watch; safe to call more than once."""
        self._on_disconnect = None
        if self._watcher is not None:
            self._watcher.close()
        if self._checker is not None:
            self._checker.kill(block=False)

    def _readable(self) -> None:
        self._watcher.stop()  # bytes left unread would wake it on every turn of the loop
        self._checker = spawn(self._context.run, self._check)  # a callback must not block

    def _check(self) -> None:
        if not _has_left(self._client):
            # Bytes without a FIN: a pipelined request, or TLS's close_notify, which a client
            # closing politely sends just before its FIN. Where poll can tell a FIN behind
            # bytes, look again in a while.
            if _poll is not None:
                self._checker = spawn_later(_LOOK_AGAIN, self._context.run, self._check)
            return
        self._gone = True
        if self._interrupted is not None:
            # Thrown from the event loop, as gevent.kill does: a greenlet parked in a wait takes
            # it there. Whether it still makes the call is looked at when the throw is due.
            get_hub().loop.run_callback(self._interrupt)
        elif self._on_disconnect is not None:
            self._on_disconnect()

    def _interrupt(self) -> None:
        interrupted = self._interrupted
        if interrupted is not None:
            interrupted.throw(_ClientGone)


_READABLE = 1  # libev's EV_READ
_LOOK_AGAIN = 0.5  # seconds
# Linux's poll tells a FIN even behind bytes not read yet; gevent's own poll (patched in) waits
# in the event loop and knows only POLLIN and POLLOUT, so the original is used, without waiting.
_RDHUP = getattr(select, "POLLRDHUP", 0)
_poll = monkey.get_original("select", "poll") if _RDHUP else None


def _has_left(client: socket.socket) -> bool:
    """Whether a client socket that became readable means the client closed its side.

    Its FIN says so: where the kernel tells it (POLLRDHUP), also when bytes came first, as TLS's
    close_notify does before a client closes; elsewhere, a socket readable with nothing to read.
    Bytes alone (a pipelined request) say the client is still there.
    """
    try:
        if _poll is not None:
            poller = _poll()
            poller.register(client.fileno(), select.POLLIN | _RDHUP)
            hung_up = _RDHUP | select.POLLHUP | select.POLLERR
            return any(events & hung_up for _, events in poller.poll(0))
        return client.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
    except ValueError:  # a TLS socket cannot be peeked at
        return False


@functools.cache
def _gevent_is_running() -> bool:
    """Whether gevent patched this process (once patched, always: the worker patches first)."""
    return monkey.is_module_patched("socket")
