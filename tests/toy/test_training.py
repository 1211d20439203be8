"""The shipped toy policy: loads with the Auto classes, solves a fair share of unseen problems
greedily, and produces the varied, tagged samples the Monte Carlo search needs."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmprm_tasks.settings import TOY_POLICY_DIR
from mmprm_tasks.toy.train_policy import EVAL_SEED, generate_rollouts, greedy_accuracy
from mmprm_tasks.toy.world import first_error_index, is_correct_answer, sample_problems, solve


@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(2)
    model = AutoModelForImageTextToText.from_pretrained(TOY_POLICY_DIR).eval()
    processor = AutoProcessor.from_pretrained(TOY_POLICY_DIR)
    return model, processor


def test_shipped_checkpoint_files_and_metrics():
    names = {p.name for p in TOY_POLICY_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "chat_template.jinja", "metrics.json"} <= names
    size = sum(p.stat().st_size for p in TOY_POLICY_DIR.iterdir())
    assert size < 10 * 2**20
    metrics = json.loads((TOY_POLICY_DIR / "metrics.json").read_text())
    assert metrics["steps"] > 0 and "seed" in metrics and "command" in metrics
    assert 0.4 <= metrics["greedy_test_accuracy"] <= 0.8


def test_greedy_accuracy_on_unseen_problems_is_in_range(policy):
    model, processor = policy
    accuracy = greedy_accuracy(model, processor, sample_problems("test", 100, EVAL_SEED))
    assert 0.4 <= accuracy <= 0.8


def test_samples_are_tagged_and_give_informative_mc_values(policy):
    model, processor = policy
    problems = sample_problems("test", 40, seed=7)
    rollouts = generate_rollouts(
        model, processor, problems, n=16, do_sample=True, temperature=1.0, top_k=50, top_p=0.9,
        repetition_penalty=1.05, seed=0, batch_size=128,
    )
    parsed = [r for rs in rollouts for r in rs]
    well_formed = [r for r in parsed if len(r) >= 3 and r[0].startswith("The numbers are")]
    assert len(well_formed) / len(parsed) >= 0.9

    mixed = 0
    for problem, rs in zip(problems, rollouts):
        gt = problem.solution()
        correct = [is_correct_answer(gt, r) for r in rs]
        mixed += 0 < sum(correct) < len(rs)
        for r, ok in zip(rs, correct):
            # a wrong answer always has a first error somewhere
            if not ok:
                assert first_error_index(gt, r) is not None
    assert mixed / len(problems) >= 0.2


def test_continuations_follow_the_prefix(policy):
    """What the annotator relies on: continuing a right prefix often ends right, continuing a
    prefix with a planted slip almost never does (later steps carry the wrong value)."""
    model, processor = policy
    problems = sample_problems("test", 30, seed=3)
    rng = random.Random(0)
    wrong_prefixes = []
    for problem in problems:
        while True:
            steps = solve(problem, rng, wrong_step_rate=0.9)
            if first_error_index(problem.solution(), steps) == 1:
                break
        wrong_prefixes.append(steps[:2])
    right_prefixes = [p.solution()[:2] for p in problems]

    def mean_mc(prefixes):
        rollouts = generate_rollouts(
            model, processor, problems, n=8, prefixes=prefixes, do_sample=True, seed=0, batch_size=120
        )
        # the prefix is not repeated: rollouts start after it (rare sampled garbage aside)
        flat = [r for rs in rollouts for r in rs]
        assert sum(bool(r) and not r[0].startswith("The numbers are") for r in flat) >= 0.95 * len(flat)
        hits = [is_correct_answer(p.solution(), r) for p, rs in zip(problems, rollouts) for r in rs]
        return sum(hits) / len(hits)

    assert mean_mc(right_prefixes) >= 0.4
    assert mean_mc(wrong_prefixes) <= 0.15
