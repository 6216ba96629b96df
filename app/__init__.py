"""openrouter-relay: a small, honest streaming relay in front of OpenRouter.

Only the configuration is imported at module level: gunicorn.conf.py reads it in the master
process, which must not import requests or ssl before the gevent worker patches them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .config import Settings

if TYPE_CHECKING:
    from flask import Flask


def create_app(config: Mapping[str, str] | Settings | None = None) -> Flask:
    """Build the WSGI app; settings come from the environment unless `config` gives them.

    `config` may be a Settings, or a mapping of environment-variable names to values (tests).
    """
    from flask import Flask
    from flask_cors import CORS

    from . import chat, cli, health, metrics, openai_api, openapi, requestlog
    from .catalog import ModelCatalog
    from .database import engine_for
    from .errors import handle_errors_as, render_for_path
    from .ledger import Ledger
    from .profiles import ProfileStore
    from .quotas import Quotas
    from .upstream import OpenRouter

    settings = config if isinstance(config, Settings) else Settings.from_environ(config)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["relay.settings"] = settings
    engine = engine_for(settings.database_url, app.instance_path)
    app.extensions["relay.database"] = engine
    app.extensions["relay.profiles"] = ProfileStore(engine, settings.secret_key)
    ledger = app.extensions["relay.ledger"] = Ledger(engine, settings.ledger_queue_max)
    quotas = app.extensions["relay.quotas"] = Quotas(settings, engine, ledger.unwritten_cost)
    ledger.listeners.append(lambda row: quotas.spent(row["caller"], row["cost"]))
    openrouter = OpenRouter(settings)
    app.extensions["relay.openrouter"] = openrouter
    app.extensions["relay.models"] = ModelCatalog(
        # Refreshed within the request that found the list stale: the upstream call carries its id.
        lambda: openrouter.list_models(
            settings.openrouter_api_key or None, requestlog.current_request_id.get()
        ),
        settings.models_cache_ttl,
    )
    requestlog.configure_logging(settings.log_format)
    requestlog.install(app)
    if settings.cors_origins:
        CORS(
            app,
            origins=list(settings.cors_origins),
            # OpenAI's JavaScript SDK, in a browser, also sends its x-stainless-* headers.
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", r"x-stainless-[a-z-]+"],
            expose_headers=[
                "X-Request-ID",
                "X-Generation-Id",
                "Retry-After",
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
            max_age=600,
        )

    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(chat.bp)
    app.register_blueprint(openai_api.bp)
    app.register_blueprint(openapi.bp)
    cli.register(app)
    app.json.sort_keys = False
    handle_errors_as(app, render_for_path)
    return app
