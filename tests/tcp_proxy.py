"""A TCP forwarder on loopback that a test can take down, silence and bring back (a database going
away, or hanging)."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target address while it is up."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._silent = False

    def up(self) -> TcpProxy:
        """Accept connections and forward them."""
        self._silent = False
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def in_front_of(self, url: str) -> str:
        """`url` (a database's or Redis's) with its host and port replaced by this proxy's,
        credentials and path kept."""
        parts = urlsplit(url)
        credentials, _, _ = parts.netloc.rpartition("@")
        address = f"127.0.0.1:{self.port}"
        netloc = f"{credentials}@{address}" if credentials else address
        return urlunsplit(parts._replace(netloc=netloc))

    def silence(self) -> TcpProxy:
        """Hang: keep every connection open, old and new, but pass nothing on any more."""
        self._silent = True
        return self

    def down(self) -> None:
        """Refuse new connections and cut every open one."""
        if self._listener:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            self._listener.close()
            self._listener = None
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self._silent:
                with self._lock:
                    self._open.append(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._open += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self._silent:
                    sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
