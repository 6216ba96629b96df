"""The relay deployed the way a PaaS deploys it: only app.json's variables, the Procfile's release
and web commands, a one-off command for the first profile; and the README's nginx block in front."""

from __future__ import annotations

import configparser
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

from app.config import Settings
from tests.conftest import (
    ROOT,
    SERVER_KEY,
    RelayProcess,
    free_port,
    own_redis_url,
    procfile_command,
)
from tests.fake_openrouter import FakeOpenRouter, Scenario

MANIFEST = json.loads((ROOT / "app.json").read_text())
DECLARED: dict[str, dict] = MANIFEST["env"]
SETTINGS_ENV = {spec.metadata["env"] for spec in fields(Settings)}
# Set by the platform (PORT), the add-ons (DATABASE_URL, REDIS_URL) and gunicorn.conf.py
# (PROMETHEUS_MULTIPROC_DIR), not by the operator.
PLATFORM_SET = {"PORT", "DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR"}
ENDPOINT = "/api/chat/openrouter"
# The address the README's nginx block proxies to; the tests put the relay's own there.
README_UPSTREAM = "127.0.0.1:8000"
# gunicorn keeps a worker alive through its whole graceful timeout for an idle kept-alive
# connection (a response object still referenced keeps its connection open): these tests' own
# requests close theirs, so that stopping the relay takes a second, not GRACEFUL_TIMEOUT.
ONE_REQUEST = {"Connection": "close"}


def chat_body(model: str) -> dict:
    return {
        "chatSettings": {"model": model, "temperature": 0.2},
        "messages": [{"role": "user", "content": "Hello"}],
    }


# app.json and the settings the app reads


def test_app_json_declares_only_variables_the_app_reads():
    assert set(DECLARED) - SETTINGS_ENV == set()


def test_every_setting_an_operator_can_set_is_declared_in_app_json():
    assert SETTINGS_ENV - PLATFORM_SET - set(DECLARED) == set()


def test_app_json_defaults_are_the_apps_own_defaults():
    for name, spec in DECLARED.items():
        if "value" in spec:
            assert Settings.from_environ({name: spec["value"]}) == Settings(), name


def test_app_json_is_a_manifest_the_platform_accepts():
    assert len(MANIFEST["name"]) <= 30
    assert len(MANIFEST["description"]) <= 140
    assert {"url": "heroku/python"} in MANIFEST["buildpacks"]
    assert "web" in MANIFEST["formation"]
    addons = {addon["plan"] if isinstance(addon, dict) else addon for addon in MANIFEST["addons"]}
    assert addons == {"heroku-postgresql", "heroku-redis"}
    for name, spec in DECLARED.items():
        assert spec["description"], name
        # A required variable (the default) needs a value or a generator: "" is refused.
        if spec.get("required", True):
            assert spec.get("value") or spec.get("generator"), name
        assert spec.get("value", None) != "", name
    assert DECLARED["SECRET_KEY"]["generator"] == "secret"
    assert DECLARED["METRICS_TOKEN"]["generator"] == "secret"
    assert procfile_command("web") and procfile_command("release")


def test_requirements_txt_installs_the_project_and_nothing_else():
    """The buildpack installs an app only from requirements.txt (or a lock file), no longer from
    setup.py alone; the dependencies are declared once, in setup.cfg, so the file names the
    project and nothing else."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert requirements == ["--editable ."]
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["name"] == "openrouter-relay"
    assert "Flask" in setup["options"]["install_requires"]
    # The buildpack refuses to build an app with two package managers' files.
    for lock in ("Pipfile", "Pipfile.lock", "poetry.lock", "uv.lock"):
        assert not (ROOT / lock).exists(), lock


def test_python_version_is_one_the_package_supports():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    minimum = setup["options"]["python_requires"].removeprefix(">=")
    pinned = (ROOT / ".python-version").read_text().strip()
    assert re.fullmatch(r"3\.\d+", pinned), "the buildpack takes a major.minor version"
    assert tuple(map(int, pinned.split("."))) >= tuple(map(int, minimum.split(".")))


# A deploy


@pytest.fixture(params=["sqlite", "postgresql"])
def addon_database_url(request, tmp_path: Path) -> Iterator[str]:
    """An empty database, as a fresh add-on gives it: an SQLite file, or a new PostgreSQL
    database on DATABASE_URL's server (named with Heroku's postgres:// scheme)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'relay.sqlite3'}"
        return
    server = os.environ.get("DATABASE_URL", "")
    if not server.startswith(("postgres://", "postgresql")):
        pytest.skip("DATABASE_URL does not name a PostgreSQL database")
    import psycopg

    parts = urlsplit(server)
    maintenance = urlunsplit(("postgresql", parts.netloc, "/postgres", "", ""))
    name = f"relay_deploy_{secrets.token_hex(4)}"
    with psycopg.connect(maintenance, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    yield urlunsplit(("postgres", parts.netloc, f"/{name}", "", ""))
    with psycopg.connect(maintenance, autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def app_json_environment(fake: FakeOpenRouter, database_url: str) -> dict[str, str]:
    """What a dyno gets: app.json's variables as the deploy form fills them in (defaults kept,
    secrets generated, the operator's key and base URL), and what the add-ons set."""
    env = {}
    for name, spec in DECLARED.items():
        if spec.get("generator") == "secret":
            env[name] = secrets.token_hex(32)  # what the platform's generator makes
        elif "value" in spec:
            env[name] = spec["value"]
    env["OPENROUTER_API_KEY"] = SERVER_KEY
    env["OPENROUTER_BASE_URL"] = fake.base_url
    env["DATABASE_URL"] = database_url
    redis_url = own_redis_url()
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def run_one_off(env: dict[str, str], command: list[str]) -> str:
    """Run a command the way `heroku run` does: the app's directory and environment."""
    platform = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    platform["HOME"] = os.environ.get("HOME", "/tmp")
    finished = subprocess.run(
        command,
        cwd=ROOT,
        env={**platform, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished.stdout


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], RelayProcess]]:
    """Release and start the web process as the Procfile says, with exactly this environment
    plus what the platform sets (RelayProcess adds PATH, HOME and PORT; its test default of
    WEB_CONCURRENCY=1 gives way to app.json's value)."""
    started: list[RelayProcess] = []

    def start(env: dict[str, str]) -> RelayProcess:
        relay = RelayProcess(env, tmp_path / f"dyno-{len(started)}.log")
        started.append(relay)
        return relay.start()

    yield start
    for relay in started:
        relay.stop()


def test_the_app_deploys_with_only_the_variables_app_json_declares(
    fake, addon_database_url, deploy
):
    env = app_json_environment(fake, addon_database_url)
    assert set(env) <= set(DECLARED) | PLATFORM_SET
    # app.json's WEB_CONCURRENCY, not RelayProcess's test default of 1, sizes the dyno.
    assert env["WEB_CONCURRENCY"] == DECLARED["WEB_CONCURRENCY"]["value"]

    relay = deploy(env)
    assert "schema at version" in relay.log()  # the release command migrated the empty database

    created = run_one_off(env, ["flask", "--app", "wsgi", "profiles", "create", "deploy-test"])
    token = created.strip().splitlines()[-1]
    assert token.startswith("orr_")

    anonymous = requests.post(
        relay.url + ENDPOINT, json=chat_body("m/deploy"), headers=ONE_REQUEST, timeout=10
    )
    assert anonymous.status_code == 401  # app.json's AUTH_MODE: a profile token is required
    with requests.post(
        relay.url + ENDPOINT,
        json=chat_body("m/deploy"),
        headers={**ONE_REQUEST, "Authorization": f"Bearer {token}"},
        stream=True,
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        text = b"".join(response.iter_content(chunk_size=None))
    assert text == b"Hello, world!"
    (upstream,) = fake.requests_for("m/deploy")
    # The fake marks the answer complete after writing its last bytes; the relay may have
    # relayed them all before that line runs.
    assert fake.wait_for(lambda: upstream.completed)
    assert upstream.header("Authorization") == f"Bearer {SERVER_KEY}"


# nginx in front, configured by the README


def readme_nginx_block() -> str:
    """The fenced nginx block of the README's "Run behind nginx" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Run behind nginx\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```nginx\n(.*?)```", section, flags=re.DOTALL)
    return block


def directive(block: str, name: str) -> str:
    (value,) = re.findall(rf"^\s*{name}\s+(.+?);", block, flags=re.MULTILINE)
    return value


def in_units(value: str, units: dict[str, int]) -> int:
    number, unit = re.fullmatch(r"(\d+)([a-z]?)", value.lower()).groups()
    return int(number) * units[unit]


def test_the_readme_nginx_block_outwaits_the_relay_and_takes_its_largest_body():
    block = readme_nginx_block()
    defaults = Settings()
    read_timeout = in_units(directive(block, "proxy_read_timeout"), {"": 1, "s": 1, "m": 60})
    assert read_timeout > defaults.upstream_read_timeout
    assert read_timeout > defaults.heartbeat_interval
    body_limit = in_units(directive(block, "client_max_body_size"), {"": 1, "k": 2**10, "m": 2**20})
    assert body_limit >= defaults.max_request_bytes
    assert directive(block, "proxy_http_version") == "1.1"
    assert directive(block, "proxy_buffering") == "off"
    assert directive(block, "gzip") == "off"
    assert block.count(README_UPSTREAM) == 1


def nginx_binary() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def nginx_conf(binary: str, prefix: Path, port: int, location: str) -> str:
    """A whole configuration around `location`, in a surrounding that would buffer and
    compress the stream if the block let it."""
    built_with = subprocess.run([binary, "-V"], capture_output=True, text=True).stderr
    # Every temporary directory nginx is built with must be writable, or it will not start.
    temp_paths = "\n".join(
        f"    {module}_temp_path {prefix / module};"
        for module in ("fastcgi", "uwsgi", "scgi")
        if f"--without-http_{module}_module" not in built_with
    )
    return f"""
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "nginx-error.log"} info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix / "client_body"};
    proxy_temp_path {prefix / "proxy"};
{temp_paths}
    # The relay's X-Accel-Buffering: no would switch buffering off by itself: ignored here, so
    # that the test shows the README's block does it. Compression is on for text, as a
    # site-wide configuration might have it.
    proxy_ignore_headers X-Accel-Buffering;
    gzip on;
    gzip_min_length 1;
    gzip_types text/plain text/event-stream;
    server {{
        listen 127.0.0.1:{port};
{location}
    }}
}}
"""


@pytest.fixture
def behind_nginx(tmp_path: Path) -> Iterator[Callable[[RelayProcess], str]]:
    """Start a real nginx in front of a relay with the README's block; returns nginx's URL."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed")
    processes: list[subprocess.Popen] = []

    def start(relay: RelayProcess) -> str:
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        port = free_port()
        location = readme_nginx_block().replace(README_UPSTREAM, f"127.0.0.1:{relay.port}")
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(binary, prefix, port, location))
        output = open(prefix / "nginx-output.log", "wb")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        output.close()
        processes.append(process)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError((prefix / "nginx-output.log").read_text())
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return f"http://127.0.0.1:{port}"
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not start: {(prefix / 'nginx-output.log').read_text()}")

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def test_a_slow_stream_arrives_token_by_token_through_the_readme_nginx_block(
    behind_nginx, relay, fake
):
    fake.script("m/slow", Scenario(tokens=["a", "b", "c"], interval=0.5))
    url = behind_nginx(relay)
    with requests.post(url + ENDPOINT, json=chat_body("m/slow"), stream=True, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert "Content-Encoding" not in r.headers
        pieces = r.iter_content(chunk_size=None)
        first = next(pieces)
        (upstream,) = fake.requests_for("m/slow")
        # The first token is through while the fake is still waiting to send the last one.
        assert first == b"a"
        assert upstream.tokens_sent < 3
        assert not upstream.completed
        rest = b"".join(pieces)
    assert first + rest == b"abc"


def test_a_stream_the_relay_cuts_off_stays_cut_off_through_the_readme_nginx_block(
    behind_nginx, relay, fake
):
    fake.script("m/dropped", Scenario(tokens=["Hel", "lo", " never"], drop_after=2))
    url = behind_nginx(relay)
    received = b""
    with (
        pytest.raises(requests.exceptions.ChunkedEncodingError),
        requests.post(url + ENDPOINT, json=chat_body("m/dropped"), stream=True, timeout=10) as r,
    ):
        assert r.status_code == 200
        for piece in r.iter_content(chunk_size=None):
            received += piece
    assert received == b"Hello"


def test_an_oversized_body_gets_the_relays_own_413_through_the_readme_nginx_block(
    behind_nginx, relay, fake
):
    url = behind_nginx(relay)
    limit = Settings().max_request_bytes
    body = chat_body("m/big")
    body["messages"][0]["content"] = "x" * limit
    response = requests.post(url + ENDPOINT, json=body, headers=ONE_REQUEST, timeout=30)
    assert response.status_code == 413
    assert f"{limit}-byte limit" in response.json()["message"]
    assert fake.requests_for("m/big") == []
