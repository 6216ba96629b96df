"""Limits' state in Redis, shared by every worker and dyno: concurrency slots and this month's
spend. Imported only when REDIS_URL is set (redis-py costs every worker 7 MB)."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from .quotas import this_month

log = logging.getLogger("relay")

SLOT_TTL = 60.0  # a slot held by a worker that died frees itself after this long
SPEND_RESEED = 3600  # seconds before Redis's spend figure is reconciled with the ledger
SPEND_BACKOFF = 10.0  # seconds spend is not added in Redis after a failure (the ledger never waits)

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
    as long as it runs, and a slot whose worker died lapses after `ttl` seconds. A slot that could
    not be given back (Redis away) is given back when Redis answers again: before this worker's
    next take, or by the loop.
    """

    def __init__(self, client: Any, ttl: float = SLOT_TTL) -> None:
        self._client = client
        self._ttl = ttl
        self._take = client.register_script(_TAKE_SLOT)
        self._held: set[tuple[str, str]] = set()
        self._unreleased: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    def acquire(self, name: str, limit: int) -> Callable[[], None] | None:
        """Take one of `limit` slots; returns the function that gives it back, or None."""
        key, slot = f"relay:slots:{name}", uuid.uuid4().hex
        if self._unreleased:
            self._release_unreleased()
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
            except RedisError as error:
                with self._lock:
                    self._unreleased.add((key, slot))
                log.warning(
                    "could not release a concurrency slot (%s): releasing it when Redis answers",
                    type(error).__name__,
                )

        return release

    def _release_unreleased(self) -> None:
        with self._lock:
            unreleased, self._unreleased = self._unreleased, set()
        pipeline = self._client.pipeline(transaction=False)
        for key, slot in unreleased:
            pipeline.zrem(key, slot)
        try:
            pipeline.execute()
        except RedisError:
            with self._lock:
                self._unreleased |= unreleased
            raise

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self._ttl / 3)
            if self._unreleased:
                with contextlib.suppress(RedisError):  # the next take or turn tries again
                    self._release_unreleased()
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
        except (RedisError, OSError):
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
    return f"relay:spend:{name}:{this_month()}"
