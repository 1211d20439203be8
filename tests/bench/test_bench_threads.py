"""``bench/bench_threads.py`` at a tiny size: every run does the same work in its own process, the
"torch default" runs really run torch's default thread count (the tests' OMP_NUM_THREADS=1 is not
inherited) and the setting's runs the setting's, on the busy box (a burner beside it) and the quiet one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import load_bench


def test_thread_bench_compares_default_and_setting_on_a_busy_and_a_quiet_box(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bench = load_bench("bench_threads")
    out = tmp_path / "threads.json"
    report = bench.main(["--problems", "1", "--burners", "1", "--max-steps", "1", "--threads", "1",
                         "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert set(report["runs"]) == {"busy", "quiet"}
    # What torch chooses by itself in a process that nothing pins.
    unpinned = {k: v for k, v in os.environ.items() if k not in bench.PINNING_ENV}
    torch_default = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                       env=unpinned, capture_output=True, text=True, check=True).stdout)
    for box, runs in report["runs"].items():
        default, setting = runs["torch_default"], runs["setting"]
        assert default["torch_threads"] == torch_default and setting["torch_threads"] == 1
        for run in (default, setting):
            assert run["annotate"]["trees"] == 1 and run["annotate"]["rollouts"] > 0
            assert run["train"]["steps"] == 1 and run["annotate"]["cpu_s"] > 0 and run["train"]["cpu_s"] > 0
        assert runs["wall_ratio"] == round(default["wall_s"] / setting["wall_s"], 2)
