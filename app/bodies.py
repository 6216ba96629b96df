"""Reading a request's body as one JSON object, with a precise 400/413 for anything else."""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge

from .errors import BadRequest, PayloadTooLarge, UnsupportedEncoding

log = logging.getLogger("relay")

# A body decoded as UTF-8 holds no surrogate: JSON's \uD800-\uDFFF escapes are the only way in.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# The decoder joins escaped pairs into one character, so any surrogate left in a string is lone.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    # 1e400 would become infinity, which fields passed on unchecked would send upstream as Infinity.
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"{text} is too large for a number")
    return number


def _read_body(request: Request) -> bytes:
    try:
        raw = request.get_data(cache=False)
        # Werkzeug stops reading a body without a length (chunked) at the limit without a word;
        # one byte more from the server's stream tells a body cut short from one that fits.
        limit = None if request.environ.get("CONTENT_LENGTH") else request.max_content_length
        if limit is not None and len(raw) >= limit and request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    except RequestEntityTooLarge:
        raise PayloadTooLarge(
            f"Request body is larger than the {request.max_content_length}-byte limit",
            {"body": ["Too large."]},
        ) from None
    except Exception as error:  # the server's reader: a malformed chunk, a dropped connection
        log.info("could not read a request body: %s", type(error).__name__)
        raise BadRequest(
            "Request body could not be read (malformed chunked encoding, or cut short)",
            {"body": ["Unreadable."]},
        ) from None
    return raw


def _lone_surrogate_at(payload: Any) -> str | None:
    """The path of a string in `payload` holding a lone surrogate (for a key, its object's path)."""
    pending = [("", payload)]
    while pending:  # not recursive: the body may be nested as deeply as the JSON decoder allows
        path, value = pending.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    return path or "body"
                pending.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            pending.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value))
    return None


# The codings a body may be sent with: as it is, and (in transfer) chunked.
_PLAIN_CODINGS = (
    ("Content-Encoding", "HTTP_CONTENT_ENCODING", "identity"),
    ("Transfer-Encoding", "HTTP_TRANSFER_ENCODING", "chunked"),
)


def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a dict; raises BadRequest, PayloadTooLarge or UnsupportedEncoding with
    a readable message."""
    for header, key, plain in _PLAIN_CODINGS:
        coding = request.environ.get(key)
        if coding is not None and coding.replace(" ", "").lower() != plain:
            raise UnsupportedEncoding(
                f"Request bodies must be sent uncompressed ({header}: {coding[:40]})",
                {header: ["Not supported; send the body uncompressed."]},
            )
    raw = _read_body(request)
    if not raw:
        raise BadRequest("Request body is empty; send a JSON object", {"body": ["Empty."]})
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest(
            f"Request body is not valid UTF-8 (byte {error.start})", {"body": ["Not UTF-8."]}
        ) from None
    try:
        payload = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as error:
        raise BadRequest(
            f"Request body is not valid JSON: {error.msg} at line {error.lineno} "
            f"column {error.colno}",
            {"body": ["Not JSON."]},
        ) from None
    except (ValueError, RecursionError) as error:
        if isinstance(error, RecursionError):
            reason = "nested too deeply"
        elif "integer string conversion" in str(error):
            reason = "a number with too many digits"
        else:
            reason = str(error)
        raise BadRequest(
            f"Request body is not valid JSON: {reason}", {"body": ["Not JSON."]}
        ) from None
    if not isinstance(payload, dict):
        raise BadRequest(
            f"Request body must be a JSON object, not {type(payload).__name__}",
            {"body": ["Not an object."]},
        )
    # A lone surrogate cannot be encoded to send upstream; a cheap scan of the bytes finds bodies
    # that may hold one, and only those are walked.
    if _SURROGATE_ESCAPE.search(raw) and (path := _lone_surrogate_at(payload)):
        raise BadRequest(
            f"Invalid request: {path}: text that is not valid Unicode (a lone surrogate escape)",
            {path: ["Not valid Unicode: holds a lone surrogate."]},
        )
    return payload
