"""The benchmark suite of openrouter-relay: `bench/run` runs it (see BENCHMARKS.md)."""
