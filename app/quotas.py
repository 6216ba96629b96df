"""Per-caller limits that hold across workers and dynos: requests per minute, concurrent streams,
and a monthly budget.

Requests per minute are counted by the `limits` library (a moving window, in-process or in Redis
when REDIS_URL is set). Concurrency slots and this month's spend are plain Redis keys with an
expiry, or in-process dictionaries. The usage ledger stays the source of truth for spend.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from limits import RateLimitItemPerMinute
from limits.errors import StorageError
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from redis.exceptions import RedisError
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from .config import Settings
from .database import usage
from .errors import BudgetExhausted, LimitsUnavailable, RateLimited
from .keys import Caller
from .metrics import LIMIT_REJECTIONS, LIMITS_FAILED_OPEN

log = logging.getLogger("relay")

SLOT_TTL = 60.0  # a slot held by a worker that died frees itself after this long
SPEND_REREAD = 10.0  # seconds an in-process spend figure is trusted before the ledger is re-read
SPEND_RESEED = 3600  # seconds before Redis's spend figure is reconciled with the ledger
SPEND_BACKOFF = 10.0  # seconds spend is not added in Redis after a failure (the ledger never waits)
_REDIS_TIMEOUT = 0.5
_STORE_FAILURES = (RedisError, StorageError, SQLAlchemyError, OSError)


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

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.failed_open = 0
        if settings.redis_url:
            import redis

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
        except _STORE_FAILURES as error:
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
        except _STORE_FAILURES as error:  # the ledger stays the source of truth
            log.warning(
                "could not add spend (%s): the figure will be read from the ledger again",
                type(error).__name__,
            )

    def _admit(self, caller: Caller) -> Admission:
        profile, name = caller.profile, caller.name
        if profile is not None and profile.monthly_budget is not None:
            spent = self._spend.total(name)
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


def _month() -> str:
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


_TAKE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return 1
end
return 0
"""


class RedisSlots:
    """Slots as members of a sorted set scored by their expiry time.

    One loop per worker renews every slot the worker holds, so a live stream keeps its slot for
    as long as it runs, and a slot whose worker died lapses after `ttl` seconds.
    """

    def __init__(self, client: Any, ttl: float = SLOT_TTL) -> None:
        self._client = client
        self._ttl = ttl
        self._take = client.register_script(_TAKE_SLOT)
        self._held: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    def acquire(self, name: str, limit: int) -> Callable[[], None] | None:
        """Take one of `limit` slots; returns the function that gives it back, or None."""
        key, slot = f"relay:slots:{name}", uuid.uuid4().hex
        now = time.time()
        if not self._take(
            keys=[key], args=[now, limit, now + self._ttl, slot, math.ceil(self._ttl * 2)]
        ):
            return None
        with self._lock:
            self._held.add((key, slot))
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew_forever, name="slot-renewal", daemon=True
                )
                self._renewer.start()

        def release() -> None:
            with self._lock:
                self._held.discard((key, slot))
            try:
                self._client.zrem(key, slot)
            except RedisError as error:  # it lapses on its own
                log.warning("could not release a concurrency slot (%s)", type(error).__name__)

        return release

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self._ttl / 3)
            with self._lock:
                held = list(self._held)
            if not held:
                continue
            expiry = time.time() + self._ttl
            pipeline = self._client.pipeline(transaction=False)
            for key, slot in held:
                pipeline.zadd(key, {slot: expiry}, xx=True)
            for key in {key for key, _ in held}:  # the set itself must outlive its live slots
                pipeline.expire(key, math.ceil(self._ttl * 2))
            try:
                pipeline.execute()
            except RedisError as error:
                log.warning(
                    "could not renew %d concurrency slots (%s)", len(held), type(error).__name__
                )


class LocalSpend:
    """This month's spend per caller in this process, re-read from the ledger every few seconds
    so that the other workers' spending is seen too."""

    def __init__(self, from_database: Callable[[str], float]) -> None:
        self._from_database = from_database
        self._known: dict[str, tuple[str, float, float]] = {}  # name -> (month, spent, read at)

    def total(self, name: str) -> float:
        month, now = _month(), time.monotonic()
        known = self._known.get(name)
        if known is None or known[0] != month or now - known[2] > SPEND_REREAD:
            known = self._known[name] = (month, self._from_database(name), now)
        return known[1]

    def add(self, name: str, cost: float) -> None:
        known = self._known.get(name)
        if known is not None and known[0] == _month():
            self._known[name] = (known[0], known[1] + cost, known[2])


_ADD_SPEND = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
end
return false
"""


class RedisSpend:
    """This month's spend per caller in Redis, seeded from the ledger when the key is missing and
    reconciled with it every SPEND_RESEED seconds (the key's expiry).

    Adds run on the ledger's writer, which must never wait on a Redis that hangs: after a failure
    they skip Redis for `backoff` seconds, and the figures they missed are deleted once Redis
    answers again, so that the ledger seeds them afresh.
    """

    def __init__(
        self, client: Any, from_database: Callable[[str], float], backoff: float = SPEND_BACKOFF
    ) -> None:
        self._client = client
        self._from_database = from_database
        self._add = client.register_script(_ADD_SPEND)
        self._backoff = backoff
        self._resume_at = 0.0
        self._stale: set[str] = set()
        self._lock = threading.Lock()

    def total(self, name: str) -> float:
        self._forget_stale()
        key = _spend_key(name)
        value = self._client.get(key)
        if value is None:
            self._client.set(key, self._from_database(name), nx=True, ex=SPEND_RESEED)
            value = self._client.get(key)
        return float(value or 0.0)

    def add(self, name: str, cost: float) -> None:
        """Add to a seeded figure only: a missing key is seeded from the ledger, which already
        holds this cost."""
        key = _spend_key(name)
        if time.monotonic() < self._resume_at:
            with self._lock:
                self._stale.add(key)
            return
        try:
            self._forget_stale()
            self._add(keys=[key], args=[cost])
        except _STORE_FAILURES:
            with self._lock:
                self._stale.add(key)
            self._resume_at = time.monotonic() + self._backoff
            raise

    def _forget_stale(self) -> None:
        if not self._stale or time.monotonic() < self._resume_at:
            return
        with self._lock:
            stale, self._stale = self._stale, set()
        try:
            self._client.delete(*stale)
        except BaseException:
            with self._lock:
                self._stale |= stale
            raise


def _spend_key(name: str) -> str:
    return f"relay:spend:{name}:{_month()}"
