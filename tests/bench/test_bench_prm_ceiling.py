"""``bench/bench_prm_ceiling.py``: its labels, layout and AUC, and one tiny real run."""

from __future__ import annotations

import json
import random

import pytest

from helpers import load_bench



@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_prm_ceiling")


def test_roc_auc_counts_wins_and_half_ties(bench):
    assert bench.roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert bench.roc_auc([0.1], [0.9]) == 0.0
    assert bench.roc_auc([0.5, 0.9], [0.5]) == 0.75  # one tie (0.5) and one win
    assert bench.roc_auc([], [0.3]) is None


def test_paths_stop_at_the_first_error_with_ground_truth_labels(bench):
    samples = bench.draw_solutions("train", 200, 0.5, random.Random(0))
    wrong = [s for s in samples if s[2] is not None]
    right = [s for s in samples if s[2] is None]
    assert wrong and right
    records = bench.path_records(wrong + right, bench.truth_labels, lambda p: f"{p.id}.png")
    for record, (problem, steps, first_error) in zip(records, wrong + right):
        kept = len(steps) if first_error is None else first_error + 1
        assert record["process"].count("<prm>") == len(record["labels"]) == kept
        if first_error is None:
            assert record["labels"] == [1.0] * kept
        else:
            assert record["labels"] == [1.0] * first_error + [0.0]
        assert record["image_path"] == f"{problem.id}.png"


def test_surface_labels_read_the_last_digit_of_each_step(bench):
    assert bench.surface_labels(["The numbers are 3 and 8.", "3 + 8 = 11.", "11"], None) == [0.0, 1.0, 1.0]


def test_tiny_run_reports_both_label_kinds(bench, tmp_path):
    out = tmp_path / "ceiling.json"
    report = bench.main(["--train", "16", "--test", "12", "--epochs", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for key in ("ground_truth", "surface_control"):
        auc = report[key]["step_auc"]
        assert auc is not None and 0.0 <= auc <= 1.0
        assert report[key]["training"]["global_step"] == 1
    assert set(report["ground_truth"]["step_auc_by_position"]) <= {0, 1, 2, 3}


def test_stratified_auc_ignores_pairs_across_groups(bench):
    # pooled, position alone would separate them; within each position the scores carry nothing
    groups = {0: ([0.9, 0.9], [0.9]), 1: ([0.1], [0.1, 0.1])}
    assert bench.roc_auc([0.9, 0.9, 0.1], [0.9, 0.1, 0.1]) > 0.5
    assert bench.stratified_auc(groups) == 0.5
    assert bench.stratified_auc({0: ([], [0.2])}) is None


@pytest.mark.slow
def test_shipped_foundation_reaches_the_ceiling_bar(bench):
    """Issue 11: from the shipped foundation, a PRM on ground-truth labels judges steps (position-
    matched AUC >= 0.9) including the reading step against the image (>= 0.8). ~5 min on 2 cores."""
    report = bench.main([])
    truth = report["ground_truth"]
    assert truth["step_auc"] >= 0.9, truth
    assert truth["step_auc_by_position"][0]["auc"] >= 0.8, truth
    assert report["surface_control"]["step_auc"] >= 0.95
