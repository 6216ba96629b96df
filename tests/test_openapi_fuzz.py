"""schemathesis against the live app's /openapi.json: no 500s, every answer as documented."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

# Derandomized, so a run tries the same examples every time and CI stays quick.
FUZZ = settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def live_schema(module_relay):
    return schemathesis.openapi.from_url(module_relay.url + "/openapi.json")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/chat/openrouter"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/{model_id}"),
        ("GET", "/healthz"),
    ],
)
def test_every_operation_answers_as_documented(live_schema, fake_server, method, path):
    operation = live_schema[path][method]
    relayed_before = len(fake_server.received)

    @given(case=operation.as_strategy())
    @FUZZ
    def answers_as_documented(case):
        response = case.call(timeout=10)
        case.validate_response(response, checks=CHECKS)

    answers_as_documented()
    if method == "POST":
        # Valid payloads were generated too, and those went all the way upstream.
        assert len(fake_server.received) > relayed_before


def fields_named_by_chatbot_error(body: Any) -> list[str]:
    assert set(body) <= {"message", "errors"}
    assert isinstance(body["message"], str)
    assert all(isinstance(problems, list) for problems in body.get("errors", {}).values())
    return list(body.get("errors", {}))


def fields_named_by_openai_error(body: Any) -> list[str]:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["type"] == "invalid_request_error"
    return [body["error"]["param"]] if body["error"]["param"] else []


@pytest.mark.parametrize(
    ("path", "fields_named_by"),
    [
        ("/api/chat/openrouter", fields_named_by_chatbot_error),
        ("/v1/chat/completions", fields_named_by_openai_error),
    ],
)
def test_invalid_bodies_are_refused_in_the_documented_shape_naming_the_field(
    live_schema, path, fields_named_by
):
    operation = live_schema[path]["POST"]
    named: list[str] = []

    @given(case=operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    @FUZZ
    def refused_as_documented(case):
        response = case.call(timeout=10)
        case.validate_response(response, checks=CHECKS)
        if 400 <= response.status_code < 500:
            assert response.status_code in (400, 413, 415, 422), response.text
            fields = fields_named_by(response.json())
            assert fields, response.text
            named.extend(fields)

    refused_as_documented()
    # Not only bytes that are not JSON: bodies that parse were refused for a field they hold.
    assert any(field != "body" for field in named)
