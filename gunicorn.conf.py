"""gunicorn settings for openrouter-relay: gevent workers, sized and bound from the environment.

The settings are validated here, in the master, so that a bad value stops the service with one
clear line before any worker starts. Nothing here imports ssl or requests: the gevent worker
monkey-patches the standard library before the app (and so requests) is imported.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

from app.config import ConfigError, Settings

try:
    _settings = Settings.from_environ()
except ConfigError as error:
    sys.exit(f"openrouter-relay: configuration error: {error}")

# prometheus_client's multiprocess mode: every worker writes its samples to files in this
# directory and /metrics adds them up. The variable must be set before a worker imports
# prometheus_client, and the directory must start empty (old files would resurrect old counts).
_own_metrics_dir = not _settings.metrics_dir
_metrics_dir = Path(_settings.metrics_dir or tempfile.mkdtemp(prefix="relay-metrics-"))
_metrics_dir.mkdir(parents=True, exist_ok=True)
for _stale in _metrics_dir.glob("*.db"):
    _stale.unlink()
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)

# gunicorn's gevent worker, its own refusals (unparsable requests) answered in JSON: app/worker.py
worker_class = "app.worker.RelayWorker"
bind = f"0.0.0.0:{_settings.port}"
workers = _settings.web_concurrency
worker_connections = _settings.worker_connections
# On SIGTERM, in-flight streams get GRACEFUL_TIMEOUT to finish (each worker's own setting, see
# post_worker_init). A worker cuts those still running up to 3 s after it (it looks once a second,
# then gives them 1 s), then writes its queued usage rows for up to 3 s (worker_exit); only then
# may the master kill it. Heroku sends SIGKILL 30 s after SIGTERM: the default 20 + 6 fits.
_CUT_OFF_DELAY = 3
_FLUSH_TIME = 3
_EXIT_MARGIN = _CUT_OFF_DELAY + _FLUSH_TIME
graceful_timeout = round(_settings.graceful_timeout) + _EXIT_MARGIN
# Streams are long-lived; a gevent worker keeps heartbeating while they run, so this only
# catches a worker whose event loop is stuck.
timeout = 30
# Above the 55 s idle window of Heroku-style routers, so the router, not us, closes idle sockets.
keepalive = 75
# The app writes one line per request itself (app/requestlog.py), when the response is closed.
accesslog = None
errorlog = "-"
# The control socket (gunicornc) is not used; one fixed path per user would clash between instances.
control_socket_disable = True


def post_worker_init(worker):
    worker.cfg.set("graceful_timeout", round(_settings.graceful_timeout))


def worker_exit(server, worker):
    """Write the usage rows still queued before the worker goes (a deploy's SIGTERM)."""
    ledger = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get("relay.ledger")
    if ledger is not None and not ledger.flush(timeout=_FLUSH_TIME):
        server.log.error("usage ledger: %d rows not written at worker exit", ledger.unwritten)


def child_exit(server, worker):
    """Drop a dead worker's live gauges (open streams, ledger depth), as prometheus_client's
    mark_process_dead does; that module is not imported here, it imports ssl."""
    for live in _metrics_dir.glob(f"gauge_live*_{worker.pid}.db"):
        live.unlink(missing_ok=True)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
