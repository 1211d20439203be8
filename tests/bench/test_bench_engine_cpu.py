"""``bench/bench_engine_cpu.py`` at a tiny size: it records a real search's requests, replays them
on both engines with the same work, and reports the ratios it measured."""

from __future__ import annotations

import json

from helpers import load_bench


def test_engine_bench_replays_the_search_requests_on_both_engines(tmp_path):
    bench = load_bench("bench_engine_cpu")
    out = tmp_path / "engine.json"
    report = bench.main(["--problems", "4", "--capacity", "64", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["requests"]["count"] > 4  # root estimates and continuations of 4 trees
    replay = report["replay"]
    rows = report["requests"]["rows"]
    assert replay["generate"]["rows"] == replay["continuous"]["rows"] == replay["continuous_int8"]["rows"] == rows
    # Same weights, same seeds: the fp32 engines sample the same number of tokens up to the rare
    # draw that float rounding flips.
    assert abs(replay["continuous"]["tokens"] - replay["generate"]["tokens"]) < 0.05 * replay["generate"]["tokens"]
    assert replay["continuous"]["ratio"] > 1.0
    annotation = report["annotation"]
    assert annotation["continuous"]["trees"] == annotation["generate"]["trees"] == 4
    assert annotation["ratio"] > 1.0
