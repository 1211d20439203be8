"""Consensus filtering: MC labels kept only where a step judge puts the first error in the same
place. The judge here is the real one of the toy world: the foundation's step likelihood."""

from __future__ import annotations

import io
import random

import pytest

from mmprm_tasks.consensus import (consensus_filter, end_at_judged_step, judge_first_error, mc_first_error,
                                   step_groups)
from mmprm_tasks.traverse import render_process
from mmprm_tasks.toy.world import first_error_index, problems_for_split, render_image, solve


def path(question: str, groups: list[list[str]], mc_values: list[float]) -> dict:
    return {"question": question, "image_path": "img", "process": render_process(groups), "labels": list(mc_values),
            "mc_values": list(mc_values), "tree_id": "t"}


def test_first_errors_by_group():
    groups = [["a b c"], ["d e", "f g"], ["h"]]
    assert mc_first_error([0.5, 0.25, 0.0]) == 2
    assert mc_first_error([0.5, 1.0]) is None
    assert judge_first_error(groups, [0.9, 0.9, 0.1, 0.9], 0.2) == 1  # step 2 lies in group 1
    assert judge_first_error(groups, [0.9, 0.9, 0.9, 0.9], 0.2) is None
    assert step_groups(render_process(groups)) == groups


def test_a_negative_path_ends_at_the_judged_step():
    p = path("q", [["one two three"], ["four", "five", "six"]], [0.5, 0.0])
    cut = end_at_judged_step(p, step_groups(p["process"]), [0.9, 0.8, 0.1, 0.9], 0.2)
    assert step_groups(cut["process"]) == [["one two three"], ["four"], ["five"]]
    assert cut["labels"] == [0.5, 0.5, 0.0]  # the step before the error keeps the last MC estimate
    assert cut["mc_values"] == [0.5, 0.5, 0.0]
    assert cut["judge_scores"] == [0.9, 0.8, 0.1]
    # an error group with no group before it has no label to give its first steps: unchanged
    first = path("q", [["four", "five"]], [0.0])
    assert end_at_judged_step(first, step_groups(first["process"]), [0.9, 0.1], 0.2) is first


@pytest.fixture(scope="module")
def judge():
    from mmprm_tasks.prm import StepLikelihoodScorer
    from mmprm_tasks.settings import TOY_FOUNDATION_DIR

    return StepLikelihoodScorer(TOY_FOUNDATION_DIR, batch_size=8)


def _solutions(n: int) -> list[tuple]:
    """Toy problems, each with a right solution and one with a single wrong step."""
    rng, out = random.Random(3), []
    for problem in problems_for_split("train")[:n]:
        right = problem.solution()
        while True:
            wrong = solve(problem, rng, wrong_step_rate=0.9)
            at = first_error_index(right, wrong)
            if at is not None and at < len(wrong) - 1:
                break
        image = io.BytesIO()
        render_image(problem.numbers).save(image, format="PNG")
        out.append((problem, right, wrong, at, image.getvalue()))
    return out


def test_the_foundation_judge_keeps_agreeing_paths_and_drops_mc_mistakes(judge):
    paths, images = [], {}
    for k, (problem, right, wrong, at, image) in enumerate(_solutions(4)):
        images[f"img{k}"] = image
        kinds = [
            ("positive, right", [[s] for s in right], [0.75] * len(right)),
            ("negative at the real error", [[s] for s in wrong[: at + 1]], [0.5] * at + [0.0]),
            # MC's usual mistakes: a wrong step the rollouts recovered from (labelled positive),
            # and a right step after which every rollout failed by chance (labelled 0)
            ("positive over a wrong step", [[s] for s in wrong], [0.5] * len(wrong)),
            ("negative at a right step", [[s] for s in right[:2]], [0.5, 0.0]),
        ]
        for kind, groups, mcs in kinds:
            paths.append({**path(problem.question, groups, mcs), "image_path": f"img{k}", "kind": kind})
    result = consensus_filter(paths, judge, 0.2, lambda p: images[p["image_path"]])
    kept = {(p["image_path"], p["kind"]) for p in result.kept}
    assert kept == {(p["image_path"], p["kind"]) for p in paths if p["kind"] in
                    ("positive, right", "negative at the real error")}
    assert result.counts == {"paths": 16, "kept": 8, "judge_earlier": 4, "judge_later": 0, "judge_none": 4}
    assert all(len(p["judge_scores"]) == sum(map(len, step_groups(p["process"]))) for p in result.kept)


def test_a_path_whose_labels_do_not_match_its_groups_is_named(judge):
    bad = {**path("q", [["a b"], ["c d"]], [0.5]), "tree_id": "tree-9"}
    with pytest.raises(ValueError, match="tree 'tree-9': 2 <prm> groups for 1 mc_values"):
        consensus_filter([bad], judge, 0.2, lambda p: b"")


def test_a_dataset_with_consensus_filtering_keeps_what_the_judge_agrees_with(settings, tmp_path):
    """traverse.consensus_judge=base_likelihood in the dataset stage: the PRM's base judges every
    path; the stored dataset holds the kept ones and its counts say what was dropped and why."""
    from mmprm_tasks.exports import dataset_paths
    from mmprm_tasks.pipeline import traverse_stage

    from test_exports import _dataset

    plain_id = _dataset(settings, tmp_path)
    plain = dataset_paths(settings.with_overrides({"traverse.min_words": 3}), plain_id)
    s = settings.with_overrides({"traverse.min_words": 3, "traverse.consensus_judge": "base_likelihood"})
    filtered = traverse_stage(s, ["run-a"])
    assert filtered["dataset_id"] != plain_id
    counts = filtered["counts"]
    kept = dataset_paths(s, filtered["dataset_id"])
    assert counts["consensus_paths"] == len(plain)
    assert 0 < len(kept) < len(plain)  # the scripted policy's trees give both kinds
    assert counts["paths"] == counts["consensus_kept"] == len(kept)
    assert counts["consensus_kept"] + counts["consensus_judge_earlier"] + counts["consensus_judge_later"] \
        + counts["consensus_judge_none"] == len(plain)
    assert counts["positives"] + counts["negatives"] == len(kept)
    assert counts["labels"] == sum(len(p["labels"]) for p in kept)
    assert {p["process"] for p in kept} <= {p["process"] for p in plain}
    assert all(len(p["judge_scores"]) == sum(map(len, step_groups(p["process"]))) for p in kept)
