"""BENCHMARKS.md from one run's results: the tables, the targets with PASS/MISS, the profile.

Everything in it is computed from the run's results.json except bench/analysis.md, a reading of
the profile written by hand after a published run, which is included as it stands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.processes import ROOT
from bench.stats import percentile

ANALYSIS = ROOT / "bench" / "analysis.md"

# Published by Bifrost's authors for a 2-vCPU box, 500 requests/s offered, 1.5 s upstream.
PUBLISHED = [
    ("LiteLLM (published)", 44.8, 90.7, 372),
    ("Bifrost, Go (published)", 424, 1.68, 120),
]


MISSING = "n/a"


def _ms(value: float | None, digits: int = 1) -> str:
    return MISSING if value is None else f"{value:,.{digits}f} ms"


def _num(value: float | None, digits: int = 0, unit: str = "") -> str:
    return MISSING if value is None else f"{value:,.{digits}f}{unit}"


def _errors(run: dict[str, Any]) -> str:
    if not run.get("errors"):
        return "0"
    return ", ".join(f"{count} {kind}" for kind, count in run["errors"].items())


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _matching(runs: list[dict[str, Any]], surface: str, **match: Any) -> list[dict[str, Any]]:
    """The runs of `surface` whose fields have the values in `match`, in order."""
    return [
        run
        for run in runs
        if run["surface"] == surface and all(run.get(k) == v for k, v in match.items())
    ]


def _find(result: dict[str, Any], surface: str, **match: Any) -> dict[str, Any] | None:
    found = _matching(result.get("runs", []), surface, **match)
    return found[0] if found else None


def _rounds(result: dict[str, Any], surface: str, rate: float) -> list[dict[str, Any]]:
    """Scenario 1's runs of `surface` at `rate`: the sweep's, then the repeats'. (Every relay
    and LiteLLM run has an overhead; a LiteLLM run without a baseline at its rate has none.)"""
    runs = result.get("runs", []) + result.get("repeats", [])
    return [r for r in _matching(runs, surface, rate=rate) if r.get("overhead")]


def _median(values: list[float | None]) -> float | None:
    middle = percentile([v for v in values if v is not None], 50)
    return None if middle is None else round(middle, 3)


def targets(results: dict[str, Any]) -> list[list[str]]:
    """The issue's targets for the relay, each with the measured figure and PASS or MISS."""
    rows: list[list[str]] = []

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("**PASS**" if ok else "**MISS**")

    s1 = results.get("scenario1", {})
    target_rate = s1.get("target_rate", 200)
    for surface in ("relay-text", "relay-sse"):
        rounds = _rounds(s1, surface, target_rate)
        p50 = _median([run["overhead"]["p50"] for run in rounds])
        p99 = _median([run["overhead"]["p99"] for run in rounds])
        errors = sum(sum((run["errors"] or {}).values()) for run in rounds) if rounds else None
        ok = None if p50 is None or p99 is None else p50 <= 1 and p99 <= 5 and not errors
        each = ""
        if len(rounds) > 1:
            figures = ", ".join(_ms(run["overhead"]["p50"], 2) for run in rounds)
            each = f" (medians of {len(rounds)} runs, each through a relay of its own: {figures})"
        rows.append(
            [
                f"TTFT overhead at {target_rate:g} req/s, {surface}: p50 ≤ 1 ms, p99 ≤ 5 ms",
                f"p50 {_ms(p50, 2)}, p99 {_ms(p99, 2)}, errors "
                f"{MISSING if errors is None else errors}{each}",
                verdict(ok),
            ]
        )
    run = _find(results.get("scenario2", {}), "relay-json")
    ok = None
    if run:
        p99 = run["total_p99"]
        ok = run["achieved_rate"] >= 400 and run["success_rate"] == 1 and p99 is not None
        ok = ok and p99 <= 1800
    rows.append(
        [
            "Scenario 2 (2 workers): ≥ 400 req/s, 100 % success, p99 ≤ 1.8 s",
            f"{_num(run['achieved_rate'], 1)} req/s, {run['success_rate']:.2%} success, "
            f"p99 {_ms(run['total_p99'])}"
            if run
            else MISSING,
            verdict(ok),
        ]
    )
    s3 = results.get("scenario3", {})
    for surface in ("relay-text", "relay-sse"):
        run = _find(s3, surface)
        ok = None if not run else run["rss_open_mb"] < 150 and not run["errors"]
        rows.append(
            [
                f"{s3.get('streams', 1000)} open streams in one worker, {surface}: RSS < 150 MB",
                f"{_num(run['rss_open_mb'], 1, ' MB')}, errors {_errors(run)}" if run else MISSING,
                verdict(ok),
            ]
        )
    run = _find(results.get("scenario4", {}), "relay-sse")
    rate = run and run.get("chunks_per_cpu_second")
    rows.append(
        [
            "≥ 20,000 relayed chunks/s per core, SSE surface",
            f"{_num(rate)} chunks per CPU-second" if run else MISSING,
            verdict(None if not rate else rate >= 20_000),
        ]
    )
    return rows


def _scenario1(result: dict[str, Any]) -> str:
    timing = result["timing"]
    text = (
        f"Open loop: requests arrive at a fixed rate for {result['duration']:g} s whatever the "
        f"answers do; each answer is {timing['tokens']} tokens {timing['gap'] * 1000:g} ms apart "
        f"after {timing['ttft'] * 1000:g} ms. The relay runs one gevent worker. *Overhead* is "
        "the relay's TTFT percentile less the upstream's own at the same offered rate (for the "
        "text surface the upstream's first content event is the baseline); *ratio* is relay ÷ "
        "direct. *Worker CPU* is the relay worker's CPU use over the run (1.0 = one core); "
        "*worker waiting for a CPU* is how long, per request, the worker was ready to run but "
        "waited for a core another task held, mostly the load generator and the upstream "
        "(Linux's schedstat). "
        "Percentiles are over the requests that were answered; requests that timed out "
        "(30 s) are in *errors*, so a saturated run looks better than it is."
    )
    if any("worker_kernel_share" in run for run in result["runs"]):
        text += (
            " The kernel's share of the worker's CPU (system calls, the TCP stack) is in brackets."
        )
    text += "\n\n"
    rows = []
    for run in result["runs"]:
        over = run.get("overhead") or {}
        rows.append(
            [
                _num(run["rate"]),
                run["surface"],
                _num(run["achieved_rate"], 1),
                _errors(run),
                _ms(run["ttfb_p50"], 2),
                _ms(run["ttft_p50"], 2),
                _ms(run["ttft_p99"], 2),
                _ms(over.get("p50"), 2),
                _ms(over.get("p99"), 2),
                _num(over.get("ratio_p50"), 2, "x") + " / " + _num(over.get("ratio_p99"), 2, "x"),
                _ms(run["gap_p99"], 1),
                _worker_cpu(run),
                _ms(run.get("worker_waited_ms"), 2),
            ]
        )
    header = ["offered req/s", "surface", "achieved req/s", "errors", "TTFB p50", "TTFT p50"]
    header += ["TTFT p99", "overhead p50", "overhead p99", "ratio p50 / p99"]
    header += ["inter-read gap p99", "worker CPU", "worker waiting for a CPU"]
    return text + _table(header, rows) + _yardstick(result) + _floor(result) + _repeats(result)


ISSUE_YARDSTICK = (
    "On the machine the issue was written on it added about 3.5 ms p50 at 100 req/s and "
    "saturated near 280 req/s."
)


def _worker_cpu(run: dict[str, Any]) -> str:
    """The worker's CPU use, with the kernel's share of it where the run measured that."""
    cpu = _num(run.get("worker_cpu"), 2)
    if run.get("worker_kernel_share") is None:
        return cpu
    return f"{cpu} ({run['worker_kernel_share'] * 100:.0f} % kernel)"


def _cpu_ms_per_request(run: dict[str, Any]) -> float | None:
    """The worker's CPU time per answered request, in ms (a one-worker server's runs only)."""
    if run.get("worker_cpu") is None or not run["achieved_rate"]:
        return None
    return run["worker_cpu"] / run["achieved_rate"] * 1000


def _by_rate(result: dict[str, Any], surface: str) -> dict[float, dict[str, Any]]:
    """Scenario 1's sweep runs of `surface`, by offered rate."""
    return {run["rate"]: run for run in result["runs"] if run["surface"] == surface}


def _yardstick(result: dict[str, Any]) -> str:
    """The plain relay against the relay, at the rate the issue quotes (runs before the
    yardstick was added have no plain-sse rows, and get nothing here)."""
    plain, relay = _by_rate(result, "plain-sse"), _by_rate(result, "relay-sse")
    if not plain:
        return ""
    rate = 100 if 100 in plain else min(plain)
    plain_cpu = _cpu_ms_per_request(plain[rate])
    relay_cpu = _cpu_ms_per_request(relay[rate]) if rate in relay else None
    text = (
        "\n*plain-sse* is the issue's yardstick, `bench/plain_relay.py`: Flask, requests and "
        "sseclient as their documentation shows them, every chunk parsed and serialised again, "
        "under gunicorn's gevent worker (one), in front of the same upstream; its overhead is over "
        f"the sweep's direct run at the same rate. {ISSUE_YARDSTICK} In this run, at {rate:g} "
        "req/s, it added "
        f"{_ms(plain[rate]['overhead']['p50'], 2)} p50 and its worker used "
        f"{_ms(plain_cpu, 2)} of CPU per request"
    )
    if plain_cpu:
        text += f", at which cost it would saturate near {1000 / plain_cpu:,.0f} req/s"
    if relay_cpu:
        text += f"; the relay's SSE surface used {_ms(relay_cpu, 2)} at the same rate"
    return text + ". The yardstick's figures tell how fast this machine is for this kind of work.\n"


def _floor(result: dict[str, Any]) -> str:
    """The byte forwarder's overhead: what the hop alone costs (runs before it was added have no
    forward-sse rows, and get nothing here)."""
    floor = _by_rate(result, "forward-sse")
    if not floor:
        return ""
    added = ", ".join(
        f"{_ms(run['overhead']['p50'], 2)} at {rate:g} req/s" for rate, run in sorted(floor.items())
    )
    return (
        "\n*forward-sse* is the floor under both, `bench/forwarder.py`: a gevent process that "
        "copies bytes between the load generator and the upstream, parsing nothing. It added "
        f"{added} (p50): what the hop alone costs on this machine, two more wake-ups on the way "
        "to each first token, before any HTTP parsing, Flask, validation or requests. A relay's "
        "own work is what it adds above this row at the same rate.\n"
    )


def _repeats(result: dict[str, Any]) -> str:
    repeats = result.get("repeats") or []
    if not repeats:
        return ""
    rate = result.get("target_rate", repeats[0]["rate"])
    text = (
        f"\nAt {rate:g} req/s, the targets' rate, again: each round after the first through a "
        "relay started for it (round 1 is the sweep's row above). A run's p50 moves by tenths "
        "of a millisecond from one relay process to the next, so the targets take the median "
        "of the rounds.\n\n"
    )
    rows = []
    for surface in ("relay-text", "relay-sse"):
        for run in _rounds(result, surface, rate):
            over = run["overhead"]
            rows.append(
                [
                    surface,
                    str(run.get("round", 1)),
                    _errors(run),
                    _ms(over["p50"], 2),
                    _ms(over["p99"], 2),
                    _worker_cpu(run),
                    _ms(run.get("worker_waited_ms"), 2),
                ]
            )
    header = ["surface", "round", "errors", "overhead p50", "overhead p99", "worker CPU"]
    header += ["worker waiting for a CPU"]
    return text + _table(header, rows)


def _scenario2(result: dict[str, Any]) -> str:
    text = (
        f"{result['rate']:g} requests/s offered (open loop), **non-streamed** completions "
        f"(`stream` absent, as the gateway benchmarks do) from an upstream that answers after "
        f"{result['timing']['ttft']:g} s; per-request timeout 60 s. The relay runs two gevent "
        "workers (one per core); LiteLLM one worker. *Achieved* is successful answers per "
        "second between the first and the last answer. *Peak RSS* is the whole process tree's "
        "(gunicorn master + workers; LiteLLM's process and children).\n\n"
    )
    rows = []
    for run in result["runs"]:
        rows.append(
            [
                run["surface"],
                f"{run['duration']:g} s",
                str(run["requests"]),
                _num(run["achieved_rate"], 1),
                f"{run['success_rate']:.2%}",
                _errors(run),
                _ms(run["total_p50"]),
                _ms(run["total_p99"]),
                _num(run.get("peak_rss_mb"), 0, " MB"),
            ]
        )
    for name, rate, p99, rss in PUBLISHED:
        unknown = [MISSING] * 3
        rows.append([name, "60 s", MISSING, _num(rate, 1), *unknown, f"{p99:,} s", f"{rss} MB"])
    header = ["surface", "offered for", "requests", "achieved req/s", "success", "errors"]
    header += ["latency p50", "latency p99", "peak RSS"]
    return text + _table(header, rows)


def _scenario3(result: dict[str, Any]) -> str:
    timing = result["timing"]
    text = (
        f"{result['streams']} streams opened over a few seconds and held open, each "
        f"{timing['tokens']} tokens {timing['gap']:g} s apart, one gevent worker "
        f"(`WORKER_CONNECTIONS={result['streams'] + 200}`). RSS is the worker's, before the "
        "load and at the plateau with every stream open; CPU is the worker's while they are "
        "all open. The direct row shows the upstream's own timing fidelity.\n\n"
    )
    rows = []
    for run in result["runs"]:
        rows.append(
            [
                run["surface"],
                f"{run['ok']} / {run['requests']}",
                _errors(run),
                _ms(run["ttft_p50"]),
                _ms(run["ttft_p99"]),
                _ms(run["gap_p99"]),
                _num(run.get("rss_before_mb"), 1, " MB"),
                _num(run.get("rss_open_mb"), 1, " MB"),
                _num(run.get("kb_per_stream"), 1, " KB"),
                _num(None if run.get("worker_cpu") is None else run["worker_cpu"] * 100, 1, " %"),
            ]
        )
    header = ["surface", "completed", "errors", "TTFT p50", "TTFT p99", "gap p99", "RSS before"]
    header += ["RSS, all open", "per open stream", "worker CPU"]
    return text + _table(header, rows)


def _scenario4(result: dict[str, Any]) -> str:
    timing = result["timing"]
    text = (
        f"Closed loop: {result['concurrency']} concurrent streams of {timing['tokens']} tokens "
        "with no spacing (the upstream writes each answer at once), one gevent worker. A chunk "
        "is one upstream event relayed (`data:` events on SSE, counted by the load generator; "
        "content deltas on text). *Per CPU-second* divides by the worker's CPU time, so it is "
        "the rate one core sustains. The direct row is the ceiling of the measurement itself: "
        "what the load generator reads straight from the fake upstream (*CPU use*: the "
        "upstream's).\n\n"
    )
    rows = []
    for run in result["runs"]:
        per_chunk = run["chunks_per_cpu_second"]
        rows.append(
            [
                run["surface"],
                f"{run['ok']} / {run['requests']}",
                _errors(run),
                f"{run['chunks']:,}",
                _num(run["chunks_per_second"]),
                _num(per_chunk),
                _num(1e6 / per_chunk if per_chunk else None, 1, " µs"),
                _num(run["cpu_utilisation"], 2),
            ]
        )
    header = ["surface", "streams ok", "errors", "chunks", "chunks/s (wall)", "per CPU-second"]
    header += ["CPU per chunk", "CPU use"]
    return text + _table(header, rows)


def _litellm(document: dict[str, Any]) -> str:
    results = document["results"]
    if document.get("litellm_error"):
        return f"LiteLLM was not compared:\n\n```\n{document['litellm_error']}\n```\n"
    lines = []
    for rate in (50, 100):
        lite = _find(results.get("scenario1", {}), "litellm-sse", rate=rate)
        relay = _find(results.get("scenario1", {}), "relay-sse", rate=rate)
        if lite and relay:
            lines.append(
                f"- Scenario 1 at {rate} req/s (SSE): LiteLLM TTFT p50 {_ms(lite['ttft_p50'])}, "
                f"p99 {_ms(lite['ttft_p99'])}, {lite['achieved_rate']:g} req/s achieved, "
                f"errors {_errors(lite)}; the relay: p50 {_ms(relay['ttft_p50'])}, "
                f"p99 {_ms(relay['ttft_p99'])}, {relay['achieved_rate']:g} req/s."
            )
    lite = _find(results.get("scenario2", {}), "litellm-json")
    relay = _find(results.get("scenario2", {}), "relay-json")
    if lite and relay:
        lines.append(
            f"- Scenario 2 ({lite['duration']:g} s offered for LiteLLM, bounded to keep the run "
            f"short): LiteLLM {lite['achieved_rate']:g} req/s, {lite['success_rate']:.1%} "
            f"success, p99 {_ms(lite['total_p99'])}, peak RSS "
            f"{_num(lite.get('peak_rss_mb'), 0, ' MB')}; the relay {relay['achieved_rate']:g} "
            f"req/s, {relay['success_rate']:.1%}, p99 {_ms(relay['total_p99'])}, "
            f"{_num(relay.get('peak_rss_mb'), 0, ' MB')}."
        )
    return "\n".join(lines) + "\n" if lines else "No LiteLLM figures in this run.\n"


def _chunk_cost_us(results: dict[str, Any], surface: str) -> float | None:
    """CPU microseconds per relayed chunk on `surface`, from scenario 4 of the same run."""
    run = _find(results.get("scenario4", {}), surface)
    rate = run and run.get("chunks_per_cpu_second")
    return 1e6 / rate if rate else None


def _profiles(result: dict[str, Any], results: dict[str, Any]) -> str:
    if "error" in result:
        return f"The profile could not be taken: {result['error']}\n"
    parts = [
        f"py-spy sampled the relay's gevent worker at 100 Hz for {result['seconds']:g} s per "
        "case (raw samples, read back below) and as long again for a flame graph "
        "(`bench/results/profile-<case>.svg`). Only samples where the worker held the GIL "
        "(ran Python) count (`--gil`). *s1* is scenario 1's load at "
        f"{result['rate']:g} req/s; *s4* is scenario 4's fast-upstream load. Each sample is "
        "put in the first stage its frames match, reading from the running frame outwards.\n"
    ]
    for name, profile in result["profiles"].items():
        load = profile["load"]
        cpu = profile["worker_cpu"]
        per_request, unit, cost = "", "", None
        if name.startswith("s1") and load["achieved_rate"]:
            cost = cpu / load["achieved_rate"] * 1000
            tokens = results.get("scenario1", {}).get("timing", {}).get("tokens", "?")
            per_request = f", about **{cost:.2f} ms of CPU per request** of {tokens} tokens"
            unit = "ms per request"
        elif name.startswith("s4"):
            cost = _chunk_cost_us(results, load["surface"])
            if cost is not None:
                per_request = f"; scenario 4 measured **{cost:.1f} µs of CPU per chunk**"
                unit = "µs per chunk"
        parts.append(
            f"\n### {name}\n\nWorker CPU {cpu:.2f} cores during the profile{per_request}; "
            f"{profile['samples']} samples; load: {load['achieved_rate']:g} req/s achieved, "
            f"TTFT p50 {_ms(load['ttft_p50'])}, errors {_errors(load)}.\n\n"
        )
        header = ["stage", "% of samples"]
        rows = [[stage, f"{share}"] for stage, share in profile["stages"]]
        if cost is not None:
            header.append(unit)
            for row, (_, share) in zip(rows, profile["stages"], strict=True):
                row.append(
                    f"{cost * share / 100:.3f}"
                    if unit.startswith("ms")
                    else f"{cost * share / 100:.1f}"
                )
        parts.append(_table(header, rows))
        parts.append("\nFunctions with the most samples of their own (self time):\n\n")
        rows = [[f"`{function}`", f"{share}"] for function, share in profile["self"]]
        parts.append(_table(["function", "% self"], rows))
        parts.append("\nThe relay's own functions, by samples under them (inclusive):\n\n")
        rows = [[f"`{function}`", f"{share}"] for function, share in profile["app_inclusive"]]
        parts.append(_table(["function", "% inclusive"], rows))
    return "".join(parts)


def _instructions(result: dict[str, Any]) -> str:
    """The instruction counts (bench/instructions.py): far steadier than the timings."""
    if "error" in result or "unavailable" in result:
        return f"Not counted: {result.get('error') or result['unavailable']}\n"
    text = (
        "What the relay's worker executes per request, counted by callgrind (valgrind) in user "
        "space: far steadier than the timings above for the same code, libraries and "
        f"{result.get('valgrind', 'valgrind')}, but not fixed. The worker's timers run by the "
        "clock, and two runs of unchanged code can differ by a few percent, more than the "
        "batches of one run: compare rows within a run, and a change between runs beside the "
        "yardstick's rows. "
        f"Batches of {result['requests']} requests one after another on one "
        "keep-alive connection; the median of the batches. A *further token* is the difference "
        f"between 1 + {result['tokens']} tokens 20 ms apart and one token, over "
        f"{result['tokens']}. The kernel's work (system calls, TCP) is not counted."
    )
    if any(row["request"].startswith("plain-sse") for row in result["rows"]):
        text += (
            " *plain-sse* is the issue's yardstick (scenario 1), counted the same way: what a "
            "relay with none of this one's features executes."
        )
    misses = all("misses" in row for row in result["rows"])
    if misses:
        text += (
            " *L1 misses* are callgrind's simulation of the first-level caches (instruction "
            "reads, data reads and writes), counted because a request's CPU time may follow "
            "them as much as its instructions."
        )
    text += "\n\n"
    rows = []
    for row in result["rows"]:
        batches = row.get("batches")
        spread = MISSING
        if batches:
            spread = f"{(max(batches) - min(batches)) / row['median'] * 100:.1f} %"
        cells = [row["request"], f"{row['median']:,.0f}", spread]
        rows.append([*cells, f"{row['misses']:,.0f}"] if misses else cells)
    header = ["request", "instructions per request", "spread of batches"]
    return text + _table([*header, "L1 misses per request"] if misses else header, rows)


def _yardstick_speed(s1: dict[str, Any]) -> str:
    """The machine's speed for this work: the issue's yardstick at the rate the issue quotes."""
    plain = _find(s1, "plain-sse", rate=100)
    if plain is None or not plain.get("overhead"):
        return ""
    return (
        f"- speed for this work: the issue's yardstick (scenario 1's *plain-sse*) added "
        f"{_ms(plain['overhead']['p50'], 2)} p50 at 100 req/s and its worker used "
        f"{_ms(_cpu_ms_per_request(plain), 2)} of CPU per request. {ISSUE_YARDSTICK} Judge the "
        "targets on a machine whose yardstick reads about the same.\n"
    )


def _sharing(others: dict[str, Any]) -> str:
    """Whether processes outside the benchmark used the machine while it ran."""
    if not others:
        return "\n"
    share = others["share"]
    line = (
        f"- Processes outside the benchmark used {others['cpu_seconds']:,.0f} CPU-seconds "
        f"during the run, {share:.0%} of the machine's capacity"
    )
    if share >= 0.05:
        line += (
            ": the machine was shared (another engineer's test runs), so the figures are "
            "noisier and somewhat worse than on a quiet machine"
        )
    return line + ".\n\n"


def _speed(machine: dict[str, Any]) -> str:
    """The machine's speed, when the run measured it (runs before the probe was added did not)."""
    if "cpu_probe_us" not in machine:
        return ""
    return (
        f'- speed: `python3 -m timeit "sum(range(10000))"` took {machine["cpu_probe_us"]:g} µs '
        f"before the run and {machine['cpu_probe_after_us']:g} µs after. The relay's figures "
        "move with the machine's speed: compare runs whose machines read about the same.\n"
    )


def render(document: dict[str, Any], images: list[Path], image_dir: Path | None) -> str:
    """The whole BENCHMARKS.md (or a partial run's report) as text."""
    machine = document["machine"]
    results = document["results"]
    base = image_dir or ROOT

    def image(path: Path, title: str) -> str:
        return f"![{title}]({path.relative_to(base).as_posix()})\n" if path in images else ""

    plots_dir = image_dir or ROOT / "bench" / "results"
    out = [
        "# Benchmarks\n\n",
        f"Written by `bench/run` on {machine['date']} in {document['wall_seconds']:g} s; do "
        "not edit by hand (run it again). Raw figures: `bench/results/results.json`.\n\n",
        "## How to run\n\n",
        "```sh\nbench/run                 # everything: writes BENCHMARKS.md and bench/results/\n"
        "bench/run scenario1       # one scenario (scenario1..4, profile, instructions): "
        "bench/results/tmp/\n"
        "bench/run --smoke         # ten seconds, relay only, exits non-zero on any error\n```\n\n"
        "`bench/run` creates `bench/.venv` (the project, editable, plus matplotlib, uvloop and "
        "py-spy) and `bench/.venv-litellm` (`litellm[proxy]`) on first use. The fake upstream "
        "(`bench/fake_upstream.py`), the load generator (`bench/loadgen.py`) and the service "
        "under test each run in their own process.\n\n",
        "## Machine\n\n",
        f"- {machine['nproc']} cores ({machine['cpu']}), {machine['memory_gb']} GB, Linux "
        f"{machine['kernel']}, Python {machine['python']}\n",
        f"- load average before the run: {', '.join(str(x) for x in machine['load_before'])}\n",
        _speed(machine),
        _yardstick_speed(results.get("scenario1", {})),
        "- The two cores are shared by the load generator, the fake upstream and the service "
        "under test, so no figure here is of a service with a machine to itself.\n",
        _sharing(document.get("others", {})),
        "## Targets\n\n",
    ]
    if document["plan"]["smoke"]:
        out.append("A smoke run: toy sizes, one shared relay; no figure here means anything.\n")
    else:
        out.append("The relay's targets on this machine (one gevent worker unless stated).\n\n")
        out.append(_table(["target", "measured", "verdict"], targets(results)))
    sections = [
        ("scenario1", "Scenario 1: added latency (TTFT overhead, open loop)", _scenario1),
        ("scenario2", "Scenario 2: the gateway benchmark (non-streamed)", _scenario2),
        ("scenario3", "Scenario 3: many open streams in one worker", _scenario3),
        ("scenario4", "Scenario 4: throughput (relayed chunks per core)", _scenario4),
    ]
    pictures = {
        "scenario1": [("ttft-overhead.png", "TTFT overhead vs offered rate")],
        "scenario2": [("gateway-latency-cdf.png", "Scenario 2 latency CDF")],
        "scenario3": [("open-streams-rss.png", "RSS with open streams")],
        "scenario4": [("throughput.png", "Chunks per CPU-second")],
    }
    for key, title, render_section in sections:
        out.append(f"\n## {title}\n\n")
        result = results.get(key)
        if result is None:
            out.append("Not run.\n")
            continue
        if "error" in result:
            out.append(f"Failed: `{result['error']}`\n")
            continue
        out.append(render_section(result))
        out.append(f"\n(wall time {result['wall_seconds']:g} s)\n\n")
        for file, alt in pictures[key]:
            out.append(image(plots_dir / file, alt))
    out.append("\n## LiteLLM's proxy, same upstream, same load generator\n\n")
    out.append(_litellm(document))
    out.append("\n## Where the time goes\n\n")
    out.append(
        _profiles(results["profile"], results) if "profile" in results else "Not profiled.\n"
    )
    if "instructions" in results:
        out.append("\n### Work per request, in instructions\n\n")
        out.append(_instructions(results["instructions"]))
    if ANALYSIS.exists() and image_dir is None:
        out.append("\n### Reading of the profile\n\n" + ANALYSIS.read_text())
    out.append("\n## Run log\n\n```\n" + "\n".join(document["log"]) + "\n```\n")
    return "".join(out)
