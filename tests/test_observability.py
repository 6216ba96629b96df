"""Operable on a PaaS: a JSON line per request, request ids, metrics across workers, readiness,
CORS. Through real gunicorn processes where the behaviour depends on them."""

from __future__ import annotations

import json
import os
import re
import time
from urllib.parse import urlsplit

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from tests.conftest import (
    SERVER_KEY,
    RelayProcess,
    env_for,
    free_port,
    migrate,
    reset_postgres,
    run_python,
    sqlite_url,
)
from tests.fake_openrouter import Scenario
from tests.tcp_proxy import TcpProxy

MESSAGES = [{"role": "user", "content": "the-secret-question-7f3a"}]
CHATBOT = "/api/chat/openrouter"
OPENAI = "/v1/chat/completions"
# gunicorn's graceful stop waits for every open connection: a test that keeps a response object
# keeps its connection open, so such requests ask the relay to close theirs.
ONE_REQUEST = {"Connection": "close"}


def chatbot_body(model: str = "m/ok") -> dict:
    return {"chatSettings": {"model": model}, "messages": MESSAGES}


def json_lines(relay: RelayProcess) -> list[dict]:
    """The relay's stdout, line by line: each one must be a JSON object (a log drain's view)."""
    lines = [json.loads(line) for line in relay.stdout_lines()]
    assert all(isinstance(line, dict) for line in lines)
    return lines


def request_lines(relay: RelayProcess) -> list[dict]:
    """The request lines of everything but the start-up health probes."""
    return [line for line in json_lines(relay) if "status" in line and line["path"] != "/healthz"]


def wait_for_lines(relay: RelayProcess, count: int, path: str | None = None) -> list[dict]:
    """The request lines (of `path` only, if given) once there are `count` of them, or after 5 s.

    A line is written once its response is closed, just after the client has read it all."""
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in request_lines(relay) if path in (None, line["path"])]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.fixture
def profiles_relay(fake, tmp_path):
    database = sqlite_url(tmp_path)
    migrate(database)
    env = {
        **env_for(fake, database),
        "AUTH_MODE": "profiles",
        "SECRET_KEY": "a-secret-key-for-the-tests",
        "UPSTREAM_RETRIES": "1",
        "UPSTREAM_RETRY_BACKOFF": "0.01",
    }
    cli = create_app(env).test_cli_runner()
    os.environ["TEAM_KEY"] = "sk-or-v1-team-own-key-5e6f"
    try:
        created = cli.invoke(
            args=["profiles", "create", "team", "--openrouter-key-env", "TEAM_KEY"]
        )
    finally:
        del os.environ["TEAM_KEY"]
    token = created.output.strip().splitlines()[-1]
    relay = RelayProcess(env, tmp_path / "relay.log").start()
    yield relay, token
    relay.stop()


def test_every_request_leaves_one_json_line_with_what_happened_and_no_secret(profiles_relay, fake):
    relay, token = profiles_relay
    auth = {"Authorization": f"Bearer {token}"}
    fake.script("m/flaky", Scenario(status=503), Scenario())
    streamed = requests.post(relay.url + CHATBOT, json=chatbot_body("m/flaky"), headers=auth)
    assert streamed.text == "Hello, world!"
    whole = requests.post(
        relay.url + OPENAI,
        json={"model": "m/ok", "messages": MESSAGES},
        headers={"Authorization": "Bearer sk-or-v1-byok-caller-key-9d8c"},
    )
    assert whole.status_code == 200
    refused = requests.post(relay.url + CHATBOT, json=chatbot_body(), headers={})
    assert refused.status_code == 401

    lines = wait_for_lines(relay, 3)
    assert len(lines) == 3
    by_path = {(line["path"], line["status"]): line for line in lines}
    chat = by_path[(CHATBOT, 200)]
    assert chat["request_id"] == streamed.headers["X-Request-ID"]
    assert chat["method"] == "POST"
    assert chat["profile"] == "team"
    assert chat["model"] == "m/flaky"
    assert chat["outcome"] == "completed"
    assert chat["retries"] == 1
    assert chat["completion_tokens"] == 4 and chat["prompt_tokens"] > 0
    assert chat["cost"] > 0
    assert 0 < chat["ttft_ms"] <= chat["duration_ms"]
    assert chat["client"] == "127.0.0.1"
    byok = by_path[(OPENAI, 200)]
    assert byok["profile"].startswith("byok:") and byok["outcome"] == "completed"
    assert by_path[(CHATBOT, 401)]["outcome"] == "rejected"

    log = relay.log()
    for secret in (token, SERVER_KEY, "sk-or-v1-team-own-key-5e6f", "sk-or-v1-byok-caller-key"):
        assert secret not in log
    assert "the-secret-question" not in log

    scraped = requests.get(relay.url + "/metrics").text
    assert metric(scraped, "relay_upstream_retries_total") == 1
    assert metric(scraped, "relay_upstream_errors_total", kind="status_503") == 1
    for surface in ("chatbot", "openai"):
        assert metric(scraped, DURATION_COUNT, surface=surface, outcome="completed") == 1


def test_the_routers_request_id_is_kept_echoed_and_sent_upstream(relay, fake):
    answer = requests.post(
        relay.url + CHATBOT, json=chatbot_body(), headers={"X-Request-ID": "router-id-42"}
    )
    assert answer.headers["X-Request-ID"] == "router-id-42"
    assert fake.received[-1].header("X-Request-ID") == "router-id-42"
    made_up = requests.post(
        relay.url + CHATBOT, json=chatbot_body(), headers={"X-Request-ID": "no spaces {}"}
    )
    generated = made_up.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert fake.received[-1].header("X-Request-ID") == generated
    assert [line["request_id"] for line in wait_for_lines(relay, 2)] == ["router-id-42", generated]


def test_warnings_carry_the_request_id_of_their_stream(relay, fake):
    fake.script("m/cut", Scenario(tokens=["a", "b", "c"], drop_after=2))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.post(
            relay.url + CHATBOT, json=chatbot_body("m/cut"), headers={"X-Request-ID": "cut-1"}
        )  # requests reads the whole body, and the cut-off body raises
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        warnings = [line for line in json_lines(relay) if line.get("level") == "warning"]
        if any("cutting off" in line["message"] for line in warnings):
            break
        time.sleep(0.05)
    assert {line["request_id"] for line in warnings} == {"cut-1"}
    assert any("dropped mid-stream" in line["message"] for line in warnings)


def test_a_model_list_refresh_carries_the_request_id_and_its_failure_is_logged_as_one(relay, fake):
    fake.models_status = 503
    failed = requests.get(relay.url + "/v1/models", headers={"X-Request-ID": "models-1"})
    assert failed.status_code == 503
    assert fake.received[-1].path == "/api/v1/models"
    assert fake.received[-1].header("X-Request-ID") == "models-1"
    fake.models_status = 200
    listed = requests.get(relay.url + "/v1/models", headers={"X-Request-ID": "models-2"})
    assert listed.status_code == 200
    assert fake.received[-1].header("X-Request-ID") == "models-2"
    lines = {line["request_id"]: line for line in wait_for_lines(relay, 2, "/v1/models")}
    assert lines["models-1"]["status"] == 503
    assert lines["models-1"]["outcome"] == "upstream_error"
    assert lines["models-2"]["outcome"] is None
    assert SERVER_KEY not in relay.log()  # the key the failed refresh was sent with


def test_log_format_text_writes_plain_lines_with_the_requests_fields(start_relay, fake):
    relay = start_relay(LOG_FORMAT="text")
    answer = requests.post(
        relay.url + CHATBOT, json=chatbot_body(), headers={**ONE_REQUEST, "X-Request-ID": "t-1"}
    )
    assert answer.status_code == 200
    deadline = time.monotonic() + 5
    while not any("request_id=t-1" in line for line in relay.stdout_lines()):
        assert time.monotonic() < deadline, relay.log()
        time.sleep(0.05)
    lines = relay.stdout_lines()
    for line in lines:
        with pytest.raises(ValueError):
            json.loads(line)
    (line,) = [line for line in lines if "request_id=t-1" in line]
    assert f"POST {CHATBOT} 200" in line
    for field in ("model=m/ok", "outcome=completed", "status=200", "retries=0"):
        assert field in line.split()
    assert "the-secret-question" not in relay.log() and SERVER_KEY not in relay.log()


DURATION_COUNT = "relay_stream_duration_seconds_count"


def metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`. With no such sample it fails
    (a metric never exported must not pass for a zero), unless a `default` is given."""
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
        and all(sample.labels.get(key) == value for key, value in labels.items())
    ]
    if not values and default is None:
        raise AssertionError(f"no sample of {name} with labels {labels}")
    return sum(values) if values else default


def test_metrics_add_up_across_two_workers(fake, tmp_path):
    database = sqlite_url(tmp_path)
    migrate(database)
    env = {**env_for(fake, database), "WEB_CONCURRENCY": "2", "METRICS_TOKEN": "metrics-tok"}
    relay = RelayProcess(env, tmp_path / "relay.log").start()

    def scrape() -> str:
        with requests.Session() as fresh:  # a new connection: either worker may take it
            answer = fresh.get(
                relay.url + "/metrics", headers={"Authorization": "Bearer metrics-tok"}
            )
        assert answer.status_code == 200
        return answer.text

    try:
        assert requests.get(relay.url + "/metrics").status_code == 401
        fake.script("m/fail", Scenario(status=400))
        for i in range(20):
            with requests.Session() as fresh:
                model = "m/fail" if i % 5 == 0 else "m/ok"
                fresh.post(relay.url + CHATBOT, json=chatbot_body(model))
        workers = {line["pid"] for line in wait_for_lines(relay, 20, CHATBOT)}
        scrapes = [scrape() for _ in range(6)]
        for text in scrapes:  # whichever worker answered, the figures are the whole picture
            assert metric(text, "relay_requests_total", surface="chatbot", status="200") == 16
            assert metric(text, "relay_requests_total", surface="chatbot", status="400") == 4
            assert metric(text, "relay_time_to_first_token_seconds_count") == 16
            assert metric(text, "relay_upstream_errors_total", kind="status_400") == 4
            assert metric(text, "relay_tokens_total", profile="open", kind="completion") == 64
            assert metric(text, "relay_open_streams", surface="chatbot") == 0
            assert metric(text, "relay_cost_usd_total", profile="open") > 0
            assert metric(text, DURATION_COUNT, surface="chatbot", outcome="completed") == 16
            assert metric(text, DURATION_COUNT, surface="chatbot", outcome="upstream_error") == 4
        assert len(workers) == 2, "both workers should have served requests"

        fake.script("m/slow", Scenario(tokens=["one ", "two ", "three"], interval=0.5))
        with requests.post(
            relay.url + CHATBOT, json=chatbot_body("m/slow"), headers=ONE_REQUEST, stream=True
        ) as slow:
            pieces = slow.iter_content(None)
            first = next(pieces)
            while_open = scrape()
            assert first + b"".join(pieces) == b"one two three"
        wait_for_lines(relay, 21, CHATBOT)
        after = scrape()
        assert metric(while_open, "relay_open_streams", surface="chatbot") == 1
        assert metric(after, "relay_open_streams", surface="chatbot") == 0
        assert metric(after, DURATION_COUNT, surface="chatbot", outcome="completed") == 17
        # Its duration is the whole answer (two pauses of 0.5 s), not the time to its first token.
        slow_duration = metric(after, "relay_stream_duration_seconds_sum") - metric(
            scrapes[-1], "relay_stream_duration_seconds_sum"
        )
        assert slow_duration >= 1.0
    finally:
        relay.stop()


# In-process apps (the Flask test client) serve the process's own registry, shared by every test
# in this process: these tests read how far a figure moved.


def test_limit_refusals_and_an_unreachable_limit_store_are_counted(fake, database_url):
    env = {**env_for(fake, database_url), "AUTH_MODE": "profiles", "SECRET_KEY": "metrics-test"}
    app = create_app(env)
    created = app.test_cli_runner().invoke(args=["profiles", "create", "limited", "--rpm", "1"])
    token = created.output.strip().splitlines()[-1]
    client = app.test_client()
    away = {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    fail_open = create_app(away).test_client()
    fail_closed = create_app({**away, "LIMITS_FAIL_OPEN": "false"}).test_client()
    auth = {"Authorization": f"Bearer {token}"}
    before = client.get("/metrics").text

    assert client.post(CHATBOT, json=chatbot_body(), headers=auth).status_code == 200
    assert client.post(CHATBOT, json=chatbot_body(), headers=auth).status_code == 429
    assert fail_open.post(CHATBOT, json=chatbot_body(), headers=auth).status_code == 200
    assert fail_closed.post(CHATBOT, json=chatbot_body(), headers=auth).status_code == 503

    after = client.get("/metrics").text
    for name, labels in [
        ("relay_limit_rejections_total", {"reason": "rpm"}),
        ("relay_limit_rejections_total", {"reason": "unavailable"}),
        ("relay_limits_failed_open_total", {}),
    ]:
        moved = metric(after, name, **labels) - metric(before, name, default=0, **labels)
        assert moved == 1, (name, labels)


def test_the_ledger_queue_depth_and_its_dropped_rows_are_counted(fake, tmp_path):
    folder = tmp_path / "not-there-yet"
    url = sqlite_url(folder)
    app = create_app({**env_for(fake, url), "LEDGER_QUEUE_MAX": "3"})
    ledger = app.extensions["relay.ledger"]
    client = app.test_client()
    before = client.get("/metrics").text
    for _ in range(20):  # the database cannot be opened: rows queue up, then overflow
        assert client.post(OPENAI, json={"model": "m/ok", "messages": MESSAGES}).status_code == 200
    while_away = client.get("/metrics").text
    assert ledger.dropped >= 20 - (3 + 1 + 3)  # all but the queue and the writer's batch
    dropped = metric(while_away, "relay_ledger_dropped_total")
    assert dropped - metric(before, "relay_ledger_dropped_total") == ledger.dropped
    assert metric(while_away, "relay_ledger_queue_depth") >= 1

    folder.mkdir()
    migrate(url)
    assert ledger.flush(15)  # the writer retries within seconds
    assert metric(client.get("/metrics").text, "relay_ledger_queue_depth") == 0


def test_readiness_needs_a_migrated_database(fake, tmp_path):
    client = create_app(env_for(fake, sqlite_url(tmp_path))).test_client()
    unmigrated = client.get("/readyz")
    assert unmigrated.status_code == 503
    assert "flask db upgrade" in unmigrated.get_json()["checks"]["database"]
    migrate(sqlite_url(tmp_path))
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json() == {
        "status": "ready",
        "checks": {"configuration": "ok", "database": "ok"},
    }
    assert not fake.received


def test_readiness_flips_when_the_database_goes_away_and_comes_back(fake):
    storage_url = os.environ.get("DATABASE_URL", "")
    if not storage_url.startswith(("postgres://", "postgresql")):
        pytest.skip("DATABASE_URL does not name a PostgreSQL database (one that can be stopped)")
    reset_postgres(storage_url)
    migrate(storage_url)
    database = urlsplit(storage_url)
    proxy = TcpProxy((database.hostname, database.port or 5432)).up()
    client = create_app(env_for(fake, proxy.in_front_of(storage_url))).test_client()
    try:
        assert client.get("/readyz").status_code == 200
        proxy.down()
        answer = client.get("/readyz")
        assert answer.status_code == 503
        assert answer.get_json()["checks"]["database"].startswith("unavailable")
        assert client.get("/healthz").status_code == 200  # alive all along
        proxy.up()
        assert client.get("/readyz").status_code == 200
    finally:
        proxy.down()


def test_readiness_flips_when_redis_goes_away_and_comes_back(fake, database_url, redis_url):
    cache = urlsplit(redis_url)
    proxy = TcpProxy((cache.hostname, cache.port or 6379)).up()
    env = {**env_for(fake, database_url), "REDIS_URL": proxy.in_front_of(redis_url)}
    client = create_app(env).test_client()
    try:
        assert client.get("/readyz").get_json()["checks"]["redis"] == "ok"
        proxy.down()
        answer = client.get("/readyz")
        assert answer.status_code == 503
        assert answer.get_json()["checks"] == {
            "configuration": "ok",
            "database": "ok",
            "redis": "unavailable (ConnectionError)",
        }
        assert client.get("/healthz").status_code == 200
        proxy.up()
        assert client.get("/readyz").status_code == 200
    finally:
        proxy.down()


def test_cors_answers_preflights_for_allowed_origins_only_and_streams_unchanged(start_relay, fake):
    relay = start_relay(CORS_ORIGINS="https://chat.example.com, https://other.example.com/")
    preflight = requests.options(
        relay.url + OPENAI,
        headers={
            "Origin": "https://chat.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "x-stainless-os" in preflight.headers["Access-Control-Allow-Headers"].lower()
    stranger = requests.options(
        relay.url + OPENAI,
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "Access-Control-Allow-Origin" not in stranger.headers

    fake.script("m/slow", Scenario(tokens=["one ", "two ", "three"], interval=0.4))
    started = time.monotonic()
    with requests.post(
        relay.url + CHATBOT,
        json=chatbot_body("m/slow"),
        headers={"Origin": "https://other.example.com"},
        stream=True,
    ) as streamed:
        assert streamed.headers["Access-Control-Allow-Origin"] == "https://other.example.com"
        assert "X-Request-ID" in streamed.headers["Access-Control-Expose-Headers"]
        pieces = [(piece, time.monotonic() - started) for piece in streamed.iter_content(None)]
    assert b"".join(piece for piece, _ in pieces) == b"one two three"
    assert pieces[0][1] < 0.5  # the first word came before the others were generated


def test_a_stream_failing_before_its_first_token_keeps_its_headers_and_logs_its_status(
    start_relay, fake
):
    """The chatbot surface's status waits for the first token: when the stream fails before it,
    the error response still carries the request's id and CORS headers, and its line the status."""
    relay = start_relay(CORS_ORIGINS="https://chat.example.com")
    fake.script("m/refused", Scenario(error_after=0, error_code=429, error_message="Slow down"))
    answer = requests.post(
        relay.url + CHATBOT,
        json=chatbot_body("m/refused"),
        headers={"Origin": "https://chat.example.com", "X-Request-ID": "router-id-43"},
    )
    assert answer.status_code == 429
    assert answer.json() == {"message": "Slow down"}
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["X-Request-ID"] == "router-id-43"
    assert answer.headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
    (line,) = wait_for_lines(relay, 1, CHATBOT)
    assert (line["request_id"], line["status"]) == ("router-id-43", 429)
    assert line["outcome"] == "upstream_error"


def test_without_cors_origins_no_cors_headers_are_sent(client, fake):
    answer = client.post(CHATBOT, json=chatbot_body(), headers={"Origin": "https://x.example"})
    assert answer.status_code == 200
    assert "Access-Control-Allow-Origin" not in answer.headers


def test_a_malformed_cors_origin_stops_the_service_at_start():
    from app.config import ConfigError, Settings

    with pytest.raises(ConfigError, match="CORS_ORIGINS"):
        Settings.from_environ({"CORS_ORIGINS": "chat.example.com"})


def test_a_stream_whose_client_left_during_silence_still_leaves_its_line(start_relay, fake):
    relay = start_relay(HEARTBEAT_INTERVAL="0.2")
    fake.script("m/quiet", Scenario(tokens=["thinking", "never"], stall_after=1))
    with requests.post(
        relay.url + OPENAI,
        json={"model": "m/quiet", "messages": MESSAGES, "stream": True},
        headers={"X-Request-ID": "left-early"},
        stream=True,
    ) as streamed:
        received = b""
        for piece in streamed.iter_content(None):  # read up to the first token, then leave
            received += piece
            if b"thinking" in received:
                break
    assert fake.wait_for(lambda: fake.requests_for("m/quiet")[-1].client_gone, 5)
    (line,) = [line for line in wait_for_lines(relay, 1) if line["request_id"] == "left-early"]
    assert line["outcome"] == "client_aborted"
    assert "Traceback" not in relay.log()


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_key_or_token_in_any_log_line_is_redacted(log_format):
    """Whatever a message or an exception's traceback quotes (the relay does not choose every
    exception's text)."""
    token = "orr_" + "t" * 43
    printed = run_python(
        f"""
import logging
from app.requestlog import configure_logging
configure_logging({log_format!r})
log = logging.getLogger("relay")
log.warning("quoted %s", {SERVER_KEY!r})
try:
    raise ValueError("Invalid header value b'Bearer {token}'")
except ValueError:
    log.exception("failed")
"""
    )
    assert "quoted sk-or-[redacted]" in printed
    assert "Bearer orr_[redacted]" in printed
    assert SERVER_KEY not in printed and token not in printed
