"""Profiles, tokens and keys: the CLI, 401/403 on both surfaces, key precedence, BYOK."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from app import create_app
from app.database import profiles
from tests.conftest import ROOT, SERVER_KEY

PROFILE_KEY = "sk-or-v1-profile-key-abcdef0123456789"
CLIENT_KEY = "sk-or-v1-client-own-key-9876543210"
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def app(profiles_env):
    return create_app(profiles_env)


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()

    def run(*args: str, env: dict | None = None) -> str:
        result = runner.invoke(args=list(args), env=env)
        assert result.exit_code == 0, result.output
        return result.output

    return run


def token_of(output: str) -> str:
    return output.strip().splitlines()[-1]


def chatbot(client, token=None, model="openai/gpt-4o-mini"):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"chatSettings": {"model": model}, "messages": MESSAGES}
    return client.post("/api/chat/openrouter", json=body, headers=headers)


def openai_call(client, token=None, **body):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"model": "openai/gpt-4o-mini", "messages": MESSAGES, **body}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_create_prints_the_token_alone_on_its_last_line(cli, app):
    token = token_of(cli("profiles", "create", "team-a", "--models", "openai/*", "--rpm", "60"))
    assert token.startswith("orr_") and len(token) > 40 and " " not in token
    with app.extensions["relay.database"].connect() as connection:
        row = connection.execute(select(profiles)).one()
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(tuple(row))


def test_list_never_shows_a_token_or_a_key(cli):
    token = token_of(
        cli(
            "profiles",
            "create",
            "team-a",
            "--openrouter-key-env",
            "TEAM_KEY",
            env={"TEAM_KEY": PROFILE_KEY},
        )
    )
    listing = cli("profiles", "list")
    assert "team-a" in listing and "own key: yes" in listing
    assert token not in listing and PROFILE_KEY not in listing


def test_a_profile_key_is_stored_encrypted(cli, app):
    cli(
        "profiles",
        "create",
        "team-a",
        "--openrouter-key-env",
        "TEAM_KEY",
        env={"TEAM_KEY": PROFILE_KEY},
    )
    with app.extensions["relay.database"].connect() as connection:
        stored = connection.execute(select(profiles.c.openrouter_key)).scalar()
    assert stored and PROFILE_KEY not in stored


def test_a_profile_key_is_refused_without_a_secret_key(profiles_env):
    app = create_app({**profiles_env, "SECRET_KEY": ""})
    result = app.test_cli_runner().invoke(
        args=["profiles", "create", "team-a", "--openrouter-key-env", "TEAM_KEY"],
        env={"TEAM_KEY": PROFILE_KEY},
    )
    assert result.exit_code != 0
    assert "SECRET_KEY must be set" in result.output


@pytest.mark.parametrize("bad", ["sk-or-v1-abc\ndef", "sk-or-v1-abc\x1bdef", "sk-or-v1-abc def"])
def test_a_profile_key_that_cannot_be_a_header_value_is_refused_unshown(app, cli, bad):
    result = app.test_cli_runner().invoke(
        args=["profiles", "create", "team-a", "--openrouter-key-env", "TEAM_KEY"],
        env={"TEAM_KEY": bad},
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: $TEAM_KEY must be printable ASCII")
    assert "abc" not in result.output and "def" not in result.output
    assert "team-a" not in cli("profiles", "list")


def test_a_profile_name_is_as_long_as_its_column_at_most(app, cli):
    longest = profiles.c.name.type.length
    cli("profiles", "create", "n" * longest)
    result = app.test_cli_runner().invoke(args=["profiles", "create", "n" * (longest + 1)])
    assert result.exit_code == 1
    assert result.output == f"Error: a profile name has at most {longest} characters\n"
    assert cli("profiles", "list").count("n" * longest) == 1


@pytest.mark.parametrize("name", ["open", "byok:72ce706e37b16123"])
def test_a_profile_cannot_take_a_name_the_relay_gives_its_other_callers(app, name):
    """It would share their usage, budget and limits."""
    result = app.test_cli_runner().invoke(args=["profiles", "create", name])
    assert result.exit_code == 1
    assert "the relay's own" in result.output


def test_a_database_failure_in_the_cli_is_one_line_naming_its_type(tmp_path: Path):
    """A database without the schema: SQLAlchemy's message would carry the statement and its
    parameters (the encrypted key, the token's hash)."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite3'}",
        "SECRET_KEY": "test-secret-key-for-profile-keys",
        "TEAM_KEY": PROFILE_KEY,
    }
    result = subprocess.run(
        [
            "flask",
            "--app",
            "wsgi",
            "profiles",
            "create",
            "team-a",
            "--openrouter-key-env",
            "TEAM_KEY",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "Error: the database failed the command (OperationalError)\n"


def test_requests_need_a_valid_enabled_token_on_both_surfaces(cli, app, fake):
    client = app.test_client()
    for token in (None, "orr_not-a-real-token"):
        response = chatbot(client, token)
        assert response.status_code == 401
        assert set(response.get_json()) == {"message"}
        response = openai_call(client, token)
        assert response.status_code == 401
        assert response.get_json()["error"]["type"] == "authentication_error"
    token = token_of(cli("profiles", "create", "team-a"))
    assert chatbot(client, token).status_code == 200
    cli("profiles", "disable", "team-a")
    assert chatbot(client, token).status_code == 401
    cli("profiles", "enable", "team-a")
    assert openai_call(client, token).status_code == 200
    assert len(fake.received) == 2


@pytest.mark.parametrize("body", [b"{}", b"not json", b"x" * (21 * 1024 * 1024)])
@pytest.mark.parametrize("path", ["/api/chat/openrouter", "/v1/chat/completions"])
def test_a_caller_is_checked_before_its_body(app, fake, path, body):
    """Without a valid token nothing about the body is read or answered: 401, not 400 or 413."""
    response = app.test_client().post(path, data=body, content_type="application/json")
    assert response.status_code == 401
    assert fake.received == []


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/openai/gpt-4o-mini"])
def test_the_model_list_needs_a_valid_caller_too(cli, app, fake, path):
    client = app.test_client()
    for headers in ({}, {"Authorization": "Bearer orr_not-a-real-token"}):
        response = client.get(path, headers=headers)
        assert response.status_code == 401
        assert response.get_json()["error"]["type"] == "authentication_error"
    assert fake.received == []
    token = token_of(cli("profiles", "create", "team-a"))
    for bearer in (token, CLIENT_KEY):
        response = client.get(path, headers={"Authorization": f"Bearer {bearer}"})
        assert response.status_code == 200


def test_rotate_kills_the_old_token_at_once(cli, app):
    client = app.test_client()
    old = token_of(cli("profiles", "create", "team-a"))
    assert chatbot(client, old).status_code == 200
    new = token_of(cli("profiles", "rotate", "team-a"))
    assert chatbot(client, old).status_code == 401
    assert chatbot(client, new).status_code == 200


def test_delete_removes_the_profile(cli, app):
    token = token_of(cli("profiles", "create", "team-a"))
    cli("profiles", "delete", "team-a")
    assert chatbot(app.test_client(), token).status_code == 401
    assert "team-a" not in cli("profiles", "list")


def test_key_precedence_own_key_then_profile_key_then_server_key(cli, app, fake):
    client = app.test_client()
    with_key = token_of(
        cli("profiles", "create", "payer", "--openrouter-key-env", "K", env={"K": PROFILE_KEY})
    )
    without_key = token_of(cli("profiles", "create", "free-rider"))
    chatbot(client, CLIENT_KEY).get_data()
    chatbot(client, with_key).get_data()
    chatbot(client, without_key).get_data()
    sent = [request.header("Authorization") for request in fake.received]
    assert sent == [f"Bearer {CLIENT_KEY}", f"Bearer {PROFILE_KEY}", f"Bearer {SERVER_KEY}"]


def test_a_stored_key_that_cannot_be_sent_refuses_the_request_unshown(app, fake, caplog):
    """A key stored before keys were checked (profiles create refuses it now)."""
    token = app.extensions["relay.profiles"].create("old", openrouter_key="sk-or-v1-old\nkey")
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="relay"):
        answers = [chatbot(client, token), openai_call(client, token)]
    assert [answer.status_code for answer in answers] == [500, 500]
    assert "operator must replace it" in answers[0].get_json()["message"]
    assert "operator must replace it" in answers[1].get_json()["error"]["message"]
    assert "sk-or-v1-old" not in caplog.text + "".join(a.get_data(as_text=True) for a in answers)
    assert fake.received == []


@pytest.mark.parametrize("secret_key", ["a-different-secret-key", ""])
def test_a_profile_key_that_cannot_be_decrypted_refuses_the_request(
    cli, profiles_env, fake, caplog, secret_key
):
    token = token_of(
        cli("profiles", "create", "payer", "--openrouter-key-env", "K", env={"K": PROFILE_KEY})
    )
    client = create_app({**profiles_env, "SECRET_KEY": secret_key}).test_client()
    with caplog.at_level(logging.ERROR, logger="relay"):
        chatbot_answer = chatbot(client, token)
        openai_answer = openai_call(client, token)
    assert chatbot_answer.status_code == openai_answer.status_code == 500
    assert "'payer'" in chatbot_answer.get_json()["message"]
    error = openai_answer.get_json()["error"]
    assert "'payer'" in error["message"] and error["type"] == "server_error"
    assert fake.received == []
    said = [r.getMessage() for r in caplog.records if "cannot be decrypted" in r.getMessage()]
    assert len(said) == 2 and all("'payer'" in line for line in said)
    everything = chatbot_answer.get_data(as_text=True) + openai_answer.get_data(as_text=True)
    secrets = (PROFILE_KEY, SERVER_KEY, token, secret_key, profiles_env["SECRET_KEY"])
    for secret in filter(None, secrets):
        assert secret not in everything + caplog.text
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/v1/usage", headers=headers).status_code == 200


def test_without_any_key_the_seed_message_comes_back(cli, profiles_env):
    app = create_app({**profiles_env, "OPENROUTER_API_KEY": ""})
    token = token_of(app.test_cli_runner().invoke(args=["profiles", "create", "t"]).output)
    response = chatbot(app.test_client(), token)
    assert response.status_code == 500
    assert response.get_json() == {
        "message": "OpenRouter API Key not found. Please set it in your profile settings."
    }


def test_client_keys_can_be_turned_off(profiles_env, fake):
    client = create_app({**profiles_env, "ALLOW_CLIENT_KEYS": "false"}).test_client()
    assert chatbot(client, CLIENT_KEY).status_code == 401
    assert fake.received == []


def test_a_model_outside_the_profile_patterns_is_a_403_naming_it(cli, app, fake):
    client = app.test_client()
    token = token_of(
        cli(
            "profiles",
            "create",
            "t",
            "--models",
            "openai/*",
            "--models",
            "anthropic/claude-3.5-sonnet",
        )
    )
    assert chatbot(client, token, model="openai/gpt-4o").status_code == 200
    assert openai_call(client, token, model="anthropic/claude-3.5-sonnet").status_code == 200
    response = chatbot(client, token, model="google/gemini-pro")
    assert response.status_code == 403
    assert "google/gemini-pro" in response.get_json()["message"]
    body = {"models": ["openai/gpt-4o", "meta/llama-3-70b"], "messages": MESSAGES}
    headers = {"Authorization": f"Bearer {token}"}
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 403, response.get_json()
    error = response.get_json()["error"]
    assert "meta/llama-3-70b" in error["message"] and error["param"] == "model"
    assert error["type"] == "permission_error"
    assert len(fake.received) == 2


@pytest.mark.parametrize(
    ("model", "models", "refused"),
    [
        ("meta/llama-3-70b", ["openai/gpt-4o"], "meta/llama-3-70b"),
        ("openai/gpt-4o", ["openai/gpt-4o-mini", "meta/llama-3-70b"], "meta/llama-3-70b"),
    ],
)
def test_with_model_and_models_every_model_named_is_checked(cli, app, fake, model, models, refused):
    token = token_of(cli("profiles", "create", "t", "--models", "openai/*"))
    body = {"model": model, "models": models, "messages": MESSAGES}
    response = app.test_client().post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 403
    assert refused in response.get_json()["error"]["message"]
    assert fake.received == []


def test_the_cli_end_to_end_through_flask_and_wsgi(tmp_path: Path):
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}",
    }

    def flask(*args: str) -> str:
        result = subprocess.run(
            ["flask", "--app", "wsgi", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "applied migration 1" in flask("db", "upgrade")
    token = token_of(flask("profiles", "create", "cli-team", "--models", "openai/*"))
    assert token.startswith("orr_")
    assert "cli-team" in flask("profiles", "list")
    assert token_of(flask("profiles", "rotate", "cli-team")) != token
    flask("profiles", "delete", "cli-team")
    assert flask("db", "version").strip() == "1"
