"""Torch threads per process (mmprm_tasks/threads.py): the default left by the cores and the
stage's processes, the setting applied where the policy and the scorer start, and one thread in
the verifier pool's processes."""

from __future__ import annotations

import os
import time

import pytest
import torch
from typer.testing import CliRunner

from mmprm_tasks.policy import load_policy
from mmprm_tasks.settings import TOY_POLICY_DIR, Settings, VerifyConfig
from mmprm_tasks.threads import cores_available, default_torch_threads, idle_cores
from mmprm_tasks.verify import AnswerVerifier


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_leaves_a_core_on_a_busy_box_and_shares_the_rest_between_the_stages_processes():
    assert default_torch_threads(1, cores=1, idle=0.0) == 1
    assert default_torch_threads(1, cores=2, idle=0.3) == 1  # the measured shared 2-core box
    assert default_torch_threads(1, cores=16, idle=3.0) == 15
    assert default_torch_threads(4, cores=16, idle=3.0) == 3  # four training ranks on the host
    assert default_torch_threads(32, cores=16, idle=3.0) == 1


def test_default_takes_every_core_of_an_idle_box():
    assert default_torch_threads(1, cores=2, idle=1.8) == 2  # the measured quiet 2-core box
    assert default_torch_threads(1, cores=16, idle=15.7) == 16
    assert default_torch_threads(4, cores=16, idle=16.0) == 4
    assert default_torch_threads(1, cores=1, idle=1.0) == 1


def test_idle_cores_sees_a_busy_core():
    """Measured, not assumed: a process spinning on one core of this process's affinity takes
    about one core from what is idle."""
    import multiprocessing

    cores = cores_available()
    quiet = idle_cores(0.5)
    assert 0.0 <= quiet <= cores + 0.05
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
    spinner.start()
    try:
        time.sleep(0.5)
        busy = idle_cores(0.5)
    finally:
        spinner.kill()
    assert busy <= max(0.0, quiet - 0.5) + 0.25, (quiet, busy)


def _spin() -> None:
    while True:
        pass


def test_the_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("MMPRM_TORCH_THREADS", "3")
    assert Settings().torch_threads == 3
    monkeypatch.setenv("MMPRM_TORCH_THREADS", "0")
    with pytest.raises(ValueError):
        Settings()


def test_the_policy_starts_with_the_setting_or_the_default(tmp_path, restore_torch_threads, monkeypatch):
    monkeypatch.setattr("mmprm_tasks.threads.idle_cores", lambda: 0.0)  # a busy box: cores - 1
    torch.set_num_threads(3)
    load_policy(Settings(home=tmp_path, torch_threads=2)).close()
    assert torch.get_num_threads() == 2
    torch.set_num_threads(3)
    load_policy(Settings(home=tmp_path)).close()
    assert torch.get_num_threads() == max(1, cores_available() - 1)


def test_the_scorer_starts_with_the_setting(cli_settings, tmp_path, monkeypatch, restore_torch_threads):
    from mmprm_tasks import cli
    from mmprm_tasks.settings import get_settings

    from test_candidates import _release_file

    monkeypatch.setenv("MMPRM_TORCH_THREADS", "2")
    get_settings.cache_clear()
    torch.set_num_threads(3)
    path, _ = _release_file(tmp_path)
    result = CliRunner().invoke(cli.app, ["score", str(path), "--checkpoint", str(TOY_POLICY_DIR),
                                          "--out", str(tmp_path / "scored.json")])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2


def threads_of_this_process(candidate: str, gold: str) -> str:
    """A rule check run in the pool's worker: "true" when it computes with one thread."""
    import torch as worker_torch

    one = os.environ["OMP_NUM_THREADS"] == "1" and worker_torch.get_num_threads() == 1
    return "true" if one else "false"


def test_the_verifier_pool_processes_use_one_thread(monkeypatch):
    # The parent asks for two: the pool's processes must not inherit it.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with AnswerVerifier(VerifyConfig(workers=2), rule_fn=threads_of_this_process) as verifier:
        assert verifier.check_many([("1", "1"), ("2", "2"), ("3", "3")]) == [True, True, True]
