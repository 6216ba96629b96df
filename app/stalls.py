"""Noticing that OpenRouter went silent mid-stream, for every open stream at once.

A socket timeout would do it on each read, but under gevent every read that waits with a
timeout arms and cancels a timer of its own, once per relayed chunk. Instead an open stream's
socket waits without a timeout, and one sweeper per process looks at how long each has been
waiting in a read (not since its last one: a stream held back by a slow client is not silent).
A stall is noticed between `timeout` and a quarter of it (at most a second) later.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .background import LazyThread

if TYPE_CHECKING:
    from .events import ChatStream

log = logging.getLogger("relay")


class StallWatch:
    """Stalls every watched stream that has waited `timeout` seconds in one read."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.period = min(1.0, timeout / 4)
        self._streams: set[ChatStream] = set()
        self._sweeper = LazyThread(self._sweep_forever, "stall-watch")

    def watch(self, stream: ChatStream) -> None:
        """Watch `stream` until it closes; its reads no longer time out on their own."""
        stream.read_without_timeout()
        self._streams.add(stream)
        stream.on_close(lambda: self._streams.discard(stream))
        self._sweeper.ensure_started()

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(self.period)
            silent_since = time.monotonic() - self.timeout
            for stream in list(self._streams):
                waiting_since = stream.waiting_since
                if waiting_since is not None and waiting_since < silent_since:
                    self._streams.discard(stream)
                    try:
                        stream.stall()
                    except Exception:  # the sweeper is all that ends a silent stream: it goes on
                        log.exception("could not end a stalled stream")
