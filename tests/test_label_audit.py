"""The label audit: a dataset's step labels against the toy world's ground truth (or the step
judge), by step kind; numbers checked exactly on hand-made paths, then the audit the dataset stage
stores and `mmprm audit` prints, on a real Postgres and object store."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from mmprm_tasks import cli
from mmprm_tasks.db import get_engine
from mmprm_tasks.exports import dataset_paths
from mmprm_tasks.label_audit import audit_labels, label_audit_key, render_audit
from mmprm_tasks.storage import open_store
from mmprm_tasks.traverse import render_process

from test_exports import N_PROBLEMS, _dataset
from test_seeds import make_seed_file

GT_A = ["The numbers are 3 and 5.", "3 + 5 = 8.", "8"]
GT_B = ["The numbers are 2, 4 and 6.", "2 + 4 = 6.", "6 + 6 = 12.", "12"]


def path(tree_id: str, groups: list[list[str]], labels: list[float], polarity: str, **extra) -> dict:
    return {"question": "q", "process": render_process(groups), "labels": labels, "mc_values": labels,
            "tree_id": tree_id, "polarity": polarity, **extra}


TOY_PATHS = [
    # right all along
    path("A", [[GT_A[0]], [GT_A[1], GT_A[2]]], [0.5, 1.0], "positive"),
    # ends at a real slip, labelled 0 there
    path("A", [[GT_A[0]], ["3 + 5 = 9."]], [0.5, 0.0], "negative"),
    # a wrong step the rollouts recovered from: labelled right (0.25), as is the answer after it
    path("B", [[GT_B[0]], ["2 + 4 = 7."], [GT_B[2], GT_B[3]]], [0.75, 0.25, 1.0], "positive"),
    # a right step after which every rollout failed by chance: MC 0
    path("B", [[GT_B[0]], [GT_B[1]]], [0.5, 0.0], "negative"),
    # a misreading the labels put one step late
    path("A", [["The numbers are 8 and 5."], ["8 + 5 = 13."]], [0.25, 0.0], "negative"),
]


def test_labels_against_ground_truth_by_step_kind():
    report = audit_labels(TOY_PATHS, {"A": GT_A, "B": GT_B})
    gt = report["ground_truth"]
    assert (report["paths"], report["labels"], gt["paths"], report["judge"], report["unaudited_paths"]) == \
        (5, 11, 5, None, 0)
    by_kind = gt["by_step_kind"]
    assert list(by_kind) == ["reading", "equation", "answer"]
    # reading: right on paths 1-4 (all said right), the misreading said right (0.25)
    assert by_kind["reading"] == {
        "labels": 5, "right": 4, "wrong": 1, "right_labelled_right": 4, "right_labelled_wrong": 0,
        "wrong_labelled_right": 1, "wrong_labelled_wrong": 0, "agreement": 0.8, "precision_wrong": None,
        "recall_wrong": 0.0, "mean_label_right": 0.5625, "mean_label_wrong": 0.25}
    # equation: the slip (0) and the step after the misreading (0) caught, the recovered slip
    # (0.25) missed, the MC-0 right step a false alarm
    assert by_kind["equation"] == pytest.approx({
        "labels": 4, "right": 1, "wrong": 3, "right_labelled_right": 0, "right_labelled_wrong": 1,
        "wrong_labelled_right": 1, "wrong_labelled_wrong": 2, "agreement": 0.5, "precision_wrong": 2 / 3,
        "recall_wrong": 2 / 3, "mean_label_right": 0.0, "mean_label_wrong": 0.25 / 3})
    # answer steps: labelled 1 whether the prefix is right or not
    assert by_kind["answer"] == {
        "labels": 2, "right": 1, "wrong": 1, "right_labelled_right": 1, "right_labelled_wrong": 0,
        "wrong_labelled_right": 1, "wrong_labelled_wrong": 0, "agreement": 0.5, "precision_wrong": None,
        "recall_wrong": 0.0, "mean_label_right": 1.0, "mean_label_wrong": 1.0}
    assert gt["all"] == pytest.approx({
        "labels": 11, "right": 6, "wrong": 5, "right_labelled_right": 5, "right_labelled_wrong": 1,
        "wrong_labelled_right": 3, "wrong_labelled_wrong": 2, "agreement": 7 / 11, "precision_wrong": 2 / 3,
        "recall_wrong": 0.4, "mean_label_right": 3.25 / 6, "mean_label_wrong": 0.3})
    # wrong prefixes by the kind of their first error: the slips' three, the misreading's two
    errors = gt["by_error_kind"]
    assert list(errors) == ["misreading", "slip"]
    assert (errors["slip"]["wrong"], errors["slip"]["wrong_labelled_wrong"], errors["slip"]["mean_label_wrong"]) \
        == pytest.approx((3, 1, 1.25 / 3))
    assert (errors["misreading"]["wrong"], errors["misreading"]["wrong_labelled_wrong"],
            errors["misreading"]["mean_label_wrong"]) == (2, 1, 0.125)
    assert gt["first_error"] == {"agree": 2, "labels_earlier": 0, "labels_later": 1, "labels_missed": 1,
                                 "labels_spurious": 1, "agreement": 0.4}
    assert report["label_distribution"]["all"] == {"labels": 11, "labelled_right": 8, "labelled_wrong": 3,
                                                   "mean_label": pytest.approx(4.75 / 11)}


def test_the_hard_reading_follows_the_threshold():
    # above 0.3: the recovered slip's 0.25 and the misreading's 0.25 now say wrong, and both
    # paths' first errors then sit where the ground truth puts them
    gt = audit_labels(TOY_PATHS, {"A": GT_A, "B": GT_B}, mc_threshold=0.3)["ground_truth"]
    assert gt["first_error"]["agree"] == 4 and gt["first_error"]["labels_spurious"] == 1
    assert (gt["all"]["wrong_labelled_wrong"], gt["all"]["wrong_labelled_right"]) == (4, 1)


def test_labels_against_the_judge_where_there_is_no_ground_truth():
    judged = [
        # the judge finds the second step wrong; the labels call the whole path right
        path("p1", [["Let x be 2."], ["2 + 3 = 6.", "So the answer is 6."]], [0.5, 1.0], "positive",
             judge_scores=[0.9, 0.1, 0.8]),
        path("p2", [["Let x be 2."], ["2 * 3 = 7."]], [0.5, 0.0], "negative", judge_scores=[0.9, 0.05]),
        path("p3", [["Let x be 2."], ["Then we stop."]], [0.5, 0.0], "negative"),  # not judged
    ]
    report = audit_labels(judged, {}, judge_threshold=0.2)
    judge = report["judge"]
    assert (report["ground_truth"], judge["paths"], report["unaudited_paths"]) == (None, 2, 1)
    assert "by_error_kind" not in judge  # kinds of error are the toy world's
    assert {k: (v["right"], v["wrong"], v["wrong_labelled_wrong"]) for k, v in judge["by_step_kind"].items()} == \
        {"reading": (2, 0, 0), "equation": (0, 1, 1), "answer": (0, 1, 0)}
    assert judge["first_error"]["agree"] == 1 and judge["first_error"]["labels_missed"] == 1
    assert report["label_distribution"]["by_step_kind"]["other"]["labels"] == 1
    assert "1 paths have neither ground truth nor judge scores (label distribution only)" in report["summary"]
    # without a judge threshold (no consensus filtering) the scores are not read
    assert audit_labels(judged, {})["judge"] is None


def test_without_ground_truth_or_judge_the_report_says_so():
    report = audit_labels(TOY_PATHS, {})
    assert report["ground_truth"] is None and report["judge"] is None and report["unaudited_paths"] == 5
    assert report["summary"][-1] == "no ground truth and no judge scores for this dataset: label distribution only"
    assert report["label_distribution"]["by_step_kind"]["answer"] == {
        "labels": 2, "labelled_right": 2, "labelled_wrong": 0, "mean_label": 1.0}


def test_a_path_whose_labels_do_not_match_its_groups_is_named():
    bad = path("tree-9", [["a b"], ["c d"]], [0.5], "negative")
    with pytest.raises(ValueError, match="path 0 of tree 'tree-9': 2 <prm> groups for 1 labels"):
        audit_labels([bad], {})


def _seeds_with_ground_truth(root):
    """The exports' seed problems ("What is i + 1?") with the ground-truth steps of the scripted
    policy's right solution, as the toy world's seeds carry them."""
    seed_file = make_seed_file(root, N_PROBLEMS)
    records = json.loads(seed_file.read_text())
    for i, record in enumerate(records):
        record["gt_steps"] = [f"The number is {i}.", f"{i} + 1 = {i + 1}.", str(i + 1)]
    seed_file.write_text(json.dumps(records))
    return seed_file


def test_the_dataset_stage_stores_the_audit_and_mmprm_audit_prints_it(cli_settings, tmp_path):
    dataset_id = _dataset(cli_settings, tmp_path, _seeds_with_ground_truth(tmp_path / "data"))
    store, engine = open_store(cli_settings), get_engine(cli_settings)
    with engine.connect() as conn:
        key = conn.execute(sa.text("SELECT label_audit_key FROM datasets WHERE dataset_id = :d"),
                           {"d": dataset_id}).scalar_one()
    assert key == label_audit_key(dataset_id)
    stored = store.get_json(key)
    paths = dataset_paths(cli_settings, dataset_id)
    gt = stored["ground_truth"]
    assert stored["dataset_id"] == dataset_id
    assert (stored["paths"], gt["paths"], stored["unaudited_paths"]) == (len(paths), len(paths), 0)
    assert stored["labels"] == gt["all"]["labels"] == sum(len(p["labels"]) for p in paths)
    # the scripted policy's slip is never recovered from, so every wrong prefix has MC 0: no
    # wrong prefix is labelled right and no path's first error is missed
    assert gt["all"]["wrong"] > 0 and gt["all"]["wrong_labelled_right"] == 0
    assert gt["first_error"]["labels_missed"] == 0
    assert "slip" in gt["by_error_kind"] and set(gt["by_error_kind"]) <= {"slip", "answer"}

    machine = CliRunner().invoke(cli.app, ["audit", dataset_id, "--json"])
    assert machine.exit_code == 0, machine.output
    assert json.loads(machine.output) == stored
    human = CliRunner().invoke(cli.app, ["audit", dataset_id])
    assert human.exit_code == 0, human.output
    assert f"labels vs ground truth, {len(paths)} paths" in human.output
    assert "wrong prefixes by their first error" in human.output and "│ slip" in human.output
    assert stored["summary"][1] in human.output

    # a dataset made before the audit existed: `mmprm audit` computes and records it
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE datasets SET label_audit_key = NULL WHERE dataset_id = :d"), {"d": dataset_id})
    store.delete(key)
    again = CliRunner().invoke(cli.app, ["audit", dataset_id, "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output) == stored
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT label_audit_key FROM datasets WHERE dataset_id = :d"),
                            {"d": dataset_id}).scalar_one() == key
    assert store.exists(key)


def test_render_audit_names_every_reference_and_the_distribution():
    parts = [p if isinstance(p, str) else p.title for p in
             render_audit(audit_labels(TOY_PATHS, {"A": GT_A, "B": GT_B}))]
    assert parts[:4] == ["labels vs ground truth, 5 paths (a label says right when > 0)",
                         "wrong prefixes by their first error",
                         "first error per path: agree 2, labels_earlier 0, labels_later 1, labels_missed 1, "
                         "labels_spurious 1 (agreement 0.40)",
                         "label distribution"]


def test_a_consensus_filtered_dataset_is_audited_against_its_judge(settings, tmp_path):
    """No ground truth (the exports' seeds carry none), consensus filtering on: the stored audit
    reads the judge's scores with the dataset's consensus threshold."""
    from mmprm_tasks.pipeline import traverse_stage

    _dataset(settings, tmp_path)
    s = settings.with_overrides({"traverse.min_words": 3, "traverse.consensus_judge": "base_likelihood",
                                 "traverse.consensus_threshold": 0.3})
    dataset = traverse_stage(s, ["run-a"])
    audit = open_store(s).get_json(label_audit_key(dataset["dataset_id"]))
    kept = dataset["counts"]["paths"]
    assert (audit["ground_truth"], audit["judge_threshold"], audit["judge"]["paths"]) == (None, 0.3, kept)
    assert audit["judge"]["all"]["labels"] == dataset["counts"]["labels"]
    # consensus kept only paths whose first errors agree, so all of them do
    assert audit["judge"]["first_error"]["agree"] == kept
    assert "judge scores exist only on paths consensus filtering kept" in " ".join(audit["summary"])
