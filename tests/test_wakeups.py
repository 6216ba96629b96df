"""The SSE reader starts, and its hand-over wakes the response's greenlet, at once under gevent as
the worker runs it; otherwise they are a thread and threading.Event."""

from __future__ import annotations

import textwrap
import threading

from app.wakeups import arrival_event
from tests.conftest import run_python

# Two greenlets are woken in one turn of the loop: the reader first (its watcher has a higher
# priority), which wakes a waiting consumer or starts a greenlet, then another stream's. What the
# reader set going must run before that other stream, as if the reader had done it itself.
_UNDER_GEVENT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import socket

    import gevent
    from gevent import get_hub

    from app.wakeups import arrival_event, start_thread

    hub = get_hub()
    before_the_loop = []  # nothing has waited yet: the hub does not run
    start_thread(before_the_loop.append, "a thread started before the loop runs")
    gevent.sleep(0.01)
    print(*before_the_loop)

    real_sleep = monkey.get_original("time", "sleep")

    def wait_readable(sock, priority):
        hub.wait(hub.loop.io(sock.fileno(), 1, priority=priority))

    def race(hand_over, waiting=lambda order: None):  # who runs after the reader's hand-over
        order = []

        def reader(sock):
            wait_readable(sock, 1)
            order.append("reader")
            hand_over(order)

        def other_stream(sock):
            wait_readable(sock, 0)
            order.append("other stream")

        reader_end, reader_feed = socket.socketpair()
        other_end, other_feed = socket.socketpair()
        greenlets = [gevent.spawn(reader, reader_end), gevent.spawn(other_stream, other_end)]
        greenlets.append(gevent.spawn(waiting, order))
        gevent.sleep(0.01)  # all wait now
        reader_feed.send(b"x")
        other_feed.send(b"x")
        real_sleep(0.01)  # the loop looks again only once both sockets are ready
        gevent.joinall(greenlets, timeout=5)
        return ", ".join(order)

    arrival = arrival_event()
    print(race(lambda _: arrival.set(), lambda order: order.append(f"woken {arrival.wait(5)}")))
    print(race(lambda order: start_thread(order.append, "started")))

    # A source faster than its consumer: the reader is held back and woken again and again, and
    # every wake-up comes from gevent's callbacks (sleep(0), Event), none after a heartbeat or
    # after the held reader's own time-out (half a second: a stall).
    import time

    from app.heartbeats import HEARTBEAT, HeartbeatReader

    class Fast:
        stalls = 0

        def __iter__(self):
            last = time.monotonic()
            for item in range(2000):
                if not item % 32:
                    gevent.sleep(0)
                now = time.monotonic()
                Fast.stalls += now - last > 0.4
                last = now
                yield item

        def close(self):
            pass

    batches = list(HeartbeatReader(Fast, 5.0))
    items = [item for batch in batches if batch is not HEARTBEAT for item in batch]
    print(len(items), batches.count(HEARTBEAT), Fast.stalls)

    # A new thread runs before its starter goes on, which resumes once the thread first waits
    # (or ends); a starter woken by something else meanwhile is not switched back to later.
    order = []

    def runner(name):
        order.append(name)
        gevent.sleep(0.01)
        order.append(f"{name} again")

    def starter():
        start_thread(runner, "thread")
        order.append("starter")
        start_thread(order.append, "thread that ends")
        order.append("starter again")

    gevent.spawn(starter).join(5)
    gevent.sleep(0.05)
    print(", ".join(order))

    def woken_by_a_kill():
        try:
            start_thread(lambda: (killed.kill(block=False), gevent.sleep(0)))
        except gevent.GreenletExit:
            order.append("killed")
            gevent.sleep(0.02)  # a switch back meant for start_thread would land here
            order.append("slept")

    order = []
    killed = gevent.spawn(woken_by_a_kill)
    killed.join(5)
    print(", ".join(order))

    # Otherwise, threading.Event's behaviour.
    later = arrival_event()
    print(later.wait(0.01), later.wait(0.01), later.wait(0))  # the timer again, then another
    gevent.spawn_later(0.01, later.set)
    print(later.wait(5), later.wait(0))
    later.clear()
    print(later.wait(0))
    """
)


def test_a_reader_wakes_its_consumer_and_starts_before_anything_else():
    printed = run_python(_UNDER_GEVENT).split("\n")
    assert printed.pop(0) == "a thread started before the loop runs"
    assert printed[:2] == ["reader, woken True, other stream", "reader, started, other stream"]
    assert printed[2] == "2000 0 0"
    assert printed[3:5] == [
        "thread, starter, thread that ends, starter again, thread again",
        "killed, slept",
    ]
    assert printed[5:8] == ["False False False", "True True", "False"]


def test_without_gevent_it_is_a_threading_event():
    arrival = arrival_event()
    assert isinstance(arrival, threading.Event)
