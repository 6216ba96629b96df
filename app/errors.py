"""What can go wrong, as a small exception hierarchy; each surface renders it in its own shape."""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable

from flask import Blueprint, Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("relay")


class RelayError(Exception):
    """A failure the relay answers with a status and a readable message."""

    status = 500
    kind = "server_error"
    message = "An unexpected error occurred"

    def __init__(self, message: str | None = None, *, status: int | None = None) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = {}


class BadRequest(RelayError):
    """The caller's payload cannot be used; `errors` maps field paths to messages."""

    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, errors: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or {}

    @property
    def param(self) -> str | None:
        return next(iter(self.errors), None)


class PayloadTooLarge(BadRequest):
    status = 413


class UnsupportedEncoding(BadRequest):
    status = 415


class Unauthorized(RelayError):
    """No valid profile token (or own OpenRouter key) came with the request."""

    status = 401
    kind = "authentication_error"


class Forbidden(RelayError):
    """The caller may not do this (a model outside its profile's patterns)."""

    status = 403
    kind = "permission_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class StorageUnavailable(RelayError):
    """The profile store cannot be reached, so the caller cannot be checked."""

    status = 503
    kind = "server_error"
    message = "The relay's profile store is unavailable; try again shortly"


class RateLimited(RelayError):
    """The caller is over its requests-per-minute or concurrent-streams limit."""

    status = 429
    kind = "rate_limit_exceeded"
    reason = "rpm"  # or "concurrency": which limit it was


class BudgetExhausted(RelayError):
    """The caller's profile has spent its monthly budget."""

    status = 402
    kind = "insufficient_quota"
    reason = "budget"


class LimitsUnavailable(RelayError):
    """The shared limit store is unreachable and LIMITS_FAIL_OPEN is false."""

    status = 503
    kind = "server_error"
    message = "The relay cannot check its limits right now; try again shortly"


class KeyNotFound(RelayError):
    """No OpenRouter key is configured for this caller (chatbot-ui's wording and status)."""

    status = 500
    kind = "authentication_error"
    message = "OpenRouter API Key not found. Please set it in your profile settings."


class ProfileKeyUnreadable(RelayError):
    """The profile's stored OpenRouter key cannot be decrypted (SECRET_KEY changed or unset):
    the request is refused rather than paid for with the server's key."""

    status = 500
    kind = "server_error"

    def __init__(self, profile: str) -> None:
        super().__init__(
            f"The OpenRouter key stored for profile '{profile}' cannot be decrypted with the "
            "relay's SECRET_KEY; an operator must store it again"
        )


class UpstreamError(RelayError):
    """OpenRouter answered with an error, or not in a way the relay can use."""

    status = 502
    kind = "upstream_error"
    outcome = "upstream_error"  # how the usage ledger and the log line record the call
    message = "OpenRouter returned an error"

    def __init__(
        self, message: str | None = None, *, status: int | None = None, code: object = None
    ) -> None:
        super().__init__(message, status=status)
        self.code = code
        self.retries = 0
        self.reported_in_stream = False  # an error event after the 200, not an error status

    @classmethod
    def from_body(cls, error: object, status: int = 502) -> UpstreamError:
        """OpenRouter's error object `{"code", "message"}`; an HTTP-like code becomes the status."""
        fields = error if isinstance(error, dict) else {}
        code = fields.get("code")
        if isinstance(code, int) and 400 <= code <= 599:
            status = code
        elif isinstance(code, str):
            code = redact_secrets(code)
        return cls(
            redact_secrets(str(fields.get("message") or cls.message)), status=status, code=code
        )


_SECRET = re.compile(r"(sk-or-|orr_)[A-Za-z0-9_-]{8,}")


def redact_secrets(text: str) -> str:
    """`text` without OpenRouter keys (sk-or-...) or profile tokens (orr_...) in it.

    For OpenRouter's messages, which go to the caller and the log (one quoting the key it was
    called with would give away the server's key, or a profile's, which its callers must not
    hold), and for every log line: an exception's text is not the relay's to choose.
    """
    if "sk-or-" in text or "orr_" in text:
        return _SECRET.sub(r"\1[redacted]", text)
    return text


class UpstreamUnreachable(UpstreamError):
    message = "Could not connect to OpenRouter"


class UpstreamTimeout(UpstreamError):
    status = 504
    kind = "timeout"
    outcome = "timeout"
    message = "OpenRouter did not answer in time"


class UpstreamProtocolError(UpstreamError):
    """OpenRouter's answer does not follow its own protocol (not SSE, not JSON, cut short)."""

    message = "OpenRouter sent an invalid response"


class ClientDisconnected(RelayError):
    """The caller closed its connection before the answer was complete."""

    status = 499
    kind = "client_closed_request"
    outcome = "client_aborted"
    message = "The client closed the connection"


class StreamCutOff(ConnectionResetError):
    """Raised out of a streamed body after its first byte to make the server drop the connection.

    The HTTP status is gone by then, so the only honest signal left is an incomplete chunked body:
    the client's reader raises instead of seeing a clean end. As a ConnectionResetError, WSGI
    servers (gunicorn, werkzeug) treat it as a dropped connection, not as an application crash.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(errno.ECONNRESET, reason)


_OPENAI_KINDS = {
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
}


def error_kind(error: RelayError) -> str:
    """The OpenAI-style `type` of an error, from its status when the upstream set it."""
    return _OPENAI_KINDS.get(error.status, error.kind)


def as_relay_error(error: Exception) -> RelayError:
    """Turn anything a view raised into a RelayError, logging what the caller must not see."""
    if isinstance(error, RelayError):
        return error
    if isinstance(error, HTTPException):
        if error.code == 413:
            return PayloadTooLarge("Request body is too large", {"body": ["Too large."]})
        relay_error = RelayError(error.description, status=error.code)
        relay_error.kind = "invalid_request_error" if (error.code or 500) < 500 else "server_error"
        relay_error.headers.update(
            (name, value) for name, value in error.get_headers() if name == "Allow"
        )  # a 405 names the methods the path takes
        return relay_error
    log.exception("unexpected error while handling a request")
    return RelayError()


Renderer = Callable[[RelayError], Response]


def render_message(error: RelayError) -> Response:
    """chatbot-ui's error shape: {"message": ...}, plus field errors for a bad payload."""
    body: dict[str, object] = {"message": error.message}
    if isinstance(error, BadRequest) and error.errors:
        body["errors"] = error.errors
    return _json(body, error)


def render_openai_error(error: RelayError) -> Response:
    """OpenAI's error shape, so the SDKs raise the matching exception class."""
    param = getattr(error, "param", None)
    body = {
        "error": {
            "message": error.message,
            "type": error_kind(error),
            "code": getattr(error, "code", None),
            "param": param,
        }
    }
    return _json(body, error)


def render_for_path(error: RelayError) -> Response:
    """Errors outside any surface (unknown path or method): in the shape of that path's surface."""
    if request.path.startswith("/v1/"):
        return render_openai_error(error)
    return render_message(error)


def _json(body: dict[str, object], error: RelayError) -> Response:
    response = jsonify(body)
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def handle_errors_as(surface: Blueprint | Flask, render: Renderer) -> None:
    """Make every error raised under `surface` an answer in the shape `render` gives."""

    def handle(error: Exception) -> Response:
        relay_error = as_relay_error(error)
        g.relay_error = relay_error  # the request's log line says how it failed
        return render(relay_error)

    surface.register_error_handler(Exception, handle)
