"""A helper thread (a greenlet under gevent) that starts when it is first needed."""

from __future__ import annotations

import threading
from collections.abc import Callable


class LazyThread:
    """A daemon thread running `target`, started by the first `ensure_started()`.

    Started on first use, in the worker: a thread made earlier would be gunicorn master's (gone
    after the fork) or a real thread where the gevent worker wants a greenlet.
    """

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target = target
        self._name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._target, name=self._name, daemon=True
                    )
                    self._thread.start()
