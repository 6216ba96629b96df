"""schemathesis against the live app's /openapi.json: no 500s, every answer as documented."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
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
    @settings(
        max_examples=40,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def answers_as_documented(case):
        response = case.call(timeout=10)
        case.validate_response(response, checks=CHECKS)

    answers_as_documented()
    if method == "POST":
        # Valid payloads were generated too, and those went all the way upstream.
        assert len(fake_server.received) > relayed_before
