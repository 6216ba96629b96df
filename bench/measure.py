"""One measured load run: the load generator in its own process, pointed at one surface.

The load generator never shares a process (or a GIL) with what it measures; the runner waits for
it and reads back its records.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import LoadSpec
from bench.processes import ROOT
from bench.stats import summarize
from bench.targets import Relay, Surface


@dataclass
class Bench:
    """What every scenario shares: the interpreter, a scratch folder, the running upstream."""

    python: str
    workdir: Path
    upstream_port: int
    upstream_pid: int
    shared_relay: Relay | None = None  # smoke runs: one relay for every scenario
    litellm_error: str | None = None  # why LiteLLM is not compared, when it is not
    log: list[str] = field(default_factory=list)

    def say(self, message: str) -> None:
        """Progress on stderr (the run's output), kept for the report's notes too."""
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, file=sys.stderr, flush=True)
        self.log.append(line)


def run_load(
    bench: Bench, surface: Surface, model: str, **options: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run bench.loadgen against `surface` asking for `model`; returns (summary, raw result).

    `options` are LoadSpec fields (mode, rate, concurrency, duration, timeout, record_gaps).
    """
    spec = LoadSpec(
        port=surface.port,
        path=surface.path,
        body=surface.body(model),
        surface=surface.kind,
        label=surface.name,
        **options,
    )
    stamp = f"{surface.name}-{time.monotonic_ns()}"
    spec_file = bench.workdir / f"spec-{stamp}.json"
    out_file = bench.workdir / f"records-{stamp}.json"
    spec_file.write_text(json.dumps(asdict(spec)))
    command = [bench.python, "-m", "bench.loadgen", str(spec_file), str(out_file)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"load generator failed: {done.stderr[-2000:]}")
    result = json.loads(out_file.read_text())
    out_file.unlink()
    spec_file.unlink()
    summary = summarize(result)
    errors = f", errors {summary['errors']}" if summary["errors"] else ""
    bench.say(
        f"  {surface.name:12} {summary['requests']} requests, ok {summary['ok']}, "
        f"ttft p50 {summary['ttft_p50']} ms p99 {summary['ttft_p99']} ms{errors}"
    )
    return summary, result


def start_load(bench: Bench, surface: Surface, model: str, **options: Any) -> LoadInFlight:
    """Like run_load, but returns at once so that the runner can take readings meanwhile."""
    return LoadInFlight(bench, surface, model, options)


class LoadInFlight:
    """A load run in a background thread; `finish()` waits for it and returns its figures."""

    def __init__(self, bench: Bench, surface: Surface, model: str, options: dict) -> None:
        self.outcome: tuple[dict, dict] | BaseException | None = None

        def go() -> None:
            try:
                self.outcome = run_load(bench, surface, model, **options)
            except BaseException as error:
                self.outcome = error

        self.thread = threading.Thread(target=go, daemon=True)
        self.thread.start()

    def finish(self) -> tuple[dict[str, Any], dict[str, Any]]:
        self.thread.join()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        assert self.outcome is not None
        return self.outcome
