"""A stream waiting for its first token is relayed before later tokens of other streams, under
gevent as the worker runs it."""

from __future__ import annotations

import textwrap

from tests.conftest import run_python

# The upstream here is a bare loopback socket server so that the test decides exactly when each
# stream's bytes are sent: both in one turn of the event loop, the fresh stream's first (libev
# wakes ready watchers of one priority last in, first out, so without the priority it runs last).
_UNDER_GEVENT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import json
    import socket
    import time

    import gevent

    from app.config import Settings
    from app.upstream import OpenRouter

    HEAD = (
        b"HTTP/1.1 200 OK\\r\\nContent-Type: text/event-stream\\r\\n"
        b"Transfer-Encoding: chunked\\r\\n\\r\\n"
    )

    def event(text):
        chunk = {"model": "m", "choices": [{"index": 0, "delta": {"content": text}}]}
        data = b"data: " + json.dumps(chunk).encode() + b"\\n\\n"
        return b"%x\\r\\n%s\\r\\n" % (len(data), data)

    def read_request(connection):
        received = b""
        while b"\\r\\n\\r\\n" not in received:
            received += connection.recv(65536)
        head, _, body = received.partition(b"\\r\\n\\r\\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\\r\\n")[0])
        while len(body) < length:
            body += connection.recv(65536)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    upstream_ends = []

    def serve():
        while True:
            connection, _ = listener.accept()
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each send at once
            read_request(connection)
            connection.sendall(HEAD)
            upstream_ends.append(connection)

    gevent.spawn(serve)
    port = listener.getsockname()[1]
    settings = Settings.from_environ(
        {
            "OPENROUTER_API_KEY": "sk-or-v1-test",
            "OPENROUTER_BASE_URL": f"http://127.0.0.1:{port}/api/v1",
            "UPSTREAM_RETRIES": "0",
        }
    )
    openrouter = OpenRouter(settings)
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    def open_stream():
        stream = iter(openrouter.open_chat_stream(payload, "sk-or-v1-test"))
        return stream, upstream_ends[-1]

    def race(under_way, fresh):  # whom the loop wakes first when both are ready in one turn
        order = []

        def relay(name, stream):
            next(stream)
            order.append(name)

        readers = [gevent.spawn(relay, "later", under_way[0])]
        readers.append(gevent.spawn(relay, "first", fresh[0]))
        gevent.sleep(0.05)  # both readers now wait on their sockets
        fresh[1].sendall(event("first"))
        under_way[1].sendall(event("later"))
        time.sleep(0.05)  # both sockets are ready before the loop looks at them again
        gevent.joinall(readers, timeout=5)
        return ", ".join(order)

    a = open_stream()
    a[1].sendall(event("one"))
    assert next(a[0])[1]["choices"][0]["delta"]["content"] == "one"
    b = open_stream()
    print(race(a, b))
    print(race(b, open_stream()))  # b, once under way, has no head start left
    """
)


def test_a_stream_waiting_for_its_first_token_is_served_before_later_tokens():
    printed = run_python(_UNDER_GEVENT)
    assert printed.split("\n")[:2] == ["first, later", "first, later"]
