"""Prometheus metrics, correct across gunicorn workers, and GET /metrics.

Under gunicorn each worker writes its samples to files in PROMETHEUS_MULTIPROC_DIR (set up by
gunicorn.conf.py) and /metrics adds up every worker's files; without that directory (the Flask
test client, `flask run`) the process's own registry is served. Everything is counted per request
or per failure, never per chunk. Labels carry profile names and the model OpenRouter served,
never the model a caller asked for (that is free text a caller could flood the series with).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from flask import Blueprint, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import REGISTRY as PROCESS_REGISTRY

from .errors import (
    RelayError,
    Unauthorized,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .keys import bearer_token

if TYPE_CHECKING:
    from .events import ChatStream

REQUESTS = Counter(
    "relay_requests_total", "Requests answered, by surface, status and model served.",
    ["surface", "status", "model"],
)  # fmt: skip
TIME_TO_FIRST_TOKEN = Histogram(
    "relay_time_to_first_token_seconds", "From the request to OpenRouter's first event.",
    ["surface"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
)  # fmt: skip
STREAM_DURATION = Histogram(
    "relay_stream_duration_seconds", "From the request to the end of the answer, by outcome.",
    ["surface", "outcome"], buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640),
)  # fmt: skip
OPEN_STREAMS = Gauge(
    "relay_open_streams", "Streams open to OpenRouter now.", ["surface"],
    multiprocess_mode="livesum",
)  # fmt: skip
UPSTREAM_ERRORS = Counter(
    "relay_upstream_errors_total",
    "OpenRouter failures by kind (unreachable, timeout, protocol, error_event, status_NNN) "
    "and stage (before_stream, mid_stream).",
    ["kind", "stage"],
)
UPSTREAM_RETRIES = Counter("relay_upstream_retries_total", "Upstream calls tried again.")
TOKENS = Counter(
    "relay_tokens_total", "Tokens by profile, model served and kind (prompt, completion).",
    ["profile", "model", "kind"],
)  # fmt: skip
COST = Counter("relay_cost_usd_total", "OpenRouter's cost in USD.", ["profile", "model"])
LEDGER_DEPTH = Gauge(
    "relay_ledger_queue_depth", "Usage rows waiting to be written.", multiprocess_mode="livesum"
)
LEDGER_DROPPED = Counter("relay_ledger_dropped_total", "Usage rows dropped: the queue was full.")
LIMIT_REJECTIONS = Counter(
    "relay_limit_rejections_total",
    "Requests refused by a limit (rpm, concurrency, budget, unavailable).",
    ["reason"],
)
LIMITS_FAILED_OPEN = Counter(
    "relay_limits_failed_open_total", "Requests served unchecked: the limit store was away."
)

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    settings = current_app.extensions["relay.settings"]
    if settings.metrics_token and not hmac.compare_digest(
        (bearer_token(request) or "").encode(), settings.metrics_token.encode()
    ):
        raise Unauthorized("Send Authorization: Bearer <METRICS_TOKEN>")
    return Response(
        generate_latest(_registry(settings.metrics_dir)), content_type=CONTENT_TYPE_LATEST
    )


def _registry(metrics_dir: str) -> CollectorRegistry:
    if not metrics_dir:
        return PROCESS_REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    return registry


def count_open_stream(stream: ChatStream, surface: str) -> None:
    """Count the stream as open until it closes."""
    gauge = OPEN_STREAMS.labels(surface)
    gauge.inc()
    stream.on_close(gauge.dec)


def count_upstream_error(error: RelayError, stage: str) -> None:
    UPSTREAM_ERRORS.labels(_kind_of(error), stage).inc()


def _kind_of(error: RelayError) -> str:
    if isinstance(error, UpstreamUnreachable):
        return "unreachable"
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamProtocolError):
        return "protocol"
    if isinstance(error, UpstreamError) and error.reported_in_stream:
        return "error_event"
    return f"status_{error.status}"
