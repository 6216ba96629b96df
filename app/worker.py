"""gunicorn's gevent worker, answering the requests gunicorn refuses itself as the app answers.

gunicorn refuses a request it cannot parse (a header over 8,190 bytes, a request line over
4,094, a header line without a colon, a bad Content-Length) before the app runs. Its own answer
is an HTML page, and it logs, and echoes, the offending line: a header line typed without its
colon, `Authorization Bearer <token>`, put the caller's token in the log. Here those refusals are
JSON, name the part of the request at fault and never repeat what the client sent.

Imported by the master (gunicorn.conf.py names the class), so it imports no more than gunicorn's
own gevent worker does: nothing of the app, requests or ssl.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from typing import Any

from gunicorn.http import errors
from gunicorn.workers.ggevent import GeventWorker

log = logging.getLogger("relay")

# What a client gets for each of gunicorn's refusals: status, reason phrase, the part of the
# request at fault, message. Anything not listed is a 400 naming the request.
_MALFORMED_HEADER = (400, "Bad Request", "headers", "A request header is malformed")
_REFUSALS: dict[type[Exception], tuple[int, str, str, str]] = {
    errors.LimitRequestLine: (414, "URI Too Long", "url", "The request line is too long"),
    errors.LimitRequestHeaders: (
        431,
        "Request Header Fields Too Large",
        "headers",
        "The request's headers are too large or too many",
    ),
    errors.InvalidHeader: _MALFORMED_HEADER,
    errors.InvalidHeaderName: _MALFORMED_HEADER,
    errors.ObsoleteFolding: _MALFORMED_HEADER,
    errors.UnsupportedTransferCoding: (
        501,
        "Not Implemented",
        "transfer-encoding",
        "The request's Transfer-Encoding is not supported",
    ),
    errors.ExpectationFailed: (
        417,
        "Expectation Failed",
        "expect",
        "Only Expect: 100-continue is supported",
    ),
}
# A body's chunks fail here only when gunicorn reads what the app left unread, after the request
# was answered (the app answers a malformed chunk it reads itself with a 400 naming the body):
# the connection is closed without a second answer that nothing asked for.
_ANSWERED_ALREADY = (
    errors.InvalidChunkSize,
    errors.ChunkMissingTerminator,
    errors.InvalidChunkExtension,
)
_NOT_HTTP = (400, "Bad Request", "request", "The request is not valid HTTP/1.1")
# The only header names gunicorn's messages carry that are sure not to be a whole header line.
_NAMED_HEADERS = frozenset({"CONTENT-LENGTH", "TRANSFER-ENCODING"})


class RelayWorker(GeventWorker):
    """gunicorn's gevent worker; only `handle_error` differs."""

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        """Answer a request gunicorn could not parse; anything else is gunicorn's to answer."""
        if not isinstance(exc, errors.ParseException) or isinstance(
            exc,
            (
                errors.ConfigurationProblem,
                errors.InvalidResponseHeader,
                errors.InvalidResponseHeaderName,
            ),
        ):
            # Not the client's fault (the app's, a server's setting): gunicorn logs it in full.
            super().handle_error(req, client, addr, exc)
            return
        if isinstance(exc, _ANSWERED_ALREADY):
            log.info(
                "closing a connection: the unread rest of an answered request's body is malformed"
            )
            return
        status, reason, param, message = _REFUSALS.get(type(exc), _NOT_HTTP)
        header = getattr(exc, "hdr", None)
        if isinstance(header, str) and header.upper() in _NAMED_HEADERS:
            param = header.lower()
            message = f"The {header.title()} header is malformed"
        log.warning(
            "refused a request gunicorn could not parse: %d %s",
            status,
            type(exc).__name__,
            extra={"fields": {"status": status, "client": addr[0] if addr else ""}},
        )
        with contextlib.suppress(OSError):  # a client already gone: the socket closes next anyway
            client.sendall(_refusal(status, reason, param, message))


def _refusal(status: int, reason: str, param: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer. Its body carries both of the app's error shapes (chatbot-ui's
    `message` and OpenAI's `error`): before a request is parsed its surface is not known."""
    body = json.dumps(
        {
            "message": message,
            "error": {
                "message": message,
                "type": "invalid_request_error" if status < 500 else "server_error",
                "code": None,
                "param": param,
            },
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body
