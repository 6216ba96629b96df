"""Validation loads only the fields a body has; that must not change what it accepts or says."""

from __future__ import annotations

import pytest
from marshmallow import ValidationError

from app.errors import BadRequest
from app.schemas import ChatbotRequest, ChatCompletionRequest, load

HI = [{"role": "user", "content": "Hi"}]

BODIES = [
    {"model": "m/ok", "messages": HI},
    {"model": "m/ok", "messages": HI, "stream": True, "temperature": 0.5, "a_new_field": [1]},
    {"models": ["a/one", "b/two"], "messages": HI, "tools": [{"type": "function", "function": {}}]},
    {"model": "m/ok"},
    {"messages": HI},
    {},
    {"model": "", "messages": [{"role": "user"}], "top_p": 0, "stop": 7, "seed": "42"},
    {"model": "m/ok", "messages": HI, "reasoning": {"effort": "extreme"}, "n": 0},
]


class Refused(dict):
    """The whole schema's error messages, told apart from a loaded body (also a dict)."""


def full_load(schema, body):
    try:
        return schema.load(body)
    except ValidationError as error:
        return Refused(error.messages)


def narrowed_load(schema, body):
    try:
        return load(schema, body)
    except BadRequest as error:
        return error


@pytest.mark.parametrize("body", BODIES)
def test_an_openai_body_loads_or_fails_as_the_whole_schema_says(body):
    schema = ChatCompletionRequest()
    expected = full_load(schema, body)
    got = narrowed_load(schema, body)
    assert isinstance(got, BadRequest) == isinstance(expected, Refused)
    if isinstance(got, BadRequest):
        assert isinstance(expected, Refused), f"refused a body the schema accepts: {got.message}"
        flat = {path.split(".")[0] for path in got.errors}
        assert flat == set(expected)
        assert next(iter(got.errors)).split(".")[0] == next(iter(expected))  # named first
    else:
        assert got == expected


@pytest.mark.parametrize(
    "body",
    [
        {"chatSettings": {"model": "m/ok", "temperature": 3}, "messages": HI},
        {"chatSettings": {"model": "m/ok"}},
        {"messages": HI, "extra": 1},
    ],
)
def test_a_chatbot_body_fails_as_the_whole_schema_says(body):
    schema = ChatbotRequest()
    expected = full_load(schema, body)
    got = narrowed_load(schema, body)
    assert isinstance(got, BadRequest)
    assert {path.split(".")[0] for path in got.errors} == set(expected)
