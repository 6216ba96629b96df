"""A streamed response whose status is chosen when its body's first piece is ready.

Until the first piece, a failure (an error event, a stream cut off, a stall) is still an error
response with its status, which chatbot-ui shows as a message; after it, the status is gone and
the connection is cut (StreamCutOff) so that the client can never mistake the answer for complete.

The view returns this response as soon as the stream is open, and the WSGI server is handed its
body at once: the status and headers go to `start_response` only when the first piece is ready,
during the body's first iteration, as PEP 3333 allows. So Flask's after-request work, the
request context's teardown and the response's headers are all done while OpenRouter is still
working on the first token, instead of between that token and its write.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from flask import Flask, Response, current_app
from werkzeug.wsgi import ClosingIterator

from .errors import Renderer, as_relay_error
from .presenters import cut_off_on_failure

# What the error response sets for itself; every other header set for this request (its id, CORS,
# rate limits) is kept.
_ITS_OWN = frozenset(("content-type", "content-length"))


class FirstPieceResponse(Response):
    """The response sending `pieces`; a failure before the first is answered as `render` says."""

    def __init__(self, pieces: Iterator[bytes], render: Renderer, **kwargs: Any) -> None:
        super().__init__(pieces, **kwargs)
        self._pieces = pieces
        self._render = render
        self._app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return ClosingIterator(self._respond(environ, start_response), self.close)

    def _respond(self, environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        headers = self.get_wsgi_headers(environ).to_wsgi_list()  # ready before the first piece
        try:
            first = next(self._pieces, None)
        except Exception as error:
            failure = self._error_response(error)
            start_response(failure.status, failure.get_wsgi_headers(environ).to_wsgi_list())
            yield from failure.response
            return
        start_response(self.status, headers)
        yield from cut_off_on_failure(first, self._pieces)

    def _error_response(self, error: Exception) -> Response:
        with self._app.app_context():
            failure = self._render(as_relay_error(error))
        failure.headers.extend(
            (name, value)
            for name, value in self.headers.items()
            if name.lower() not in _ITS_OWN and name not in failure.headers
        )
        self.status_code = failure.status_code  # the request's log line reads it when closed
        return failure
