"""The shipped toy models. The foundation (the PRM's base) reads, computes and judges; the policy
fine-tuned from it loads with the Auto classes, errs at a useful rate and produces the varied,
tagged samples the Monte Carlo search needs."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmprm_tasks.settings import TOY_FOUNDATION_DIR, TOY_POLICY_DIR
from mmprm_tasks.toy.training import EVAL_SEED, generate_rollouts, greedy_accuracy
from mmprm_tasks.toy.world import first_error_index, is_correct_answer, sample_problems, solve


@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(2)
    model = AutoModelForImageTextToText.from_pretrained(TOY_POLICY_DIR).eval()
    processor = AutoProcessor.from_pretrained(TOY_POLICY_DIR)
    return model, processor


@pytest.mark.parametrize("directory", [TOY_FOUNDATION_DIR, TOY_POLICY_DIR], ids=["foundation", "policy"])
def test_shipped_checkpoint_files_and_metrics(directory):
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "chat_template.jinja", "metrics.json"} <= names
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size < 10 * 2**20
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics["steps"] > 0 and "seed" in metrics and "command" in metrics


def test_foundation_reads_computes_and_judges():
    """What the PRM's base brings (its metrics.json, measured on held-out test problems)."""
    metrics = json.loads((TOY_FOUNDATION_DIR / "metrics.json").read_text())
    assert metrics["init_from"] is None and metrics["layouts"]["judgement"] > 0
    assert metrics["greedy_test_accuracy"] >= 0.85
    assert metrics["judgement_auc"]["image"] >= 0.9 and metrics["judgement_auc"]["arithmetic"] >= 0.9


def test_foundation_likelihood_separates_right_from_wrong_steps():
    """The base's own probability of a stated step is low for a slipped or misread one: what a
    PRM fine-tuned from it can build on (the generative-verifier baseline of the evaluation)."""
    from mmprm_tasks.evaluate import roc_auc
    from mmprm_tasks.prm import StepLikelihoodScorer
    from mmprm_tasks.toy.world import render_image

    scorer = StepLikelihoodScorer(TOY_FOUNDATION_DIR, batch_size=32)
    rng = random.Random(5)
    right, wrong = [], []
    for problem in sample_problems("test", 60, seed=11):
        steps = solve(problem, rng, wrong_step_rate=0.6)
        first_error = first_error_index(problem.solution(), steps)
        scores = scorer.score(problem.question, render_image(problem.numbers), [steps])[0]
        for i, score in enumerate(scores):
            if first_error is None or i < first_error:
                right.append(score)
            elif i == first_error:
                wrong.append(score)
    assert len(wrong) >= 20
    assert roc_auc(right, wrong) >= 0.9


def test_policy_greedy_accuracy_and_metrics_agree(policy):
    model, processor = policy
    metrics = json.loads((TOY_POLICY_DIR / "metrics.json").read_text())
    assert metrics["init_from"].endswith("toy_foundation") and metrics["wrong_step_rate"] > 0
    accuracy = greedy_accuracy(model, processor, sample_problems("test", 100, EVAL_SEED))
    assert accuracy == pytest.approx(metrics["greedy_test_accuracy"], abs=0.1)


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

    mixed = hits = 0
    for problem, rs in zip(problems, rollouts):
        gt = problem.solution()
        correct = [is_correct_answer(gt, r) for r in rs]
        mixed += 0 < sum(correct) < len(rs)
        hits += sum(correct)
        for r, ok in zip(rs, correct):
            # a wrong answer always has a first error somewhere
            if not ok:
                assert first_error_index(gt, r) is not None
    assert mixed / len(problems) >= 0.2
    # sampled (not greedy) accuracy is what Best-of-N and the search see: wrong often enough
    # that picking matters, right often enough that the answer is usually among the samples
    assert 0.35 <= hits / len(parsed) <= 0.7


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
