"""The heartbeat reader's hand-over between its reading thread and the consumer, with real
threads (the end-to-end tests cover it under gevent, behind gunicorn), and its start under
gevent."""

from __future__ import annotations

import itertools
import textwrap
import time
from collections.abc import Iterator

import pytest

from app.heartbeats import HEARTBEAT, MAX_AHEAD, HeartbeatReader
from tests.conftest import run_python
from tests.fake_openrouter import wait_for


class Items:
    """A source yielding `items`, pausing `pause` seconds before those at `slow_at`."""

    def __init__(self, items: list, slow_at: tuple[int, ...] = (), pause: float = 0.0) -> None:
        self.items = items
        self.slow_at = slow_at
        self.pause = pause
        self.closed = False
        self.yielded = 0

    def __iter__(self) -> Iterator:
        for index, item in enumerate(self.items):
            if index in self.slow_at:
                time.sleep(self.pause)
            if isinstance(item, BaseException):
                raise item
            self.yielded += 1
            yield item

    def close(self) -> None:
        self.closed = True


def test_a_fast_source_reaches_a_slow_consumer_whole_in_order_and_held_back():
    source = Items(list(range(3000)))
    batches = []
    for batch in HeartbeatReader(lambda: source, interval=5):
        assert batch is not HEARTBEAT
        batches.append(batch)
        time.sleep(0.001)  # the reader runs ahead until the queue is full, then waits
    assert [item for batch in batches for item in batch] == list(range(3000))
    assert max(len(batch) for batch in batches) <= MAX_AHEAD
    assert len(batches) < 3000  # items that arrived meanwhile leave together
    assert source.closed


def test_heartbeats_come_while_the_source_is_silent_and_stop_when_it_speaks():
    source = Items(["first", "second"], slow_at=(1,), pause=1.0)
    seen = list(HeartbeatReader(lambda: source, interval=0.1))
    assert seen[0] == [] or seen[0] == ["first"]  # the source is open (and maybe read)
    flat = [item for item in seen if item is not HEARTBEAT]
    assert [item for batch in flat for item in batch] == ["first", "second"]
    assert seen.count(HEARTBEAT) >= 3
    assert seen[-1] == ["second"]


def test_a_failure_is_raised_after_the_items_before_it():
    source = Items(["a", "b", RuntimeError("cut off")])
    received = []
    with pytest.raises(RuntimeError, match="cut off"):
        for batch in HeartbeatReader(lambda: source, interval=5):
            received.extend(batch)
    assert received == ["a", "b"]


def test_stopping_closes_the_source_and_the_reader_held_back_reads_no_more():
    source = Items(list(range(10 * MAX_AHEAD)))
    batches = iter(HeartbeatReader(lambda: source, interval=5))
    first = next(batches)
    held = len(first) + MAX_AHEAD + 1  # what it took, a full queue, the one in hand
    wait_for(lambda: source.yielded >= held)  # the reader fills the queue, waits for it to empty
    time.sleep(0.1)
    assert source.yielded == held
    batches.close()
    time.sleep(0.2)
    assert source.closed
    assert source.yielded == held  # the item it held is handed over, and nothing after


def test_stopped_from_elsewhere_while_iterated_the_iteration_ends():
    source = Items(list(range(10 * MAX_AHEAD)))
    reader = HeartbeatReader(lambda: source, interval=0.05)
    batches = iter(reader)
    next(batches)
    time.sleep(0.2)  # the reader is held back by a full queue
    reader.stop()
    taken = [batch for batch in itertools.islice(batches, 100) if batch is not HEARTBEAT]
    assert sum(len(batch) for batch in taken) <= MAX_AHEAD + 1
    assert next(batches, None) is None  # ended, not heartbeats forever
    assert source.closed


_KILLED_WHILE_THE_READER_OPENS = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import gevent

    from app.heartbeats import HeartbeatReader

    class Source:
        closed = False

        def __iter__(self):
            yield from range(1000)

        def close(self):
            self.closed = True

    source = Source()

    def open_source():  # under gevent the reader runs at once, inside HeartbeatReader()
        consumer.kill(block=False)
        gevent.sleep(0.05)  # the upstream call: the consumer is killed meanwhile
        return source

    def consume():
        for batch in HeartbeatReader(open_source, interval=5):
            pass

    consumer = gevent.spawn(consume)
    consumer.join(5)
    gevent.sleep(0.2)
    print(consumer.dead, source.closed)
    """
)


def test_a_consumer_killed_while_its_reader_opens_the_source_still_gets_it_closed():
    assert run_python(_KILLED_WHILE_THE_READER_OPENS).split() == ["True", "True"]
