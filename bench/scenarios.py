"""The four scenarios of the issue, each measured against the upstream itself and through the
relay (and LiteLLM's proxy where it is compared) in the same run.

Each returns plain data (JSON-ready) that bench.report and bench.plots turn into tables and
pictures; nothing here formats.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from bench.fake_upstream import TOKEN, Timing, model_name
from bench.measure import Bench, run_load, start_load
from bench.plan import Plan
from bench.processes import PeakMemory, cpu_seconds, cpu_times, rss_bytes, run_queue_seconds
from bench.stats import quantile_points
from bench.targets import Forwarder, LiteLLM, PlainRelay, Relay, Surface, direct

MB = 1024 * 1024
SHORT = model_name(Timing(ttft=0, tokens=5, gap=0))


@contextmanager
def relay_for(bench: Bench, **settings: Any) -> Iterator[Relay]:
    """A relay with these settings, or the run's shared one (smoke runs share one relay)."""
    if bench.shared_relay is not None:
        yield bench.shared_relay
        return
    with Relay(bench.python, bench.workdir, bench.upstream_port, **settings) as relay:
        yield relay


def warm_up(bench: Bench, plan: Plan, surface: Surface, model: str = SHORT) -> None:
    """A few requests first, so that imports, pools and caches are not measured."""
    if plan.warm_up:
        run_load(bench, surface, model, rate=20, duration=1, timeout=30)


def _overhead(relay: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a - b, 3)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 2)

    return {
        "p50": minus(relay["ttft_p50"], base["ttft_p50"]),
        "p99": minus(relay["ttft_p99"], base["ttft_p99"]),
        "ratio_p50": ratio(relay["ttft_p50"], base["ttft_p50"]),
        "ratio_p99": ratio(relay["ttft_p99"], base["ttft_p99"]),
    }


def added_latency(
    bench: Bench, plan: Plan, start_litellm: Callable[[], LiteLLM | None]
) -> dict[str, Any]:
    """Scenario 1: time-to-first-token overhead under open-loop load, both surfaces.

    Per offered rate: the upstream directly, then the relay's text and SSE surfaces (one
    worker), then LiteLLM's proxy at the rates it can take at all; the relay worker's CPU use
    over each run tells how close it is to saturation. At `plan.s1_reference_rates` the issue's
    yardstick (bench/plain_relay.py) and the floor under both, a byte forwarder
    (bench/forwarder.py), follow the relay against the same direct run. The targets' rate is
    then measured again (`repeats`), each time through a relay started for it.
    """
    model = model_name(plan.s1_timing)
    base = direct(bench.upstream_port)
    references = (PlainRelay, Forwarder) if plan.s1_reference_rates else ()
    runs = _through_one_relay(bench, plan, base, model, plan.s1_rates, references=references)
    repeats: list[dict[str, Any]] = []
    # Round 1 is the sweep's run at the targets' rate; a sweep without that rate has none.
    rounds = plan.s1_repeats if plan.s1_target_rate in plan.s1_rates else 1
    for round_ in range(2, rounds + 1):
        again = _through_one_relay(
            bench, plan, base, model, [plan.s1_target_rate], f", round {round_}"
        )
        repeats += [{**run, "round": round_} for run in again]
    litellm = start_litellm() if plan.s1_litellm_rates else None
    if litellm is not None:
        try:
            warm_up(bench, plan, litellm.sse(), model)
            for rate in plan.s1_litellm_rates:
                bench.say(f"scenario 1, LiteLLM at {rate:g} requests/s")
                options = {"rate": rate, "duration": plan.s1_litellm_duration, "timeout": 30}
                summary, _ = run_load(bench, litellm.sse(), model, **options, record_gaps=True)
                summary["rate"] = rate
                baseline = _run_at(runs, base, rate)
                if baseline is not None:
                    summary["overhead"] = _overhead(summary, baseline)
                runs.append(summary)
        finally:
            litellm.stop()
    return {
        "timing": plan.s1_timing.__dict__,
        "duration": plan.s1_duration,
        "runs": runs,
        "target_rate": plan.s1_target_rate,
        "repeats": repeats,
    }


def _run_at(runs: list[dict[str, Any]], surface: Surface, rate: float) -> dict[str, Any] | None:
    """`surface`'s run at `rate` among `runs`; a partial run's rates (--set s1_rates=...) may
    not include it."""
    return next((r for r in runs if r["rate"] == rate and r["surface"] == surface.name), None)


def _through_one_relay(
    bench: Bench,
    plan: Plan,
    base: Surface,
    model: str,
    rates: list[float],
    label: str = "",
    references: tuple[type[PlainRelay | Forwarder], ...] = (),
) -> list[dict[str, Any]]:
    """`_at_rate` at each of `rates`, through one relay started (and warmed up) for them, and
    through `references` started beside it at the rates in `plan.s1_reference_rates`."""
    runs: list[dict[str, Any]] = []
    with relay_for(bench) as relay, ExitStack() as stack:
        started = [
            stack.enter_context(server(bench.python, bench.workdir, bench.upstream_port))
            for server in references
        ]
        relays: list[tuple[Surface, Relay | PlainRelay | Forwarder]]
        relays = [(relay.text(), relay), (relay.sse(), relay)]
        beside = [(reference.sse(), reference) for reference in started]
        for surface, _ in relays + beside:
            warm_up(bench, plan, surface)
        for rate in rates:
            bench.say(f"scenario 1 at {rate:g} requests/s{label}")
            at_rate = relays + beside if rate in plan.s1_reference_rates else relays
            runs += _at_rate(bench, plan, at_rate, base, model, rate)
    return runs


def _at_rate(
    bench: Bench,
    plan: Plan,
    servers: list[tuple[Surface, Relay | PlainRelay | Forwarder]],
    base: Surface,
    model: str,
    rate: float,
) -> list[dict[str, Any]]:
    """The upstream directly, then each surface through its one-worker server, at one offered
    rate: every overhead is over that one direct run."""
    options = {"rate": rate, "duration": plan.s1_duration, "timeout": 30}
    baseline, _ = run_load(bench, base, model, **options, record_gaps=True)
    runs = [{**baseline, "rate": rate}]
    for surface, server in servers:
        worker = server.worker_pids[0]
        runs.append(_through_worker(bench, surface, worker, model, options, baseline))
    return runs


def _through_worker(
    bench: Bench,
    surface: Surface,
    worker: int,
    model: str,
    options: dict[str, Any],
    baseline: dict[str, Any],
) -> dict[str, Any]:
    """One open-loop run through a one-worker server, with that worker's CPU use and its
    overhead over the upstream's own `baseline` run at the same rate."""
    (user_before, kernel_before), waited_before = cpu_times(worker), run_queue_seconds(worker)
    started = time.monotonic()
    summary, _ = run_load(bench, surface, model, **options, record_gaps=True)
    user, kernel = cpu_times(worker)
    waited_after = run_queue_seconds(worker)
    used = user - user_before + kernel - kernel_before
    summary.update(rate=options["rate"], worker_cpu=round(used / (time.monotonic() - started), 3))
    if used:
        summary["worker_kernel_share"] = round((kernel - kernel_before) / used, 3)
    if waited_before is not None and waited_after is not None and summary["requests"]:
        waited = max(waited_after - waited_before, 0)
        summary["worker_waited_ms"] = round(waited * 1000 / summary["requests"], 3)
    summary["overhead"] = _overhead(summary, baseline)
    return summary


def gateway(
    bench: Bench, plan: Plan, start_litellm: Callable[[], LiteLLM | None]
) -> dict[str, Any]:
    """Scenario 2: the gateway benchmark: 1.5 s upstream, non-streamed, a fixed rate offered.

    The relay runs two workers (this machine's cores). Peak RSS is the whole process tree's
    (gunicorn master and workers; LiteLLM and whatever it spawns).
    """
    model = model_name(plan.s2_timing)
    options = {"rate": plan.s2_rate, "duration": plan.s2_duration, "timeout": 60}
    runs: list[dict[str, Any]] = []
    cdfs: dict[str, list[float]] = {}

    def measure(surface: Surface, pid: int | None, **override: Any) -> None:
        bench.say(f"scenario 2: {surface.name} at {plan.s2_rate:g} requests/s")
        if pid is None:
            summary, result = run_load(bench, surface, model, **{**options, **override})
        else:
            with PeakMemory(pid) as memory:
                summary, result = run_load(bench, surface, model, **{**options, **override})
            summary["peak_rss_mb"] = round(memory.peak / MB, 1)
        totals = [r["total"] * 1000 for r in result["records"] if r["error"] is None]
        cdfs[surface.name] = quantile_points(totals)
        runs.append(summary)

    measure(direct(bench.upstream_port, "json"), None)
    with relay_for(bench, web_concurrency=2) as relay:
        warm_up(bench, plan, relay.json())
        measure(relay.json(), relay.master)
    litellm = start_litellm()  # a fresh one: scenario 1 may have left it backlogged
    if litellm is not None:
        try:
            warm_up(bench, plan, litellm.json(), model)
            measure(litellm.json(), litellm.pid, duration=plan.s2_litellm_duration)
        finally:
            litellm.stop()
    return {"timing": plan.s2_timing.__dict__, "rate": plan.s2_rate, "runs": runs, "cdf_ms": cdfs}


def open_streams(bench: Bench, plan: Plan) -> dict[str, Any]:
    """Scenario 3: many slow streams (a token a second) open at once in one gevent worker.

    Memory per open stream is the worker's RSS at the plateau less its RSS before, over the
    stream count; CPU is the worker's over a window while every stream is open.
    """
    model = model_name(plan.s3_timing)
    streams = plan.s3_streams
    results: list[dict[str, Any]] = []
    options = {"rate": streams / plan.s3_ramp, "duration": plan.s3_ramp, "timeout": 120}
    bench.say(f"scenario 3: {streams} streams directly")
    summary, _ = run_load(bench, direct(bench.upstream_port), model, **options, record_gaps=True)
    results.append(summary)
    for kind in ("text", "sse"):
        with relay_for(bench, worker_connections=streams + 200) as relay:
            surface = relay.text() if kind == "text" else relay.sse()
            warm_up(bench, plan, surface)
            worker = relay.worker_pids[0]
            time.sleep(1 if plan.warm_up else 0)
            rss_before = rss_bytes(worker)
            bench.say(f"scenario 3: {streams} streams through {surface.name}")
            load = start_load(bench, surface, model, **options, record_gaps=True)
            time.sleep(plan.s3_ramp + plan.s3_settle)
            cpu_before, started = cpu_seconds(worker), time.monotonic()
            peak = rss_bytes(worker)
            while time.monotonic() - started < plan.s3_window:
                time.sleep(min(0.5, plan.s3_window))
                peak = max(peak, rss_bytes(worker))
            cpu = (cpu_seconds(worker) - cpu_before) / (time.monotonic() - started)
            summary, _ = load.finish()
        summary.update(
            rss_before_mb=round(rss_before / MB, 1),
            rss_open_mb=round(peak / MB, 1),
            kb_per_stream=round((peak - rss_before) / 1024 / streams, 1),
            worker_cpu=round(cpu, 3),
        )
        results.append(summary)
    return {"timing": plan.s3_timing.__dict__, "streams": streams, "runs": results}


def throughput(bench: Bench, plan: Plan) -> dict[str, Any]:
    """Scenario 4: relayed chunks per CPU-second of the worker, fast upstream, closed loop.

    A chunk is one upstream event relayed: a `data:` event on the SSE surface (the finish,
    usage and [DONE] events included), one content delta on the text surface. The direct run is
    the ceiling of the measurement itself: what the load generator reads from the upstream.
    """
    model = model_name(plan.s4_timing)
    options = {
        "mode": "closed",
        "concurrency": plan.s4_concurrency,
        "duration": plan.s4_duration,
        "timeout": 60,
    }
    results: list[dict[str, Any]] = []
    streams = f"{plan.s4_concurrency} streams of {plan.s4_timing.tokens} tokens"
    bench.say(f"scenario 4: {streams} directly")
    cpu_before = cpu_seconds(bench.upstream_pid)
    summary, _ = run_load(bench, direct(bench.upstream_port), model, **options)
    summary["chunks"] = summary["events"]
    summary["cpu_seconds"] = round(cpu_seconds(bench.upstream_pid) - cpu_before, 2)
    results.append(summary)
    with relay_for(bench) as relay:
        for surface in (relay.text(), relay.sse()):
            warm_up(bench, plan, surface)
            worker = relay.worker_pids[0]
            bench.say(f"scenario 4: {streams} through {surface.name}")
            cpu_before = cpu_seconds(worker)
            summary, _ = run_load(bench, surface, model, **options)
            if surface.kind == "text":
                summary["chunks"] = summary["body_bytes"] // len(TOKEN)
            else:
                summary["chunks"] = summary["events"]
            summary["cpu_seconds"] = round(cpu_seconds(worker) - cpu_before, 2)
            results.append(summary)
    for summary in results:
        cpu = summary["cpu_seconds"]
        summary["chunks_per_second"] = round(summary["chunks"] / summary["elapsed"])
        relayed = summary["surface"].startswith("relay")
        summary["chunks_per_cpu_second"] = (
            round(summary["chunks"] / cpu) if cpu and relayed else None
        )
        summary["cpu_utilisation"] = round(cpu / summary["elapsed"], 2)
    return {"timing": plan.s4_timing.__dict__, "concurrency": plan.s4_concurrency, "runs": results}
