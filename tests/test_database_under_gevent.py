"""Under gevent, a database call that waits must not hold up the worker's other streams."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import psycopg
import pytest
import requests

from tests.conftest import ROOT, reset_postgres
from tests.fake_openrouter import Scenario

DATABASE_URL = os.environ.get("DATABASE_URL", "")
pytestmark = pytest.mark.skipif(
    not DATABASE_URL.startswith(("postgres", "postgresql")),
    reason="needs DATABASE_URL naming a PostgreSQL database",
)
MESSAGES = [{"role": "user", "content": "Hi"}]


def test_streams_flow_while_a_profile_lookup_waits_on_a_slow_query(start_relay, fake):
    reset_postgres(DATABASE_URL)
    relay = start_relay(AUTH_MODE="profiles", DATABASE_URL=DATABASE_URL)
    created = subprocess.run(
        ["flask", "--app", "wsgi", *["profiles", "create", "slow-team"]],
        cwd=ROOT,
        env=relay._env,
        capture_output=True,
        text=True,
        check=True,
    )
    token = created.stdout.strip().splitlines()[-1]
    fake.script("m/quick", Scenario(tokens=["a", "b", "c"], interval=0.05))
    lock_held = threading.Event()
    released_at: list[float] = []

    def slow_query() -> None:
        with psycopg.connect(DATABASE_URL.replace("postgres://", "postgresql://")) as connection:
            connection.execute("LOCK TABLE profiles IN ACCESS EXCLUSIVE MODE")
            lock_held.set()
            connection.execute("SELECT pg_sleep(3)")
            released_at.append(time.monotonic())

    holder = threading.Thread(target=slow_query)
    holder.start()
    assert lock_held.wait(10)
    blocked: dict = {}

    def blocked_chat() -> None:
        body = {"model": "m/quick", "messages": MESSAGES}
        response = requests.post(
            relay.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        blocked["status"], blocked["at"] = response.status_code, time.monotonic()

    waiting = threading.Thread(target=blocked_chat)
    waiting.start()
    time.sleep(0.3)  # the profile lookup is now waiting on the lock, inside the one worker
    finished = []
    for _ in range(5):
        response = requests.post(
            relay.url + "/api/chat/openrouter",
            json={"chatSettings": {"model": "m/quick"}, "messages": MESSAGES},
            headers={"Authorization": "Bearer sk-or-v1-own-key-for-this-test"},
            timeout=30,
        )
        assert response.text == "abc"
        finished.append(time.monotonic())
    holder.join()
    waiting.join()
    assert blocked["status"] == 200
    assert max(finished) < released_at[0] < blocked["at"]
