"""The disconnect watch on its own, on a real socket pair, under gevent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import run_python

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
    printed = run_python(
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
    printed = run_python(
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
    printed = run_python(
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
    printed = run_python(
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


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize("close_notify", [False, True], ids=["fin", "close-notify-then-fin"])
def test_a_tls_client_gone_is_noticed_too(tmp_path, close_notify):
    """gunicorn terminating TLS hands over a TLS socket, which cannot be peeked at; a client
    closing politely sends TLS's close_notify before its FIN."""
    cert, key = _self_signed(tmp_path)
    printed = run_python(
        f"""
from gevent import monkey; monkey.patch_all()
import socket, ssl, time
import gevent
from app.disconnects import DisconnectWatch
from app.errors import ClientDisconnected
server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server.load_cert_chain({str(cert)!r}, {str(key)!r})
client_side = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
client_side.check_hostname, client_side.verify_mode = False, ssl.CERT_NONE
ours, theirs = socket.socketpair()
accepting = gevent.spawn(server.wrap_socket, ours, server_side=True)
peer = client_side.wrap_socket(theirs)
client = accepting.get()
watch = DisconnectWatch({{"gunicorn.socket": client}})

def leave():
    if {close_notify}:
        gevent.spawn(peer.unwrap)  # sends close_notify, then waits for ours, which never comes
        gevent.sleep(0.05)
    peer.close()

gevent.spawn_later(0.1, leave)
started = time.monotonic()
try:
    with watch.interrupting():
        gevent.sleep(30)
except ClientDisconnected:
    print("interrupted after", round(time.monotonic() - started, 1))
"""
    )
    assert printed.split()[:2] == ["interrupted", "after"]
    assert float(printed.split()[2]) < 5
