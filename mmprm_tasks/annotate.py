"""Annotation stage: OmegaPRM trees for the problems of a chunk, persisted as they finish.

Each finished tree is written as SPEC §4 JSON to ``trees/<run>/<problem>.json`` and its nodes
indexed in Postgres in one transaction (upsert by run and problem) that also marks the problem
done, so a chunk re-run after a crash skips finished problems and never duplicates rows.  A policy
or verification failure fails the chunk: trees finished before it stay, in-flight work is handed
back, and nothing is recorded as a label.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from .db import get_engine, require_schema
from .failures import best_effort
from .policy import GenerationRequest, PolicyBackend, load_policy
from .progress import StageProgress, track
from .runs import (attempt_owner, claim_problems, config_hash, end_attempt, finish_chunks, hold_leases, mark_done,
                   reclaim_dead_attempts, release_leases, renew_leases)
from .search import SearchProblem, SearchResult, is_rollout_engine, run_search
from .settings import ConfigurationError, Settings
from .storage import ObjectStore, open_store
from .tree_index import TreeEntry, encode_json, write_trees
from .verify import AnswerVerifier

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """What the policy engine was asked for: calls, prompts and rollouts."""

    calls: int = 0
    requests: int = 0
    rollouts: int = 0
    seconds: float = 0.0
    # Engines that batch requests themselves (the continuous transformers engine): decode steps
    # run and rows summed over them, so rows per step says how full the running batch was.
    decode_steps: int = 0
    row_steps: int = 0

    @property
    def mean_batch_size(self) -> float:
        return self.requests / self.calls if self.calls else 0.0


@dataclass
class CountingPolicy:
    """Wraps a backend to count engine calls and batch sizes (recorded as run stats)."""

    inner: PolicyBackend
    stats: EngineStats = field(default_factory=EngineStats)

    def settle(self) -> EngineStats:
        return self.stats

    def generate(self, requests: Sequence[GenerationRequest], *, seed: int | None = None) -> list[list[list[str]]]:
        start = time.perf_counter()
        out = self.inner.generate(requests, seed=seed)
        self.stats.calls += 1
        self.stats.requests += len(requests)
        self.stats.rollouts += sum(r.n for r in requests)
        self.stats.seconds += time.perf_counter() - start
        return out


@dataclass
class CountingEngine:
    """Wraps a backend that takes requests one at a time (``submit``, e.g. an OpenAI-compatible
    server that batches concurrent requests itself) to count them; each request is one call."""

    inner: Any
    stats: EngineStats = field(default_factory=EngineStats)

    def __post_init__(self) -> None:
        self._decode_start = self._decode_work()

    def _decode_work(self) -> tuple[int, int]:
        counters = getattr(self.inner, "counters", None)
        return (counters.decode_steps, counters.row_steps) if counters is not None else (0, 0)

    def settle(self) -> EngineStats:
        """The stats, with the decode work the engine did since this wrapper was made."""
        steps, rows = self._decode_work()
        self.stats.decode_steps, self.stats.row_steps = steps - self._decode_start[0], rows - self._decode_start[1]
        return self.stats

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    def submit(self, request: GenerationRequest) -> Any:
        self.stats.calls += 1
        self.stats.requests += 1
        self.stats.rollouts += request.n
        return self.inner.submit(request)


_ENGINE_FIELDS = ("calls", "requests", "rollouts", "seconds", "decode_steps", "row_steps")


class StatsLedger:
    """The engine work of one attempt not yet added to the run's stats.  Each tree transaction
    adds, with its trees, the work done since the last one (:meth:`take`), so a SIGKILLed attempt
    loses at most its work since its last commit: never its committed work or an earlier
    attempt's (issue 25: the stats were added once, at the end, so only the last attempt counted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counting: CountingPolicy | CountingEngine | None = None
        self._recorded = dict.fromkeys(_ENGINE_FIELDS, 0.0)

    def _now(self) -> dict[str, float]:
        stats = self.counting.settle() if self.counting else EngineStats()
        return {name: getattr(stats, name) for name in _ENGINE_FIELDS}

    def take(self, written: Sequence[SearchResult] = ()) -> dict[str, float]:
        """The run-stats delta to add now (engine work since the last take, and the unverifiable
        answers of ``written``); counted as recorded until :meth:`give_back`."""
        with self._lock:
            now = self._now()
            delta = {name: now[name] - self._recorded[name] for name in _ENGINE_FIELDS}
            self._recorded = now
        return {"unverifiable_answers": sum(r.stats["unverifiable"] for r in written),
                **{f"engine_{name}": round(value, 3) if name == "seconds" else int(value)
                   for name, value in delta.items()}}

    def give_back(self, delta: dict[str, float]) -> None:
        """A taken delta whose transaction did not commit: it is added by a later take."""
        with self._lock:
            for name in _ENGINE_FIELDS:
                self._recorded[name] -= delta[f"engine_{name}"]


def counted(backend: Any) -> CountingPolicy | CountingEngine:
    """The backend wrapped to count what the engine was asked (recorded as run stats)."""
    return CountingEngine(backend) if is_rollout_engine(backend) else CountingPolicy(backend)


def persist_trees(conn: sa.Connection, store: ObjectStore, run_id: str, chash: str, results: Sequence[SearchResult],
                  owner: str, ledger: StatsLedger | None = None) -> list[SearchResult]:
    """In one transaction on ``conn``: lock the problems ``owner`` still leases, write their trees'
    JSON, index their nodes (upsert by run and problem) and mark them done.  Returns the results
    written; a problem whose lease a peer took is not written (nothing of it is, the peer searches
    it again).  One transaction for several trees saves its round trips (lease check, done-marks,
    commit) per tree; every tree still lands with its done-mark or neither does."""
    # The per-tree work that needs no database happens before the transaction holds locks.
    prepared = []
    for result in results:
        data = encode_json(result.tree)
        prepared.append((result, data, TreeEntry.build(run_id, result.tree, data, num_rollouts=result.stats["rollouts"],
                                                       num_searches=result.stats["searches"])))
    put: list[tuple[str, str]] = []
    delta: dict[str, float] | None = None
    try:
        with conn.begin():
            # Atomic but not flushed to disk at commit: a database crash can lose the last few
            # hundred milliseconds of trees, and with them their done-marks (same transaction), so
            # those problems are searched again; nothing is half-written.  Saves an fsync per commit.
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            held = hold_leases(conn, run_id, [result.problem_id for result, _, _ in prepared], owner)
            prepared = [item for item in prepared if item[0].problem_id in held]
            for result, data, entry in prepared:
                store.put_bytes(entry.key, data, "application/json")
                put.append((result.problem_id, entry.key))
            write_trees(conn, run_id, chash, [entry for _, _, entry in prepared])
            mark_done(conn, run_id, [result.problem_id for result, _, _ in prepared])
            if ledger is not None:  # last: the run's row is locked only until the commit
                delta = ledger.take([result for result, _, _ in prepared])
                _add_run_stats(conn, run_id, delta)
    except BaseException as exc:
        if delta is not None:  # not committed: a later transaction adds it
            ledger.give_back(delta)  # type: ignore[union-attr]
        for problem_id, key in put:
            best_effort(lambda: remove_uncommitted_tree(conn.engine, store, run_id, problem_id, key),
                        f"removing the uncommitted tree object {key}", exc)
        raise
    return [result for result, _, _ in prepared]


def remove_uncommitted_tree(engine: sa.Engine, store: ObjectStore, run_id: str, problem_id: str, key: str) -> None:
    """Delete the object of a tree whose transaction failed after the object was put, if its row
    is not in the index (the commit may have landed before the connection broke).  Holds the
    problem's row lock, as a writer does from before its put to its commit, so no peer's put is
    deleted.  If Postgres is unreachable the object stays: the tree's key is fixed per run and
    problem, so the retry that finishes the problem overwrites it, and a run is not finished
    while the problem is not done; an object for a problem that is not done is never read."""
    with engine.begin() as check:
        check.execute(sa.text("SELECT 1 FROM chunk_problems WHERE run_id = :run AND problem_id = :pid FOR UPDATE"),
                      {"run": run_id, "pid": problem_id})
        landed = check.execute(sa.text("SELECT 1 FROM trees WHERE run_id = :run AND problem_id = :pid"),
                               {"run": run_id, "pid": problem_id}).first()
        if landed is None:
            store.delete(key)


_STOP = object()
# Trees a writer thread puts in one transaction when several are waiting (a chunk's trees finish
# in bursts): per-transaction round trips dominate a tree's write, and a batch bounds how long
# row locks are held.
WRITE_BATCH = 16


class TreeWriter:
    """Persists finished trees on background threads, so the search never waits for the index.

    ``settings.index_writers`` threads, each on its own connection, take finished trees from a
    queue, and write the trees already waiting in one transaction with their problems' done-marks
    (:func:`persist_trees`), so a crash leaves every problem either done with its tree or leased and
    searched again.  The
    first thread also renews the owner's leases on a heartbeat (every quarter lease) while the
    chunk runs, whether or not trees are finishing, so a long search keeps its problems.  A write
    error stops further writes and is raised on the search thread at the next :meth:`submit` or at
    :meth:`close`.  ``max_pending`` bounds the trees waiting in memory.
    """

    def __init__(self, engine: sa.Engine, store: ObjectStore, settings: Settings, run_id: str, chash: str,
                 owner: str, *, max_pending: int = 64, ledger: StatsLedger | None = None) -> None:
        self._engine, self._store, self._settings, self._ledger = engine, store, settings, ledger
        self._run_id, self._chash, self._owner = run_id, chash, owner
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self.written: list[SearchResult] = []
        self.lost: list[str] = []  # problems whose lease a peer took before the tree was written
        self._heartbeat = max(settings.lease_seconds / 4, 0.05)
        self._threads = [threading.Thread(target=self._run, args=(i == 0,), name=f"tree-writer-{i}[{owner}]",
                                          daemon=True) for i in range(settings.index_writers)]
        for thread in self._threads:
            thread.start()

    def submit(self, result: SearchResult) -> None:
        self._raise_error()
        self._queue.put(result)

    def close(self) -> None:
        """Write what was submitted (unless a write failed), stop, and raise a write error."""
        if not self._closed:
            self._closed = True
            for _ in self._threads:
                self._queue.put(_STOP)
            for thread in self._threads:
                thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._error = self._error or exc  # the first cause is the one raised

    def _next_batch(self, first: Any) -> tuple[list[SearchResult], bool]:
        """``first`` and the trees already waiting behind it (up to :data:`WRITE_BATCH`), and
        whether a stop came with them."""
        batch = [first]
        while len(batch) < WRITE_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self, renews: bool) -> None:
        next_renewal = time.monotonic() + self._heartbeat
        conn: sa.Connection | None = None
        try:
            conn = self._engine.connect()
        except BaseException as exc:  # raised on the search thread
            self._fail(exc)
        try:
            stop = False
            while not stop:
                try:
                    timeout = max(0.0, next_renewal - time.monotonic()) if renews else None
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    return
                batch: list[SearchResult] = []
                if item is not None:
                    batch, stop = self._next_batch(item)
                if self._error is not None or conn is None:
                    continue  # drain: the problems stay leased and are handed back by the caller
                try:
                    if batch:
                        written = persist_trees(conn, self._store, self._run_id, self._chash, batch, self._owner,
                                                self._ledger)
                        landed = {r.problem_id for r in written}
                        lost = [r.problem_id for r in batch if r.problem_id not in landed]
                        if lost:  # a peer searches them again; not this chunk's failure
                            log.warning("run %s: %s no longer holds the leases of %s (they expired and another "
                                        "worker took them); their trees are not written", self._run_id, self._owner,
                                        ", ".join(lost))
                        with self._lock:
                            self.written.extend(written)
                            self.lost.extend(lost)
                        for result in written:
                            log.info("tree %s: root mc %.3f, %d nodes", result.problem_id, result.tree["mc_value"],
                                     result.stats["nodes"])
                    if renews and time.monotonic() >= next_renewal:
                        renew_leases(self._engine, self._run_id, self._owner,
                                     lease_seconds=self._settings.lease_seconds)
                        next_renewal = time.monotonic() + self._heartbeat
                except BaseException as exc:  # raised on the search thread
                    self._fail(exc)
        finally:
            if conn is not None:
                conn.close()


def _load_problem(conn: sa.Connection, store: ObjectStore, problem_id: str) -> SearchProblem:
    row = conn.execute(sa.text(
        "SELECT problem_id, question, correct_answer, image_path, image_key FROM seed_problems WHERE problem_id = :p"),
        {"p": problem_id}).one()
    # The tree names the image as the seed did (the release's tools read that path); problems
    # ingested before schema v4 never recorded it, so theirs name the stored copy by its key
    # (relative to the store, as the release's paths are to their image root).
    return SearchProblem(id=row.problem_id, question=row.question, answer=row.correct_answer,
                         image=store.get_bytes(row.image_key), image_path=row.image_path or row.image_key)


def _open_problems(engine: sa.Engine, run_id: str, chunk_index: int) -> int:
    """Problems of the chunk not done yet: the work an attempt starts with (it may steal more)."""
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM chunk_problems WHERE run_id = :r AND chunk_index = :c"
                                    " AND status <> 'done'"), {"r": run_id, "c": chunk_index}).scalar_one()


def _check_run(engine: sa.Engine, settings: Settings, run_id: str, chunk_index: int) -> str:
    """The run's config hash, once the run exists with these settings and has the chunk (a run
    with no chunks has nothing to do): anything else is a one-line configuration error."""
    chash = config_hash(settings)
    with engine.connect() as conn:
        recorded = conn.execute(sa.text("SELECT config_hash FROM annotation_runs WHERE run_id = :r"),
                                {"r": run_id}).scalar_one_or_none()
        chunks = conn.execute(sa.text("SELECT count(*) FROM chunks WHERE run_id = :r"), {"r": run_id}).scalar_one()
    if recorded is None:
        raise LookupError(f"annotation run {run_id!r} does not exist: shard it first (`mmprm chunks`)")
    if recorded != chash:
        raise ConfigurationError(f"run {run_id!r} was created with config {recorded}, these settings give "
                                 f"{chash}: annotate a run with the settings it was sharded with")
    if chunks and not 0 <= chunk_index < chunks:
        raise LookupError(f"annotation run {run_id!r} has no chunk {chunk_index} (its chunks are 0 to {chunks - 1})")
    return chash


def _add_run_stats(conn: sa.Connection, run_id: str, delta: dict[str, float]) -> None:
    # NO KEY UPDATE: it does not wait on the key-share locks a peer's tree rows hold on the run
    # (their foreign key), so two writers adding stats after their trees cannot deadlock.
    current = conn.execute(sa.text("SELECT stats FROM annotation_runs WHERE run_id = :r FOR NO KEY UPDATE"),
                           {"r": run_id}).scalar_one()
    merged = dict(current)
    for name, value in delta.items():
        merged[name] = merged.get(name, 0) + value
    merged["mean_batch_size"] = merged["engine_requests"] / merged["engine_calls"] if merged.get("engine_calls") else 0.0
    if merged.get("engine_decode_steps"):
        merged["mean_rows_per_step"] = merged["engine_row_steps"] / merged["engine_decode_steps"]
    conn.execute(sa.text("UPDATE annotation_runs SET stats = CAST(:s AS JSONB) WHERE run_id = :r"),
                 {"s": json.dumps(merged), "r": run_id})


# One policy engine and one verifier pool per worker process, kept warm across the chunks it runs
# (a vLLM engine takes minutes to start; an Airflow worker runs many chunks).  Keyed by the
# settings that make them what they are; closed when the process exits.
_warm: dict[str, Any] = {}


def _warm_instance(key: str, build: Any) -> Any:
    if key not in _warm:
        _warm[key] = build()
    return _warm[key]


@atexit.register
def _close_warm() -> None:
    for instance in _warm.values():
        try:
            instance.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    _warm.clear()


def warm_policy(settings: Settings) -> PolicyBackend:
    key = "policy:" + json.dumps([settings.policy.model_dump(mode="json"), settings.sampling.model_dump(mode="json")],
                                 sort_keys=True, default=str)
    return _warm_instance(key, lambda: load_policy(settings))


def warm_verifier(settings: Settings) -> AnswerVerifier:
    key = "verifier:" + settings.verify.model_dump_json()
    return _warm_instance(key, lambda: AnswerVerifier(settings.verify))


def annotate_chunk(settings: Settings, run_id: str, chunk_index: int, *, worker: str | None = None,
                   policy: PolicyBackend | None = None, verifier: AnswerVerifier | None = None,
                   steal: bool = True) -> dict[str, Any]:
    """Annotate the chunk's problems (then, with ``steal``, unclaimed ones of other chunks).

    Idempotent and resumable: finished problems are skipped, a retry continues where the last
    attempt stopped.  Returns this call's stats.
    """
    engine = get_engine(settings)
    require_schema(engine)
    chash = _check_run(engine, settings, run_id, chunk_index)
    store = open_store(settings)
    # Owners name the attempt (host, pid, token): a retry takes back at once only the leases of
    # attempts that died on this host; a live attempt's are never taken, others expire.
    base = worker or f"{run_id}/chunk-{chunk_index}"
    resumed = reclaim_dead_attempts(engine, run_id, base)
    owner = attempt_owner(base)
    stolen: list[str] = []
    # Nothing to do costs nothing: no engine or verifier is touched before a problem is claimed.
    lease = settings.lease_seconds
    first = claim_problems(engine, run_id, chunk_index, owner, limit=1, lease_seconds=lease, steal=steal)
    counting: CountingPolicy | CountingEngine | None = None

    def problems(progress: StageProgress) -> Iterator[SearchProblem]:
        # Claimed lazily, one at a time, so a fast worker keeps taking work while peers are busy.
        claimed = first
        while True:
            if not claimed:
                return
            problem_id, from_chunk = claimed[0]
            if from_chunk != chunk_index:
                stolen.append(problem_id)
                progress.add_total(1)
            with engine.connect() as conn:
                problem = _load_problem(conn, store, problem_id)
            yield problem  # outside the connection: the search may hold this generator for long
            claimed = claim_problems(engine, run_id, chunk_index, owner, limit=1, lease_seconds=lease, steal=steal)

    ledger = StatsLedger()
    writer = TreeWriter(engine, store, settings, run_id, chash, owner, ledger=ledger)
    failure: BaseException | None = None
    try:
        if first:
            counting = ledger.counting = counted(policy or warm_policy(settings))
            with track(f"annotation of {run_id} chunk {chunk_index}", _open_problems(engine, run_id, chunk_index),
                       "problems", rates=("rollouts",)) as progress:
                for result in run_search(problems(progress), counting, verifier or warm_verifier(settings),
                                         settings.search, settings.seed):
                    writer.submit(result)
                    progress.advance(1, rollouts=result.stats["rollouts"])
                # Nothing left to claim: problems of this chunk that other workers took are theirs,
                # so the attempt's total is what it did (and the count it left to them is shown).
                if progress.total and progress.total > progress.completed:
                    progress.advance(0, **{"taken by other workers": progress.total - progress.completed})
                    progress.reached(progress.completed, total=progress.completed)
        writer.close()
    except BaseException as exc:
        # Clean-up may fail on the same outage: its failures are logged in one line and the first
        # cause is raised.  Leases it cannot release stay named after this attempt, which ends
        # below, so a retry on this host takes them back at once (others get them on expiry).
        failure = exc
        best_effort(writer.close, "writing finished trees", exc)  # trees finished before still land
        best_effort(lambda: release_leases(engine, run_id, owner, f"{type(exc).__name__}: {exc}"),
                    "releasing leases", exc)
        raise
    finally:
        end_attempt(owner)
        # What this attempt did. Only the engine's work and the unverifiable answers are added to
        # the run's stats (work done, crashed attempts included), with each tree transaction and
        # here the rest since the last one; tree and rollout counts of the run are read from the
        # index (run_summary), so a duplicate or killed attempt cannot double or drop them.
        engine_stats = counting.settle() if counting else EngineStats()
        stats = {"trees": len(writer.written), "rollouts": sum(r.stats["rollouts"] for r in writer.written),
                 "trees_mixed_root": sum(0 < r.tree["mc_value"] < 1 for r in writer.written),
                 "unverifiable_answers": sum(r.stats["unverifiable"] for r in writer.written),
                 "engine_calls": engine_stats.calls, "engine_requests": engine_stats.requests,
                 "engine_rollouts": engine_stats.rollouts, "engine_seconds": round(engine_stats.seconds, 3),
                 "engine_decode_steps": engine_stats.decode_steps, "engine_row_steps": engine_stats.row_steps}
        if counting:
            def add_stats() -> None:
                rest = ledger.take()
                try:
                    with engine.begin() as conn:
                        _add_run_stats(conn, run_id, rest)
                except BaseException:
                    ledger.give_back(rest)
                    raise
            if failure is None:
                add_stats()
            else:
                best_effort(add_stats, "adding the attempt's engine stats", failure)
    finish_chunks(engine, run_id)
    return {**stats, "run_id": run_id, "chunk_index": chunk_index, "stolen": len(stolen),
            "resumed_leases": resumed, "leases_lost": len(writer.lost),
            "mean_batch_size": engine_stats.mean_batch_size}


def run_summary(settings: Settings, run_id: str) -> dict[str, Any]:
    """Index summary of a run: trees, step annotations, MC distribution, first errors, stats."""
    engine = get_engine(settings)
    with engine.connect() as conn:
        run = conn.execute(sa.text("SELECT status, stats FROM annotation_runs WHERE run_id = :r"),
                           {"r": run_id}).one()
        # Per-tree columns and the partial first-error index only: no scan of the wide node rows.
        per_tree = conn.execute(sa.text(
            "SELECT count(*) AS trees, coalesce(sum(num_rollouts), 0) AS rollouts,"
            " coalesce(sum(num_nodes), 0) AS nodes,"
            " count(*) FILTER (WHERE root_mc_value > 0 AND root_mc_value < 1) AS mixed"
            " FROM trees WHERE run_id = :r"), {"r": run_id}).one()
        first_errors = conn.execute(sa.text(
            "SELECT count(*) FROM trees t JOIN step_nodes n USING (tree_id) WHERE t.run_id = :r AND n.is_first_error"),
            {"r": run_id}).scalar_one()
        histogram = conn.execute(sa.text(
            "SELECT h.bucket, sum(h.n) FROM trees t, unnest(t.mc_histogram) WITH ORDINALITY AS h(n, bucket)"
            " WHERE t.run_id = :r GROUP BY 1 HAVING sum(h.n) > 0 ORDER BY 1"), {"r": run_id}).all()
        problems = conn.execute(sa.text("SELECT count(*) FROM chunk_problems WHERE run_id = :r"),
                                {"r": run_id}).scalar_one()
    return {
        "run_id": run_id, "status": run.status, "problems": problems, "trees": per_tree.trees,
        "nodes": int(per_tree.nodes), "step_annotations": int(per_tree.nodes) - per_tree.trees,
        "first_errors": first_errors, "trees_mixed_root": per_tree.mixed,
        "mc_histogram": {f"{(b - 1) / 10:.1f}-{b / 10:.1f}": n for b, n in histogram},
        # Counts from the index (one row per tree); the rest is engine work summed per attempt.
        "stats": {**run.stats, "trees": per_tree.trees, "rollouts": int(per_tree.rollouts),
                  "trees_mixed_root": per_tree.mixed},
    }
