"""Keeping a silent stream alive: items pass through, a HEARTBEAT marks each quiet interval."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from queue import Empty, Full, Queue
from typing import Any

HEARTBEAT: Any = object()

_END = object()


def with_heartbeats(items: Iterator[Any], interval: float) -> Iterator[Any]:
    """Yield what `items` yields, and HEARTBEAT whenever `interval` seconds pass without an item.

    `items` is read by a helper thread (a greenlet under gevent) through a one-slot queue, so a
    slow consumer holds back the reader instead of letting items pile up. Exceptions from `items`
    are re-raised here. Closing this generator stops the helper once `items` returns or fails;
    whoever owns `items` must close its source to unblock a read.
    """
    queue: Queue = Queue(maxsize=1)
    stopped = threading.Event()

    def hand_over(entry: tuple[Any, BaseException | None]) -> None:
        while not stopped.is_set():
            try:
                queue.put(entry, timeout=0.5)
                return
            except Full:
                continue

    def pump() -> None:
        try:
            for item in items:
                hand_over((item, None))
                if stopped.is_set():
                    return
            hand_over((_END, None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            hand_over((_END, error))

    # The reader runs in a copy of this context, so that what it logs names the request.
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(pump,), name="upstream-reader", daemon=True).start()
    try:
        while True:
            try:
                item, error = queue.get(timeout=interval)
            except Empty:
                yield HEARTBEAT
                continue
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stopped.set()
