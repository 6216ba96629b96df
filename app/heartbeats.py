"""Keeping a silent stream alive, and relaying a fast one in batches.

A helper thread (a greenlet under gevent) opens the source and reads its items; the consumer takes
everything that arrived since it last looked, as one batch, and gets HEARTBEAT instead when nothing
arrived for a whole interval. Under gevent the reader runs until its socket has nothing more to
give, so a fast upstream's events leave in few large writes while a slow one's leave one by one,
at once.
"""

from __future__ import annotations

import _thread
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

HEARTBEAT: Any = object()

MAX_AHEAD = 32  # items the reader may hold before the consumer takes them: back-pressure

_OPENED = object()
_END = object()


class Source(Protocol):
    def __iter__(self) -> Iterator[Any]: ...

    def close(self) -> None: ...


class HeartbeatReader:
    """Iterating yields lists of what the source yielded meanwhile, and HEARTBEAT after
    `interval` seconds without any. The first list (possibly empty) comes once the source is open.

    `open_source` runs in the reader's thread, so the wait for it is covered by heartbeats too.
    Exceptions from opening or reading are re-raised by the iteration, after the items that came
    before them. `stop()` (or closing the iteration) closes the source, from whichever thread
    calls it: `Source.close` must be safe from any thread and unblock a read in progress.
    """

    def __init__(self, open_source: Callable[[], Source], interval: float) -> None:
        self._open_source: Callable[[], Source] | None = open_source
        self._source: Source | None = None
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
        if self._source is not None:
            self._source.close()

    def _hand_over(self, item: Any) -> bool:
        with self._changed:
            while len(self._pending) >= MAX_AHEAD and not self._stopped:
                self._changed.wait(0.5)
            self._pending.append(item)
            self._changed.notify()
            return not self._stopped

    def _read(self) -> None:
        try:
            open_source, self._open_source = self._open_source, None
            source = self._source = open_source()  # type: ignore[misc]
            del open_source  # it holds the request's body, and a stream may run for minutes
            if self._stopped:  # stop() came while it opened, and could not close it
                source.close()
                return
            if self._hand_over(_OPENED):
                for item in source:
                    if not self._hand_over(item):
                        return  # stop() has closed the source
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._failure = error
        self._hand_over(_END)

    def __iter__(self) -> Iterator[Any]:
        changed = self._changed
        try:
            while True:
                with changed:
                    if not self._pending:
                        changed.wait(self._interval)
                    batch, self._pending = self._pending, []
                    changed.notify()
                if not batch:
                    yield HEARTBEAT
                    continue
                opened = batch[0] is _OPENED
                ended = batch[-1] is _END
                if opened or ended:
                    batch = batch[opened : len(batch) - ended]
                if batch or opened:
                    yield batch  # the first one, maybe empty, says the source is open
                if ended:
                    if self._failure is not None:
                        raise self._failure
                    return
        finally:
            self.stop()
