"""Limits and budgets: requests per minute, concurrent streams, monthly budget, shared via Redis."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
import redis
import requests
from redis.exceptions import RedisError
from werkzeug.test import EnvironBuilder

from app import create_app
from app.ledger import UsageRow
from app.shared_limits import RedisSlots, RedisSpend
from tests.conftest import ROOT, RelayProcess, env_for, migrate, sqlite_url
from tests.fake_openrouter import Scenario
from tests.tcp_proxy import TcpProxy
from tests.test_observability import metric

MESSAGES = [{"role": "user", "content": "Hi"}]


def create_profile(app, *options: str, name: str = "team") -> str:
    result = app.test_cli_runner().invoke(args=["profiles", "create", name, *options])
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]


def chatbot(client, token, **kwargs):
    body = {"chatSettings": {"model": "m/ok"}, "messages": MESSAGES}
    return client.post(
        "/api/chat/openrouter", json=body, headers={"Authorization": f"Bearer {token}"}, **kwargs
    )


def held_stream(client, token, fake):
    """A /v1 stream that holds its slot until closed: OpenRouter is still answering (the relay
    reads ahead of a client, so a short answer would be over upstream before the client reads)."""
    fake.script("m/held", Scenario(tokens=["w "] * 200, interval=0.05))
    return completion(client, token, stream=True, model="m/held")


def completion(client, token, **fields):
    body = {"model": "m/ok", "messages": MESSAGES, **fields}
    return client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}
    )


@pytest.fixture
def app(profiles_env):
    return create_app(profiles_env)


def test_over_the_rate_limit_is_a_429_with_openais_headers_on_both_surfaces(app, fake):
    token = create_profile(app, "--rpm", "3")
    client = app.test_client()
    first = chatbot(client, token)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert completion(client, token).status_code == 200
    assert chatbot(client, token).status_code == 200
    refused = chatbot(client, token)
    assert refused.status_code == 429
    assert set(refused.get_json()) == {"message"}
    assert "3 requests per minute" in refused.get_json()["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    refused = completion(client, token)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["type"] == "rate_limit_exceeded"
    assert len(fake.received) == 3


def test_a_concurrency_slot_is_held_while_streaming_and_given_back_at_the_end(app, fake):
    token = create_profile(app, "--concurrency", "1")
    fake.script("m/ok", Scenario(tokens=["a", "b", "c"]))
    client = app.test_client()
    finished = completion(client, token, stream=True)
    assert finished.status_code == 200
    assert finished.get_data().endswith(b"data: [DONE]\n\n")  # read to its end: slot back
    open_stream = held_stream(client, token, fake)
    assert open_stream.status_code == 200
    refused = chatbot(client, token)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    open_stream.close()  # the client goes away mid-stream
    assert chatbot(client, token).status_code == 200


def test_a_request_that_failed_upstream_gives_its_slot_back(app, fake):
    token = create_profile(app, "--concurrency", "1")
    fake.script("m/ok", Scenario(status=503), Scenario())
    assert chatbot(client := app.test_client(), token).status_code == 503
    assert chatbot(client, token).status_code == 200


def test_over_budget_is_a_402_and_survives_a_restart(profiles_env, fake):
    app = create_app(profiles_env)
    token = create_profile(app, "--monthly-budget", "0.0001")
    client = app.test_client()
    assert completion(client, token).status_code == 200  # costs 0.0001 or more
    assert app.extensions["relay.ledger"].flush(10)
    refused = completion(client, token)
    assert refused.status_code == 402
    assert "monthly budget" in refused.get_json()["error"]["message"]
    restarted = create_app(profiles_env)
    assert chatbot(restarted.test_client(), token).status_code == 402
    assert len(fake.received) == 1


@pytest.mark.parametrize("surface", ["completion", "chatbot"])
def test_the_budget_counts_a_cost_before_its_row_is_written(profiles_env, fake, surface):
    """The next request, made at once, must not slip through while the row waits to be written
    (a quarter second or more)."""
    app = create_app(profiles_env)
    token = create_profile(app, "--monthly-budget", "0.0001")
    client, ask = app.test_client(), {"completion": completion, "chatbot": chatbot}[surface]
    with ask(client, token) as first:  # costs 0.0001 or more
        assert first.status_code == 200
        first.get_data()
    assert app.extensions["relay.ledger"].written == 0  # the row is still waiting
    assert ask(client, token).status_code == 402
    assert app.extensions["relay.ledger"].flush(10)
    assert ask(client, token).status_code == 402  # once written, counted once: still over
    assert len(fake.received) == 1


def test_default_limits_apply_to_callers_with_their_own_key(profiles_env, fake):
    client = create_app({**profiles_env, "DEFAULT_RPM": "1"}).test_client()
    assert chatbot(client, "sk-or-v1-mine").status_code == 200
    assert chatbot(client, "sk-or-v1-mine").status_code == 429
    assert chatbot(client, "sk-or-v1-someone-else").status_code == 200


def test_two_gunicorns_with_two_workers_each_share_one_limit_exactly(fake, redis_url, tmp_path):
    database = sqlite_url(tmp_path)
    migrate(database)
    env = {
        **env_for(fake, database),
        "AUTH_MODE": "profiles",
        "REDIS_URL": redis_url,
        "WEB_CONCURRENCY": "2",
    }
    token = create_profile(create_app(env), "--rpm", "10")
    relays = [RelayProcess(env, tmp_path / f"relay-{i}.log").start() for i in range(2)]
    try:
        statuses = []
        for i in range(30):
            with requests.Session() as fresh:  # a new connection: any worker may take it
                statuses.append(
                    fresh.post(
                        relays[i % 2].url + "/api/chat/openrouter",
                        json={"chatSettings": {"model": "m/ok"}, "messages": MESSAGES},
                        headers={"Authorization": f"Bearer {token}"},
                        timeout=10,
                    ).status_code
                )
        assert statuses.count(200) == 10
        assert statuses.count(429) == 20
        assert len(fake.received) == 10
    finally:
        for relay in relays:
            relay.stop()


def test_slots_come_back_after_aborted_streams_with_redis(fake, redis_url, tmp_path):
    database = sqlite_url(tmp_path)
    migrate(database)
    env = {**env_for(fake, database), "AUTH_MODE": "profiles", "REDIS_URL": redis_url}
    token = create_profile(create_app(env), "--concurrency", "2")
    fake.script("m/long", Scenario(tokens=["w "] * 1000, interval=0.02))
    relay = RelayProcess(env, tmp_path / "relay.log").start()
    body = {"model": "m/long", "messages": MESSAGES, "stream": True}
    headers = {"Authorization": f"Bearer {token}"}
    url = relay.url + "/v1/chat/completions"
    try:
        for _ in range(3):  # slots leaking would show on the second round
            held = [
                requests.post(url, json=body, headers=headers, stream=True, timeout=10)
                for _ in range(2)
            ]
            assert [r.status_code for r in held] == [200, 200]
            assert requests.post(url, json=body, headers=headers, timeout=10).status_code == 429
            for response in held:
                response.close()  # aborted mid-stream
            assert fake.wait_for(
                lambda: all(r.client_gone for r in fake.requests_for("m/long")[-2:]), 5
            )
            assert fake.wait_for(lambda: not redis.Redis.from_url(redis_url).zcard(SLOTS), 5)
        done = requests.post(url, json={**body, "stream": False}, headers=headers, timeout=10)
        assert done.status_code == 200
    finally:
        relay.stop()


SLOTS = "relay:slots:team"

HOLD_A_SLOT = """
import sys, time, redis
from app.shared_limits import RedisSlots
slots = RedisSlots(redis.Redis.from_url(sys.argv[1]), ttl=1.5)
assert slots.acquire("team", 1) is not None
print("held", flush=True)
time.sleep(60)
"""


def test_a_slot_is_renewed_while_its_holder_lives_and_lapses_when_it_dies(redis_url):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_SLOT, redis_url], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        slots = RedisSlots(redis.Redis.from_url(redis_url), ttl=1.5)
        time.sleep(4)  # past the slot's and its set's first expiry: only renewal keeps them
        assert slots.acquire("team", 1) is None
    finally:
        holder.kill()
        holder.wait()
    died = time.monotonic()
    while (release := slots.acquire("team", 1)) is None:
        assert time.monotonic() - died < 5, "the dead holder's slot never lapsed"
        time.sleep(0.1)
    release()
    assert not redis.Redis.from_url(redis_url).zcard(SLOTS)


def test_spend_is_shared_through_redis_the_moment_a_row_is_written(profiles_env, redis_url, fake):
    env = {**profiles_env, "REDIS_URL": redis_url}
    one, other = create_app(env), create_app(env)
    token = create_profile(one, "--monthly-budget", "0.0001")
    assert chatbot(other.test_client(), token).status_code == 200  # seeds the figure: 0
    assert completion(one.test_client(), token).status_code == 200
    assert one.extensions["relay.ledger"].flush(10)
    refused = chatbot(other.test_client(), token)
    assert refused.status_code == 402
    assert "monthly budget" in refused.get_json()["message"]


def test_limits_can_be_changed_without_a_new_token(app, fake):
    token = create_profile(app, "--rpm", "1")
    client = app.test_client()
    assert chatbot(client, token).status_code == 200
    assert chatbot(client, token).status_code == 429
    result = app.test_cli_runner().invoke(args=["profiles", "limit", "team", "--rpm", "5"])
    assert result.exit_code == 0, result.output
    allowed = chatbot(client, token)
    assert allowed.status_code == 200
    assert allowed.headers["x-ratelimit-limit-requests"] == "5"


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
def test_redis_going_away_follows_limits_fail_open(profiles_env, redis_url, caplog, fail_open):
    real = urlsplit(redis_url)
    proxy = TcpProxy((real.hostname or "127.0.0.1", real.port or 6379)).up()
    env = {
        **profiles_env,
        "REDIS_URL": proxy.in_front_of(redis_url),
        "LIMITS_FAIL_OPEN": str(fail_open).lower(),
    }
    app = create_app(env)
    token = create_profile(app, "--rpm", "100")
    client = app.test_client()
    try:
        assert chatbot(client, token).status_code == 200
        proxy.down()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="relay"):
            answer = chatbot(client, token)
        assert time.monotonic() - started < 3
        if fail_open:
            assert answer.status_code == 200
            assert "serving without them" in caplog.text
            assert app.extensions["relay.quotas"].failed_open == 1
        else:
            assert answer.status_code == 503
            assert "limits" in answer.get_json()["message"]
    finally:
        proxy.down()


def test_limits_are_checked_before_anything_goes_upstream(app, fake):
    token = create_profile(app, "--rpm", "1")
    client = app.test_client()
    threads = [threading.Thread(target=chatbot, args=(client, token)) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake.received) == 1


@pytest.mark.parametrize("surface", ["text", "sse"])
def test_a_body_the_server_closes_unread_still_ends_the_stream(app, fake, surface):
    """WSGI lets a server close the body without reading it (its client left first)."""
    token = create_profile(app, "--concurrency", "1")
    fake.script("m/long", Scenario(tokens=["w "] * 100, interval=0.05))
    path, body = {
        "text": ("/api/chat/openrouter", {"chatSettings": {"model": "m/long"}}),
        "sse": ("/v1/chat/completions", {"model": "m/long", "stream": True}),
    }[surface]
    environ = EnvironBuilder(
        path=path,
        method="POST",
        json={**body, "messages": MESSAGES},
        headers={"Authorization": f"Bearer {token}"},
    ).get_environ()
    app(environ, lambda status, headers, exc_info=None: None).close()
    assert fake.wait_for(lambda: fake.requests_for("m/long")[-1].client_gone, 2)
    assert chatbot(app.test_client(), token).status_code == 200
    assert app.extensions["relay.ledger"].flush(5)


def test_a_request_refused_by_one_limit_uses_up_none_of_the_other(app, fake):
    token = create_profile(app, "--rpm", "3", "--concurrency", "1")
    client = app.test_client()
    with held_stream(client, token, fake) as held:
        assert held.status_code == 200
        for _ in range(5):
            refused = completion(client, token)  # for concurrency: the minute is not used up
            assert refused.status_code == 429
            assert refused.headers["x-ratelimit-limit-requests"] == "3"
            assert refused.headers["x-ratelimit-remaining-requests"] == "2"
    assert chatbot(client, token).status_code == 200
    last = completion(client, token)
    assert last.status_code == 200
    assert last.headers["x-ratelimit-remaining-requests"] == "0"
    assert chatbot(client, token).status_code == 429  # now the rate, with no slot held by it
    result = app.test_cli_runner().invoke(args=["profiles", "limit", "team", "--rpm", "10"])
    assert result.exit_code == 0, result.output
    with held_stream(client, token, fake) as held:
        assert held.status_code == 200  # no slot was kept by the requests the rate refused
        assert chatbot(client, token).status_code == 429


def refusal_message(response, surface: str) -> str:
    """The message of an error response, checking it has its surface's shape."""
    body = response.get_json()
    if surface == "text":
        assert set(body) == {"message"}
        return body["message"]
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["type"] == "rate_limit_exceeded"
    return body["error"]["message"]


@pytest.mark.parametrize("surface", ["text", "openai"])
@pytest.mark.parametrize("limit", ["rpm", "concurrency"])
def test_every_429_carries_retry_after_and_the_rate_limit_headers(app, fake, limit, surface):
    token = create_profile(app, f"--{limit}", "1")
    client = app.test_client()
    with held_stream(client, token, fake) as held:
        assert held.status_code == 200
        refused = {"text": chatbot, "openai": completion}[surface](client, token)
    assert refused.status_code == 429
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "1"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == f"{retry_after}s"
    expected = {"rpm": "1 requests per minute", "concurrency": "concurrent streams"}[limit]
    assert expected in refusal_message(refused, surface)


def silent_redis_url() -> tuple[TcpProxy, str]:
    """A Redis that accepts connections and never answers (nothing behind it)."""
    silent = TcpProxy(("127.0.0.1", 9)).up().silence()
    return silent, f"redis://127.0.0.1:{silent.port}/0"


def test_a_redis_that_never_answers_does_not_hold_up_the_ledger(profiles_env):
    silent, url = silent_redis_url()
    ledger = create_app({**profiles_env, "REDIS_URL": url}).extensions["relay.ledger"]
    try:
        for i in range(20):
            ledger.record(UsageRow(f"team-{i % 3}", "openai", "m/ok", cost=0.01))
        assert ledger.flush(4), "adding spend to a hung Redis held the ledger's writer up"
        assert ledger.written == 20 and not ledger.dropped
    finally:
        silent.down()


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
def test_a_redis_that_never_answers_follows_limits_fail_open_at_once(profiles_env, fake, fail_open):
    silent, url = silent_redis_url()
    env = {**profiles_env, "REDIS_URL": url, "LIMITS_FAIL_OPEN": str(fail_open).lower()}
    app = create_app(env)
    token = create_profile(app, "--rpm", "10", "--concurrency", "2", "--monthly-budget", "5")
    answers = []
    # The budget is read first, then the slot taken, then the request counted: drop them in turn.
    for options in ([], ["--no-budget"], ["--concurrency", "0"]):
        if options:
            result = app.test_cli_runner().invoke(args=["profiles", "limit", "team", *options])
            assert result.exit_code == 0, result.output
        asking = threading.Thread(
            target=lambda: answers.append(completion(app.test_client(), token)), daemon=True
        )
        asking.start()
        asking.join(5)
        assert not asking.is_alive(), "the request hung on a Redis that never answers"
    silent.down()
    assert [answer.status_code for answer in answers] == [200 if fail_open else 503] * 3


def test_a_slot_that_could_not_be_given_back_is_given_back_once_redis_answers(redis_url):
    """Not a slot's lifetime later: a concurrency-1 caller would be refused all that time."""
    real = urlsplit(redis_url)
    proxy = TcpProxy((real.hostname or "127.0.0.1", real.port or 6379)).up()
    slots = RedisSlots(redis.Redis.from_url(proxy.in_front_of(redis_url), socket_timeout=0.5))
    try:
        release = slots.acquire("team", 1)
        assert release is not None
        proxy.down()
        release()  # Redis away: kept to be given back
        proxy.up()
        again = slots.acquire("team", 1)
        assert again is not None
        again()
    finally:
        proxy.down()
    assert not redis.Redis.from_url(redis_url).zcard(SLOTS)


def test_spend_added_while_redis_hung_is_reseeded_from_the_ledger_once_it_answers(redis_url):
    real = urlsplit(redis_url)
    proxy = TcpProxy((real.hostname or "127.0.0.1", real.port or 6379)).up()
    client = redis.Redis.from_url(proxy.in_front_of(redis_url), socket_timeout=0.5)
    ledger = {"team": 0.0, "other": 0.0}  # what the database holds this month
    spend = RedisSpend(client, ledger.__getitem__, backoff=1.0)
    try:
        assert spend.total("team") == 0.0
        proxy.silence()
        ledger["team"] += 2.0
        with pytest.raises(RedisError):
            spend.add("team", 2.0)
        ledger["team"] += 1.0
        spend.add("team", 1.0)  # skipped while Redis is given time to come back
        proxy.down()
        proxy.up()
        time.sleep(1.0)
        ledger["other"] += 1.0
        spend.add("other", 1.0)  # the first add that reaches Redis again
        assert spend.total("team") == 3.0
        assert spend.total("other") == 1.0
    finally:
        proxy.down()


def test_default_concurrency_applies_to_profiles_without_a_limit_of_their_own(profiles_env, fake):
    app = create_app({**profiles_env, "DEFAULT_CONCURRENCY": "1"})
    team = create_profile(app)
    wide = create_profile(app, "--concurrency", "2", name="wide")
    client = app.test_client()
    with contextlib.ExitStack() as streams:
        held = [streams.enter_context(held_stream(client, team, fake))]
        assert chatbot(client, team).status_code == 429
        held += [streams.enter_context(held_stream(client, wide, fake)) for _ in range(2)]
        assert [response.status_code for response in held] == [200, 200, 200]
        assert chatbot(client, wide).status_code == 429


def test_redis_spend_is_seeded_from_this_months_ledger(profiles_env, redis_url, fake):
    env = {**profiles_env, "REDIS_URL": redis_url}
    before = create_app(env)
    spender = create_profile(before, "--monthly-budget", "1")
    saver = create_profile(before, "--monthly-budget", "1", name="saver")
    ledger = before.extensions["relay.ledger"]
    last_month = datetime.now(UTC).replace(day=1) - timedelta(days=1)
    ledger.record(UsageRow("team", "openai", "m/ok", cost=0.6))
    ledger.record(UsageRow("team", "chatbot", "m/ok", cost=0.6))
    ledger.record(UsageRow("saver", "openai", "m/ok", at=last_month, cost=5.0))
    assert ledger.flush(10)
    client = create_app(env).test_client()  # a restart, Redis holding no figure yet
    with chatbot(client, spender) as refused:
        assert refused.status_code == 402
        assert "($1.20 of $1.00)" in refused.get_json()["message"]
    with chatbot(client, saver) as served:
        assert served.status_code == 200
    assert len(fake.received) == 1


def test_serving_without_limits_is_counted_in_the_metrics(start_relay):
    silent, url = silent_redis_url()
    try:
        relay = start_relay(REDIS_URL=url, DEFAULT_RPM="5")
        assert metric(requests.get(relay.url + "/metrics", timeout=10).text, FAILED_OPEN) == 0
        for _ in range(2):
            body = {"model": "m/ok", "messages": MESSAGES}
            assert (
                requests.post(relay.url + "/v1/chat/completions", json=body, timeout=10).status_code
                == 200
            )
        assert metric(requests.get(relay.url + "/metrics", timeout=10).text, FAILED_OPEN) == 2
        assert "serving without them" in relay.log()
    finally:
        silent.down()


FAILED_OPEN = "relay_limits_failed_open_total"
