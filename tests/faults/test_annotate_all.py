"""``mmprm annotate --all`` as separate processes beside other workers: it helps until the run is
done, takes back at once what workers that died on this host held, and exits 0 when the only
problems left are being annotated by live peers (it used to exit 1, "not finished", while its
peer completed the run)."""

from __future__ import annotations

import socket
import subprocess

import sqlalchemy as sa

from mmprm_tasks.db import get_engine
from mmprm_tasks.runs import attempt_owner, claim_problems, end_attempt
from mmprm_tasks.seeds import ingest_file

from helpers import run_mmprm
from test_seeds import count, make_seed_file

# A small search on the shipped toy policy, the same for every process (it fixes the run's config).
SMALL_ENV = {"MMPRM_SEARCH__NUM_ROLLOUTS": "2", "MMPRM_SEARCH__MAX_SEARCH_COUNT": "1",
             "MMPRM_SEARCH__ROLLOUT_BUDGET": "8", "MMPRM_SAMPLING__MAX_NEW_TOKENS": "64"}


def _dead_owner() -> str:
    """A lease owner naming a process of this host that has exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return f"r/chunk-1@{socket.gethostname()}:{child.pid}:deadbeef"


def test_annotate_all_finishes_dead_workers_problems_and_leaves_live_peers_theirs(settings, tmp_path):
    ingest_file(make_seed_file(tmp_path / "data", 3), settings)
    assert run_mmprm(settings, "chunks", "--run", "r", "--chunk-size", "1", **SMALL_ENV).returncode == 0
    engine = get_engine(settings)
    peer = attempt_owner("r/chunk-2")  # this test process: alive while the CLI runs
    [(live_problem, _)] = claim_problems(get_engine(settings), "r", 2, peer, limit=1, steal=False, lease_seconds=settings.lease_seconds)
    with engine.begin() as conn:  # a worker that died holding chunk 1's problem, lease still running
        conn.execute(sa.text("UPDATE chunk_problems SET status = 'leased', lease_owner = :o,"
                             " lease_expires_at = now() + interval '1 hour' WHERE run_id = 'r' AND chunk_index = 1"),
                     {"o": _dead_owner()})

    done = run_mmprm(settings, "annotate", "--run", "r", "--all", timeout=600, **SMALL_ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "being annotated by live workers" in done.stdout and peer in done.stdout.replace("\n", "")
    with engine.connect() as conn:
        trees = set(conn.execute(sa.text("SELECT problem_id FROM trees WHERE run_id = 'r'")).scalars())
    assert len(trees) == 2 and live_problem not in trees  # the dead worker's problem was finished here

    end_attempt(peer)  # the peer dies too: now its problem comes back to the next --all at once
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE chunk_problems SET lease_owner = :o WHERE lease_owner = :p"),
                     {"o": _dead_owner(), "p": peer})
    done = run_mmprm(settings, "annotate", "--run", "r", "--all", timeout=600, **SMALL_ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    assert count(settings, "trees") == 3
