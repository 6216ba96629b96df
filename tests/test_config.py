import subprocess
import sys
from pathlib import Path

import pytest

from app import create_app
from app.config import ConfigError, Settings
from tests.conftest import ROOT, procfile_command


def refusal(name: str, value: str) -> str:
    """The message of the ConfigError that `value` for `name` raises."""
    with pytest.raises(ConfigError) as raised:
        Settings.from_environ({name: value})
    return str(raised.value)


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


HTTP_URL = "must be an http:// or https:// URL"
LATIN_1 = "must be printable Latin-1 text without control characters"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("UPSTREAM_READ_TIMEOUT", "abc", "must be a number of seconds, got 'abc'"),
        ("UPSTREAM_CONNECT_TIMEOUT", "-1", "must be a positive number of seconds, got '-1'"),
        ("MAX_REQUEST_BYTES", "1.5", "must be a whole number, got '1.5'"),
        ("UPSTREAM_RETRIES", "-1", "must be at least 0, got '-1'"),
        ("PORT", "70000", "must be a TCP port (1-65535), got '70000'"),
        ("OPENROUTER_BASE_URL", "openrouter.ai/v1", f"{HTTP_URL}, got 'openrouter.ai/v1'"),
        ("OPENROUTER_BASE_URL", "http://h:x/", "has a malformed port, got 'http://h:x/'"),
        # A URL is shown without its user and password; a secret's value not at all.
        ("OPENROUTER_BASE_URL", "ftp://u:S3CRET@h/v1", f"{HTTP_URL}, got 'ftp://h/v1'"),
        ("OPENROUTER_BASE_URL", "ftp://u:S3/CR#ET@h/v1", "has a malformed port, got 'ftp://h/v1'"),
        ("OPENROUTER_BASE_URL", "http://u:S3@CRET@h:x/", "has a malformed port, got 'http://h:x/'"),
        ("OPENROUTER_BASE_URL", "http://S3CRET@[::1/", "has a malformed host, got 'http://[::1/'"),
        ("OPENROUTER_APP_URL", "https://u:S3CRET@h/\a", f"{LATIN_1}, got 'https://h/\\x07'"),
        (
            "CORS_ORIGINS",
            "https://a,ftp://S3CRET@b",
            "must list origins like https://chat.example.com or *; 'ftp://b' is not one, "
            "got 'https://a,ftp://b'",
        ),
        ("DATABASE_URL", "postgresql://u:S3CRET@h:x/db", "has a malformed port, got (hidden)"),
        ("DATABASE_URL", "postgresql://u:S3CRET@h:70000/db", "has a malformed port, got (hidden)"),
        ("DATABASE_URL", "postgresql://u:S3CRET@[::1/db", "has a malformed host, got (hidden)"),
        (
            "DATABASE_URL",
            "postgresql:S3CRET",
            "must be a sqlite:// or postgresql:// URL, got (hidden)",
        ),
        ("REDIS_URL", "redis://:S3CRET@h:x/0", "has a malformed port, got (hidden)"),
        ("REDIS_URL", "rediss:S3CRET@h:6379", "must be a redis:// or rediss:// URL, got (hidden)"),
    ],
)
def test_a_bad_value_is_refused_in_one_line_naming_the_variable(name, value, message):
    assert refusal(name, value) == f"{name} {message}"


@pytest.mark.parametrize(
    "value",
    ["sk-or-v1-abc\ndef", "sk-or-v1-abc def", "sk-or-v1-abc\x00def", "sk-or-v1-abc\u00e9def"],
)
def test_a_key_that_cannot_be_a_header_value_is_refused_without_showing_it(value):
    message = refusal("OPENROUTER_API_KEY", value)
    assert message.startswith("OPENROUTER_API_KEY must be printable ASCII")
    assert "abc" not in message and "def" not in message


@pytest.mark.parametrize("name", ["OPENROUTER_APP_TITLE", "OPENROUTER_APP_URL"])
@pytest.mark.parametrize("value", ["Relay \U0001f916 App", "Relay\nX-Injected: 1", "Relay\x7fApp"])
def test_attribution_that_cannot_be_a_header_value_is_refused(name, value):
    assert refusal(name, value).startswith(f"{name} must be printable Latin-1 text")


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
        # SQLAlchemy takes a password holding / ? # (urlsplit would not find the port then).
        ("DATABASE_URL", "postgresql://u:pa/ss?#@db.example:5432/relay"),
        ("DATABASE_URL", "postgresql://u:p@[::1]:5432/relay"),
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
