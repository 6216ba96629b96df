"""The usage ledger: exactly one correct row per request that went upstream, whatever happened."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import urlsplit

import pytest
import requests
from sqlalchemy import create_engine, select

from app import create_app
from app.database import usage
from app.ledger import UsageRow
from tests.conftest import env_for, migrate, reset_postgres, sqlite_url
from tests.fake_openrouter import Scenario
from tests.tcp_proxy import TcpProxy

SECRET_WORDS = "my deepest secret"
MESSAGES = [{"role": "user", "content": SECRET_WORDS}]


@pytest.fixture
def app(profiles_env):
    return create_app(profiles_env)


@pytest.fixture
def token(app) -> str:
    output = app.test_cli_runner().invoke(args=["profiles", "create", "team-a"]).output
    return output.strip().splitlines()[-1]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def rows(app) -> list[dict]:
    assert app.extensions["relay.ledger"].flush(10)
    with app.extensions["relay.database"].connect() as connection:
        return [dict(row._mapping) for row in connection.execute(select(usage))]


def test_a_completed_stream_on_each_surface_leaves_one_complete_row(app, token, fake):
    fake.script("openai/gpt-4o-mini", Scenario(tokens=["a", "b", "c"]))
    client = app.test_client()
    body = {"chatSettings": {"model": "openai/gpt-4o-mini"}, "messages": MESSAGES}
    client.post("/api/chat/openrouter", json=body, headers=auth(token)).get_data()
    body = {"model": "openai/gpt-4o-mini", "messages": MESSAGES}
    client.post(
        "/v1/chat/completions", json={**body, "stream": True}, headers=auth(token)
    ).get_data()
    client.post("/v1/chat/completions", json=body, headers=auth(token)).get_data()
    recorded = rows(app)
    assert [row["surface"] for row in recorded] == ["chatbot", "openai", "openai"]
    generation_ids = [request.generation_id for request in fake.received]
    for row, generation_id in zip(recorded, generation_ids, strict=True):
        assert row["caller"] == "team-a"
        assert row["outcome"] == "completed"
        assert row["model_requested"] == row["model_served"] == "openai/gpt-4o-mini"
        assert row["generation_id"] == generation_id
        assert row["completion_tokens"] == 3
        assert row["total_tokens"] == row["prompt_tokens"] + 3
        assert row["cost"] == pytest.approx(row["total_tokens"] * 0.00001)
        assert row["upstream_status"] == 200
        assert row["retries"] == 0
        assert row["duration_ms"] > 0
    assert recorded[0]["ttft_ms"] > 0 and recorded[1]["ttft_ms"] > 0
    assert SECRET_WORDS not in json.dumps(recorded, default=str)


def test_an_aborted_stream_leaves_one_client_aborted_row(app, token, fake):
    fake.script("m/long", Scenario(tokens=["w "] * 500, interval=0.01))
    body = {"model": "m/long", "messages": MESSAGES, "stream": True}
    response = app.test_client().post(
        "/v1/chat/completions", json=body, headers=auth(token), buffered=False
    )
    pieces = iter(response.response)
    next(pieces)
    next(pieces)
    response.close()
    (row,) = rows(app)
    assert row["outcome"] == "client_aborted"
    assert row["upstream_status"] == 200


@pytest.mark.parametrize(
    ("scenario", "outcome", "status"),
    [
        (Scenario(tokens=["a", "b"], error_after=1), "upstream_error", 200),
        (Scenario(status=503, error_message="No provider"), "upstream_error", 503),
        (Scenario(tokens=["a", "b"], stall_after=1), "timeout", 200),
        (Scenario(headers_delay=3), "timeout", 504),
    ],
    ids=["mid-stream-error", "status-503", "stall", "no-headers"],
)
def test_a_failed_stream_leaves_one_row_saying_how(profiles_env, fake, scenario, outcome, status):
    app = create_app({**profiles_env, "UPSTREAM_READ_TIMEOUT": "0.5"})
    runner = app.test_cli_runner()
    token = runner.invoke(args=["profiles", "create", "t"]).output.strip().splitlines()[-1]
    fake.script("m/bad", scenario)
    body = {"chatSettings": {"model": "m/bad"}, "messages": MESSAGES}
    response = app.test_client().post("/api/chat/openrouter", json=body, headers=auth(token))
    with contextlib.suppress(ConnectionResetError):  # a cut-off text stream
        response.get_data()
    (row,) = rows(app)
    assert (row["outcome"], row["upstream_status"]) == (outcome, status)


def test_refused_requests_never_went_upstream_and_leave_no_row(app, token, fake):
    client = app.test_client()
    client.post("/v1/chat/completions", json={"messages": MESSAGES, "model": "x"})
    client.post("/v1/chat/completions", json={"messages": []}, headers=auth(token))
    assert fake.received == []
    assert rows(app) == []


def test_the_usage_report_and_endpoint_total_by_profile_model_and_outcome(app, token, fake):
    client = app.test_client()
    fake.script("m/fail", Scenario(status=502))
    for model in ("openai/gpt-4o-mini", "openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet"):
        body = {"model": model, "messages": MESSAGES}
        client.post("/v1/chat/completions", json=body, headers=auth(token))
    client.post(
        "/v1/chat/completions", json={"model": "m/fail", "messages": MESSAGES}, headers=auth(token)
    )
    rows(app)
    report = app.test_cli_runner().invoke(args=["usage", "report", "--profile", "team-a"]).output
    lines = [line.split() for line in report.strip().splitlines()[1:]]
    assert [(line[0], line[1], line[2]) for line in lines] == [
        ("team-a", "anthropic/claude-3.5-sonnet", "1"),
        ("team-a", "m/fail", "1"),
        ("team-a", "openai/gpt-4o-mini", "2"),
    ]
    summary = client.get("/v1/usage?since=2020-01-01", headers=auth(token)).get_json()
    assert summary["requests"] == 4
    assert summary["by_model"]["openai/gpt-4o-mini"]["requests"] == 2
    assert summary["by_outcome"] == {
        "completed": {**summary["by_outcome"]["completed"], "requests": 3},
        "upstream_error": {**summary["by_outcome"]["upstream_error"], "requests": 1},
    }
    assert summary["completion_tokens"] == 12
    assert client.get("/v1/usage?since=yesterday", headers=auth(token)).status_code == 400
    assert client.get("/v1/usage").status_code == 401


def row_for_completion(app, token, fake, completion: dict) -> dict:
    """The ledger row of a request OpenRouter answered with `completion`, sent as it is."""
    fake.script(
        "m/as-sent",
        Scenario(raw_body=json.dumps(completion).encode(), raw_content_type="application/json"),
    )
    body = {"model": "m/as-sent", "messages": MESSAGES}
    response = app.test_client().post("/v1/chat/completions", json=body, headers=auth(token))
    assert response.status_code == 200
    (row,) = rows(app)
    return row


def test_values_the_columns_cannot_hold_are_fitted_and_the_row_written(app, token, fake):
    odd_completion = {
        "id": {"not": "a string"},
        "model": "m/" + "y" * 300,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 2**70, "completion_tokens": 3, "cost": 10**400},
    }
    row = row_for_completion(app, token, fake, odd_completion)
    assert row["model_served"] == odd_completion["model"][:200]
    assert row["prompt_tokens"] == 2**31 - 1
    assert row["completion_tokens"] == 3
    assert row["cost"] is None and row["generation_id"] is None


def test_usage_that_cannot_be_true_is_dropped_not_subtracted_from_the_spend(app, token, fake):
    impossible = {"prompt_tokens": -5, "completion_tokens": 3, "total_tokens": -2, "cost": -0.5}
    completion = {
        "id": "gen-impossible",
        "model": "m/negative",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": impossible,
    }
    row = row_for_completion(app, token, fake, completion)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (None, 3)
    assert (row["total_tokens"], row["cost"]) == (None, None)


def test_usage_totals_while_the_database_is_away_are_a_503_not_a_500(relay_env, tmp_path):
    missing = f"sqlite:///{tmp_path / 'missing' / 'relay.sqlite3'}"
    client = create_app({**relay_env, "DATABASE_URL": missing}).test_client()
    response = client.get("/v1/usage")
    assert response.status_code == 503
    assert "usage ledger" in response.get_json()["error"]["message"]


def test_a_row_the_database_refuses_is_dropped_alone_and_the_writer_goes_on(app, caplog):
    ledger = app.extensions["relay.ledger"]

    def row(**fields) -> UsageRow:
        return UsageRow(
            **{"caller": "team-a", "surface": "openai", "model_requested": "m/ok", **fields}
        )

    with caplog.at_level(logging.WARNING, logger="relay"):
        ledger.record(row())
        ledger.record(row(caller=None, model_requested="m/secret-1"))  # NOT NULL
        ledger.record(row(at="not a time", model_requested="m/secret-2"))
        ledger.record(row())
        assert ledger.flush(10)
        ledger.record(row())
        recorded = rows(app)
    assert [r["model_requested"] for r in recorded] == ["m/ok"] * 3
    assert (ledger.written, ledger.dropped, ledger.unwritten) == (3, 2, 0)
    assert "database refused" in caplog.text
    assert "secret" not in caplog.text


@pytest.mark.parametrize("offset_hours", [5, -5])
def test_since_with_an_offset_means_that_instant(app, token, fake, offset_hours):
    client = app.test_client()
    body = {"model": "openai/gpt-4o-mini", "messages": MESSAGES}
    assert client.post("/v1/chat/completions", json=body, headers=auth(token)).status_code == 200
    assert app.extensions["relay.ledger"].flush(10)
    two_hours_ago = {
        "at": datetime.now(UTC) - timedelta(hours=2),
        "caller": "team-a",
        "surface": "openai",
        "model_requested": "m/old",
        "outcome": "completed",
    }
    with app.extensions["relay.database"].begin() as connection:
        connection.execute(usage.insert(), [two_hours_ago])
    zone = timezone(timedelta(hours=offset_hours))
    since = (datetime.now(UTC) - timedelta(minutes=30)).astimezone(zone).isoformat()
    summary = client.get("/v1/usage", query_string={"since": since}, headers=auth(token))
    assert list(summary.get_json()["by_model"]) == ["openai/gpt-4o-mini"]
    result = app.test_cli_runner().invoke(args=["usage", "report", "--since", since])
    assert result.exit_code == 0, result.output
    assert [line.split()[1] for line in result.output.splitlines()[1:]] == ["openai/gpt-4o-mini"]


def test_an_unreachable_database_never_fails_a_chat_and_drops_are_bounded(
    relay_env, fake, caplog, tmp_path
):
    env = {
        **relay_env,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'missing' / 'dir' / 'relay.sqlite3'}",
        "LEDGER_QUEUE_MAX": "3",
    }
    app = create_app(env)
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="relay"):
        for _ in range(20):
            body = {"model": "m/ok", "messages": MESSAGES}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    ledger = app.extensions["relay.ledger"]
    # What is held is bounded: the queue (3) and the writer's batch (its first row and the
    # queue drained behind it); every other row was dropped and counted.
    assert ledger.depth <= 3
    assert ledger.unwritten <= 3 + 1 + 3
    assert ledger.written == 0 and ledger.dropped == 20 - ledger.unwritten
    assert "usage ledger full" in caplog.text
    # The database comes back: the writer's next try succeeds, instead of retrying (and logging)
    # for the rest of the test run, into later tests' captured logs.
    migrate(sqlite_url(tmp_path))
    ledger.engine = create_engine(sqlite_url(tmp_path))


def test_worker_exit_counts_every_row_not_written(start_relay, database_url, fake):
    relay = start_relay()
    operator = create_engine(database_url)
    with operator.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE usage RENAME TO usage_away")
    operator.dispose()
    body = {"model": "m/ok", "messages": MESSAGES}
    # Connection: close, or the idle keep-alive connections would hold the worker up at SIGTERM.
    headers = {"Connection": "close"}
    for _ in range(3):
        response = requests.post(
            relay.url + "/v1/chat/completions", json=body, headers=headers, timeout=10
        )
        assert response.status_code == 200
    relay.stop()
    # The writer holds some of the rows in its batch, the queue the others.
    assert "usage ledger: 3 rows not written at worker exit" in relay.log()


@dataclass
class Outage:
    """A migrated database, and how to take it away from the relay and bring it back."""

    url: str
    down: Callable[[], None]
    up: Callable[[], None]


@pytest.fixture(params=["sqlite", "postgresql"])
def outage(request, tmp_path) -> Iterator[Outage]:
    """PostgreSQL behind a TCP proxy that refuses and cuts connections while down. SQLite is a
    file that cannot go away, so while it is "down" its tables are renamed: every query fails."""
    if request.param == "sqlite":
        url = sqlite_url(tmp_path)
        migrate(url)
        operator = create_engine(url)

        def rename(suffix: str, new_suffix: str) -> None:
            with operator.begin() as connection:
                for table in ("profiles", "usage"):
                    connection.exec_driver_sql(
                        f"ALTER TABLE {table}{suffix} RENAME TO {table}{new_suffix}"
                    )

        yield Outage(url, lambda: rename("", "_away"), lambda: rename("_away", ""))
        operator.dispose()
        return
    if not os.environ.get("DATABASE_URL", "").startswith(("postgres", "postgresql")):
        pytest.skip("DATABASE_URL does not name a PostgreSQL database")
    real = urlsplit(os.environ["DATABASE_URL"])
    proxy = TcpProxy((real.hostname or "127.0.0.1", real.port or 5432)).up()
    url = proxy.in_front_of(os.environ["DATABASE_URL"])
    reset_postgres(url)
    migrate(url)
    try:
        yield Outage(url, proxy.down, proxy.up)
    finally:
        proxy.down()


@pytest.mark.parametrize("auth_mode", ["open", "profiles"])
def test_the_database_going_away_mid_run_fails_no_chat_and_loses_no_row(fake, outage, auth_mode):
    app = create_app({**env_for(fake, outage.url), "AUTH_MODE": auth_mode})
    client = app.test_client()
    headers, unseen = {}, {}
    if auth_mode == "profiles":
        runner = app.test_cli_runner()
        headers = auth(runner.invoke(args=["profiles", "create", "a"]).output.split()[-1])
        unseen = auth(runner.invoke(args=["profiles", "create", "b"]).output.split()[-1])
    body = {"model": "m/ok", "messages": MESSAGES}

    def chat() -> None:
        assert client.post("/v1/chat/completions", json=body, headers=headers).status_code == 200

    chat()
    assert app.extensions["relay.ledger"].flush(10)
    outage.down()
    for _ in range(5):
        chat()
    if auth_mode == "profiles":
        # A token this worker never saw cannot be checked while the database is away.
        response = client.post("/v1/chat/completions", json=body, headers=unseen)
        assert response.status_code == 503
        assert len(fake.received) == 6
    assert not app.extensions["relay.ledger"].flush(1.5)
    outage.up()
    chat()
    assert app.extensions["relay.ledger"].flush(60)
    assert len(rows(app)) == 7
    assert app.extensions["relay.ledger"].dropped == 0


def test_a_flush_waits_for_the_listeners_of_the_rows_it_waited_for(app):
    ledger = app.extensions["relay.ledger"]
    heard: list[str] = []

    def slow_listener(row: dict) -> None:
        time.sleep(0.3)
        heard.append(row["model_requested"])

    ledger.listeners.append(slow_listener)
    ledger.record(UsageRow("team-a", "openai", "m/first"))
    ledger.record(UsageRow("team-a", "openai", "m/second"))
    assert ledger.flush(10)
    assert heard == ["m/first", "m/second"]
