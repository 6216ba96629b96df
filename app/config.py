"""Settings: read once from the environment, validated before the service starts."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import SplitResult, urlsplit


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


# A URL's user and password: from its "//" to its last "@" (a password may hold / ? # too).
_USERINFO = re.compile(r"(?<=//)[^\s,]*@")


def _without_userinfo(value: str) -> str:
    """`value` as it may be shown in an error: every URL in it without its user and password."""
    return _USERINFO.sub("", value)


def _text(raw: str) -> str:
    return raw.strip()


def openrouter_key(raw: str) -> str:
    """An OpenRouter key as it can be sent in an Authorization header; raises ValueError."""
    key = raw.strip()
    if not all("!" <= char <= "~" for char in key):
        raise ValueError("must be printable ASCII without spaces or control characters")
    return key


def _header_text(raw: str) -> str:
    # http.client sends header values in Latin-1 and refuses line breaks: anything else would
    # fail every upstream call, long after start-up.
    text = raw.strip()
    if not all(" " <= char <= "~" or "\xa0" <= char <= "\xff" for char in text):
        raise ValueError("must be printable Latin-1 text without control characters")
    return text


def _positive_number(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _whole_number(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    return parse


_positive_int = _whole_number(1)
_count = _whole_number(0)


def _port(raw: str) -> int:
    value = _positive_int(raw)
    if value > 65535:
        raise ValueError("must be a TCP port (1-65535)")
    return value


def _split(url: str) -> SplitResult:
    """`url`'s parts, its port read: what the clients would fail on at their first use."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("has a malformed host") from None
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError("has a malformed port") from None
    return parts


def _http_url(raw: str) -> str:
    url = raw.strip().rstrip("/")
    parts = _split(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return url


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


# The database's and Redis's URLs are read here as their clients will read them, without
# importing those (SQLAlchemy and redis-py would import ssl in the master, before gevent patches
# it).


def _with_scheme(raw: str, schemes: tuple[str, ...], kind: str) -> str:
    url = raw.strip()
    scheme, separator, _ = url.partition("://")
    if scheme not in schemes or not separator:
        raise ValueError(f"must be a {kind} URL")
    return url


def _database_url(raw: str) -> str:
    url = _with_scheme(
        raw,
        ("sqlite", "postgres", "postgresql", "postgresql+psycopg"),
        "sqlite:// or postgresql://",
    )
    # As SQLAlchemy does: the host after the last "@", the port up to a "/" or "?". (urlsplit
    # would refuse a password holding "/", "?" or "#", which SQLAlchemy takes.)
    host = re.split(r"[/?]", url.partition("://")[2].rpartition("@")[2], maxsplit=1)[0]
    if host.startswith("["):
        _, bracket, host = host[1:].partition("]")
        if not bracket:
            raise ValueError("has a malformed host")
    port = host.partition(":")[2]
    if port and not (port.isdigit() and int(port) <= 65535):
        raise ValueError("has a malformed port")
    return url


def _redis_url(raw: str) -> str:
    url = _with_scheme(raw, ("redis", "rediss"), "redis:// or rediss://")
    _split(url)  # as redis-py does
    return url


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(origin.strip().rstrip("/") for origin in raw.split(",") if origin.strip())
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc):
            raise ValueError(
                "must list origins like https://chat.example.com or *; "
                f"{_without_userinfo(origin)!r} is not one"
            )
    return origins


def _setting(env: str, parse: Callable[[str], Any], default: Any, *, secret: bool = False) -> Any:
    return field(
        default=default,
        repr=not secret,
        metadata={"env": env, "parse": parse},
    )


@dataclass(frozen=True)
class Settings:
    """Everything the relay can be configured with; one environment variable per field."""

    openrouter_api_key: str = _setting("OPENROUTER_API_KEY", openrouter_key, "", secret=True)
    openrouter_base_url: str = _setting(
        "OPENROUTER_BASE_URL", _http_url, "https://openrouter.ai/api/v1"
    )
    openrouter_app_url: str = _setting("OPENROUTER_APP_URL", _header_text, "")
    openrouter_app_title: str = _setting("OPENROUTER_APP_TITLE", _header_text, "")
    upstream_connect_timeout: float = _setting("UPSTREAM_CONNECT_TIMEOUT", _positive_number, 10.0)
    upstream_read_timeout: float = _setting("UPSTREAM_READ_TIMEOUT", _positive_number, 300.0)
    upstream_retries: int = _setting("UPSTREAM_RETRIES", _count, 2)
    upstream_retry_backoff: float = _setting("UPSTREAM_RETRY_BACKOFF", _positive_number, 0.5)
    retry_after_max: float = _setting("RETRY_AFTER_MAX", _positive_number, 10.0)
    max_request_bytes: int = _setting("MAX_REQUEST_BYTES", _positive_int, 20 * 1024 * 1024)
    heartbeat_interval: float = _setting("HEARTBEAT_INTERVAL", _positive_number, 15.0)
    models_cache_ttl: float = _setting("MODELS_CACHE_TTL", _positive_number, 300.0)
    database_url: str = _setting("DATABASE_URL", _database_url, "", secret=True)
    secret_key: str = _setting("SECRET_KEY", _text, "", secret=True)
    auth_mode: str = _setting("AUTH_MODE", _choice("profiles", "open"), "profiles")
    allow_client_keys: bool = _setting("ALLOW_CLIENT_KEYS", _flag, True)
    ledger_queue_max: int = _setting("LEDGER_QUEUE_MAX", _positive_int, 10_000)
    redis_url: str = _setting("REDIS_URL", _redis_url, "", secret=True)
    redis_tls_verify: bool = _setting("REDIS_TLS_VERIFY", _flag, False)
    default_rpm: int = _setting("DEFAULT_RPM", _count, 0)
    default_concurrency: int = _setting("DEFAULT_CONCURRENCY", _count, 0)
    limits_fail_open: bool = _setting("LIMITS_FAIL_OPEN", _flag, True)
    log_format: str = _setting("LOG_FORMAT", _choice("json", "text"), "json")
    metrics_token: str = _setting("METRICS_TOKEN", _text, "", secret=True)
    metrics_dir: str = _setting("PROMETHEUS_MULTIPROC_DIR", _text, "")
    cors_origins: tuple[str, ...] = _setting("CORS_ORIGINS", _origins, ())
    port: int = _setting("PORT", _port, 8000)
    web_concurrency: int = _setting("WEB_CONCURRENCY", _positive_int, 2)
    worker_connections: int = _setting("WORKER_CONNECTIONS", _positive_int, 1000)
    graceful_timeout: float = _setting("GRACEFUL_TIMEOUT", _positive_number, 20.0)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from `environ` (the process environment by default).

        Raises ConfigError naming the first variable whose value cannot be used.
        """
        environ = os.environ if environ is None else environ
        values = {}
        for spec in fields(cls):
            name = spec.metadata["env"]
            raw = environ.get(name)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[spec.name] = spec.metadata["parse"](raw)
            except ValueError as error:
                shown = "(hidden)" if not spec.repr else repr(_without_userinfo(raw))
                raise ConfigError(f"{name} {error}, got {shown}") from None
        return cls(**values)
