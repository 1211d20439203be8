"""``bench/bench_toy_scaling.py``: ground-truth labels of a path, nested subsets, and one tiny run."""

from __future__ import annotations

import json

from helpers import load_bench


def test_truth_labels_follow_the_first_wrong_step():
    bench = load_bench("bench_toy_scaling")
    gt = ["The numbers are 3, 4 and 2.", "3 + 4 = 7.", "7 - 2 = 5.", "5"]
    right = "The numbers are 3, 4 and 2.<prm>\n\n3 + 4 = 7.<prm>\n\n7 - 2 = 5.<prm>\n\n5<prm>"
    assert bench.truth_labels(right, gt) == [1.0, 1.0, 1.0, 1.0]
    slipped = "The numbers are 3, 4 and 2.<prm>\n\n3 + 4 = 8.<prm>\n\n8 - 2 = 6.<prm>"
    assert bench.truth_labels(slipped, gt) == [1.0, 0.0, 0.0]
    grouped = "The numbers are 3, 4 and 2.\n\n3 + 4 = 7.<prm>\n\n7 - 2 = 4.\n\n4<prm>"
    assert bench.truth_labels(grouped, gt) == [1.0, 0.0]


def test_subsets_are_nested_and_whole_trees():
    bench = load_bench("bench_toy_scaling")
    paths = [{"tree_id": t, "n": i} for t in range(10) for i in range(3)]
    subsets = bench.nested_subsets(paths, [4, 10, 100], seed=1)
    assert [len(subsets[s]) for s in (4, 10, 100)] == [6, 12, 30]  # whole trees of 3 paths
    assert all(p in subsets[10] for p in subsets[4]) and all(p in subsets[100] for p in subsets[10])


def test_plot_is_the_packages_curve_plot(tmp_path):
    """The bench writes its report's plot with the one plotting function the browser uses too."""
    from mmprm_tasks.scaling_curve import plot_curve_png
    from test_scaling_curve import CURVE

    bench = load_bench("bench_toy_scaling")
    out = tmp_path / "plots" / "scaling.png"
    bench.plot(CURVE, out)
    assert out.read_bytes() == plot_curve_png(CURVE) and out.read_bytes().startswith(b"\x89PNG")


def test_tiny_scaling_run(tmp_path):
    bench = load_bench("bench_toy_scaling")
    out = tmp_path / "scaling.json"
    report = bench.main(["--problems", "16", "--test", "6", "--scales", "40,80", "--candidates", "4",
                         "--epochs", "1", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == report and out.with_suffix(".png").stat().st_size > 10_000
    assert [(p["labels"], p["scale"]) for p in report["points"]] == [("mc", 40), ("truth", 40), ("mc", 80),
                                                                      ("truth", 80)]
    assert all(0.0 <= p["min"] <= 1.0 and p["random"] <= p["oracle"] for p in report["points"])
    assert 0.5 < report["mc_vs_truth_agreement"] <= 1.0
    # The trees and candidates are cached: a second run, with consensus filtering and hard labels,
    # annotates nothing again and trains on the paths the judge agrees with.
    again = bench.main(["--problems", "16", "--test", "6", "--scales", "40", "--candidates", "4", "--epochs", "1",
                        "--labels", "mc-hard", "--consensus-threshold", "0.2", "--cut-negatives",
                        "--work", str(tmp_path / "work")])
    assert again["trees"] == report["trees"] and again["timings"]["annotate_s"] < 5
    assert "candidates_s" in again["timings"] and again["timings"]["candidates_s"] < 5
    assert again["consensus"]["paths"] == report["paths"] > again["consensus"]["kept"] == again["paths"] > 0
    assert [p["labels"] for p in again["points"]] == ["mc-hard"] and again["cpu_s"] > 0
