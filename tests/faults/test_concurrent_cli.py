"""The CLI as separate processes at once: concurrent ingests of overlapping files, and a frozen
annotate worker whose lease expires while a peer finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import sqlalchemy as sa

from mmprm_tasks.db import get_engine
from mmprm_tasks.runs import run_progress

from helpers import cli_env, run_mmprm
from test_annotate_all import SMALL_ENV
from test_seeds import count, make_seed_file


def _mmprm(settings, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmprm_tasks", *args], env=cli_env(settings, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_ingests_of_overlapping_files_land_every_record_once(settings, tmp_path):
    records = json.loads(make_seed_file(tmp_path / "data", 40).read_text())
    files = []
    for i, part in enumerate([records[:30], records[10:], records[::2]]):  # every record in two files
        path = tmp_path / "data" / f"part{i}.json"
        path.write_text(json.dumps(part))
        files.append(path)
    ingests = [_mmprm(settings, "ingest", str(path)) for path in files]
    outputs = [process.communicate(timeout=300) for process in ingests]
    for process, (out, err) in zip(ingests, outputs, strict=True):
        assert process.returncode == 0, out + err  # a record another ingest landed counts as unchanged
        assert "Traceback" not in out + err
    assert count(settings, "seed_problems") == 40
    with get_engine(settings).connect() as conn:
        images = conn.execute(sa.text("SELECT count(DISTINCT image_key) FROM seed_problems")).scalar_one()
    assert images == 40


def test_a_frozen_worker_whose_lease_expired_writes_nothing_when_it_wakes(settings, tmp_path):
    """Worker A is frozen (SIGSTOP) holding a problem; its lease expires; worker B takes it and
    finishes the run; A wakes: it must not write that problem's tree again, and the run stays
    finished with one tree per problem."""
    from mmprm_tasks.seeds import ingest_file

    ingest_file(make_seed_file(tmp_path / "data", 2), settings)
    env = {**SMALL_ENV, "MMPRM_LEASE_SECONDS": "3"}
    assert run_mmprm(settings, "chunks", "--run", "r", "--chunk-size", "1", **env).returncode == 0
    engine = get_engine(settings)
    frozen = _mmprm(settings, "annotate", "--run", "r", "--chunk", "0", **env)
    try:
        deadline = time.monotonic() + 120
        while run_progress(engine, "r").get("leased", 0) == 0:  # A holds a problem
            assert frozen.poll() is None and time.monotonic() < deadline, frozen.communicate()
            time.sleep(0.05)
        os.kill(frozen.pid, signal.SIGSTOP)
        time.sleep(4)  # past the lease: A's heartbeat is frozen with it
        peer = run_mmprm(settings, "annotate", "--run", "r", "--all", timeout=600, **env)
        assert peer.returncode == 0, peer.stdout + peer.stderr
        assert run_progress(engine, "r") == {"done": 2}
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    out, err = frozen.communicate(timeout=600)
    assert "Traceback" not in out + err, out + err
    assert count(settings, "trees") == 2 and run_progress(engine, "r") == {"done": 2}
    with engine.connect() as conn:
        status = conn.execute(sa.text("SELECT status FROM annotation_runs WHERE run_id = 'r'")).scalar_one()
    assert status == "succeeded"
