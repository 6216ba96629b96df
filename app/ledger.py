"""The usage ledger: one row per request that went upstream, written off the request's path.

Rows go into a bounded queue that one writer drains in batches. When the database is away the
writer keeps its batch and retries with back-off while the queue holds new rows; past the bound,
rows are dropped and counted, and the drop is logged. When the database refuses a batch for what
is in it, the writer writes its rows one at a time and drops (and logs) only those refused. No
message content is ever recorded.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from queue import Empty, Full, Queue
from typing import Any

from sqlalchemy import Column, Engine, Float, Integer, String

from .background import LazyThread
from .database import database_away, usage
from .errors import ClientDisconnected, UpstreamError
from .events import ChatStream
from .metrics import LEDGER_DEPTH, LEDGER_DROPPED

log = logging.getLogger("relay")

_BATCH = 500
# How long the writer waits for more rows once one is queued: one transaction per batch instead
# of one per request. A commit costs about as much CPU as relaying a whole short answer, and
# SQLite's commits run on the worker's event loop.
_LINGER = 0.25
_INTEGER_MAX = 2**31 - 1  # PostgreSQL's INTEGER, the narrowest of the databases
# Errors that say the database cannot be used now, rather than that a row cannot be written.


@dataclass
class UsageRow:
    """What the ledger keeps of one request (never its messages)."""

    caller: str
    surface: str
    model_requested: str | None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    model_served: str | None = None
    generation_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cost: float | None = None
    outcome: str = "completed"
    upstream_status: int | None = None
    ttft_ms: float | None = None
    duration_ms: float | None = None
    retries: int = 0
    started: float = field(default_factory=time.monotonic, repr=False)

    def take_usage(self, usage_report: dict[str, Any] | None) -> None:
        """OpenRouter's usage figures; a negative one is dropped (it would lower the month's
        spend, and metrics' counters refuse it)."""
        if not isinstance(usage_report, dict):
            return
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            count = usage_report.get(name)
            if isinstance(count, int) and count >= 0:
                setattr(self, name, _FITS[name](count))
        cost = usage_report.get("cost")
        if isinstance(cost, int | float) and cost >= 0:  # NaN is not
            self.cost = _FITS["cost"](cost)

    def take_stream(self, stream: ChatStream) -> None:
        self.generation_id = stream.generation_id
        self.model_served = stream.model_served
        self.take_usage(stream.usage)
        self.outcome = stream.outcome
        self.upstream_status = 200
        self.retries = stream.retries
        if stream.first_event_at is not None:
            self.ttft_ms = round((stream.first_event_at - self.started) * 1000, 1)

    def take_completion(self, completion: dict[str, Any], retries: int) -> None:
        self.generation_id = completion.get("id")
        self.model_served = completion.get("model")
        self.take_usage(completion.get("usage"))
        self.upstream_status = 200
        self.retries = retries

    def take_failure(self, error: UpstreamError | ClientDisconnected) -> None:
        self.outcome = error.outcome
        self.upstream_status = error.status
        self.retries = getattr(error, "retries", 0)

    def finish(self) -> dict[str, Any]:
        self.duration_ms = round((time.monotonic() - self.started) * 1000, 1)
        return {name: fit(getattr(self, name)) for name, fit in _FITS.items()}


def _fit_for(column: Column) -> Callable[[Any], Any]:
    """A function giving a value as `column` can hold it: text cut to the column's length (no
    NUL, no lone surrogate), integers held to INTEGER's range, numbers that are not finite
    dropped, a value of the wrong type dropped. What OpenRouter or a caller sent must not make
    the row unwritable."""
    kind = column.type
    if isinstance(kind, String):
        length = kind.length

        def fit_text(value: Any) -> str | None:
            if not isinstance(value, str):
                return None
            text = value.replace("\x00", "").encode("utf-8", "replace").decode()
            return text[:length] if length else text

        return fit_text
    if isinstance(kind, Integer):

        def fit_integer(value: Any) -> int | None:
            if not isinstance(value, int):
                return None
            return max(-_INTEGER_MAX - 1, min(_INTEGER_MAX, value))

        return fit_integer
    if isinstance(kind, Float):

        def fit_number(value: Any) -> float | None:
            if value is None:
                return None
            try:
                number = float(value)
            except (TypeError, ValueError, OverflowError):
                return None
            return number if math.isfinite(number) else None

        return fit_number
    return lambda value: value


_FITS = {
    spec.name: _fit_for(usage.c[spec.name]) for spec in fields(UsageRow) if spec.name != "started"
}


class Ledger:
    """Accepts rows without ever blocking the caller; one writer thread persists them."""

    def __init__(self, engine: Engine, max_queued: int) -> None:
        self.engine = engine
        self.max_queued = max_queued
        self.dropped = 0
        self.written = 0
        self._queue: Queue = Queue(maxsize=max_queued)
        self._writer = LazyThread(self._write_forever, "usage-ledger")
        self._counts = threading.Lock()
        self._pending = 0
        self._unwritten_cost: dict[str, float] = {}  # caller -> cost of its rows not yet written
        # Called with each row once it is written (the quotas add its cost to the spend).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def unwritten(self) -> int:
        """Rows recorded and not written yet: those queued and the batch the writer holds."""
        return self._pending

    def unwritten_cost(self, caller: str) -> float:
        """What `caller`'s rows queued in this process and not yet written cost: a budget counts
        it too, or requests made meanwhile would be let through over it."""
        return self._unwritten_cost.get(caller, 0.0)

    def record(self, row: UsageRow) -> None:
        """Queue the row; if the queue is full, drop it and say so."""
        try:
            with self._counts:
                finished = row.finish()
                self._queue.put_nowait(finished)
                self._pending += 1
                if finished["cost"]:
                    caller = finished["caller"]
                    self._unwritten_cost[caller] = (
                        self._unwritten_cost.get(caller, 0.0) + finished["cost"]
                    )
        except Full:
            with self._counts:
                self.dropped += 1
            LEDGER_DROPPED.inc()
            log.error(
                "usage ledger full (%d rows waiting): dropped a row for %s (%d dropped so far)",
                self.max_queued,
                row.caller,
                self.dropped,
            )
        LEDGER_DEPTH.set(self.depth)
        self._writer.ensure_started()

    @contextmanager
    def recording_failures(self, row: UsageRow) -> Iterator[None]:
        """Record `row` if the upstream call in this block fails before its answer begins, or
        is abandoned because the client left."""
        try:
            yield
        except (UpstreamError, ClientDisconnected) as error:
            row.take_failure(error)
            self.record(row)
            raise

    def follow(self, stream: ChatStream, row: UsageRow) -> None:
        """Record `row` with the stream's outcome, tokens and cost when the stream closes."""

        def record() -> None:
            row.take_stream(stream)
            self.record(row)

        stream.on_close(record)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued row is written and its listeners told; False if that took
        longer than `timeout`."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._pending

    def _write_forever(self) -> None:
        """The writer's loop: whatever a row or the database does, it goes on."""
        batch: list[dict[str, Any]] = []
        failures = 0
        while True:
            batch = batch or self._next_batch()
            if not batch:
                continue
            try:
                self._write(batch)
            except Exception as error:  # the database is away (or worse): the rows wait
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                log.warning(
                    "usage ledger cannot write %d rows (%s); retrying in %.1fs, %d more waiting",
                    len(batch),
                    type(error).__name__,
                    delay,
                    self.depth,
                )
                time.sleep(delay)
                continue
            if failures:
                log.info("usage ledger writing again after %d failed attempts", failures)
            failures = 0

    def _next_batch(self) -> list[dict[str, Any]]:
        """The rows queued by _LINGER after the first (at most _BATCH), or none for a second."""
        try:
            batch = [self._queue.get(timeout=1.0)]
        except Empty:
            return []
        time.sleep(_LINGER)  # meanwhile new rows wait in the queue, within its bound
        while len(batch) < _BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except Empty:
                break
        return batch

    def _write(self, batch: list[dict[str, Any]]) -> None:
        """Write the rows of `batch`, taking each out once written or dropped. Raises while the
        database is away, the rows not yet written left in `batch`."""
        try:
            self._insert(batch)
        except Exception as error:
            if database_away(error):
                raise
            self._write_one_by_one(batch)
            return
        rows = batch[:]
        batch.clear()
        self._written(rows)

    def _write_one_by_one(self, batch: list[dict[str, Any]]) -> None:
        """The database refused the batch for some row in it: write the rows one at a time,
        dropping those it refuses (logged by count and error, never by content)."""
        refused: dict[str, int] = {}
        total = len(batch)
        try:
            while batch:
                row = batch[0]
                try:
                    self._insert([row])
                except Exception as error:
                    if database_away(error):
                        raise
                    del batch[0]
                    refused[type(error).__name__] = refused.get(type(error).__name__, 0) + 1
                    self._drop([row])
                else:
                    del batch[0]
                    self._written([row])
        finally:
            if refused:
                log.error(
                    "usage ledger dropped %d of %d rows that the database refused (%s); "
                    "%d dropped so far",
                    sum(refused.values()),
                    total,
                    ", ".join(f"{count} {kind}" for kind, count in refused.items()),
                    self.dropped,
                )

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as connection:
            connection.execute(usage.insert(), rows)

    def _written(self, rows: list[dict[str, Any]]) -> None:
        """Count the rows written once the listeners and the gauge have them, so that a flush
        also waits for the spend figures: a restart seeding them from the database must not see
        a cost twice."""
        self._tell_listeners(rows)
        LEDGER_DEPTH.set(self.depth)
        with self._counts:
            self.written += len(rows)
            self._pending -= len(rows)
            self._settle(rows)

    def _drop(self, rows: list[dict[str, Any]]) -> None:
        LEDGER_DROPPED.inc(len(rows))
        with self._counts:
            self.dropped += len(rows)
            self._pending -= len(rows)
            self._settle(rows)

    def _settle(self, rows: list[dict[str, Any]]) -> None:
        """Take written or dropped rows' costs out of the unwritten ones (under `_counts`)."""
        for row in rows:
            if row["cost"]:
                left = self._unwritten_cost.get(row["caller"], 0.0) - row["cost"]
                if left > 1e-12:
                    self._unwritten_cost[row["caller"]] = left
                else:
                    self._unwritten_cost.pop(row["caller"], None)

    def _tell_listeners(self, batch: list[dict[str, Any]]) -> None:
        for row in batch:
            for listener in self.listeners:
                try:
                    listener(row)
                except Exception:  # a listener's bug must not stop the writer
                    log.exception("usage ledger listener failed")
