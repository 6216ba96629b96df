"""The yardstick the issue measures the relay against: a plain Flask + requests + sseclient relay,
written the way the libraries' documentation shows, with nothing tuned.

Every chunk is parsed and serialised again, as a relay that reads what it relays would do. Run
by gunicorn's gevent worker in front of the same fake upstream as the service
(`PLAIN_UPSTREAM` is the upstream's `/api/v1` URL), it tells how fast this machine is: the
issue measured it adding about 3.5 ms p50 at 100 requests/s and saturating near 280 requests/s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import requests
import sseclient
from flask import Flask, Response, request

from bench.targets import RELAY_KEY

app = Flask(__name__)
session = requests.Session()
UPSTREAM = os.environ.get("PLAIN_UPSTREAM", "http://127.0.0.1:8900/api/v1")


@app.get("/healthz")
def healthz() -> str:
    """What the benchmark polls until the relay is up."""
    return "ok"


@app.post("/v1/chat/completions")
def chat_completions() -> Response:
    """OpenRouter's event stream, each event parsed and serialised again on its way."""
    upstream = session.post(
        f"{UPSTREAM}/chat/completions",
        json=request.get_json(),
        headers={"Authorization": f"Bearer {RELAY_KEY}"},
        stream=True,
        timeout=60,
    )
    events = sseclient.SSEClient(upstream).events()

    def relay() -> Iterator[str]:
        for event in events:  # to the end: the connection goes back to the pool only then
            if event.data == "[DONE]":
                yield "data: [DONE]\n\n"
            else:
                yield f"data: {json.dumps(json.loads(event.data))}\n\n"

    return Response(relay(), mimetype="text/event-stream")
