"""The OpenAPI 3 document, generated from the marshmallow schemas that validate the payloads."""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, current_app
from marshmallow import INCLUDE, Schema, fields, validate

from . import schemas

bp = Blueprint("openapi", __name__)


class MessageError(Schema):
    message = fields.String(required=True)
    errors = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))


class OpenAIErrorDetail(Schema):
    message = fields.String(required=True)
    type = fields.String(required=True)
    code = fields.Raw(allow_none=True)
    param = fields.String(allow_none=True)


class OpenAIError(Schema):
    error = fields.Nested(OpenAIErrorDetail, required=True)


class Model(Schema):
    """OpenAI's model object; OpenRouter's own fields (pricing, context_length, ...) come along."""

    class Meta:
        unknown = INCLUDE

    id = fields.String(required=True)
    object = fields.String(required=True)
    created = fields.Integer()
    owned_by = fields.String()


class ModelList(Schema):
    object = fields.String(required=True)
    data = fields.List(fields.Nested(Model), required=True)


# Every schema MessageContent may hand a part to; OtherPart's type excludes the others' types.
_CONTENT_PART_SCHEMAS = [
    type(part) for part in (*schemas.CONTENT_PARTS.values(), schemas.OTHER_PART)
]

_CUSTOM_FIELDS: dict[type, dict[str, Any]] = {
    schemas.MessageContent: {
        "oneOf": [
            {"type": "string"},
            {
                "type": "array",
                "items": {
                    "oneOf": [
                        {"$ref": f"#/components/schemas/{part.__name__}"}
                        for part in _CONTENT_PART_SCHEMAS
                    ]
                },
            },
        ]
    },
    schemas.Stop: {
        "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]
    },
    schemas.ToolChoice: {
        "oneOf": [
            {"type": "string", "enum": ["none", "auto", "required"]},
            {
                "type": "object",
                "required": ["type", "function"],
                "properties": {
                    "type": {"type": "string", "enum": ["function"]},
                    "function": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}},
                    },
                },
            },
        ]
    },
}


def _custom_field(self: Any, field: fields.Field, **kwargs: Any) -> dict[str, Any]:
    """What apispec cannot infer: our union-typed fields, exclusive lower bounds, and NoneOf."""
    properties = dict(_CUSTOM_FIELDS.get(type(field), {}))
    for validator in field.validators:
        if isinstance(validator, validate.Range) and not validator.min_inclusive:
            properties["exclusiveMinimum"] = True
        if isinstance(validator, validate.NoneOf):
            properties["not"] = {"enum": list(validator.iterable)}
    return properties


def _errors(schema: str, statuses: dict[int, str]) -> dict[str, Any]:
    return {
        str(status): {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
        for status, description in statuses.items()
    }


_NO_CALLER = "No valid profile token (AUTH_MODE=profiles)"
_FAILURES = {
    400: "The body is not a valid request; the message names the field",
    401: "No valid profile token, or OpenRouter refused the key",
    402: "OpenRouter credits exhausted",
    403: "OpenRouter's moderation flagged the input",
    404: "Not found",
    408: "OpenRouter timed out",
    413: "The body is larger than MAX_REQUEST_BYTES",
    429: "Rate limited (Retry-After may say when to try again)",
    500: "No OpenRouter key, or an unexpected error",
    502: "OpenRouter unreachable, down, or answering invalidly",
    503: "No OpenRouter provider meets the routing requirements",
    504: "OpenRouter did not answer in time",
}


def build_spec() -> dict[str, Any]:
    """The whole document as a dict."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="openrouter-relay",
        version="0.1.0",
        openapi_version="3.0.3",
        plugins=[plugin],
        info={"description": "A streaming relay in front of OpenRouter's chat completions."},
    )
    plugin.converter.add_attribute_function(_custom_field)
    for name, schema in [
        ("ChatbotRequest", schemas.ChatbotRequest),
        ("ChatCompletionRequest", schemas.ChatCompletionRequest),
        *((part.__name__, part) for part in _CONTENT_PART_SCHEMAS),
        ("MessageError", MessageError),
        ("OpenAIError", OpenAIError),
        ("Model", Model),
        ("ModelList", ModelList),
    ]:
        spec.components.schema(name, schema=schema)

    spec.path(
        path="/api/chat/openrouter",
        operations={
            "post": {
                "summary": "chatbot-ui's route: the reply as streamed plain text",
                "requestBody": _json_body("ChatbotRequest"),
                "responses": {
                    "200": {
                        "description": "The reply's text, streamed as it is generated",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors("MessageError", _FAILURES),
                },
            }
        },
    )
    spec.path(
        path="/v1/chat/completions",
        operations={
            "post": {
                "summary": "OpenAI-compatible chat completion (SSE when stream is true)",
                "requestBody": _json_body("ChatCompletionRequest"),
                "responses": {
                    "200": {
                        "description": "A chat.completion object, or its chunks as SSE",
                        "content": {
                            "application/json": {"schema": {"type": "object"}},
                            "text/event-stream": {"schema": {}},
                        },
                    },
                    **_errors("OpenAIError", _FAILURES),
                },
            }
        },
    )
    spec.path(
        path="/v1/models",
        operations={
            "get": {
                "summary": "OpenRouter's models in OpenAI's list shape",
                "responses": {
                    "200": {
                        "description": "The model list",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ModelList"}
                            }
                        },
                    },
                    **_errors(
                        "OpenAIError",
                        {401: _NO_CALLER, 502: _FAILURES[502], 504: _FAILURES[504]},
                    ),
                },
            }
        },
    )
    spec.path(
        path="/v1/models/{model_id}",
        operations={
            "get": {
                "summary": "One model",
                "parameters": [
                    {
                        "name": "model_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The model",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Model"}}
                        },
                    },
                    **_errors(
                        "OpenAIError",
                        {401: _NO_CALLER, 404: "No such model", 502: _FAILURES[502]},
                    ),
                },
            }
        },
    )
    spec.path(
        path="/healthz",
        operations={"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
    )
    document = spec.to_dict()
    # Only an assistant message that carries tool_calls may leave out its content (or send null);
    # the document asks for it always rather than spell out that condition.
    message = document["components"]["schemas"]["Message"]
    message["required"].append("content")
    message["properties"]["content"].pop("nullable")
    other_roles = [role for role in schemas.ROLES if role != "tool"]
    message["anyOf"] = [
        {"properties": {"role": {"enum": other_roles}}},
        {"required": ["tool_call_id"]},
    ]
    completion = document["components"]["schemas"]["ChatCompletionRequest"]
    completion["anyOf"] = [{"required": ["model"]}, {"required": ["models"]}]
    return document


def _json_body(schema: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


@bp.get("/openapi.json")
def openapi_document() -> dict[str, Any]:
    document = current_app.extensions.get("relay.openapi")
    if document is None:
        document = current_app.extensions["relay.openapi"] = build_spec()
    return document
