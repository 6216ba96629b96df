"""How big each scenario is: the full run the issue specifies, and the smoke run CI affords.

The smoke plan exercises every scenario's code path (every surface, every reading, the report)
at toy sizes against one shared relay, to finish in about ten seconds; its numbers mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.fake_upstream import Timing, model_name


@dataclass(frozen=True)
class Plan:
    """Every knob of a run; durations in seconds, rates in requests per second."""

    smoke: bool
    s1_timing: Timing = field(default_factory=lambda: Timing(ttft=0.05, tokens=20, gap=0.02))
    s1_rates: list[float] = field(default_factory=lambda: [50, 100, 200, 400])
    s1_duration: float = 12
    # A run's p50 at one rate moves by up to about 0.2 ms from one relay process to the next,
    # so the targets' rate is measured again through new relays and the targets take the median.
    s1_target_rate: float = 200
    s1_repeats: int = 3
    # The yardstick (bench/plain_relay.py) and the byte forwarder (bench/forwarder.py), at
    # the rates the issue quotes and the targets' rate.
    s1_reference_rates: list[float] = field(default_factory=lambda: [50, 100, 200])
    s1_litellm_rates: list[float] = field(default_factory=lambda: [50, 100])
    s1_litellm_duration: float = 10
    s2_timing: Timing = field(default_factory=lambda: Timing(ttft=1.5, tokens=20, gap=0.0))
    s2_rate: float = 500
    s2_duration: float = 60
    s2_litellm_duration: float = 30
    s3_timing: Timing = field(default_factory=lambda: Timing(ttft=0.0, tokens=25, gap=1.0))
    s3_streams: int = 1000
    s3_ramp: float = 5
    s3_settle: float = 3
    s3_window: float = 10
    s4_timing: Timing = field(default_factory=lambda: Timing(ttft=0.0, tokens=2000, gap=0.0))
    s4_concurrency: int = 16
    s4_duration: float = 10
    profile_rate: float = 200
    profile_seconds: float = 8
    instr_requests: int = 50  # per batch
    instr_batches: int = 3
    instr_tokens: int = 20  # the further tokens, 20 ms apart, that part a request's cost
    warm_up: bool = True

    @property
    def litellm_models(self) -> list[str]:
        return [model_name(self.s1_timing), model_name(self.s2_timing)]


FULL = Plan(smoke=False)

SMOKE = Plan(
    smoke=True,
    s1_rates=[20],
    s1_duration=0.5,
    s1_target_rate=20,
    s1_repeats=2,
    s1_reference_rates=[20],
    s1_litellm_rates=[],
    s2_timing=Timing(ttft=0.1, tokens=20, gap=0.0),
    s2_rate=20,
    s2_duration=0.5,
    s3_timing=Timing(ttft=0.0, tokens=3, gap=0.3),
    s3_streams=20,
    s3_ramp=0.2,
    s3_settle=0.1,
    s3_window=0.3,
    s4_timing=Timing(ttft=0.0, tokens=200, gap=0.0),
    s4_concurrency=4,
    s4_duration=0.5,
    warm_up=False,
)
