"""Work per request counted in instructions: what the relay's code costs, whatever the machine's
speed.

The timed figures move with the machine: machines of this kind have differed by a factor of two
or more from one session to the next (the report's speed line), so a change worth 5 % of a
request's CPU cannot be seen across sessions, and often not within one. callgrind (valgrind)
counts the instructions the worker executes in user space, and the same code, libraries, Python
and valgrind give the same count, to a few tenths of a percent, on a fast machine or a slow one,
loaded or not. Not quite the same: the worker's periodic work (the ledger's quarter-second writes,
the stall sweeper) runs by the clock, and tokens 20 ms apart must stay separate reads, which a
machine many times slower than these would not keep. The kernel's share (system calls, the TCP
stack) is not counted, nor what an instruction costs (the simulated cache misses say part of
that).

One relay worker (then the yardstick's, bench/plain_relay.py) runs under callgrind, instrumented
only once it has started. Per kind of request: the counters are zeroed, a batch of requests goes
one after another on one keep-alive connection, the counters are dumped (`callgrind_control`); a
figure is the median of the batches, per request. Two shapes of one request part its cost: one
token (the whole request, its first token included) and 1 + N tokens 20 ms apart (each its own read
and write, as in scenario 1), whose difference over N is the cost of each further token.
"""

from __future__ import annotations

import http.client
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.fake_upstream import Timing, model_name
from bench.measure import Bench
from bench.plan import Plan
from bench.targets import PlainRelay, Relay

ONE_TOKEN = model_name(Timing(ttft=0.0, tokens=1, gap=0.0))
# callgrind's simulated first-level misses: instruction reads, data reads, data writes
FIRST_LEVEL_MISSES = ("I1mr", "D1mr", "D1mw")
# name, path, body (a GET when None), requests per connection
Kind = tuple[str, str, dict[str, Any] | None, int]


def count_instructions(bench: Bench, plan: Plan) -> dict[str, Any]:
    """Instructions per request on both surfaces, for a request that does nothing, and for the
    issue's yardstick (bench/plain_relay.py) beside them."""
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        return {"unavailable": f"{' and '.join(missing)} not found (Debian's package valgrind)"}
    out = bench.workdir / "callgrind"
    out.mkdir(exist_ok=True)
    under = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",  # the worker starts in seconds, not a minute
        "--trace-children=yes",  # else callgrind_control cannot reach the forked worker (3.19)
        # First-level cache misses too: a request's time may follow them as much as its
        # instructions (bench/analysis.md, the run of 14:11).
        "--cache-sim=yes",
        f"--callgrind-out-file={out}/callgrind.%p",
    ]
    spaced = model_name(Timing(ttft=0.0, tokens=1 + plan.instr_tokens, gap=0.02))
    per_batch = plan.instr_requests
    more_tokens = f"1 + {plan.instr_tokens} tokens"
    with Relay(bench.python, bench.workdir, bench.upstream_port, under=under) as relay:
        text, sse = relay.text(), relay.sse()
        kinds: list[Kind] = [
            ("GET /healthz (does nothing)", "/healthz", None, per_batch),
            # nginx as the README configures it opens a connection per request
            ("GET /healthz, a new connection each", "/healthz", None, 1),
            ("relay-text, one token", text.path, text.body(ONE_TOKEN), per_batch),
            (f"relay-text, {more_tokens}", text.path, text.body(spaced), per_batch),
            ("relay-sse, one token", sse.path, sse.body(ONE_TOKEN), per_batch),
            (f"relay-sse, {more_tokens}", sse.path, sse.body(spaced), per_batch),
        ]
        rows = _count(bench, plan, relay.port, relay.worker_pids, out, kinds)
    # The yardstick, counted the same way: what the relay's features cost beside it.
    with PlainRelay(bench.python, bench.workdir, bench.upstream_port, under=under) as plain:
        sse = plain.sse()
        kinds = [
            ("plain-sse, one token", sse.path, sse.body(ONE_TOKEN), per_batch),
            (f"plain-sse, {more_tokens}", sse.path, sse.body(spaced), per_batch),
        ]
        rows += _count(bench, plan, plain.port, plain.worker_pids, out, kinds)
    for surface in ("relay-text", "relay-sse", "plain-sse"):
        one, longer = (row for row in rows if row["request"].startswith(surface + ","))
        rows.append(
            {
                "request": f"{surface}, each further token",
                "median": (longer["median"] - one["median"]) / plan.instr_tokens,
                "misses": (longer["misses"] - one["misses"]) / plan.instr_tokens,
            }
        )
    version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout
    return {
        "requests": plan.instr_requests,
        "tokens": plan.instr_tokens,
        "valgrind": version.strip(),
        "rows": rows,
    }


def _count(
    bench: Bench, plan: Plan, port: int, workers: list[int], out: Path, kinds: list[Kind]
) -> list[dict[str, Any]]:
    """Each kind of request in batches through the one worker, which runs under callgrind."""
    (worker,) = workers
    counter = _Counter(worker, out)
    counter.control("--instr=on")
    per_batch = plan.instr_requests
    rows = []
    for name, *request in kinds:
        bench.say(f"instructions: {name}")
        _send(port, per_batch, *request)  # warm: the instrumented code, the caches
        batches, misses = [], []
        for _ in range(plan.instr_batches):
            counter.control("--zero")
            _send(port, per_batch, *request)
            events = counter.dump()
            batches.append(events["Ir"] / per_batch)
            misses.append(sum(events.get(e, 0) for e in FIRST_LEVEL_MISSES) / per_batch)
        rows.append(
            {
                "request": name,
                "batches": batches,
                "median": statistics.median(batches),
                "misses": statistics.median(misses),
            }
        )
    return rows


class _Counter:
    """callgrind's counters in one process: zeroed, then dumped and read back."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self.dumps = 0

    def control(self, *args: str) -> None:
        """Have the worker carry out a callgrind command (vgdb interrupts what it is doing); it
        exits 0 even when it found no such process, so its answer is read."""
        done = subprocess.run(
            ["callgrind_control", *args, str(self.pid)], capture_output=True, text=True
        )
        if "OK." not in done.stdout:
            raise RuntimeError(f"callgrind_control {' '.join(args)}: {done.stdout}{done.stderr}")

    def dump(self) -> dict[str, int]:
        """The events counted since the last zero, by callgrind's name (Ir: instructions); the
        wait for the file is a guard."""
        self.control("--dump")
        self.dumps += 1
        dump = self.out / f"callgrind.{self.pid}.{self.dumps}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = dump.read_text() if dump.exists() else ""
            if "\ntotals:" in text:  # the last line: the file is whole
                lines = text.splitlines()
                names = next(line for line in lines if line.startswith("events:")).split()[1:]
                counts = next(line for line in lines if line.startswith("summary:")).split()[1:]
                return dict(zip(names, map(int, counts), strict=True))
            time.sleep(0.1)
        raise RuntimeError(f"callgrind wrote no {dump.name} within 60 s")


def _send(
    port: int, count: int, path: str, body: dict[str, Any] | None, per_connection: int
) -> None:
    """`count` requests one after another, `per_connection` of them on each connection, each
    read to its end (a GET when there is no body)."""
    payload = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    for first in range(0, count, per_connection):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            for _ in range(min(per_connection, count - first)):
                connection.request("GET" if body is None else "POST", path, payload, headers)
                response = connection.getresponse()
                answer = response.read()
                if response.status != 200:
                    raise RuntimeError(f"{path} answered {response.status}: {answer[:200]!r}")
        finally:
            connection.close()
