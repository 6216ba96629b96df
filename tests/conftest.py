"""Fixtures: a real OpenRouter-speaking server on loopback, the app built against it, and a real
gunicorn gevent process started from the Procfile's command."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from app import create_app
from tests.fake_openrouter import FakeOpenRouter

ROOT = Path(__file__).resolve().parent.parent
SERVER_KEY = "sk-or-v1-server-key-0123456789abcdef"


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter() as server:
        yield server


@pytest.fixture
def fake(fake_server: FakeOpenRouter) -> FakeOpenRouter:
    fake_server.reset()
    return fake_server


def env_for(fake: FakeOpenRouter, database_url: str) -> dict[str, str]:
    return {
        "AUTH_MODE": "open",
        "DATABASE_URL": database_url,
        "OPENROUTER_API_KEY": SERVER_KEY,
        "OPENROUTER_BASE_URL": fake.base_url,
        "UPSTREAM_CONNECT_TIMEOUT": "2",
        "UPSTREAM_READ_TIMEOUT": "5",
        # Retries are off unless a test is about them: it keeps every other test's upstream view
        # to exactly the calls it made.
        "UPSTREAM_RETRIES": "0",
    }


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'relay.sqlite3'}"


def migrate(database_url: str) -> None:
    from app.database import engine_for
    from app.migrations import upgrade

    engine = engine_for(database_url, "")
    upgrade(engine)
    engine.dispose()


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """A migrated SQLite database of this test's own."""
    url = sqlite_url(tmp_path)
    migrate(url)
    return url


@pytest.fixture
def relay_env(fake: FakeOpenRouter, database_url: str) -> dict[str, str]:
    """The environment of a relay pointed at the fake upstream, with a server key, open mode."""
    return env_for(fake, database_url)


@pytest.fixture
def app(relay_env: dict[str, str]):
    return create_app(relay_env)


@pytest.fixture
def client(app):
    return app.test_client()


def run_python(script: str) -> str:
    """Run `script` in a process of its own and return what it printed; fail on its error.

    For what must not touch the tests' own process: gevent's patching is for good (the script
    patches first), the relay's logging is configured once.
    """
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def procfile_command(process: str = "web") -> list[str]:
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == process:
            return shlex.split(command)
    raise LookupError(f"no {process}: line in the Procfile")


class RelayProcess:
    """gunicorn running the Procfile's web command on a free port. Its stdout (the relay's own
    lines) goes to `log_path`; its stderr (gunicorn's log) and the release command's output go to
    `stderr_path`, as a platform keeps them apart."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.stderr_path = log_path.with_name(log_path.name + ".stderr")
        self._env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": os.environ.get("HOME", "/tmp"),
            "PORT": str(self.port),
            "WEB_CONCURRENCY": "1",
            **env,
        }
        self._outputs: list = []
        self.process: subprocess.Popen | None = None

    def release(self, output) -> None:
        """Run the Procfile's release command (the schema migrations), as a PaaS would."""
        subprocess.run(
            procfile_command("release"),
            cwd=ROOT,
            env=self._env,
            stdout=output,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=60,
        )

    def start(self) -> RelayProcess:
        # Closed in stop().
        stdout, stderr = open(self.log_path, "ab"), open(self.stderr_path, "ab")  # noqa: SIM115
        self._outputs = [stdout, stderr]
        self.release(stderr)
        self.process = subprocess.Popen(
            procfile_command(),
            cwd=ROOT,
            env=self._env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log()}")
            try:
                # The master accepts before its worker has imported the app: under load that
                # takes seconds, so a slow answer means "not yet", like a refused connection.
                if requests.get(self.url + "/healthz", timeout=5).ok:
                    return self
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not start: {self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for output in self._outputs:
            output.close()

    @property
    def database_url(self) -> str:
        return self._env["DATABASE_URL"]

    def stdout_lines(self) -> list[str]:
        """The web process's stdout so far, as whole lines (one still being written is left out)."""
        text = self.log_path.read_text(errors="replace")
        return text[: text.rfind("\n") + 1].splitlines()

    def log(self, since: tuple[int, int] = (0, 0)) -> str:
        """Everything the relay printed (the release's output, gunicorn's log, the relay's
        lines), or only what came after `since`, a `log_mark()`."""
        return (
            self.stderr_path.read_text(errors="replace")[since[0] :]
            + self.log_path.read_text(errors="replace")[since[1] :]
        )

    def log_mark(self) -> tuple[int, int]:
        """Where each of the relay's two outputs ends now, for `log(since=...)`."""
        return (
            len(self.stderr_path.read_text(errors="replace")),
            len(self.log_path.read_text(errors="replace")),
        )


@pytest.fixture
def start_relay(tmp_path: Path, relay_env: dict[str, str]) -> Iterator:
    """Start gunicorn as the Procfile says; extra variables override the defaults."""
    started: list[RelayProcess] = []

    def start(**overrides: str) -> RelayProcess:
        relay = RelayProcess({**relay_env, **overrides}, tmp_path / f"gunicorn-{len(started)}.log")
        started.append(relay)
        return relay.start()

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture
def relay(start_relay) -> RelayProcess:
    return start_relay()


@pytest.fixture(scope="module")
def module_relay(fake_server: FakeOpenRouter, tmp_path_factory) -> Iterator[RelayProcess]:
    """One gunicorn for a whole test module (tests that do not change its settings)."""
    folder = tmp_path_factory.mktemp("relay")
    relay = RelayProcess(env_for(fake_server, sqlite_url(folder)), folder / "gunicorn.log")
    yield relay.start()
    relay.stop()


def reset_postgres(url: str) -> None:
    """Drop the relay's tables so the next migration starts from an empty database."""
    from sqlalchemy import text

    from app.database import engine_for

    engine = engine_for(url, "")
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS profiles, usage, schema_version"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path: Path) -> str:
    """A migrated database on SQLite, and on PostgreSQL when DATABASE_URL names one."""
    if request.param == "sqlite":
        url = sqlite_url(tmp_path)
    else:
        url = os.environ.get("DATABASE_URL", "")
        if not url.startswith(("postgres://", "postgresql")):
            pytest.skip("DATABASE_URL does not name a PostgreSQL database")
        reset_postgres(url)
    migrate(url)
    return url


@pytest.fixture
def profiles_env(fake: FakeOpenRouter, storage_url: str) -> dict[str, str]:
    """A relay in profiles mode on the storage under test."""
    return {
        **env_for(fake, storage_url),
        "AUTH_MODE": "profiles",
        "SECRET_KEY": "test-secret-key-for-profile-keys",
    }


def own_redis_url() -> str | None:
    """A Redis database of the tests' own (number 15 of REDIS_URL's server, or TEST_REDIS_DB so that
    two checkouts can run their tests at once), emptied first; None without REDIS_URL."""
    url = os.environ.get("REDIS_URL", "")
    if not url.startswith(("redis://", "rediss://")):
        return None
    import redis

    number = os.environ.get("TEST_REDIS_DB", "15")
    own = (url.rsplit("/", 1)[0] if url.count("/") > 2 else url) + f"/{number}"
    redis.Redis.from_url(own).flushdb()
    return own


@pytest.fixture
def redis_url() -> str:
    """The tests' own Redis database (see own_redis_url), emptied first."""
    own = own_redis_url()
    if own is None:
        pytest.skip("REDIS_URL does not name a Redis server")
    return own
