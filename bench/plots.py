"""The pictures of a run (matplotlib, Agg: no display), drawn from the results the tables use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {
    "direct-sse": "#555555",
    "direct-json": "#555555",
    "relay-text": "#1f77b4",
    "relay-sse": "#2ca02c",
    "relay-json": "#2ca02c",
    "plain-sse": "#ff7f0e",
    "forward-sse": "#7f7f7f",
    "litellm-sse": "#d62728",
    "litellm-json": "#d62728",
}


def draw_all(document: dict[str, Any], folder: Path) -> list[Path]:
    """Draw every picture the results allow into `folder`; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    results = document["results"]
    drawn: list[Path] = []
    for key, draw, name in (
        ("scenario1", _overhead, "ttft-overhead.png"),
        ("scenario2", _latency_cdf, "gateway-latency-cdf.png"),
        ("scenario3", _open_streams, "open-streams-rss.png"),
        ("scenario4", _throughput, "throughput.png"),
    ):
        result = results.get(key)
        if not result or "error" in result:
            continue
        figure = draw(plt, result)
        path = folder / name
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        drawn.append(path)
    return drawn


def _overheads(runs: list[dict[str, Any]], surface: str, key: str) -> list[tuple[float, float]]:
    """(offered rate, overhead) of `surface`'s runs, floored for the log scale."""
    return [
        (run["rate"], max(run["overhead"][key], 0.01))
        for run in runs
        if run["surface"] == surface and run.get("overhead", {}).get(key) is not None
    ]


def _overhead(plt: Any, result: dict[str, Any]) -> Any:
    """TTFT overhead (relay or LiteLLM less the upstream itself) against offered rate."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, key, title in ((axes[0], "p50", "TTFT overhead p50"), (axes[1], "p99", "p99")):
        for surface in ("relay-text", "relay-sse", "plain-sse", "forward-sse", "litellm-sse"):
            points = _overheads(result["runs"], surface, key)
            if points:
                xs, ys = zip(*points, strict=True)
                axis.plot(xs, ys, "o-", label=surface, color=COLOURS[surface])
            again = _overheads(result.get("repeats", []), surface, key)
            if again:  # the targets' rate, measured again through other relays
                xs, ys = zip(*again, strict=True)
                axis.plot(xs, ys, "x", color=COLOURS[surface])
        target = 1 if key == "p50" else 5
        axis.axhline(target, color="#999999", linestyle="--", linewidth=1)
        axis.text(axis.get_xlim()[0], target * 1.15, f"target {target} ms", fontsize=8)
        axis.set_yscale("log")
        axis.set_xlabel("offered requests/s (open loop)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms added to time to first token")
    axes[0].legend()
    return figure


def _latency_cdf(plt: Any, result: dict[str, Any]) -> Any:
    """Scenario 2's latency distribution per surface."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    figure, axis = plt.subplots(figsize=(7, 4.2))
    success = {run["surface"]: run["success_rate"] for run in result["runs"]}
    for surface, points in result["cdf_ms"].items():
        if len(points) > 1:
            # Failed requests never arrive: the curve tops out at the success rate.
            top = success.get(surface, 1.0)
            ys = [top * i / (len(points) - 1) for i in range(len(points))]
            axis.plot([p / 1000 for p in points], ys, label=surface, color=COLOURS.get(surface))
    axis.axvline(1.8, color="#999999", linestyle="--", linewidth=1, label="target p99 1.8 s")
    axis.set_xscale("log")
    axis.set_xticks([1.5, 2, 3, 5, 10, 20, 30, 60])
    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("latency, s (log scale)")
    axis.set_ylabel("fraction of all requests answered")
    axis.set_title(f"{result['rate']:g} req/s offered, 1.5 s upstream, non-streamed")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    return figure


def _open_streams(plt: Any, result: dict[str, Any]) -> Any:
    """Worker RSS before the load and with every stream open, against the 150 MB target."""
    runs = [run for run in result["runs"] if "rss_open_mb" in run]
    figure, axis = plt.subplots(figsize=(6, 4))
    names = [run["surface"] for run in runs]
    axis.bar(names, [run["rss_open_mb"] for run in runs], color="#9ecae1", label="all open")
    axis.bar(names, [run["rss_before_mb"] for run in runs], color="#3182bd", label="before")
    axis.axhline(150, color="#d62728", linestyle="--", linewidth=1, label="target 150 MB")
    axis.set_ylabel("worker RSS, MB")
    axis.set_ylim(0, 180)
    axis.set_title(f"{result['streams']} open streams, one gevent worker")
    axis.legend(loc="lower right")
    return figure


def _throughput(plt: Any, result: dict[str, Any]) -> Any:
    """Relayed chunks per CPU-second of the worker, per surface."""
    runs = [run for run in result["runs"] if run["surface"].startswith("relay")]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.bar(
        [run["surface"] for run in runs],
        [run["chunks_per_cpu_second"] or 0 for run in runs],
        color=[COLOURS[run["surface"]] for run in runs],
    )
    axis.axhline(20_000, color="#d62728", linestyle="--", linewidth=1, label="target (SSE)")
    axis.set_ylabel("chunks per CPU-second of the worker")
    axis.set_title("Throughput with a fast upstream")
    axis.legend()
    return figure
