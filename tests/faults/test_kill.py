"""An annotating process SIGKILLed at several points, two live attempts of one chunk, and a lease
shorter than one search."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mmprm_tasks.annotate import annotate_chunk, run_summary
from mmprm_tasks.db import get_engine
from mmprm_tasks.runs import run_progress

from fault_helpers import HookedPolicy, assert_consistent, seeded_run
from test_search import ExactVerifier

TESTS = Path(__file__).resolve().parents[1]

# Runs one chunk and SIGKILLs itself at the named point.
_KILLED_WORKER = """
import os, signal, sys
sys.path[:0] = [sys.argv[3], sys.argv[3] + "/faults"]
from mmprm_tasks import annotate
from mmprm_tasks.settings import Settings
from fault_helpers import HookedPolicy
from test_search import ExactVerifier

settings, point = Settings.model_validate_json(sys.argv[1]), sys.argv[2]
die = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
hooks = {}
if point == "mid-search":
    hooks = {3: die}
elif point == "between-put-and-commit":
    from mmprm_tasks.tree_index import write_trees
    annotate.write_trees = lambda *args: die()  # the object is put, the rows are not yet written
elif point == "after-a-commit":  # as soon as a tree is in the index, at an engine call
    import time
    import sqlalchemy as sa
    from mmprm_tasks.db import get_engine

    def die_once_a_tree_landed():
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            with get_engine(settings).connect() as conn:
                if conn.execute(sa.text("SELECT count(*) FROM trees")).scalar_one():
                    die()
            time.sleep(0.05)

    hooks = {call: die_once_a_tree_landed for call in range(2, 200)}
    settings = settings.with_overrides({"search.concurrent_problems": 1})  # trees one after another
annotate.annotate_chunk(settings, "run-f", 0, policy=HookedPolicy(hooks), verifier=ExactVerifier(), steal=False)
"""


@pytest.mark.parametrize("point", ["mid-search", "between-put-and-commit", "after-a-commit"])
def test_sigkill_then_retry_resumes_at_once(fault_settings, tmp_path, point):
    s = seeded_run(fault_settings, tmp_path / "data")
    done = subprocess.run([sys.executable, "-c", _KILLED_WORKER, s.model_dump_json(), point, str(TESTS)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == -9, done.stderr[-3000:]
    assert run_progress(get_engine(s), "run-f").get("leased", 0) >= 1  # the dead worker's leases
    assert_consistent(s, "run-f", finished=False, killed=True)
    # The engine work behind every committed tree is in the run's stats, the killed attempt's too.
    assert _engine_rollouts(s) >= _tree_rollouts(s) and (point != "after-a-commit" or _tree_rollouts(s) > 0)
    # The retry on this host sees the worker's process gone and takes its leases back at once.
    stats = annotate_chunk(s, "run-f", 0, policy=HookedPolicy(), verifier=ExactVerifier(), steal=True)
    assert stats["resumed_leases"] >= 1
    assert_consistent(s, "run-f", finished=True)
    assert _engine_rollouts(s) >= _tree_rollouts(s)


def _engine_rollouts(settings) -> int:
    return run_summary(settings, "run-f")["stats"].get("engine_rollouts", 0)


def _tree_rollouts(settings) -> int:
    return run_summary(settings, "run-f")["stats"]["rollouts"]


def test_two_live_attempts_of_one_chunk_with_a_lease_shorter_than_a_search(fault_settings, tmp_path):
    """Both attempts run at once on chunk 0; each search takes several leases' length and the
    heartbeat keeps them: no problem is taken from a live attempt, none is written twice."""
    s = seeded_run(fault_settings.with_overrides({"lease_seconds": 1.0}), tmp_path / "data")

    class SlowPolicy(HookedPolicy):
        def generate(self, requests, *, seed=None):
            time.sleep(0.8)  # a tree takes several calls: longer than its lease
            return super().generate(requests, seed=seed)

    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def attempt(i: int) -> None:
        try:
            results[i] = annotate_chunk(s, "run-f", 0, policy=SlowPolicy(), verifier=ExactVerifier(), steal=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    assert time.monotonic() - started > 2 * s.lease_seconds  # the searches outlived their lease
    assert sum(r["trees"] for r in results.values()) == 3  # chunk 0's problems, each written once
    assert all(r["leases_lost"] == 0 for r in results.values())
    assert_consistent(s, "run-f", finished=False)
    assert run_progress(get_engine(s), "run-f") == {"done": 3, "pending": 3}
