"""Per-caller limits that hold across workers and dynos: requests per minute, concurrent streams,
and a monthly budget.

Requests per minute are counted by the `limits` library (a moving window, in-process or in Redis
when REDIS_URL is set). Concurrency slots and this month's spend are in-process dictionaries here,
or plain Redis keys with an expiry (app/shared_limits.py). The usage ledger stays the source of
truth for spend.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from limits import RateLimitItemPerMinute
from limits.errors import StorageError
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from .config import Settings
from .database import usage
from .errors import BudgetExhausted, LimitsUnavailable, RateLimited
from .keys import Caller
from .metrics import LIMIT_REJECTIONS, LIMITS_FAILED_OPEN

if TYPE_CHECKING:
    from .shared_limits import RedisSlots, RedisSpend

log = logging.getLogger("relay")

SPEND_REREAD = 10.0  # seconds an in-process spend figure is trusted before the ledger is re-read
_REDIS_TIMEOUT = 0.5
_LOCAL_FAILURES = (StorageError, SQLAlchemyError, OSError)


def _nothing() -> None:
    pass


class Admission:
    """A request let through: the rate-limit headers to send, and a slot to give back."""

    def __init__(self, headers: dict[str, str], release: Callable[[], None] = _nothing) -> None:
        self.headers = headers
        self._release = release
        self._released = False

    def release(self) -> None:
        """Give the concurrency slot back; safe to call more than once."""
        if not self._released:
            self._released = True
            self._release()

    @contextmanager
    def released_on_failure(self) -> Iterator[None]:
        """Give the slot back if the block raises (the stream never started)."""
        try:
            yield
        except BaseException:
            self.release()
            raise


class Quotas:
    """Admits or refuses a caller's request before anything goes upstream."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        unwritten_spend: Callable[[str], float] = lambda caller: 0.0,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self._unwritten_spend = unwritten_spend
        self.failed_open = 0
        # What it means that the limits' store cannot be used now.
        self.failures: tuple[type[BaseException], ...] = _LOCAL_FAILURES
        if settings.redis_url:
            import redis

            from .shared_limits import RedisSlots, RedisSpend

            options: dict[str, Any] = {
                "socket_timeout": _REDIS_TIMEOUT,
                "socket_connect_timeout": _REDIS_TIMEOUT,
            }
            if settings.redis_url.startswith("rediss:") and not settings.redis_tls_verify:
                # Heroku Redis serves TLS with a self-signed certificate (its documented setup).
                options["ssl_cert_reqs"] = None
            client = redis.Redis.from_url(settings.redis_url, **options)
            self._rates = MovingWindowRateLimiter(
                storage_from_string(settings.redis_url, **options)
            )
            self.ping = client.ping
            self.failures = (redis.RedisError, *_LOCAL_FAILURES)
            self._slots: LocalSlots | RedisSlots = RedisSlots(client)
            self._spend: LocalSpend | RedisSpend = RedisSpend(client, self._spent_in_database)
        else:
            self._rates = MovingWindowRateLimiter(storage_from_string("memory://"))
            self._slots = LocalSlots()
            self._spend = LocalSpend(self._spent_in_database)

    def admit(self, caller: Caller) -> Admission:
        """Let the request through (returning its Admission) or raise why not.

        When the store cannot be reached, LIMITS_FAIL_OPEN decides: serve without limits, or
        refuse with LimitsUnavailable (503).
        """
        try:
            return self._admit(caller)
        except (RateLimited, BudgetExhausted) as refusal:
            LIMIT_REJECTIONS.labels(refusal.reason).inc()
            raise
        except self.failures as error:
            if not self.settings.limits_fail_open:
                log.error("limits unavailable (%s): refusing", type(error).__name__)
                LIMIT_REJECTIONS.labels("unavailable").inc()
                raise LimitsUnavailable() from None
            self.failed_open += 1
            LIMITS_FAILED_OPEN.inc()
            log.warning("limits unavailable (%s): serving without them", type(error).__name__)
            return Admission({})

    def spent(self, caller: str, cost: float | None) -> None:
        """Add a ledger row's cost to the caller's spend this month (the ledger's listener)."""
        if not cost:
            return
        try:
            self._spend.add(caller, cost)
        except self.failures as error:  # the ledger stays the source of truth
            log.warning(
                "could not add spend (%s): the figure will be read from the ledger again",
                type(error).__name__,
            )

    def _admit(self, caller: Caller) -> Admission:
        profile, name = caller.profile, caller.name
        if profile is not None and profile.monthly_budget is not None:
            spent = self._spend.total(name) + self._unwritten_spend(name)
            if spent >= profile.monthly_budget:
                raise BudgetExhausted(
                    f"Profile '{name}' has spent its monthly budget "
                    f"(${spent:.2f} of ${profile.monthly_budget:.2f})"
                )
        rpm = (profile and profile.rpm) or self.settings.default_rpm
        concurrency = (profile and profile.concurrency) or self.settings.default_concurrency
        # The slot is taken before the request is counted, so that a request refused for either
        # limit uses up none of the other.
        release = self._slots.acquire(name, concurrency) if concurrency else _nothing
        if release is None:
            raise self._too_many_streams(name, concurrency, rpm)
        if not rpm:
            return Admission({}, release)
        try:
            return Admission(self._count_request(name, rpm), release)
        except BaseException:
            release()
            raise

    def _count_request(self, name: str, rpm: int) -> dict[str, str]:
        item = RateLimitItemPerMinute(rpm)
        allowed = self._rates.hit(item, "rpm", name)
        headers = self._rate_headers(name, rpm)
        if not allowed:
            raise _refusal(
                f"Rate limit reached for '{name}': {rpm} requests per minute",
                {**headers, "Retry-After": headers["x-ratelimit-reset-requests"][:-1]},
                "rpm",
            )
        return headers

    def _rate_headers(self, name: str, rpm: int) -> dict[str, str]:
        stats = self._rates.get_window_stats(RateLimitItemPerMinute(rpm), "rpm", name)
        reset = max(1, math.ceil(stats.reset_time - time.time()))
        return {
            "x-ratelimit-limit-requests": str(rpm),
            "x-ratelimit-remaining-requests": str(stats.remaining),
            "x-ratelimit-reset-requests": f"{reset}s",
        }

    def _too_many_streams(self, name: str, concurrency: int, rpm: int) -> RateLimited:
        """The refusal of a request over its concurrency limit: its headers describe the rate
        limit when there is one (uncounted), else the concurrency limit."""
        if not rpm:
            headers = {
                "x-ratelimit-limit-requests": str(concurrency),
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "1s",
            }
        else:
            headers = self._rate_headers(name, rpm)
        return _refusal(
            f"Too many concurrent streams for '{name}' (limit {concurrency})",
            {**headers, "Retry-After": "1"},
            "concurrency",
        )

    def _spent_in_database(self, caller: str) -> float:
        month_start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        query = select(func.coalesce(func.sum(usage.c.cost), 0.0)).where(
            usage.c.caller == caller, usage.c.at >= month_start
        )
        with self.engine.connect() as connection:
            return float(connection.execute(query).scalar() or 0.0)


def _refusal(message: str, headers: dict[str, str], reason: str) -> RateLimited:
    error = RateLimited(message)
    error.headers.update(headers)
    error.reason = reason
    return error


def this_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


class LocalSlots:
    """Concurrency slots counted in this process."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, name: str, limit: int) -> Callable[[], None] | None:
        """Take one of `limit` slots; returns the function that gives it back, or None."""
        with self._lock:
            if self._held.get(name, 0) >= limit:
                return None
            self._held[name] = self._held.get(name, 0) + 1

        def release() -> None:
            with self._lock:
                self._held[name] -= 1
                if not self._held[name]:
                    del self._held[name]

        return release


class LocalSpend:
    """This month's spend per caller in this process, re-read from the ledger every few seconds
    so that the other workers' spending is seen too."""

    def __init__(self, from_database: Callable[[str], float]) -> None:
        self._from_database = from_database
        self._known: dict[str, tuple[str, float, float]] = {}  # name -> (month, spent, read at)

    def total(self, name: str) -> float:
        month, now = this_month(), time.monotonic()
        known = self._known.get(name)
        if known is None or known[0] != month or now - known[2] > SPEND_REREAD:
            known = self._known[name] = (month, self._from_database(name), now)
        return known[1]

    def add(self, name: str, cost: float) -> None:
        known = self._known.get(name)
        if known is not None and known[0] == this_month():
            self._known[name] = (known[0], known[1] + cost, known[2])
