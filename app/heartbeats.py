"""Keeping a silent stream alive, and relaying a fast one in batches.

A helper thread (a greenlet under gevent) opens the source and reads its items; the consumer takes
everything that arrived since it last looked, as one batch, and gets HEARTBEAT instead when nothing
arrived for a whole interval. Under gevent the reader runs until its socket has nothing more to
give, so a fast upstream's events leave in few large writes while a slow one's leave one by one,
at once.
"""

from __future__ import annotations

import contextvars
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .wakeups import arrival_event, start_thread

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

    The hand-over is a deque (appends and pops are atomic) and two events, not a Condition: the
    reader wakes the consumer once per upstream chunk, and under gevent a Condition's locks cost
    more than the rest of relaying that chunk. The event that says an item arrived wakes the
    consumer before the loop's other ready work, and under gevent the reader runs as soon as it
    is made, until it first waits (see wakeups.py).
    """

    def __init__(self, open_source: Callable[[], Source], interval: float) -> None:
        self._open_source: Callable[[], Source] | None = open_source
        self._source: Source | None = None
        self._interval = interval
        self._pending: deque[Any] = deque()
        self._arrived = arrival_event()  # set after each item handed over
        self._taken = threading.Event()  # set when the queue was emptied for a held reader
        self._held = False  # the reader waits for the queue to be emptied
        self._stopped = False
        self._failure: BaseException | None = None
        # The reader runs in a copy of this context, so that it sees the request (and what it
        # logs names it). A bare thread (a bare greenlet under gevent): threading.Thread's
        # start-up handshake costs more than the rest of a request's hand-over.
        try:
            start_thread(contextvars.copy_context().run, self._read)
        except BaseException:  # killed while the reader ran: nobody else would stop it
            self.stop()
            raise

    def stop(self) -> None:
        self._stopped = True
        self._taken.set()  # a reader held back by a full queue sees the stop
        if self._source is not None:
            self._source.close()

    def _hand_over(self, item: Any) -> bool:
        pending = self._pending
        while len(pending) >= MAX_AHEAD and not self._stopped:
            self._taken.clear()
            self._held = True  # before looking again: a batch taken after this look sees it
            if len(pending) >= MAX_AHEAD and not self._stopped:  # not emptied meanwhile
                self._taken.wait(0.5)
            self._held = False
        pending.append(item)
        self._arrived.set()
        return not self._stopped

    def _read(self) -> None:
        try:
            open_source, self._open_source = self._open_source, None
            source = self._source = open_source()  # type: ignore[misc]
            del open_source  # it holds the request's body, and a stream may run for minutes
            if self._stopped:  # stop() came while it opened, and could not close it
                source.close()
            elif self._hand_over(_OPENED):
                for item in source:
                    if not self._hand_over(item):
                        break  # stop() has closed the source
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._failure = error
        self._hand_over(_END)  # even after stop(): a consumer still iterating then ends

    def _take(self) -> list[Any]:
        """Everything handed over so far. The event is cleared first: an item handed over
        after it is either taken now or sets it again."""
        self._arrived.clear()
        pending = self._pending
        batch = [pending.popleft() for _ in range(len(pending))]
        if self._held:
            self._taken.set()
        return batch

    def __iter__(self) -> Iterator[Any]:
        arrived = self._arrived
        try:
            while True:
                if not self._pending and not arrived.wait(self._interval):
                    yield HEARTBEAT
                    continue
                batch = self._take()
                if not batch:  # set for items an earlier batch took
                    continue
                opened = batch[0] is _OPENED
                ended = batch[-1] is _END
                if opened or ended:
                    batch = batch[opened : len(batch) - ended]
                if batch or opened:
                    yield batch  # the first one, maybe empty, says the source is open
                if ended:
                    failure, self._failure = self._failure, None
                    if failure is None:
                        return
                    try:
                        raise failure
                    finally:  # its traceback holds this frame and the reader's: no cycle left
                        del failure
        finally:
            self.stop()
