"""How much of a request body validation reads before refusing it, and turns for other requests.

marshmallow reads every item of a list before a Length validator runs, and never lets the
worker's other requests run: a 4.5 MB body of empty messages held a worker for 51 s, until
gunicorn killed it. Here a list (or a mapping) is refused before its items are read when it is
longer than its own cap or would take the body past its budget, and a long validation takes turns
with the worker's other requests every few hundred items (under gevent `time.sleep(0)` yields).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from marshmallow import ValidationError, fields

MAX_MESSAGES = 10_000
MAX_ITEMS = 1_000  # in any other list or mapping: content parts, tools, tool calls, models, ...
MAX_BODY_ITEMS = 20_000  # in all the lists and mappings of one body, messages included
_ITEMS_PER_TURN = 256

# [items the body may still hold, items read since the worker's other requests last ran]
_budget: ContextVar[list[int] | None] = ContextVar("validation_budget", default=None)


@contextmanager
def body_budget() -> Iterator[None]:
    """Validation inside this block shares one budget of MAX_BODY_ITEMS items."""
    token = _budget.set([MAX_BODY_ITEMS, 0])
    try:
        yield
    finally:
        _budget.reset(token)


def take(items: list[Any] | dict[Any, Any], cap: int) -> Iterator[Any]:
    """The items of a list (a mapping's keys), once they are known to fit its cap and the body's
    budget; a ValidationError otherwise, before any is read."""
    count = len(items)
    if count > cap:
        raise ValidationError(f"Longer than maximum length {cap}.")
    budget = _budget.get()
    if budget is None:
        return iter(items)
    budget[0] -= count
    if budget[0] < 0:
        raise ValidationError(f"The body's lists hold more than {MAX_BODY_ITEMS} items in all.")
    budget[1] += count
    if budget[1] < _ITEMS_PER_TURN:
        return iter(items)
    budget[1] = 0
    time.sleep(0)
    return _in_turns(items) if count > _ITEMS_PER_TURN else iter(items)


def _in_turns(items: list[Any] | dict[Any, Any]) -> Iterator[Any]:
    for index, item in enumerate(items):
        if index and not index % _ITEMS_PER_TURN:
            time.sleep(0)
        yield item


class BoundedList(fields.List):
    """A list of at most `cap` items, read only if it fits (see `take`)."""

    def __init__(self, inner: fields.Field, cap: int = MAX_ITEMS, **kwargs: Any) -> None:
        super().__init__(inner, metadata={"maxItems": cap}, **kwargs)
        self.cap = cap

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, list):
            value = take(value, self.cap)
        return super()._deserialize(value, attr, data, **kwargs)


class BoundedDict(fields.Dict):
    """A mapping of at most `cap` entries, read only if it fits (see `take`)."""

    def __init__(self, cap: int = MAX_ITEMS, **kwargs: Any) -> None:
        super().__init__(metadata={"maxProperties": cap}, **kwargs)
        self.cap = cap

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, dict):
            take(value, self.cap)
        return super()._deserialize(value, attr, data, **kwargs)
