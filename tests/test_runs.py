"""Runs, chunks and per-problem leases on a real Postgres."""

from __future__ import annotations

import sqlalchemy as sa

from mmprm_tasks.db import get_engine
from mmprm_tasks.runs import (claim_problems, config_hash, finish_chunks, mark_done, release_leases,
                              run_progress, shard_run)
from mmprm_tasks.seeds import ingest_file

from test_seeds import make_seed_file


def _seed(settings, tmp_path, n=10):
    ingest_file(make_seed_file(tmp_path / "data", n), settings)


def test_shard_is_idempotent(settings, tmp_path):
    _seed(settings, tmp_path, 10)
    first = shard_run(settings, "r1", chunk_size=4)
    assert first.created and first.chunk_indices == [0, 1, 2] and first.num_problems == 10
    again = shard_run(settings, "r1", chunk_size=3)
    assert not again.created and again.chunk_indices == [0, 1, 2] and again.num_problems == 10
    with get_engine(settings).connect() as conn:
        sizes = conn.execute(sa.text("SELECT chunk_index, count(*) FROM chunk_problems WHERE run_id='r1'"
                                     " GROUP BY chunk_index ORDER BY 1")).all()
    assert [n for _, n in sizes] == [4, 4, 2]


def test_claims_own_chunk_first_then_steals(settings, tmp_path):
    _seed(settings, tmp_path, 6)
    shard_run(settings, "r", chunk_size=3)
    own = claim_problems(get_engine(settings), "r", 0, "w0", limit=10, lease_seconds=settings.lease_seconds)
    assert {c for _, c in own} == {0} and len(own) == 3
    # A retried task gives its stale leases back, then claims them again.
    assert release_leases(get_engine(settings), "r", "w0", "retry") == 3
    assert sorted(claim_problems(get_engine(settings), "r", 0, "w0", limit=10, lease_seconds=settings.lease_seconds)) == sorted(own)
    with get_engine(settings).begin() as conn:
        for pid, _ in own:
            mark_done(conn, "r", [pid])
    stolen = claim_problems(get_engine(settings), "r", 0, "w0", limit=2, lease_seconds=settings.lease_seconds)
    assert {c for _, c in stolen} == {1} and len(stolen) == 2
    # The owner of chunk 1 finds only what was not stolen.
    rest = claim_problems(get_engine(settings), "r", 1, "w1", limit=10, lease_seconds=settings.lease_seconds)
    assert len(rest) == 1 and rest[0][1] == 1
    assert claim_problems(get_engine(settings), "r", 1, "w2", limit=10, steal=False, lease_seconds=settings.lease_seconds) == []


def test_release_and_expiry_hand_work_back(settings, tmp_path):
    _seed(settings, tmp_path, 3)
    shard_run(settings, "r", chunk_size=3)
    taken = claim_problems(get_engine(settings), "r", 0, "dead-worker", limit=3, lease_seconds=settings.lease_seconds)
    assert claim_problems(get_engine(settings), "r", 0, "other", limit=3, lease_seconds=settings.lease_seconds) == []
    assert release_leases(get_engine(settings), "r", "dead-worker", "boom") == 3
    assert len(claim_problems(get_engine(settings), "r", 0, "other", limit=3, lease_seconds=settings.lease_seconds)) == 3
    # A lease that expired is claimable by anyone.
    short = settings.with_overrides({"lease_seconds": 0.001})
    with get_engine(settings).begin() as conn:
        conn.execute(sa.text("UPDATE chunk_problems SET lease_expires_at = now() - interval '1 second'"))
    assert len(claim_problems(get_engine(short), "r", 0, "third", limit=3, lease_seconds=short.lease_seconds)) == len(taken)


def test_release_keeps_an_error_text_with_nul_bytes(settings, tmp_path):
    """A judge's garbage reply can carry NUL, which a Postgres TEXT column rejects: releasing the
    leases must still work (else the real error is hidden and the problems stay leased)."""
    _seed(settings, tmp_path, 3)
    shard_run(settings, "r", chunk_size=3)
    claim_problems(get_engine(settings), "r", 0, "w0", limit=3, lease_seconds=settings.lease_seconds)
    assert release_leases(get_engine(settings), "r", "w0", "VerificationError: judge said 'Y\x00es'") == 3
    with get_engine(settings).connect() as conn:
        errors = conn.execute(sa.text("SELECT DISTINCT error FROM chunk_problems WHERE run_id = 'r'")).scalars().all()
    assert errors == ["VerificationError: judge said 'Y\\x00es'"]
    assert run_progress(get_engine(settings), "r") == {"pending": 3}


def test_finish_marks_chunks_and_run(settings, tmp_path):
    _seed(settings, tmp_path, 4)
    shard_run(settings, "r", chunk_size=2)
    with get_engine(settings).begin() as conn:
        for pid, _ in claim_problems(get_engine(settings), "r", 0, "w", limit=2, steal=False, lease_seconds=settings.lease_seconds):
            mark_done(conn, "r", [pid])
    finish_chunks(get_engine(settings), "r")
    with get_engine(settings).connect() as conn:
        status = dict(conn.execute(sa.text("SELECT chunk_index, status FROM chunks WHERE run_id='r'")).all())
        run_status = conn.execute(sa.text("SELECT status FROM annotation_runs WHERE run_id='r'")).scalar_one()
    assert status == {0: "done", 1: "pending"} and run_status == "running"
    assert run_progress(get_engine(settings), "r") == {"done": 2, "pending": 2}


def test_stale_selection_skips_problems_with_current_trees(settings, tmp_path):
    _seed(settings, tmp_path, 3)
    shard_run(settings, "old", chunk_size=10)
    with get_engine(settings).begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO trees (run_id, problem_id, root_mc_value, visit_count, num_nodes, num_rollouts,"
            " num_searches, tree_key, tree_sha256, config_hash, mc_histogram) VALUES"
            " ('old', 'p0000', 0.5, 1, 1, 16, 0, 'k', 's', :current, '{0,0,0,0,0,1,0,0,0,0}'),"
            " ('old', 'p0001', 0.5, 1, 1, 16, 0, 'k', 's', 'older-config', '{0,0,0,0,0,1,0,0,0,0}')"),
            {"current": config_hash(settings)})
    fresh = shard_run(settings, "nightly", chunk_size=10, selection="stale")
    with get_engine(settings).connect() as conn:
        picked = set(conn.execute(sa.text("SELECT problem_id FROM chunk_problems WHERE run_id='nightly'")).scalars())
    assert picked == {"p0001", "p0002"} and fresh.num_problems == 2
    other = settings.with_overrides({"search.num_rollouts": 4})
    assert config_hash(other) != config_hash(settings)
    assert shard_run(other, "nightly2", selection="stale").num_problems == 3
