"""When a failed upstream call is worth another try, and how long to wait before it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from .errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout, UpstreamUnreachable

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """Up to `retries` more tries, with exponential backoff and jitter, honouring Retry-After.

    Only failures before OpenRouter's answer has begun are retried: a connection that could not
    be made, no headers within the read timeout, or one of RETRYABLE_STATUSES.
    """

    retries: int
    backoff: float
    retry_after_max: float

    def delay_before_retry(self, error: UpstreamError, attempt: int) -> float | None:
        """Seconds to wait before retry number `attempt + 1`, or None when it must not happen."""
        if attempt >= self.retries or not is_retryable(error):
            return None
        retry_after = seconds_to_wait(error.headers.get("Retry-After"))
        if retry_after is not None:
            return retry_after if retry_after <= self.retry_after_max else None
        return min(self.backoff * 2**attempt * random.uniform(0.5, 1.5), self.retry_after_max)


def is_retryable(error: UpstreamError) -> bool:
    if isinstance(error, UpstreamProtocolError):
        return False
    if isinstance(error, UpstreamUnreachable | UpstreamTimeout):
        return True
    return error.status in RETRYABLE_STATUSES


def seconds_to_wait(retry_after: str | None) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) as seconds from now."""
    if not retry_after:
        return None
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(retry_after)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
