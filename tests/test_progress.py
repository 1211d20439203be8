"""Progress of long work (mmprm_tasks/progress.py): rich bars in the CLI, captured with rich's
recording console, for annotation, training and evaluation run as a user runs them; one-line
progress in logs elsewhere."""

from __future__ import annotations

import io
import logging
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mmprm_tasks.progress import StageProgress, track
from mmprm_tasks.toy.world import generate_seeds

# Small budgets: three problems annotated, three training steps, two test problems.
TINY = {"MMPRM_SEARCH__NUM_ROLLOUTS": "4", "MMPRM_SEARCH__MAX_SEARCH_COUNT": "2",
        "MMPRM_SEARCH__ROLLOUT_BUDGET": "24", "MMPRM_SAMPLING__MAX_NEW_TOKENS": "96",
        "MMPRM_TRAVERSE__MIN_WORDS": "3", "MMPRM_TRAIN__MAX_LENGTH": "512",
        "MMPRM_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": "2", "MMPRM_EVAL__NUM_CANDIDATES": "4",
        "MMPRM_EVAL__NS": "[1,2,4]", "MMPRM_EVAL__BASE_LIKELIHOOD_BASELINE": "false"}


def test_the_cli_shows_progress_bars_for_annotation_training_and_evaluation(cli_settings, tmp_path, monkeypatch):
    from mmprm_tasks import cli
    from mmprm_tasks.settings import get_settings

    for name, value in TINY.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    recording = Console(record=True, force_terminal=True, width=200, file=io.StringIO())
    monkeypatch.setattr(cli, "console", recording)
    seeds = generate_seeds(tmp_path / "seeds", n_train=3, n_test=2, seed=5)

    def mmprm(*args: str) -> None:
        result = CliRunner().invoke(cli.app, list(args))
        assert result.exit_code == 0, f"mmprm {' '.join(args)}: {result.output}\n{recording.export_text(clear=False)}"

    mmprm("ingest", str(seeds["train"]))
    mmprm("ingest", str(seeds["test"]))
    mmprm("chunks", "--run", "r1", "--split", "train")
    mmprm("annotate", "--run", "r1", "--all")
    mmprm("traverse", "r1")
    mmprm("format", re.search(r'"dataset_id": "(ds-\w+)"', recording.export_text(clear=False)).group(1))
    mmprm("train", "--max-steps", "3")
    mmprm("evaluate", "--limit", "2")
    shown = recording.export_text()
    # Each bar's last state: what it did of how much, its rate or figure, and the time left/taken.
    assert re.search(r"ingest train\.json \(records\) \S+ 3/3", shown), shown
    assert re.search(r"annotation of r1 chunk 0 \(problems\) \S+ 3/3 [\d.]+ rollouts/s ETA", shown), shown
    assert re.search(r"PRM training \(steps\) \S+ 3/3 loss \d\.\d{4} ETA", shown), shown
    assert re.search(r"candidates sampled \(candidates\) \S+ 8/8 [\d.]+ problems/s ETA", shown), shown
    assert re.search(r"candidates scored \(\w+\) \(candidates\) \S+ 8/8", shown), shown


@pytest.fixture
def log_every_line(monkeypatch):
    """The interval setting at 0 for this test only (get_settings() is cached)."""
    from mmprm_tasks.settings import get_settings

    monkeypatch.setenv("MMPRM_PROGRESS_LOG_INTERVAL_S", "0")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_without_a_display_progress_is_logged_one_line_at_a_time(caplog, log_every_line):
    with caplog.at_level(logging.INFO, logger="mmprm_tasks.progress"):
        with track("annotation of r chunk 0", 4, "problems", rates=("rollouts",)) as progress:
            progress.advance(1, rollouts=16)
            progress.advance(1, rollouts=16, loss=0.5)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert re.fullmatch(r"annotation of r chunk 0: 1/4 problems \(25%\), [\d.]+ problems/s, [\d.]+ rollouts/s, "
                        r"ETA \w+, elapsed \w+", lines[0]), lines[0]
    assert "2/4 problems (50%)" in lines[1] and "loss 0.5000" in lines[1]
    assert lines[2].endswith("(done)")


def test_log_lines_are_spaced_by_the_interval(caplog):
    with caplog.at_level(logging.INFO, logger="mmprm_tasks.progress"):
        progress = StageProgress("PRM training", 100, "steps", interval_s=3600)
        for _ in range(50):
            progress.advance(1)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("PRM training: 50/100 steps (50%)") and lines[0].endswith("(done)")


def test_work_that_fails_says_it_stopped_not_done(caplog):
    with caplog.at_level(logging.INFO, logger="mmprm_tasks.progress"):
        try:
            with track("candidates sampled", 8, "candidates") as progress:
                progress.advance(4)
                raise TimeoutError("policy server gone")
        except TimeoutError:
            pass
    assert caplog.records[-1].getMessage().endswith("(stopped by TimeoutError)")
    assert "(done)" not in caplog.text
