"""What the load generator is pointed at: the fake upstream itself, the relay's two surfaces, the
issue's yardstick (bench/plain_relay.py), a byte forwarder (bench/forwarder.py) and LiteLLM's
proxy, each started the way its users start it.

A `Surface` names one endpoint and how to ask it for a model; the same model name reaches the
fake upstream unchanged through each of them, so every surface gets the same upstream timing.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.processes import ROOT, Service, children, free_port

_MESSAGES = [{"role": "user", "content": "hi"}]
RELAY_KEY = "sk-or-v1-bench"


@dataclass(frozen=True)
class Surface:
    """One endpoint the load generator calls, and the kind of body it answers with."""

    name: str  # direct, relay-text, relay-sse, relay-json, litellm-sse, ...
    port: int
    path: str
    kind: str  # text | sse | json: how bench.loadgen reads the answer

    def body(self, model: str) -> dict[str, Any]:
        """The request body asking this surface for `model`."""
        if self.path == "/api/chat/openrouter":
            return {"chatSettings": {"model": model}, "messages": _MESSAGES}
        body: dict[str, Any] = {"model": model, "messages": _MESSAGES}
        if self.kind == "sse":
            body["stream"] = True
        return body


def direct(upstream_port: int, kind: str = "sse") -> Surface:
    """The fake upstream itself: the physical limit of every other surface."""
    return Surface(f"direct-{kind}", upstream_port, "/api/v1/chat/completions", kind)


def start_upstream(python: str, workdir: Path) -> tuple[Service, int]:
    """The fake OpenRouter in its own process."""
    port = free_port()
    command = [python, "-m", "bench.fake_upstream", "--port", str(port)]
    service = Service("fake upstream", command, dict(os.environ), workdir / "upstream.log")
    return service.start(port, "/healthz", timeout=20), port


class _Gunicorn:
    """A gunicorn server the benchmark starts and stops, maybe under a tool (`under`, such as
    valgrind, which prefixes its command), and its workers."""

    def __init__(
        self,
        name: str,
        gunicorn: list[str],
        env: dict[str, str],
        log: Path,
        under: list[str] | None,
    ) -> None:
        self.start_timeout = 60.0 if under is None else 300.0  # valgrind: several times slower
        self.service = Service(name, [*(under or []), *gunicorn], env, log)

    def __exit__(self, *exc: object) -> None:
        self.service.stop()

    @property
    def worker_pids(self) -> list[int]:
        """The gevent workers: the gunicorn master's children."""
        return children(self.service.pid)


class Relay(_Gunicorn):
    """The relay as the Procfile runs it (gunicorn, gevent workers), on the working tree's code."""

    def __init__(
        self,
        python: str,
        workdir: Path,
        upstream_port: int,
        *,
        under: list[str] | None = None,
        **settings: Any,
    ) -> None:
        """`under` prefixes gunicorn's command (a tool it runs under, such as valgrind);
        `settings` are environment variables (lower case allowed)."""
        self.port = free_port()
        bin_dir = Path(python).parent
        self.workdir = workdir
        database = workdir / f"relay-{self.port}.sqlite3"
        self.env = {
            **os.environ,
            "AUTH_MODE": "open",
            "OPENROUTER_API_KEY": RELAY_KEY,
            "OPENROUTER_BASE_URL": f"http://127.0.0.1:{upstream_port}/api/v1",
            "DATABASE_URL": f"sqlite:///{database}",
            "UPSTREAM_RETRIES": "0",
            "GRACEFUL_TIMEOUT": "5",
            "PORT": str(self.port),
            "WEB_CONCURRENCY": "1",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.env.update({name.upper(): str(value) for name, value in settings.items()})
        self.workers = int(self.env["WEB_CONCURRENCY"])
        self.flask = str(bin_dir / "flask")
        gunicorn = [str(bin_dir / "gunicorn"), "--config", "gunicorn.conf.py", "wsgi:app"]
        super().__init__("relay", gunicorn, self.env, workdir / f"relay-{self.port}.log", under)

    def __enter__(self) -> Relay:
        migrate = [self.flask, "--app", "wsgi", "db", "upgrade"]
        done = subprocess.run(migrate, cwd=ROOT, env=self.env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"flask db upgrade failed: {done.stderr[-2000:]}")
        self.service.start(self.port, "/healthz", self.start_timeout)
        for _ in range(100):
            if len(children(self.service.pid)) >= self.workers:
                break
            time.sleep(0.1)
        return self

    @property
    def master(self) -> int:
        return self.service.pid

    def text(self) -> Surface:
        return Surface("relay-text", self.port, "/api/chat/openrouter", "text")

    def sse(self) -> Surface:
        return Surface("relay-sse", self.port, "/v1/chat/completions", "sse")

    def json(self) -> Surface:
        return Surface("relay-json", self.port, "/v1/chat/completions", "json")


class PlainRelay(_Gunicorn):
    """bench/plain_relay.py, the issue's yardstick, as gunicorn runs it: one gevent worker."""

    def __init__(
        self, python: str, workdir: Path, upstream_port: int, *, under: list[str] | None = None
    ) -> None:
        self.port = free_port()
        env = {**os.environ, "PLAIN_UPSTREAM": f"http://127.0.0.1:{upstream_port}/api/v1"}
        gunicorn = [str(Path(python).parent / "gunicorn"), "--worker-class", "gevent"]
        gunicorn += ["--workers", "1", "--bind", f"127.0.0.1:{self.port}", "bench.plain_relay:app"]
        super().__init__("plain relay", gunicorn, env, workdir / f"plain-{self.port}.log", under)

    def __enter__(self) -> PlainRelay:
        self.service.start(self.port, "/healthz", self.start_timeout)
        return self

    def sse(self) -> Surface:
        return Surface("plain-sse", self.port, "/v1/chat/completions", "sse")


class Forwarder:
    """bench/forwarder.py in front of the upstream: the floor under every relay here."""

    def __init__(self, python: str, workdir: Path, upstream_port: int) -> None:
        self.port = free_port()
        command = [python, "-m", "bench.forwarder", "--port", str(self.port)]
        command += ["--upstream-port", str(upstream_port)]
        log = workdir / f"forwarder-{self.port}.log"
        self.service = Service("forwarder", command, dict(os.environ), log)

    def __enter__(self) -> Forwarder:
        self.service.start(self.port, "/healthz", timeout=20)
        return self

    def __exit__(self, *exc: object) -> None:
        self.service.stop()

    @property
    def worker_pids(self) -> list[int]:
        return [self.service.pid]

    def sse(self) -> Surface:
        return Surface("forward-sse", self.port, "/api/v1/chat/completions", "sse")


LITELLM_PYTHON = ROOT / "bench" / ".venv-litellm" / "bin" / "python"


class LiteLLM:
    """LiteLLM's proxy (one worker, no database) in front of the same fake upstream."""

    def __init__(self, workdir: Path, upstream_port: int, models: list[str]) -> None:
        self.port = free_port()
        config = workdir / "litellm.yaml"
        entries = [
            f'  - model_name: "{model}"\n'
            f"    litellm_params:\n"
            f'      model: "openai/{model}"\n'
            f'      api_base: "http://127.0.0.1:{upstream_port}/api/v1"\n'
            f'      api_key: "sk-x"\n'
            for model in models
        ]
        config.write_text(
            "model_list:\n" + "".join(entries) + "litellm_settings:\n  telemetry: false\n"
        )
        env = {
            **os.environ,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOG": "ERROR",
            "DISABLE_SCHEMA_UPDATE": "True",
            # No auth, like the relay in AUTH_MODE=open: neither pays for a key check.
            "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
        }
        env.pop("DATABASE_URL", None)
        litellm = str(LITELLM_PYTHON.parent / "litellm")
        command = [litellm, "--config", str(config), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--num_workers", "1"]
        self.service = Service("litellm", command, env, workdir / f"litellm-{self.port}.log")

    def start(self) -> LiteLLM:
        """Start the proxy; it takes some seconds to import (raises RuntimeError if it fails)."""
        self.service.start(self.port, "/health/liveliness", timeout=180)
        return self

    def stop(self) -> None:
        self.service.stop()

    @property
    def pid(self) -> int:
        return self.service.pid

    def sse(self) -> Surface:
        return Surface("litellm-sse", self.port, "/v1/chat/completions", "sse")

    def json(self) -> Surface:
        return Surface("litellm-json", self.port, "/v1/chat/completions", "json")


def litellm_installed() -> bool:
    """Whether bench/run managed to install LiteLLM's proxy."""
    return LITELLM_PYTHON.exists() and (LITELLM_PYTHON.parent / "litellm").exists()
