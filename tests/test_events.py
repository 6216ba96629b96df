"""A ChatStream read from the loopback upstream, closed under its reader by the disconnect watch
(from its own greenlet; a thread here): it ends as the client's abort, and nothing blames
OpenRouter for it."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from app.config import Settings
from app.errors import ClientDisconnected
from app.events import ChatStream
from app.upstream import OpenRouter
from tests.fake_openrouter import Scenario


@pytest.fixture
def open_stream(relay_env, caplog):
    openrouter = OpenRouter(Settings.from_environ(relay_env))

    def open_(model: str) -> ChatStream:
        stream = openrouter.open_chat_stream({"model": model, "messages": []}, "sk-or-v1-test")
        caplog.set_level(logging.INFO, logger="relay")
        return stream

    yield open_
    openrouter.close()


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def _first_content(events) -> str:
    return next(events)[1]["choices"][0]["delta"]["content"]


def test_abandoned_between_two_reads(fake, open_stream, caplog):
    """The reader was away (writing the last chunk to the client) when the watch closed it."""
    fake.script("m/slow", Scenario(tokens=["one", "two", "three"], interval=0.2))
    stream = open_stream("m/slow")
    events = iter(stream)
    assert _first_content(events) == "one"
    stream.abandon()
    with pytest.raises(ClientDisconnected):
        next(events)
    assert stream.outcome == "client_aborted"
    assert _warnings(caplog) == []


def test_abandoned_while_a_read_waits_with_half_an_event_read(fake, open_stream, caplog):
    """The half-read event is not handed over as a whole one (and found not to be JSON)."""
    half = b'data: {"choices":[{"index":0,"delta":{"content":"tw'
    fake.script("m/half", Scenario(tokens=["one"], raw_events=[half], stall_after=1))
    stream = open_stream("m/half")
    events = iter(stream)
    assert _first_content(events) == "one"
    threading.Timer(0.3, stream.abandon).start()  # the read below waits for the rest
    with pytest.raises(ClientDisconnected):
        next(events)
    assert stream.outcome == "client_aborted"
    assert _warnings(caplog) == []


class _ClosedAfterTheSizeLine:
    """The response's real socket file, except that the stream is abandoned right after a
    chunk's size line is read, before its data: the moment the watch's greenlet can run when
    the reader waits for the rest of a chunk. http.client then reads on with no file."""

    def __init__(self, file: Any, stream: ChatStream) -> None:
        self._file = file
        self._stream = stream

    def readline(self, *args: Any) -> bytes:
        line = self._file.readline(*args)
        if line.strip() and not self._stream.abandoned:
            self._stream.abandon()
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def test_abandoned_inside_a_chunked_read(fake, open_stream, caplog):
    fake.script("m/slow", Scenario(tokens=["one", "two", "three"], interval=0.2))
    stream = open_stream("m/slow")
    events = iter(stream)
    assert _first_content(events) == "one"
    body = stream._response.raw._fp  # http.client's response under urllib3's
    body.fp = _ClosedAfterTheSizeLine(body.fp, stream)
    with pytest.raises(ClientDisconnected):
        next(events)  # was AttributeError: 'NoneType' object has no attribute 'read1'
    assert stream.outcome == "client_aborted"
    assert _warnings(caplog) == []
