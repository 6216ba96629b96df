"""Retries before the first byte, through Flask's test client against the fake OpenRouter."""

import logging
import time

import pytest

from app import create_app
from app.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from app.retries import RetryPolicy, seconds_to_wait
from tests.fake_openrouter import Scenario

BODY = {"model": "m/flaky", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def retrying_client(relay_env):
    env = {**relay_env, "UPSTREAM_RETRIES": "2", "UPSTREAM_RETRY_BACKOFF": "0.01"}
    return create_app(env).test_client()


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_a_retryable_status_is_retried_then_succeeds(retrying_client, fake, status, stream):
    fake.script("m/flaky", Scenario(status=status), Scenario(status=status), Scenario())
    response = retrying_client.post("/v1/chat/completions", json={**BODY, "stream": stream})
    assert response.status_code == 200
    answer = response.get_data(as_text=True)
    assert answer.endswith("data: [DONE]\n\n") if stream else "Hello, world!" in answer
    assert len(fake.requests_for("m/flaky")) == 3


def test_retries_stop_after_the_configured_number(retrying_client, fake, caplog):
    fake.script("m/flaky", Scenario(status=503, error_message="No provider"))
    with caplog.at_level(logging.WARNING, logger="relay"):
        response = retrying_client.post("/v1/chat/completions", json=BODY)
    assert response.status_code == 503
    assert response.get_json()["error"]["message"] == "No provider"
    assert len(fake.requests_for("m/flaky")) == 3
    assert "retry 1 of 2" in caplog.text and "retry 2 of 2" in caplog.text
    assert "No provider" in caplog.text


@pytest.mark.parametrize("status", [400, 401, 402, 403])
def test_a_callers_problem_is_never_retried(retrying_client, fake, status):
    fake.script("m/flaky", Scenario(status=status))
    assert retrying_client.post("/v1/chat/completions", json=BODY).status_code == status
    assert len(fake.requests_for("m/flaky")) == 1


def test_a_short_retry_after_is_honoured(retrying_client, fake):
    fake.script("m/flaky", Scenario(status=429, retry_after="0.4"), Scenario())
    started = time.monotonic()
    assert retrying_client.post("/v1/chat/completions", json=BODY).status_code == 200
    first, second = fake.requests_for("m/flaky")
    assert second.started - first.started >= 0.4
    assert time.monotonic() - started >= 0.4


def test_a_retry_after_longer_than_the_maximum_goes_back_to_the_client(relay_env, fake):
    client = create_app(
        {**relay_env, "UPSTREAM_RETRIES": "2", "RETRY_AFTER_MAX": "5"}
    ).test_client()
    fake.script("m/flaky", Scenario(status=429, retry_after="60", error_message="Later"))
    response = client.post(
        "/api/chat/openrouter",
        json={"chatSettings": {"model": "m/flaky"}, "messages": BODY["messages"]},
    )
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "60"
    assert response.get_json() == {"message": "Later"}
    assert len(fake.requests_for("m/flaky")) == 1


def test_no_headers_within_the_read_timeout_is_retried(relay_env, fake):
    env = {**relay_env, "UPSTREAM_RETRIES": "1", "UPSTREAM_READ_TIMEOUT": "0.3"}
    client = create_app(env).test_client()
    fake.script("m/flaky", Scenario(headers_delay=2), Scenario())
    assert client.post("/v1/chat/completions", json=BODY).status_code == 200
    assert len(fake.requests_for("m/flaky")) == 2


def test_a_connection_dropped_before_the_headers_is_retried(retrying_client, fake):
    fake.script("m/flaky", Scenario(drop_before_headers=True), Scenario())
    assert retrying_client.post("/v1/chat/completions", json=BODY).status_code == 200
    assert len(fake.requests_for("m/flaky")) == 2


def test_an_unreachable_upstream_is_retried_then_a_502(relay_env, caplog):
    env = {
        **relay_env,
        "OPENROUTER_BASE_URL": "http://127.0.0.1:9/api/v1",
        "UPSTREAM_RETRIES": "2",
        "UPSTREAM_RETRY_BACKOFF": "0.01",
    }
    with caplog.at_level(logging.WARNING, logger="relay"):
        response = create_app(env).test_client().post("/v1/chat/completions", json=BODY)
    assert response.status_code == 502
    assert caplog.text.count("upstream unreachable") == 3


def test_nothing_is_retried_once_the_stream_has_begun(retrying_client, fake):
    fake.script("m/flaky", Scenario(tokens=["a", "b"], error_after=1, error_code=503), Scenario())
    body = retrying_client.post("/v1/chat/completions", json={**BODY, "stream": True}).get_data()
    assert b'"error"' in body and b"[DONE]" not in body
    assert len(fake.requests_for("m/flaky")) == 1


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    policy = RetryPolicy(retries=5, backoff=1.0, retry_after_max=6.0)
    failure = UpstreamError("x", status=502)
    delays = [policy.delay_before_retry(failure, attempt) for attempt in range(4)]
    assert 0.5 <= delays[0] <= 1.5
    assert 1.0 <= delays[1] <= 3.0
    assert 2.0 <= delays[2] <= 6.0
    assert delays[3] == 6.0 or 4.0 <= delays[3] <= 6.0
    assert policy.delay_before_retry(failure, 5) is None
    assert policy.delay_before_retry(UpstreamUnreachable(), 0) is not None
    assert policy.delay_before_retry(UpstreamTimeout(), 0) is not None


def test_retry_after_may_be_seconds_or_an_http_date():
    assert seconds_to_wait("3") == 3.0
    assert seconds_to_wait("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert seconds_to_wait("soon") is None
    assert seconds_to_wait(None) is None
