"""marshmallow schemas of the payloads the relay accepts: the one source of truth for them."""

from __future__ import annotations

from typing import Any

from marshmallow import (
    EXCLUDE,
    INCLUDE,
    Schema,
    ValidationError,
    fields,
    missing,
    validate,
    validates_schema,
)

from .bounds import MAX_ITEMS, MAX_MESSAGES, BoundedDict, BoundedList, body_budget, take
from .errors import BadRequest

ROLES = ("system", "developer", "user", "assistant", "tool")


class Number(fields.Float):
    """A JSON number: unlike marshmallow's Float, a numeric string is refused, not converted."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, str):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class NonEmptyString(fields.String):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(validate=validate.Length(min=1), **kwargs)


class ModelName(fields.String):
    """A model id: the ledger keeps up to 200 characters of it, and no real id is longer."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(validate=validate.Length(min=1, max=200), **kwargs)


class ImageUrl(Schema):
    class Meta:
        unknown = INCLUDE

    url = NonEmptyString(required=True)
    detail = fields.String(validate=validate.OneOf(("auto", "low", "high")))


class TextPart(Schema):
    class Meta:
        unknown = INCLUDE

    type = fields.String(required=True, validate=validate.OneOf(("text",)))
    text = fields.String(required=True)


class ImagePart(Schema):
    class Meta:
        unknown = INCLUDE

    type = fields.String(required=True, validate=validate.OneOf(("image_url",)))
    image_url = fields.Nested(ImageUrl, required=True)


CONTENT_PARTS: dict[str, Schema] = {"text": TextPart(), "image_url": ImagePart()}


class OtherPart(Schema):
    """Audio, file and video parts: OpenRouter checks them; the relay only requires a type."""

    class Meta:
        unknown = INCLUDE

    # Never refused for a known type (MessageContent sends those elsewhere): it documents the split.
    type = fields.String(
        required=True, validate=[validate.Length(min=1), validate.NoneOf(tuple(CONTENT_PARTS))]
    )


OTHER_PART = OtherPart()


class MessageContent(fields.Field):
    """A message's content: a string, or a list of typed parts (text, image_url, ...)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValidationError("Must be a string or a list of content parts.")
        parts, errors = [], {}
        for index, part in enumerate(take(value, MAX_ITEMS)):
            if not isinstance(part, dict):
                errors[index] = ["Must be an object with a type."]
                continue
            kind = part.get("type")
            # A type that is not a string (even an unhashable one) falls to OtherPart to be refused.
            schema = CONTENT_PARTS.get(kind, OTHER_PART) if isinstance(kind, str) else OTHER_PART
            try:
                parts.append(schema.load(part))
            except ValidationError as error:
                errors[index] = error.messages
        if errors:
            raise ValidationError(errors)
        return parts


class ToolFunction(Schema):
    class Meta:
        unknown = INCLUDE

    name = NonEmptyString(required=True)
    arguments = fields.String()


class ToolCall(Schema):
    class Meta:
        unknown = INCLUDE

    id = NonEmptyString(required=True)
    type = fields.String(validate=validate.OneOf(("function",)))
    function = fields.Nested(ToolFunction, required=True)


class Message(Schema):
    """One chat message; fields the relay does not know are passed on as they are."""

    class Meta:
        unknown = INCLUDE

    role = fields.String(required=True, validate=validate.OneOf(ROLES))
    content = MessageContent(allow_none=True)
    name = fields.String()
    tool_call_id = NonEmptyString()
    tool_calls = BoundedList(fields.Nested(ToolCall))

    @validates_schema
    def content_is_present(self, message: dict[str, Any], **kwargs: Any) -> None:
        if message.get("content") is None and not (
            message.get("role") == "assistant" and message.get("tool_calls")
        ):
            raise ValidationError("Missing data for required field.", "content")
        if message.get("role") == "tool" and not message.get("tool_call_id"):
            raise ValidationError("A tool message needs the id of its tool call.", "tool_call_id")


def messages_field() -> fields.List:
    return BoundedList(
        fields.Nested(Message), MAX_MESSAGES, required=True, validate=validate.Length(min=1)
    )


class ChatSettings(Schema):
    """chatbot-ui's ChatSettings: only model and temperature go upstream."""

    class Meta:
        unknown = EXCLUDE

    model = ModelName(required=True)
    temperature = Number(validate=validate.Range(min=0, max=2))
    prompt = fields.String(allow_none=True)
    contextLength = fields.Integer(allow_none=True)
    includeProfileContext = fields.Boolean(allow_none=True)
    includeWorkspaceInstructions = fields.Boolean(allow_none=True)
    embeddingsProvider = fields.String(allow_none=True)


class ChatbotRequest(Schema):
    """The body chatbot-ui posts to /api/chat/openrouter."""

    class Meta:
        unknown = EXCLUDE

    chatSettings = fields.Nested(ChatSettings, required=True)
    messages = messages_field()


class StrictBoolean(fields.Boolean):
    """A JSON true or false; marshmallow's Boolean would also take "yes" and 1."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class StrictInteger(fields.Integer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)


class Stop(fields.Field):
    """`stop`: one string, or a list of at most four."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and len(value) <= 4 and all(isinstance(v, str) for v in value):
            return value
        raise ValidationError("Must be a string or a list of at most 4 strings.")


class ToolChoice(fields.Field):
    """`tool_choice`: "none", "auto", "required", or {"type": "function", "function": {"name"}}."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if value in ("none", "auto", "required"):
            return value
        if isinstance(value, dict) and value.get("type") == "function":
            function = value.get("function")
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                return value
        raise ValidationError(
            'Must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.'
        )


class FunctionDefinition(Schema):
    class Meta:
        unknown = INCLUDE

    name = NonEmptyString(required=True)
    description = fields.String()
    parameters = fields.Dict()


class Tool(Schema):
    class Meta:
        unknown = INCLUDE

    type = fields.String(required=True, validate=validate.OneOf(("function",)))
    function = fields.Nested(FunctionDefinition, required=True)


class ResponseFormat(Schema):
    class Meta:
        unknown = INCLUDE

    type = fields.String(
        required=True, validate=validate.OneOf(("text", "json_object", "json_schema"))
    )
    json_schema = fields.Dict()


class Reasoning(Schema):
    class Meta:
        unknown = INCLUDE

    effort = fields.String(validate=validate.OneOf(("minimal", "low", "medium", "high")))
    max_tokens = StrictInteger(validate=validate.Range(min=0))
    exclude = StrictBoolean()
    enabled = StrictBoolean()


def _range(low: float, high: float, **inclusive: bool) -> validate.Range:
    return validate.Range(min=low, max=high, **inclusive)


class ChatCompletionRequest(Schema):
    """OpenAI's chat-completions body plus OpenRouter's additions; unknown fields pass unchanged."""

    class Meta:
        unknown = INCLUDE

    model = ModelName()
    models = BoundedList(ModelName(), validate=validate.Length(min=1))
    messages = messages_field()
    stream = StrictBoolean()
    stream_options = fields.Dict()
    temperature = Number(validate=_range(0, 2))
    top_p = Number(validate=_range(0, 1, min_inclusive=False))
    top_k = StrictInteger(validate=validate.Range(min=0))
    min_p = Number(validate=_range(0, 1))
    top_a = Number(validate=_range(0, 1))
    frequency_penalty = Number(validate=_range(-2, 2))
    presence_penalty = Number(validate=_range(-2, 2))
    repetition_penalty = Number(validate=_range(0, 2, min_inclusive=False))
    max_tokens = StrictInteger(validate=validate.Range(min=1))
    max_completion_tokens = StrictInteger(validate=validate.Range(min=1))
    seed = StrictInteger()
    stop = Stop()
    n = StrictInteger(validate=validate.Range(min=1))
    logit_bias = BoundedDict(keys=fields.String(), values=Number(validate=_range(-100, 100)))
    logprobs = StrictBoolean()
    top_logprobs = StrictInteger(validate=validate.Range(min=0, max=20))
    response_format = fields.Nested(ResponseFormat)
    tools = BoundedList(fields.Nested(Tool))
    tool_choice = ToolChoice()
    parallel_tool_calls = StrictBoolean()
    user = fields.String()
    provider = fields.Dict()
    transforms = BoundedList(fields.String())
    route = fields.String(validate=validate.OneOf(("fallback",)))
    reasoning = fields.Nested(Reasoning)
    usage = fields.Dict()
    plugins = BoundedList(fields.Dict())
    prediction = fields.Dict()

    @validates_schema
    def names_a_model(self, body: dict[str, Any], **kwargs: Any) -> None:
        if "model" not in body and "models" not in body:
            raise ValidationError("Give a model, or a list of models to try in order.", "model")


MAX_PROBLEMS_LISTED = 100


def load(schema: Schema, payload: dict[str, Any]) -> dict[str, Any]:
    """Validate `payload` against `schema`, raising BadRequest that names every bad field."""
    try:
        with body_budget():
            return _narrowed(schema, payload).load(payload)
    except ValidationError as error:
        problems: dict[str, list[str]] = {}
        for path, messages in _flatten(error.messages):
            problems.setdefault(path, []).extend(messages)
        path, messages = next(iter(problems.items()))
        more = len(problems) - 1
        sentence = f"Invalid request: {path}: {messages[0]}"
        if more:
            sentence += f" (and {more} more problem{'s' if more > 1 else ''})"
        if len(problems) > MAX_PROBLEMS_LISTED:  # the sentence counts them all
            problems = dict(list(problems.items())[:MAX_PROBLEMS_LISTED])
        raise BadRequest(sentence, problems) from None


_NARROWED_MAX = 128  # key sets remembered (about 15 KB each); a client sends one or a few
_narrowed_schemas: dict[tuple[Schema, frozenset[str]], Schema] = {}


def _narrowed(schema: Schema, payload: dict[str, Any]) -> Schema:
    """`schema` with only the fields `payload` has, and those it needs when absent.

    marshmallow runs every field of a schema on every load, present or not: for an OpenAI body
    naming 3 of ChatCompletionRequest's 33, that is half of its validation time. This copy loads
    the same result and refuses the same bodies, naming the same fields in the same order.
    """
    declared = schema.load_fields
    present = frozenset(key for key in payload if key in declared)
    if len(present) == len(declared):
        return schema
    narrowed = _narrowed_schemas.get((schema, present))
    if narrowed is None:
        if len(_narrowed_schemas) >= _NARROWED_MAX:
            return schema
        only = [
            name
            for name, field in declared.items()
            if name in present or field.required or field.load_default is not missing
        ]
        narrowed = type(schema)(only=only, unknown=schema.unknown)
        _narrowed_schemas[(schema, present)] = narrowed
    return narrowed


def _flatten(messages: Any, path: str = "") -> Any:
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key == "_schema":
                yield from _flatten(value, path)
            else:
                yield from _flatten(value, f"{path}.{key}" if path else str(key))
    elif isinstance(messages, list) and all(isinstance(item, str) for item in messages):
        yield path or "body", messages
    elif isinstance(messages, list):
        for item in messages:
            yield from _flatten(item, path)
    else:
        yield path or "body", [str(messages)]
