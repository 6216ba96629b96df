"""A ChatStream read from the loopback upstream: how it ends when it is closed under its reader."""

from __future__ import annotations

import logging

import pytest

from app.config import Settings
from app.errors import ClientDisconnected
from app.upstream import OpenRouter
from tests.fake_openrouter import Scenario


def test_a_stream_abandoned_between_two_reads_ends_as_the_clients_abort(fake, relay_env, caplog):
    """The disconnect watch closes the upstream from its own greenlet, and the stream's reader
    may be away then (writing the last chunk to the client) rather than blocked in a read."""
    fake.script("m/slow", Scenario(tokens=["one", "two", "three"], interval=0.2))
    openrouter = OpenRouter(Settings.from_environ(relay_env))
    stream = openrouter.open_chat_stream({"model": "m/slow", "messages": []}, "sk-or-v1-test")
    events = iter(stream)
    first = next(events)[1]
    assert first["choices"][0]["delta"]["content"] == "one"
    caplog.set_level(logging.INFO, logger="relay")
    stream.abandon()
    with pytest.raises(ClientDisconnected):
        next(events)
    assert stream.outcome == "client_aborted"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
