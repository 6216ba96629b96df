"""Keeping a silent stream alive, and relaying a fast one in batches.

A helper thread (a greenlet under gevent) reads the items; the consumer takes everything that
arrived since it last looked, as one batch, and gets HEARTBEAT instead when nothing arrived for a
whole interval. Under gevent the reader runs until its socket has nothing more to give, so a
fast upstream's events leave in few large writes while a slow one's leave one by one, at once.
"""

from __future__ import annotations

import _thread
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

HEARTBEAT: Any = object()

MAX_AHEAD = 32  # items the reader may hold before the consumer takes them: back-pressure

_END = object()


def with_heartbeats(items: Iterator[Any], interval: float) -> Iterator[Any]:
    """Yield lists of what `items` yielded meanwhile, and HEARTBEAT after `interval` seconds
    without any.

    Exceptions from `items` are re-raised here, after the items that came before them. Closing
    this generator stops the reader once `items` returns or fails; whoever owns `items` must
    close its source to unblock a read.
    """
    pending: list[Any] = []
    changed = threading.Condition()
    stopped = False
    failure: list[BaseException] = []

    def hand_over(item: Any) -> bool:
        with changed:
            while len(pending) >= MAX_AHEAD and not stopped:
                changed.wait(0.5)
            pending.append(item)
            changed.notify()
            return not stopped

    def read() -> None:
        try:
            for item in items:
                if not hand_over(item):
                    return
        except BaseException as error:  # handed to the consumer, which re-raises it
            failure.append(error)
        hand_over(_END)

    # The reader runs in a copy of this context, so that what it logs names the request.
    context = contextvars.copy_context()
    # A bare thread (a bare greenlet under gevent): threading.Thread's start-up handshake
    # costs more than the rest of a request's hand-over.
    _thread.start_new_thread(context.run, (read,))
    try:
        while True:
            with changed:
                if not pending:
                    changed.wait(interval)
                batch = pending[:]
                pending.clear()
                changed.notify()
            if not batch:
                yield HEARTBEAT
                continue
            if batch[-1] is _END:
                if len(batch) > 1:
                    yield batch[:-1]
                if failure:
                    raise failure[0]
                return
            yield batch
    finally:
        with changed:
            stopped = True
            changed.notify()
