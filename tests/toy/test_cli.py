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


def test_train_policy_command_saves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "policy"
    result = runner.invoke(
        toy_app, ["train-policy", "--out", str(out), "--steps", "2", "--seed", "1", "--eval-problems", "4"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["seed"] == 1 and metrics["eval_problems"] == 4
    assert "train-policy" in metrics["command"]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


@pytest.mark.slow
def test_training_recipe_reaches_the_target_range(tmp_path):
    """The shipped checkpoint's recipe, rerun from scratch (minutes on 2 cores)."""
    from mmprm_tasks.toy.train_policy import DEFAULT_STEPS

    result = runner.invoke(toy_app, ["train-policy", "--out", str(tmp_path), "--steps", str(DEFAULT_STEPS)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.4 <= metrics["greedy_test_accuracy"] <= 0.8


def test_train_policy_continues_from_a_checkpoint_with_process_layout_examples(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["--steps", "1", "--seed", "1", "--eval-problems", "2"]
    assert runner.invoke(toy_app, ["train-policy", "--out", str(first), *args]).exit_code == 0
    result = runner.invoke(
        toy_app,
        ["train-policy", "--out", str(second), *args, "--init-from", str(first),
         "--wrong-step-rate", "0", "--process-layout-rate", "1"],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["init_from"] == str(first) and metrics["process_layout_rate"] == 1.0
    assert "--init-from" in metrics["command"] and "--process-layout-rate" in metrics["command"]

    from safetensors.torch import load_file

    before, after = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert before.keys() == after.keys()
    # one optimizer step from the first checkpoint: close to it, yet moved
    name = next(k for k in before if "layers.0.mlp.up_proj" in k and "vision" not in k)
    delta = (before[name] - after[name]).abs().max().item()
    assert 0 < delta < 0.1
