"""Reading a request's body as one JSON object, with a precise 400/413 for anything else."""

from __future__ import annotations

import json
from typing import Any

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge

from .errors import BadRequest, PayloadTooLarge


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a dict; raises BadRequest or PayloadTooLarge with a readable message."""
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge:
        limit = request.max_content_length
        raise PayloadTooLarge(
            f"Request body is larger than the {limit}-byte limit", {"body": ["Too large."]}
        ) from None
    if not raw:
        raise BadRequest("Request body is empty; send a JSON object", {"body": ["Empty."]})
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest(
            f"Request body is not valid UTF-8 (byte {error.start})", {"body": ["Not UTF-8."]}
        ) from None
    try:
        payload = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise BadRequest(
            f"Request body is not valid JSON: {error.msg} at line {error.lineno} "
            f"column {error.colno}",
            {"body": ["Not JSON."]},
        ) from None
    except (ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise BadRequest(
            f"Request body is not valid JSON: {reason}", {"body": ["Not JSON."]}
        ) from None
    if not isinstance(payload, dict):
        raise BadRequest(
            f"Request body must be a JSON object, not {type(payload).__name__}",
            {"body": ["Not an object."]},
        )
    return payload
