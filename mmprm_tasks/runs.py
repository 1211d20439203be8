"""Annotation runs, their chunks, and per-problem leases.

A run fixes the policy and search settings.  Sharding splits the selected problems into chunks
(one Airflow mapped task each); inside a chunk, problems are leased one batch at a time so that
a crashed worker's problems come back after their lease expires, a retried task resumes its own
leases at once, and a worker that finishes its own chunk early takes unclaimed problems of
chunks that are still running.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import sqlalchemy as sa

from .db import get_engine, require_schema
from .settings import Settings
from .validation import check_id

Selection = Literal["all", "stale"]


def run_config(settings: Settings) -> dict:
    """What makes two annotations of a problem comparable: the policy and the search settings."""
    config = {
        "policy": {"backend": settings.policy.backend, "model": settings.policy.model},
        "sampling": settings.sampling.model_dump(),
        "search": settings.search.model_dump(exclude={"concurrent_problems", "max_sequences_in_flight"}),
        "seed": settings.seed,
    }
    if settings.policy.prompt_preset != "platform":  # the default leaves existing config hashes as they were
        config["policy"]["prompt_preset"] = settings.policy.prompt_preset
    return config


def config_hash(settings: Settings) -> str:
    return hashlib.sha256(json.dumps(run_config(settings), sort_keys=True).encode()).hexdigest()[:16]


def default_run_id(settings: Settings) -> str:
    return f"run-{config_hash(settings)}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"


@dataclass(frozen=True)
class ShardResult:
    run_id: str
    chunk_indices: list[int]
    num_problems: int
    created: bool  # False when the run was already sharded (idempotent re-run)


def shard_run(settings: Settings, run_id: str, *, chunk_size: int | None = None,
              selection: Selection = "all", split: str | None = None, limit: int | None = None) -> ShardResult:
    """Create the run (if new) and split its problems into chunks of ``chunk_size``.

    ``selection="stale"`` keeps only problems with no tree made under the current policy and
    search config (new problems, or ones annotated by an older policy/config): the nightly refresh.
    Re-running on an already-sharded run returns its existing chunks unchanged.
    """
    check_id(run_id, "run_id")  # it names objects (trees/<run>/...) and URLs
    engine = get_engine(settings)
    require_schema(engine)
    size = chunk_size or settings.chunk_size
    chash = config_hash(settings)
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:r))"), {"r": run_id})
        conn.execute(sa.text(
            "INSERT INTO annotation_runs (run_id, policy_backend, policy_model, config, config_hash)"
            " VALUES (:r, :b, :m, CAST(:c AS JSONB), :h) ON CONFLICT (run_id) DO NOTHING"
        ), {"r": run_id, "b": settings.policy.backend, "m": settings.policy.model,
            "c": json.dumps(run_config(settings)), "h": chash})
        existing = conn.execute(sa.text(
            "SELECT chunk_index FROM chunks WHERE run_id = :r ORDER BY chunk_index"), {"r": run_id}).scalars().all()
        if existing:
            total = conn.execute(sa.text("SELECT count(*) FROM chunk_problems WHERE run_id = :r"), {"r": run_id}).scalar_one()
            return ShardResult(run_id, list(existing), total, created=False)
        query = "SELECT p.problem_id FROM seed_problems p WHERE (CAST(:split AS TEXT) IS NULL OR p.split = :split)"
        if selection == "stale":
            query += " AND NOT EXISTS (SELECT 1 FROM trees t WHERE t.problem_id = p.problem_id AND t.config_hash = :h)"
        query += " ORDER BY p.problem_id"
        if limit is not None:
            query += " LIMIT :limit"
        problem_ids = conn.execute(sa.text(query), {"split": split, "h": chash, "limit": limit}).scalars().all()
        chunks = [problem_ids[i:i + size] for i in range(0, len(problem_ids), size)]
        if chunks:
            conn.execute(sa.text("INSERT INTO chunks (run_id, chunk_index) VALUES (:r, :i)"),
                         [{"r": run_id, "i": i} for i in range(len(chunks))])
            conn.execute(sa.text(
                "INSERT INTO chunk_problems (run_id, chunk_index, problem_id) VALUES (:r, :i, :p)"),
                [{"r": run_id, "i": i, "p": pid} for i, chunk in enumerate(chunks) for pid in chunk])
        else:
            conn.execute(sa.text("UPDATE annotation_runs SET status = 'succeeded', finished_at = now()"
                                 " WHERE run_id = :r"), {"r": run_id})
    return ShardResult(run_id, list(range(len(chunks))), len(problem_ids), created=True)


_CLAIM = """
WITH picked AS (
    SELECT run_id, problem_id FROM chunk_problems
    WHERE run_id = :run AND {scope}
      AND (status = 'pending' OR (status = 'leased' AND lease_expires_at < now()))
    ORDER BY chunk_index, problem_id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE chunk_problems c
SET status = 'leased', lease_owner = :owner,
    lease_expires_at = now() + make_interval(secs => :lease), attempts = c.attempts + 1
FROM picked WHERE c.run_id = picked.run_id AND c.problem_id = picked.problem_id
RETURNING c.problem_id, c.chunk_index
"""


def claim_problems(engine: sa.Engine, run_id: str, chunk_index: int, owner: str, limit: int,
                   *, lease_seconds: float, steal: bool = True) -> list[tuple[str, int]]:
    """Lease up to ``limit`` problems: the chunk's own first, then (``steal``) other chunks'.

    A problem is claimable when pending or leased by someone whose lease has expired (a dead
    worker).  A retried task first takes back its dead attempts' leases with
    :func:`reclaim_dead_attempts`.
    """
    params = {"run": run_id, "chunk": chunk_index, "owner": owner, "limit": limit, "lease": lease_seconds}
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE chunks SET status = 'running', attempts = attempts + 1, updated_at = now()"
                             " WHERE run_id = :run AND chunk_index = :chunk AND status = 'pending'"), params)
        conn.execute(sa.text("UPDATE annotation_runs SET status = 'running' WHERE run_id = :run"
                             " AND status IN ('created', 'failed')"), params)
        rows = conn.execute(sa.text(_CLAIM.format(scope="chunk_index = :chunk")), params).all()
        if not rows and steal:
            rows = conn.execute(sa.text(_CLAIM.format(scope="chunk_index <> :chunk")), params).all()
    return [(pid, idx) for pid, idx in rows]


def renew_leases(engine: sa.Engine, run_id: str, owner: str, *, lease_seconds: float) -> int:
    with engine.begin() as conn:
        return conn.execute(sa.text(
            "UPDATE chunk_problems SET lease_expires_at = now() + make_interval(secs => :lease)"
            " WHERE run_id = :run AND lease_owner = :owner AND status = 'leased'"),
            {"run": run_id, "owner": owner, "lease": lease_seconds}).rowcount


def hold_leases(conn: sa.Connection, run_id: str, problem_ids: Sequence[str], owner: str) -> set[str]:
    """Lock, for the rest of ``conn``'s transaction, the rows of those of ``problem_ids`` that
    ``owner`` still leases (a peer cannot claim them meanwhile) and return their ids; a problem
    missing from the result expired and was taken by another worker, so this attempt must not
    write its tree.  Called first in the transaction that writes the trees.  Rows are locked in
    id order, so writers holding disjoint problems never wait on each other in a cycle."""
    rows = conn.execute(sa.text(
        "SELECT problem_id FROM chunk_problems WHERE run_id = :run AND problem_id = ANY(:pids)"
        " AND lease_owner = :owner AND status = 'leased' ORDER BY problem_id FOR UPDATE"),
        {"run": run_id, "pids": list(problem_ids), "owner": owner})
    return {row.problem_id for row in rows}


def mark_done(conn: sa.Connection, run_id: str, problem_ids: Sequence[str]) -> None:
    """Called inside the transaction that writes the problems' trees (after :func:`hold_leases`),
    so trees and done-marks land together or not at all."""
    conn.execute(sa.text(
        "UPDATE chunk_problems SET status = 'done', lease_owner = NULL, lease_expires_at = NULL, error = NULL"
        " WHERE run_id = :run AND problem_id = ANY(:pids)"), {"run": run_id, "pids": list(problem_ids)})


# Owners of attempts running in this process (an owner naming this pid but not here is over).
_live_owners: set[str] = set()


def attempt_owner(base: str) -> str:
    """A lease owner naming one attempt: ``<base>@<host>:<pid>:<token>``.  Registered as live in
    this process until :func:`end_attempt`."""
    owner = f"{base}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    _live_owners.add(owner)
    return owner


def end_attempt(owner: str) -> None:
    _live_owners.discard(owner)


def _is_dead(owner: str) -> bool:
    """True only for an attempt on this host whose process is gone (or is this process, where
    the attempt is no longer running).  Anything else is treated as alive: its leases come back
    when they expire, since a live owner renews them on a heartbeat."""
    try:
        host, pid_text, _ = owner.rsplit("@", 1)[1].split(":")
        pid = int(pid_text)
    except (IndexError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return owner not in _live_owners
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed process its parent has not reaped yet is a zombie: dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def reclaim_dead_attempts(engine: sa.Engine, run_id: str, base: str | None) -> int:
    """Hand back at once the leases of earlier attempts of ``base`` (e.g. this chunk; None: of any
    worker of the run) that died on this host; a live attempt's leases, or one on another host,
    are left to their expiry."""
    with engine.connect() as conn:
        owners = conn.execute(sa.text(
            "SELECT DISTINCT lease_owner FROM chunk_problems WHERE run_id = :run AND status = 'leased'"
            " AND (CAST(:prefix AS TEXT) IS NULL OR left(lease_owner, :n) = :prefix)"),
            {"run": run_id, "n": len(base or "") + 1, "prefix": None if base is None else base + "@"}).scalars()
        dead = [owner for owner in owners if _is_dead(owner)]
    return sum(release_leases(engine, run_id, owner, f"resumed by a new attempt: {owner} died") for owner in dead)


@dataclass(frozen=True)
class LeaseHolder:
    owner: str
    problems: int
    live: bool  # its leases are unexpired and its process is not known to be dead


def lease_holders(engine: sa.Engine, run_id: str) -> list[LeaseHolder]:
    """Who holds the run's leased problems, and whether each holder is still working on them."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT lease_owner, count(*) AS problems, bool_and(lease_expires_at > now()) AS unexpired"
            " FROM chunk_problems WHERE run_id = :run AND status = 'leased' GROUP BY lease_owner"
            " ORDER BY lease_owner"), {"run": run_id}).all()
    return [LeaseHolder(row.lease_owner, row.problems, bool(row.unexpired) and not _is_dead(row.lease_owner))
            for row in rows]


def storable_error(error: str, limit: int = 2000) -> str:
    """An error text Postgres accepts: NUL (which a TEXT column rejects, and which a broken
    judge's garbage reply can carry) written visibly as ``\\x00``, cut to ``limit`` characters."""
    return error.replace("\x00", "\\x00")[:limit]


def release_leases(engine: sa.Engine, run_id: str, owner: str, error: str) -> int:
    """Give unfinished leases back at once (the task failed; its retry or a peer continues)."""
    with engine.begin() as conn:
        return conn.execute(sa.text(
            "UPDATE chunk_problems SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL,"
            " error = :err WHERE run_id = :run AND lease_owner = :owner AND status = 'leased'"),
            {"run": run_id, "owner": owner, "err": storable_error(error)}).rowcount


def finish_chunks(engine: sa.Engine, run_id: str) -> None:
    """Mark chunks whose problems are all done, and the run when every chunk is."""
    from .tree_index import analyze_index

    with engine.begin() as conn:
        conn.execute(sa.text(
            "UPDATE chunks c SET status = 'done', updated_at = now() WHERE c.run_id = :run AND c.status <> 'done'"
            " AND NOT EXISTS (SELECT 1 FROM chunk_problems p WHERE p.run_id = c.run_id"
            " AND p.chunk_index = c.chunk_index AND p.status <> 'done')"), {"run": run_id})
        finished = conn.execute(sa.text(
            "UPDATE annotation_runs r SET status = 'succeeded', finished_at = now() WHERE r.run_id = :run"
            " AND r.status <> 'succeeded'"
            " AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.run_id = r.run_id AND c.status <> 'done')"),
            {"run": run_id}).rowcount
    if finished:  # the run's trees are all written: the planner sees them from now on
        analyze_index(engine)


def run_progress(engine: sa.Engine, run_id: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT status, count(*) FROM chunk_problems WHERE run_id = :run GROUP BY status"), {"run": run_id}).all()
    return {status: count for status, count in rows}
