"""Profiles: who is calling, with which OpenRouter key and which models; their tokens."""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from .database import profiles
from .errors import StorageUnavailable

log = logging.getLogger("relay")

TOKEN_PREFIX = "orr_"
# The names the relay gives callers that are not profiles: a profile so named would share their
# usage, budget and limits.
OPEN_CALLER = "open"
OWN_KEY_CALLER_PREFIX = "byok:"
LONGEST_NAME: int = profiles.c.name.type.length
# While the database cannot be reached, a token it confirmed this recently is still honoured.
KNOWN_FOR = 3600.0
# After a failed lookup the database is left alone this long (a blackholed database would hold
# every request for its connect timeout).
RECHECK_AFTER = 5.0


class ProfileError(Exception):
    """A profile command cannot be carried out; the message says why."""


@dataclass(frozen=True)
class Profile:
    id: int
    name: str
    models: tuple[str, ...]
    rpm: int | None
    concurrency: int | None
    monthly_budget: float | None
    enabled: bool
    has_own_key: bool
    created_at: datetime

    def allows(self, model: str) -> bool:
        """Whether this profile may use `model` (no patterns: every model)."""
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A token of 256 random bits; it is shown once and only its hash is kept."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class KeyBox:
    """Encrypts profiles' OpenRouter keys with a key derived from SECRET_KEY.

    cryptography is loaded at the first key sealed or opened: a relay whose profiles hold no keys
    of their own never needs it, and it would cost every worker 6 MB.
    """

    def __init__(self, secret_key: str) -> None:
        self._secret_key = secret_key
        self._fernet: Any = None

    def _cipher(self) -> Any:
        if self._fernet is None and self._secret_key:
            from cryptography.fernet import Fernet
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.kdf.hkdf import HKDF

            derived = HKDF(
                algorithm=hashes.SHA256(), length=32, salt=None, info=b"openrouter-relay keys"
            ).derive(self._secret_key.encode())
            self._fernet = Fernet(base64.urlsafe_b64encode(derived))
        return self._fernet

    def seal(self, key: str) -> str:
        cipher = self._cipher()
        if cipher is None:
            raise ProfileError("SECRET_KEY must be set to store a profile's OpenRouter key")
        return cipher.encrypt(key.encode()).decode()

    def open(self, sealed: str) -> str | None:
        """The key, or None when SECRET_KEY is missing or not the one it was sealed with."""
        cipher = self._cipher()
        if cipher is None:
            return None
        from cryptography.fernet import InvalidToken

        try:
            return cipher.decrypt(sealed.encode()).decode()
        except InvalidToken:
            return None


class ProfileStore:
    """Profiles in the database: the CLI's commands and the per-request token check."""

    def __init__(self, engine: Engine, secret_key: str) -> None:
        self.engine = engine
        self.keys = KeyBox(secret_key)
        # token hash -> (when the database last confirmed it, what it answered)
        self._known: dict[str, tuple[float, tuple[Profile, str | None]]] = {}
        self._recheck_at = 0.0

    def create(
        self,
        name: str,
        *,
        openrouter_key: str | None = None,
        models: tuple[str, ...] = (),
        rpm: int | None = None,
        concurrency: int | None = None,
        monthly_budget: float | None = None,
    ) -> str:
        """Create a profile; returns its token (the only time it is ever shown)."""
        if len(name) > LONGEST_NAME:
            raise ProfileError(f"a profile name has at most {LONGEST_NAME} characters")
        if name == OPEN_CALLER or name.startswith(OWN_KEY_CALLER_PREFIX):
            raise ProfileError(
                f"'{OPEN_CALLER}' and names starting '{OWN_KEY_CALLER_PREFIX}' are the relay's own"
            )
        token = new_token()
        row = {
            "name": name,
            "token_hash": hash_token(token),
            "openrouter_key": self.keys.seal(openrouter_key) if openrouter_key else None,
            "models": json.dumps(list(models)),
            "rpm": rpm,
            "concurrency": concurrency,
            "monthly_budget": monthly_budget,
            "enabled": True,
            "created_at": datetime.now(UTC),
        }
        try:
            with self.engine.begin() as connection:
                connection.execute(profiles.insert().values(**row))
        except IntegrityError:
            raise ProfileError(f"a profile named {name!r} already exists") from None
        return token

    def all(self) -> list[Profile]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(profiles).order_by(profiles.c.name)).all()
        return [_profile(row) for row in rows]

    def rotate(self, name: str) -> str:
        """Give the profile a new token; the old one stops working at once."""
        token = new_token()
        self._update(name, token_hash=hash_token(token))
        return token

    def set_enabled(self, name: str, enabled: bool) -> None:
        self._update(name, enabled=enabled)

    def set_limits(self, name: str, **limits: float | None) -> None:
        """Change some of `rpm`, `concurrency` and `monthly_budget`; None removes that limit."""
        self._update(name, **limits)

    def delete(self, name: str) -> None:
        with self.engine.begin() as connection:
            if not connection.execute(delete(profiles).where(profiles.c.name == name)).rowcount:
                raise ProfileError(f"no profile named {name!r}")

    def authenticate(self, token: str) -> tuple[Profile, str | None] | None:
        """The enabled profile holding `token`, with its own OpenRouter key: None when it has
        none, or when the key cannot be decrypted (then `has_own_key` is still true).

        The database is asked every time, so a disabled or rotated token stops at once. While it
        cannot be reached, a token it confirmed within KNOWN_FOR is answered as it was then;
        any other raises StorageUnavailable.
        """
        wanted = hash_token(token)
        now = time.monotonic()
        if now >= self._recheck_at:
            try:
                found = self._look_up(wanted)
            except SQLAlchemyError as error:
                self._recheck_at = now + RECHECK_AFTER
                log.error(
                    "profile lookup failed (%s): honouring tokens seen in the last %d min, "
                    "asking again in %.0fs",
                    type(error).__name__,
                    KNOWN_FOR // 60,
                    RECHECK_AFTER,
                )
            else:
                if self._recheck_at:
                    self._recheck_at = 0.0
                    log.info("profile lookups work again")
                if found is None:
                    self._known.pop(wanted, None)
                else:
                    self._known[wanted] = (now, found)
                return found
        known = self._known.get(wanted)
        if known is None or now - known[0] > KNOWN_FOR:
            raise StorageUnavailable()
        return known[1]

    def _look_up(self, wanted: str) -> tuple[Profile, str | None] | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(profiles).where(profiles.c.token_hash == wanted)
            ).first()
        if row is None or not hmac.compare_digest(row.token_hash, wanted) or not row.enabled:
            return None
        key = self.keys.open(row.openrouter_key) if row.openrouter_key else None
        return _profile(row), key

    def _update(self, name: str, **values: object) -> None:
        with self.engine.begin() as connection:
            statement = update(profiles).where(profiles.c.name == name).values(**values)
            if not connection.execute(statement).rowcount:
                raise ProfileError(f"no profile named {name!r}")


def _profile(row) -> Profile:
    return Profile(
        id=row.id,
        name=row.name,
        models=tuple(json.loads(row.models or "[]")),
        rpm=row.rpm,
        concurrency=row.concurrency,
        monthly_budget=row.monthly_budget,
        enabled=row.enabled,
        has_own_key=row.openrouter_key is not None,
        created_at=row.created_at,
    )
