"""The ``toy`` typer sub-app."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mmprm_tasks.toy.cli import toy_app

runner = CliRunner()


def test_seeds_command_writes_both_splits(tmp_path):
    result = runner.invoke(toy_app, ["seeds", str(tmp_path / "s"), "--train", "5", "--test", "3", "--seed", "2"])
    assert result.exit_code == 0, result.output
    paths = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(json.loads(open(paths["train"]).read())) == 5
    assert len(json.loads(open(paths["test"]).read())) == 3
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 8


def test_seeds_command_rejects_impossible_sizes(tmp_path):
    result = runner.invoke(toy_app, ["seeds", str(tmp_path), "--test", "100000"])
    assert result.exit_code != 0


def test_train_foundation_then_policy_from_it(tmp_path):
    """The two shipped models' commands, a few steps each: the policy starts from the foundation's
    weights (and tokenizer) and records where it came from."""
    foundation, policy = tmp_path / "foundation", tmp_path / "policy"
    result = runner.invoke(
        toy_app, ["train-foundation", "--out", str(foundation), "--steps", "2", "--seed", "1", "--eval-problems", "4"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((foundation / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["seed"] == 1 and metrics["eval_problems"] == 4
    assert metrics["init_from"] is None and "train-foundation" in metrics["command"]
    assert set(metrics["layouts"]) == {"tagged", "process", "judgement"}
    assert set(metrics["judgement_auc"]) == {"image", "arithmetic"}
    assert (foundation / "model.safetensors").exists() and (foundation / "tokenizer.json").exists()

    result = runner.invoke(
        toy_app,
        ["train-policy", "--out", str(policy), "--init-from", str(foundation), "--steps", "1",
         "--eval-problems", "2", "--wrong-step-rate", "0.5"],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((policy / "metrics.json").read_text())
    assert metrics["init_from"] == str(foundation) and metrics["wrong_step_rate"] == 0.5
    assert metrics["layouts"] == {"tagged": 1.0} and "--init-from" in metrics["command"]

    from safetensors.torch import load_file

    before, after = load_file(foundation / "model.safetensors"), load_file(policy / "model.safetensors")
    assert before.keys() == after.keys()
    # one optimizer step from the foundation: close to it, yet moved
    name = next(k for k in before if "layers.0.mlp.up_proj" in k and "vision" not in k)
    delta = (before[name] - after[name]).abs().max().item()
    assert 0 < delta < 0.1


@pytest.mark.slow
def test_policy_recipe_reaches_the_target_range(tmp_path):
    """The shipped policy's recipe, rerun from the shipped foundation (minutes on 2 cores)."""
    result = runner.invoke(toy_app, ["train-policy", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.4 <= metrics["greedy_test_accuracy"] <= 0.8
