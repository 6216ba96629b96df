"""The disconnect watch on its own, on a real socket pair, under gevent."""

from __future__ import annotations

from tests.conftest import run_under_gevent

# Each script patches first; `client` stands for the relay's end of a client connection,
# `peer` for the client itself.
PREAMBLE = """
from gevent import monkey; monkey.patch_all()
import socket, time
import gevent
from app.disconnects import DisconnectWatch
from app.errors import ClientDisconnected
client, peer = socket.socketpair()
watch = DisconnectWatch({"gunicorn.socket": client})
"""


def test_a_client_gone_during_the_call_raises_client_disconnected_in_it_at_once():
    printed = run_under_gevent(
        PREAMBLE
        + """
gevent.spawn_later(0.1, peer.close)
started = time.monotonic()
try:
    with watch.interrupting():
        gevent.sleep(30)  # an upstream call waiting for OpenRouter's headers, or a back-off
except ClientDisconnected:
    print("interrupted after", round(time.monotonic() - started, 1))
"""
    )
    assert printed.split()[:2] == ["interrupted", "after"]
    assert float(printed.split()[2]) < 5


def test_bytes_from_a_client_that_stays_do_not_interrupt_the_call():
    printed = run_under_gevent(
        PREAMBLE
        + """
peer.sendall(b"GET / HTTP/1.1")  # a pipelined request
with watch.interrupting():
    gevent.sleep(0.3)
watch.stop()
print("finished")
"""
    )
    assert printed.split() == ["finished"]


def test_a_client_gone_as_the_call_ends_reaches_the_stream_instead():
    """The watch is handed over without a gap: a FIN noticed after the call ended (here: before
    the hand-over) goes to the stream's handler, and nothing is thrown at the caller later."""
    printed = run_under_gevent(
        PREAMBLE
        + """
with watch.interrupting():
    gevent.sleep(0.1)
    peer.close()  # the call ends before the loop has looked at the client again
gevent.sleep(0.2)
watch.hand_over(lambda: print("abandoned"))
gevent.sleep(0.3)
watch.stop()
print("finished")
"""
    )
    assert printed.split() == ["abandoned", "finished"]


def test_a_throw_that_falls_due_after_the_call_ended_is_dropped():
    """The FIN is seen during the call, but the call ends before the loop delivers the throw:
    the caller, now past the call, must not get it."""
    printed = run_under_gevent(
        PREAMBLE
        + """
with watch.interrupting():
    peer.close()
    while not watch._gone:  # the check has run, and the throw is due
        gevent.sleep(0)
gevent.sleep(0.2)  # a throw still due would land here, outside the call
watch.stop()
print("finished")
"""
    )
    assert printed.split() == ["finished"]
