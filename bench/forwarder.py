"""The floor under every relay in the benchmark: a gevent process that copies bytes between the
client and the upstream, both ways, parsing nothing.

Scenario 1 runs it beside the relay. What it adds to the time to first token is what the hop
alone costs on this machine (one more process, woken by the request and by each token, and
gevent's loop around each read and write), so the relay's own work is what it adds beyond this.

Usage: `python -m bench.forwarder --port PORT --upstream-port PORT`.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import socket  # noqa: E402

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

_READ_SIZE = 64 * 1024
_BACKLOG = 2048  # gunicorn's default: the same accept queue as the relay it is compared with


def _copy(source: socket.socket, target: socket.socket) -> None:
    """Every byte from `source` to `target`, until `source` ends; then end `target`'s side."""
    with contextlib.suppress(OSError):
        while data := source.recv(_READ_SIZE):
            target.sendall(data)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)


def serve(port: int, upstream_port: int) -> None:
    """Forward every connection to `port` to a connection of its own to `upstream_port`."""

    def forward(client: socket.socket, _address: object) -> None:
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        try:
            for end in (client, upstream):
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            answers = gevent.spawn(_copy, upstream, client)
            _copy(client, upstream)
            answers.join()
        finally:
            upstream.close()

    StreamServer(("127.0.0.1", port), forward, backlog=_BACKLOG).serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    serve(args.port, args.upstream_port)


if __name__ == "__main__":
    main()
