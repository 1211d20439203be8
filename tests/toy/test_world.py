"""The synthetic world: seed files, ground truth, and locating first errors."""

from __future__ import annotations

import json
import random
import re

import pytest
from PIL import Image

from mmprm_tasks.toy.world import (
    IMAGE_SIZE,
    all_problems,
    first_error_index,
    generate_seeds,
    is_correct_answer,
    problems_for_split,
    sample_problems,
    solve,
)

SPEC_FIELDS = {"id": str, "question": str, "correct_answer": str, "image_path": str}


def _read(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    return out, generate_seeds(out, 40, 20, seed=3)


def test_records_are_valid_seed_problems(seeds):
    out, paths = seeds
    assert set(paths) == {"train", "test"}
    for split, path in paths.items():
        records = _read(path)
        assert isinstance(records, list) and len(records) == (40 if split == "train" else 20)
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            for field, typ in SPEC_FIELDS.items():
                assert isinstance(r[field], typ) and r[field], field
            assert r["split"] == split
            steps = r["gt_steps"]
            assert 3 <= len(steps) <= 4 and steps[-1] == r["correct_answer"]
            assert steps[0].startswith("The numbers are ")
            assert not r["image_path"].startswith("/")
            image_file = path.parent / r["image_path"]
            with Image.open(image_file) as img:
                img.load()
                assert img.size == (IMAGE_SIZE, IMAGE_SIZE) and img.format == "PNG"
            # the reading step names exactly the numbers drawn in the image
            assert [int(x) for x in re.findall(r"\d", steps[0])] == r["numbers"]
    # every kind of question shows up even in small draws
    kinds = {r["kind"] for p in paths.values() for r in _read(p)}
    assert len(kinds) == 7


def test_generation_is_deterministic_and_seed_dependent(seeds, tmp_path):
    out, paths = seeds
    again = generate_seeds(tmp_path / "again", 40, 20, seed=3)
    other = generate_seeds(tmp_path / "other", 40, 20, seed=4)
    for split in ("train", "test"):
        assert _read(again[split]) == _read(paths[split])
        assert _read(other[split]) != _read(paths[split])
        for r in _read(paths[split]):
            assert (out / r["image_path"]).read_bytes() == (again[split].parent / r["image_path"]).read_bytes()


def test_splits_are_disjoint_across_seeds(seeds, tmp_path):
    _, paths = seeds
    other = generate_seeds(tmp_path / "other", 60, 30, seed=9)
    train = {r["id"] for p in (paths["train"], other["train"]) for r in _read(p)}
    test = {r["id"] for p in (paths["test"], other["test"]) for r in _read(p)}
    assert train and test and not train & test
    # the partition is fixed: the policy's training part never meets any test split
    train_part = {p.id for p in problems_for_split("train")}
    test_part = {p.id for p in problems_for_split("test")}
    assert not train_part & test_part and len(train_part) + len(test_part) == len(all_problems())
    assert 0.15 < len(test_part) / len(all_problems()) < 0.25


def test_too_many_problems_is_an_error():
    with pytest.raises(ValueError, match="only"):
        sample_problems("test", 10_000, 0)


GT = ["The numbers are 3, 5 and 7.", "3 + 5 = 8.", "8 - 7 = 1.", "1"]


@pytest.mark.parametrize(
    ("rollout", "expected"),
    [
        (GT, None),
        (["The numbers are 3, 5 and 7.", "5 + 3 = 8.", "8 - 7 = 1.", "The final answer is 1"], None),
        (["The numbers are 3, 5 and 7.", "3 + 5 = 9.", "9 - 7 = 2.", "2"], 1),  # slip
        (["The numbers are 3, 6 and 7.", "3 + 6 = 9.", "9 - 7 = 2.", "2"], 0),  # misreading
        (["The numbers are 3, 5 and 7.", "3 + 5 = 8.", "8 - 7 = 2.", "2"], 2),
        (["The numbers are 3, 5 and 7.", "3 + 5 = 8.", "8 - 7 = 1.", "3"], 3),  # answer only
        (["The numbers are 3, 5 and 7.", "3 + 5 = 8.", "8"], 2),  # stops early
        (["The numbers are 3, 5 and 7.", "3 + 5 = 8.", "8 - 7 = 1.", "1 + 0 = 1.", "1"], 3),
        (["The numbers are 3, 5 and 7.", "3 - 5 = 8.", "8 - 7 = 1.", "1"], 1),  # wrong operator
        (["The numbers are 3, 5 and 7.", "3 + 5 = 8.", "7 - 8 = -1.", "-1"], 2),
        ([], 0),
    ],
)
def test_first_error_index_finds_the_planted_error(rollout, expected):
    assert first_error_index(GT, rollout) == expected
    assert is_correct_answer(GT, rollout) == (rollout[-1:] in (["1"], ["The final answer is 1"]))


def test_corrupted_solutions_stay_consistent_after_the_first_error():
    rng = random.Random(0)
    problems = all_problems()[::37]
    wrong = 0
    for problem in problems:
        gt = problem.solution()
        for _ in range(5):
            steps = solve(problem, rng, wrong_step_rate=0.4)
            assert len(steps) == len(gt)
            err = first_error_index(gt, steps)
            assert (err is None) == (steps == gt)
            if err is not None:
                wrong += 1
                assert err < len(gt) - 1  # the error is in a reasoning step, never the answer alone
                assert not is_correct_answer(gt, steps)  # an error propagates to the answer
            # the answer is always the last computed value
            assert steps[-1] == steps[-2].rstrip(".").split("= ")[-1]
    assert wrong > 0
