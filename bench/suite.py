"""The benchmark suite's entry point (`bench/run` calls `python -m bench.suite`).

- No scenario named: the full run. Every scenario, LiteLLM compared, the profile, the
  instruction counts (under valgrind); it writes BENCHMARKS.md, bench/results/*.png, the flame
  graphs and bench/results/results.json.
- Scenario names (`scenario1` ... `scenario4`, `profile`, `instructions`): only those; the report
  and plots go to bench/results/tmp/<time>/ so that a partial run never overwrites the published
  one.
- `--smoke`: every scenario at toy size against one relay, no LiteLLM, no plots, the report in
  a temporary folder; exits non-zero if any request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import timeit
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import instructions, plots, profiling, report, scenarios
from bench.fake_upstream import Timing, timing_for
from bench.measure import Bench
from bench.plan import FULL, SMOKE, Plan
from bench.processes import ROOT
from bench.targets import LiteLLM, Relay, litellm_installed, start_upstream

SCENARIOS = ("scenario1", "scenario2", "scenario3", "scenario4", "profile", "instructions")
RESULTS = ROOT / "bench" / "results"


def machine_facts() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "cpu_probe_us": cpu_probe_us(),
    }


def cpu_probe_us() -> float:
    """How long this machine takes over a fixed piece of Python, in microseconds: the figure
    `python3 -m timeit "sum(range(10000))"` prints (the best of five timings, per run of the sum).

    Machines of this kind have differed by a factor of three or more from one session to the
    next, and the relay's figures with them; a run's figures compare only with runs on a machine
    whose probe reads about the same. Taken before and after the run, in about half a second.
    """
    timings = timeit.Timer("sum(range(10000))").repeat(repeat=5, number=1000)
    return round(min(timings) / 1000 * 1e6, 1)


def _busy_seconds() -> float:
    """CPU-seconds the whole machine has been busy (all cores, all processes) since boot."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _our_seconds() -> float:
    """CPU-seconds of this process and every child (and their children) it has waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def litellm_status(wanted: bool, error_file: str | None) -> str | None:
    """None when LiteLLM can be compared; otherwise why not."""
    if not wanted:
        return "not compared in this run (--no-litellm, smoke, or no scenario that uses it)"
    if litellm_installed():
        return None
    if error_file and Path(error_file).exists():
        return "`pip install 'litellm[proxy]'` failed:\n" + Path(error_file).read_text()[-3000:]
    return "LiteLLM's proxy is not installed in bench/.venv-litellm"


def run(plan: Plan, chosen: list[str], bench: Bench, results_dir: Path) -> dict[str, Any]:
    """Run the chosen scenarios in order; one failing scenario is reported, not fatal."""
    results: dict[str, Any] = {}

    def start_litellm() -> LiteLLM | None:
        """LiteLLM's proxy in front of the upstream, or None (why: bench.litellm_error)."""
        if bench.litellm_error is not None:
            return None
        try:
            return LiteLLM(bench.workdir, bench.upstream_port, plan.litellm_models).start()
        except RuntimeError as error:
            bench.litellm_error = f"LiteLLM's proxy did not start: {error}"
            bench.say(bench.litellm_error)
            return None

    for name in chosen:
        started = time.monotonic()
        try:
            if name == "scenario1":
                results[name] = scenarios.added_latency(bench, plan, start_litellm)
            elif name == "scenario2":
                results[name] = scenarios.gateway(bench, plan, start_litellm)
            elif name == "scenario3":
                results[name] = scenarios.open_streams(bench, plan)
            elif name == "scenario4":
                results[name] = scenarios.throughput(bench, plan)
            elif name == "profile":
                results[name] = profiling.profile_relay(bench, plan, results_dir)
            elif name == "instructions":
                results[name] = instructions.count_instructions(bench, plan)
        except Exception as error:  # the other scenarios still run; the report says what broke
            bench.say(f"{name} failed: {error!r}")
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        results[name]["wall_seconds"] = round(time.monotonic() - started, 1)
    return results


def with_changes(plan: Plan, changes: list[str]) -> Plan:
    """The plan with `knob=value` changes applied (numbers, comma lists, or ttft;tokens;gap)."""
    values: dict[str, Any] = {}
    for change in changes:
        knob, _, raw = change.partition("=")
        current = getattr(plan, knob)
        if isinstance(current, Timing):
            values[knob] = timing_for(f"bench/{raw}", current)
        elif isinstance(current, list):
            values[knob] = [float(x) for x in raw.split(",") if x]
        elif isinstance(current, bool):
            values[knob] = raw.lower() in ("1", "true", "yes")
        else:
            values[knob] = type(current)(raw)
    return replace(plan, **values)


def errors_in(results: dict[str, Any]) -> list[str]:
    """Every failed request or scenario, as lines."""
    found = []
    for name, result in results.items():
        if "error" in result:
            found.append(f"{name}: {result['error']}")
        for run_ in result.get("runs", []) + result.get("repeats", []):
            if run_.get("errors"):
                where = f" at {run_['rate']:g} req/s" if "rate" in run_ else ""
                where += f", round {run_['round']}" if "round" in run_ else ""
                found.append(f"{name} {run_['surface']}{where}: {run_['errors']}")
    return found


def publish(document: dict[str, Any]) -> int:
    """A full run's BENCHMARKS.md (at the top of the repository) and bench/results/*.png."""
    images = plots.draw_all(document, RESULTS)
    (ROOT / "BENCHMARKS.md").write_text(report.render(document, images, None))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="openrouter-relay's benchmark suite")
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=", ".join(SCENARIOS))
    parser.add_argument("--smoke", action="store_true", help="a ten-second check that it runs")
    parser.add_argument("--no-litellm", action="store_true", help="do not compare LiteLLM")
    parser.add_argument("--litellm-install-log", help="pip's output when LiteLLM did not install")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: redraw BENCHMARKS.md and the plots from bench/results/results.json",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="change one knob of the plan for this run (bench/plan.py), e.g. s2_duration=20",
    )
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}; choose from {SCENARIOS}")

    if args.report_only:
        if not (RESULTS / "results.json").exists():
            parser.error("no bench/results/results.json yet: run bench/run first")
        return publish(json.loads((RESULTS / "results.json").read_text()))
    plan = with_changes(SMOKE if args.smoke else FULL, args.set)
    full = not args.smoke and not args.scenarios
    chosen = list(args.scenarios or SCENARIOS)
    if args.smoke:
        chosen = [name for name in chosen if name not in ("profile", "instructions")]
    if args.set and full:
        parser.error("--set changes the plan: name the scenarios too, so that BENCHMARKS.md stays")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.smoke:
        out = Path(tempfile.mkdtemp(prefix="relay-bench-smoke-"))
    elif full:
        out = RESULTS
    else:
        out = RESULTS / "tmp" / stamp
    workdir = (out if args.smoke else RESULTS / "tmp" / f"work-{stamp}") / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    wants_litellm = not args.smoke and not args.no_litellm
    wants_litellm = wants_litellm and bool({"scenario1", "scenario2"} & set(chosen))
    facts = machine_facts()
    upstream, port = start_upstream(sys.executable, workdir)
    bench = Bench(sys.executable, workdir, port, upstream.pid)
    bench.litellm_error = litellm_status(wants_litellm, args.litellm_install_log)
    bench.say(f"{'smoke' if args.smoke else 'full' if full else 'partial'} run: {chosen}")
    started = time.monotonic()
    busy_before, ours_before = _busy_seconds(), _our_seconds()
    shared: Relay | None = None
    try:
        if args.smoke:
            shared = Relay(sys.executable, workdir, port).__enter__()
            bench.shared_relay = shared
        results = run(plan, chosen, bench, out)
    finally:
        if shared is not None:
            shared.__exit__(None, None, None)
        upstream.stop()
    wall = time.monotonic() - started
    others = _busy_seconds() - busy_before - (_our_seconds() - ours_before)
    facts["cpu_probe_after_us"] = cpu_probe_us()
    document = {
        "machine": facts,
        "others": {
            "cpu_seconds": round(max(others, 0.0), 1),
            "share": round(max(others, 0.0) / (wall * (os.cpu_count() or 1)), 3),
        },
        "plan": {"smoke": plan.smoke, "scenarios": chosen},
        "wall_seconds": round(wall, 1),
        "litellm_error": bench.litellm_error,
        "results": results,
        "log": bench.log,
    }
    (out / "results.json").write_text(json.dumps(document, indent=1))
    if full:
        publish(document)
    else:
        images = [] if args.smoke else plots.draw_all(document, out)
        (out / "BENCHMARKS.md").write_text(report.render(document, images, out))
    bench.say(f"wrote the report into {out} in {document['wall_seconds']} s")
    problems = errors_in(results)
    for problem in problems:
        bench.say(f"error: {problem}")
    return 1 if args.smoke and problems else 0


if __name__ == "__main__":
    sys.exit(main())
