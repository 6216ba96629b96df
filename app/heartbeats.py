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
from typing import Any, Protocol

HEARTBEAT: Any = object()

MAX_AHEAD = 32  # items the reader may hold before the consumer takes them: back-pressure

_END = object()


def _nothing() -> None:
    pass


class ClosableIterable(Protocol):
    def __iter__(self) -> Iterator[Any]: ...

    def close(self) -> None: ...


class HeartbeatReader:
    """Iterating yields lists of what `items` yielded meanwhile, and HEARTBEAT after `interval`
    seconds without any.

    Exceptions from `items` are re-raised by the iteration, after the items that came before
    them. `stop()` (or closing the iteration) calls `items.close()`, which must be safe from any
    thread and unblock a read in progress; the reader then ends at its next item.
    """

    def __init__(self, items: ClosableIterable, interval: float) -> None:
        self._items = items
        self._interval = interval
        self._pending: list[Any] = []
        self._changed = threading.Condition()
        self._stopped = False
        self._failure: BaseException | None = None
        # The reader runs in a copy of this context, so that it sees the request (and what it
        # logs names it). A bare thread (a bare greenlet under gevent): threading.Thread's
        # start-up handshake costs more than the rest of a request's hand-over.
        _thread.start_new_thread(contextvars.copy_context().run, (self._read,))

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()
        self._items.close()

    def _hand_over(self, item: Any) -> bool:
        with self._changed:
            while len(self._pending) >= MAX_AHEAD and not self._stopped:
                self._changed.wait(0.5)
            self._pending.append(item)
            self._changed.notify()
            return not self._stopped

    def _read(self) -> None:
        items = iter(self._items)
        try:
            for item in items:
                if not self._hand_over(item):
                    getattr(items, "close", _nothing)()  # lets a generator's `finally` run now
                    return
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._failure = error
        self._hand_over(_END)

    def __iter__(self) -> Iterator[Any]:
        changed, pending = self._changed, self._pending
        try:
            while True:
                with changed:
                    if not pending:
                        changed.wait(self._interval)
                    batch = pending[:]
                    pending.clear()
                    changed.notify()
                if not batch:
                    yield HEARTBEAT
                    continue
                if batch[-1] is _END:
                    if len(batch) > 1:
                        yield batch[:-1]
                    if self._failure is not None:
                        raise self._failure
                    return
                yield batch
        finally:
            self.stop()
