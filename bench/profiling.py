"""Where the relay worker's CPU time goes: py-spy samples of the gevent worker under load, read
back into stages of a request's life and into the functions that burn the most.

py-spy reads the worker from outside (no change to app/, no wrapper), pausing it briefly per
sample; only samples where the worker holds the GIL count (waits for the network do not).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.fake_upstream import model_name
from bench.measure import Bench, start_load
from bench.plan import Plan
from bench.processes import cpu_seconds
from bench.scenarios import warm_up
from bench.targets import Relay

_LINE = re.compile(r":\d+$")
_RATE = 100  # samples per second: enough for percentages, little pause overhead

# A sample belongs to the first stage (reading from the sampled frame outwards) whose rule its
# frame matches; a rule is a stage name and the path fragments of frames ("file" or "file:func").
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("chunk parsing: json.loads + checks", ("app/events.py:ChatStream._interpret",)),
    ("SSE framing (sseclient)", ("sseclient",)),
    ("upstream socket reads (urllib3 read1)", ("urllib3/response.py", "http/client.py")),
    ("usage ledger (SQLAlchemy/SQLite writes)", ("app/ledger.py", "sqlalchemy/")),
    ("logging (gunicorn access log)", ("gunicorn/glogging.py", "logging/")),
    ("heartbeats: helper greenlet + queue hand-over", ("app/heartbeats.py",)),
    ("disconnect watcher", ("app/disconnects.py",)),
    ("ChatStream loop (events.py)", ("app/events.py",)),
    ("presenters (text / SSE framing out)", ("app/presenters.py",)),
    ("gunicorn: writing chunks to the client", ("gunicorn/http/wsgi.py", "gunicorn/util.py")),
    ("opening the upstream call (requests/urllib3)", ("requests/", "urllib3/")),
    ("request body + marshmallow validation", ("marshmallow/", "app/schemas.py", "app/bodies.py")),
    ("Flask/Werkzeug request handling", ("flask/", "werkzeug/")),
    ("gunicorn: accept, parse request, start response", ("gunicorn/",)),
    ("app: other (views, keys, errors)", ("app/",)),
]
GEVENT_STAGE = "gevent hub: loop, greenlet switches, timers"


def _frame(raw: str) -> str:
    """`func (path/file.py:12)` as `path/file.py:func`, line number dropped."""
    name, _, place = raw.rpartition(" (")
    return f"{_LINE.sub('', place.rstrip(')'))}:{name}"


def _stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, fragments in STAGES:
            if any(fragment in frame for fragment in fragments):
                return stage
    if any("gevent/" in frame for frame in frames):
        return GEVENT_STAGE
    return "other"


def read_profile(raw_file: Path, top: int = 15) -> dict[str, Any]:
    """Samples by stage, the functions with the most samples of their own (self time), and the
    relay's own functions by samples under them (inclusive)."""
    stages: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw_file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_frame(raw) for raw in stack.split(";") if raw]
        if not frames:
            continue
        samples = int(count)
        total += samples
        stages[_stage_of(frames)] += samples
        functions[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples

    def share(counter: Counter[str], limit: int | None = None) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(limit)]

    ours = Counter({name: n for name, n in inclusive.items() if name.startswith("app/")})
    return {
        "samples": total,
        "stages": share(stages),
        "self": share(functions, top),
        "app_inclusive": share(ours, top),
    }


def _py_spy(bench: Bench) -> str:
    return str(Path(bench.python).parent / "py-spy")


def _record(bench: Bench, pid: int, seconds: float, fmt: str, out: Path) -> str | None:
    """py-spy record into `out`; returns the error text if py-spy failed."""
    command = [_py_spy(bench), "record", "--pid", str(pid), "--duration", str(int(seconds))]
    # --gil: only samples where the worker holds the GIL, i.e. runs Python. Without it the idle
    # native thread of gevent's thread pool (DNS lookups) shows as a third of the "busy" samples.
    command += ["--rate", str(_RATE), "--gil", "--format", fmt, "-o", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr or done.stdout)[-1500:]


def profile_relay(bench: Bench, plan: Plan, results: Path) -> dict[str, Any]:
    """Profile the worker under scenario 1's load (at `plan.profile_rate`) and scenario 4's,
    both surfaces.

    Each profile records raw samples for `plan.profile_seconds` (read back here) and then a
    flame graph SVG (`results`/profile-*.svg) for as long again, while the same load goes on.
    """
    rate, seconds = plan.profile_rate, plan.profile_seconds
    if not Path(_py_spy(bench)).exists():
        return {"error": "py-spy is not installed in the benchmark's virtualenv"}
    profiles: dict[str, Any] = {}
    loads = {
        "s1": (model_name(plan.s1_timing), {"rate": rate}),
        "s4": (model_name(plan.s4_timing), {"mode": "closed", "concurrency": plan.s4_concurrency}),
    }
    with Relay(bench.python, bench.workdir, bench.upstream_port) as relay:
        for surface in (relay.text(), relay.sse()):
            warm_up(bench, plan, surface)
            for scenario, (model, options) in loads.items():
                name = f"{scenario}-{surface.name}"
                bench.say(f"profiling the relay worker: {name}")
                worker = relay.worker_pids[0]
                load = start_load(
                    bench, surface, model, duration=2 * seconds + 3, timeout=10, **options
                )
                time.sleep(1.5)
                raw = bench.workdir / f"profile-{name}.txt"
                cpu_before, started = cpu_seconds(worker), time.monotonic()
                error = _record(bench, worker, seconds, "raw", raw)
                cpu = (cpu_seconds(worker) - cpu_before) / (time.monotonic() - started)
                if error is None:
                    svg = results / f"profile-{name}.svg"
                    error = _record(bench, worker, seconds, "flamegraph", svg)
                summary, _ = load.finish()
                if error is not None:
                    return {"error": f"py-spy could not record: {error}"}
                profile = read_profile(raw)
                profile.update(worker_cpu=round(cpu, 3), load=summary)
                profiles[name] = profile
    return {"rate": rate, "seconds": seconds, "profiles": profiles}
