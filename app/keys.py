"""Who is calling, and which OpenRouter key pays: its own, its profile's, or the server's."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from flask import Request

from .config import Settings
from .errors import Forbidden, KeyNotFound, ProfileKeyUnreadable, Unauthorized
from .profiles import OPEN_CALLER, OWN_KEY_CALLER_PREFIX, Profile, ProfileStore

log = logging.getLogger("relay")

OPENROUTER_KEY_PREFIX = "sk-or-"


@dataclass(frozen=True)
class Caller:
    """The party a request is made for: recorded in the ledger under `name`."""

    name: str
    key: str
    profile: Profile | None = None

    def check_models(self, models: list[str]) -> None:
        """Raise Forbidden naming the first model this caller's profile may not use."""
        if self.profile is None:
            return
        for model in models:
            if not self.profile.allows(model):
                raise Forbidden(
                    f"The model '{model}' is not allowed for profile '{self.profile.name}'",
                    param="model",
                )


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def resolve_caller(
    request: Request, settings: Settings, store: ProfileStore, *, paying: bool = True
) -> Caller:
    """The caller of this request and its key, in order of precedence: the caller's own
    OpenRouter key (bring your own key), its profile's key, the server's OPENROUTER_API_KEY.

    With `paying` false (a request that spends nothing upstream: the model list, the caller's
    usage) the caller must still be valid, but no key is needed.
    """
    token = bearer_token(request)
    if token and token.startswith(OPENROUTER_KEY_PREFIX) and settings.allow_client_keys:
        pseudonym = hashlib.sha256(token.encode()).hexdigest()[:16]
        return Caller(name=f"{OWN_KEY_CALLER_PREFIX}{pseudonym}", key=token)
    if settings.auth_mode == "open":
        return Caller(name=OPEN_CALLER, key=_server_key(settings) if paying else "")
    if not token:
        raise Unauthorized("Missing bearer token: send Authorization: Bearer <profile token>")
    found = store.authenticate(token)
    if found is None:
        raise Unauthorized("Invalid or disabled token")
    profile, own_key = found
    if not paying:
        return Caller(name=profile.name, key="", profile=profile)
    if profile.has_own_key and own_key is None:
        log.error(
            "the OpenRouter key stored for profile %r cannot be decrypted (SECRET_KEY changed "
            "or unset): refusing the request rather than paying with the server's key",
            profile.name,
        )
        raise ProfileKeyUnreadable(profile.name)
    return Caller(name=profile.name, key=own_key or _server_key(settings), profile=profile)


def _server_key(settings: Settings) -> str:
    if not settings.openrouter_api_key:
        raise KeyNotFound()
    return settings.openrouter_api_key
