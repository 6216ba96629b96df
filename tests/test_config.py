import subprocess
import sys
from pathlib import Path

import pytest

from app import create_app
from app.config import ConfigError, Settings
from tests.conftest import ROOT, procfile_command


def test_defaults_need_no_environment():
    settings = Settings.from_environ({})
    assert settings.openrouter_base_url == "https://openrouter.ai/api/v1"
    assert settings.upstream_connect_timeout == 10
    assert settings.upstream_read_timeout == 300
    assert settings.upstream_retries == 2
    assert settings.upstream_retry_backoff == 0.5
    assert settings.retry_after_max == 10
    assert settings.graceful_timeout == 20
    assert settings.max_request_bytes == 20 * 1024 * 1024
    assert settings.port == 8000


@pytest.mark.parametrize(
    ("name", "value", "complaint"),
    [
        ("UPSTREAM_READ_TIMEOUT", "abc", "must be a number of seconds"),
        ("UPSTREAM_CONNECT_TIMEOUT", "-1", "must be a positive number"),
        ("OPENROUTER_BASE_URL", "openrouter.ai/api/v1", "must be an http:// or https:// URL"),
        ("OPENROUTER_BASE_URL", "http://host:notaport/", "has a malformed port"),
        ("MAX_REQUEST_BYTES", "1.5", "must be a whole number"),
        ("UPSTREAM_RETRIES", "-1", "must be at least 0"),
        ("PORT", "70000", "must be a TCP port"),
        ("DATABASE_URL", "postgresql://u:DBPW@127.0.0.1:notaport/db", "has a malformed port"),
        ("DATABASE_URL", "postgresql://u:DBPW@127.0.0.1:70000/db", "has a malformed port"),
        ("DATABASE_URL", "postgresql:DBPW", "must be a sqlite:// or postgresql:// URL"),
        ("DATABASE_URL", "postgresql://u:DBPW@[::1/db", "has a malformed host"),
        ("REDIS_URL", "redis://:DBPW@127.0.0.1:notaport/0", "has a malformed port"),
        ("REDIS_URL", "rediss:DBPW@127.0.0.1:6379", "must be a redis:// or rediss:// URL"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(name, value, complaint):
    with pytest.raises(ConfigError) as raised:
        Settings.from_environ({name: value})
    shown = "(hidden)" if name in ("DATABASE_URL", "REDIS_URL") else repr(value)
    assert str(raised.value).startswith(f"{name} {complaint}")
    assert str(raised.value).endswith(f", got {shown}")


@pytest.mark.parametrize(
    "value",
    ["sk-or-v1-abc\ndef", "sk-or-v1-abc def", "sk-or-v1-abc\x00def", "sk-or-v1-abc\u00e9def"],
)
def test_a_key_that_cannot_be_a_header_value_is_refused_without_showing_it(value):
    with pytest.raises(ConfigError) as raised:
        Settings.from_environ({"OPENROUTER_API_KEY": value})
    message = str(raised.value)
    assert message.startswith("OPENROUTER_API_KEY must be printable ASCII")
    assert "abc" not in message and "def" not in message


@pytest.mark.parametrize("name", ["OPENROUTER_APP_TITLE", "OPENROUTER_APP_URL"])
@pytest.mark.parametrize("value", ["Relay \U0001f916 App", "Relay\nX-Injected: 1", "Relay\x7fApp"])
def test_attribution_that_cannot_be_a_header_value_is_refused(name, value):
    with pytest.raises(ConfigError) as raised:
        Settings.from_environ({name: value})
    assert str(raised.value).startswith(f"{name} must be printable Latin-1 text")


def test_attribution_in_latin_1_reaches_the_upstream(relay_env, fake):
    title, url = "Caf\u00e9 Relay \u00bd", "https://relay.example/caf\u00e9"
    app = create_app({**relay_env, "OPENROUTER_APP_TITLE": title, "OPENROUTER_APP_URL": url})
    body = {
        "chatSettings": {"model": "openai/gpt-4o-mini"},
        "messages": [{"role": "user", "content": "Hi"}],
    }
    response = app.test_client().post("/api/chat/openrouter", json=body)
    assert response.status_code == 200
    (received,) = fake.received
    assert received.header("X-Title") == title and received.header("HTTP-Referer") == url


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "sqlite:///relay.sqlite3"),
        ("DATABASE_URL", "postgres://u:p@db.example:5432/relay?sslmode=require"),
        ("DATABASE_URL", "postgresql:///relay"),
        ("REDIS_URL", "rediss://:p@[::1]:6380/0"),
    ],
)
def test_a_good_connection_url_is_kept_as_it_is(name, value):
    settings = Settings.from_environ({name: value})
    assert getattr(settings, name.lower()) == value


def test_the_key_is_neither_shown_in_errors_nor_in_the_settings_repr():
    settings = Settings.from_environ({"OPENROUTER_API_KEY": "sk-or-v1-very-secret"})
    assert settings.openrouter_api_key == "sk-or-v1-very-secret"
    assert "very-secret" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value", "complaint"),
    [
        ("UPSTREAM_READ_TIMEOUT", "soon", "must be a number of seconds, got 'soon'"),
        (
            "DATABASE_URL",
            "postgresql://u:DBPW@127.0.0.1:notaport/db",
            "has a malformed port, got (hidden)",
        ),
    ],
)
def test_gunicorn_refuses_to_start_on_a_bad_value_with_one_clear_line(name, value, complaint):
    result = subprocess.run(
        procfile_command(),
        cwd=ROOT,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", name: value},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines == [f"openrouter-relay: configuration error: {name} {complaint}"]
