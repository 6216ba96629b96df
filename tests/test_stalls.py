"""The stall sweeper on its own, with streams that only say how long their read has waited."""

from __future__ import annotations

import time

from app.stalls import StallWatch


class Reading:
    """A stream whose current read began `waited` seconds ago (None: not reading)."""

    def __init__(self, waited: float | None, fails: bool = False) -> None:
        self.waiting_since = None if waited is None else time.monotonic() - waited
        self.fails = fails
        self.stalled = False
        self.on_close_callbacks = []

    def read_without_timeout(self) -> None:
        pass

    def on_close(self, callback) -> None:
        self.on_close_callbacks.append(callback)

    def stall(self) -> None:
        if self.fails:
            raise AttributeError("this urllib3 cannot shut a response down")
        self.stalled = True


def test_only_a_read_waiting_past_the_timeout_is_stalled_and_a_failure_stops_nothing(caplog):
    watch = StallWatch(timeout=0.2)
    failing, silent, reading, idle = Reading(5, fails=True), Reading(5), Reading(0), Reading(None)
    for stream in (failing, silent, reading, idle):
        watch.watch(stream)
    deadline = time.monotonic() + 3
    # One sweep tries both streams that waited too long, in no set order: wait for both.
    while not (silent.stalled and "could not end" in caplog.text) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert silent.stalled
    assert not idle.stalled  # held back by its client, not waiting on OpenRouter
    assert "could not end a stalled stream" in caplog.text
    reading.waiting_since = time.monotonic() - 5  # and now it has waited too long
    while not reading.stalled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reading.stalled  # the sweeper outlived the stream whose stall failed


def test_a_closed_stream_is_no_longer_watched():
    watch = StallWatch(timeout=0.2)
    stream = Reading(None)
    watch.watch(stream)
    for callback in stream.on_close_callbacks:
        callback()
    stream.waiting_since = time.monotonic() - 5
    time.sleep(0.3)
    assert not stream.stalled
