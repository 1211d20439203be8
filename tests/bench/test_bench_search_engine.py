"""``bench/bench_search_engine.py`` at a tiny size: the platform's driver keeps the simulated
engine fuller than the one-problem-at-a-time loop and grows the same trees."""

from __future__ import annotations

import pytest

from helpers import load_bench


@pytest.mark.parametrize("capacity", [64])
def test_engine_bench_feeds_the_engine_and_keeps_the_trees(capacity):
    bench = load_bench("bench_search_engine")
    result = bench.main(["--problems", "12", "--capacity", str(capacity), "--error-rate", "0.1"])
    assert result["same_trees"]
    continuous, serial = result["continuous"], result["one_at_a_time"]
    assert continuous["rollouts"] == serial["rollouts"]  # same work, done faster
    assert continuous["mean_sequences_in_flight_overall"] > 2 * serial["mean_sequences_in_flight_overall"]
    assert result["speedup_rollouts_per_s"] > 1.5
