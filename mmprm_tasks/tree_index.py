"""Writing trees into the step index: one fixed-shape upsert for the tree rows, COPY for the nodes.

Both the annotate stage (one tree per transaction, with the problem's done-mark) and
``mmprm import-trees`` (many trees per transaction) go through :func:`write_trees`, so a tree
lands the same way whichever path brought it.  The statements never change shape with the number
of trees or nodes: SQLAlchemy compiles the upsert once, and the nodes stream through Postgres'
COPY (psycopg), which is what keeps the index ahead of the engine at paper scale (issue 12).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import sqlalchemy as sa

from .db import get_engine, require_schema
from .search import NodeRow, TreeRecordError, flatten_tree
from .settings import ConfigurationError, Settings
from .storage import open_store, open_uri
from .validation import check_id, load_json

MC_BUCKETS = 10
STEP_NODE_COLUMNS = ("tree_id", "node_index", "parent_index", "depth", "prefix_len", "num_steps", "steps",
                     "mc_value", "visit_count", "num_correct", "num_incorrect", "is_first_error")


def tree_key(run_id: str, problem_id: str) -> str:
    return f"trees/{run_id}/{problem_id}.json"


@dataclass(frozen=True)
class TreeEntry:
    """What the index stores of one tree, as plain data (it crosses process boundaries when an
    import parses in worker processes): the tree row's fields and its node rows for COPY
    (:data:`STEP_NODE_COLUMNS` without the tree id, which the upsert assigns)."""

    problem_id: str
    key: str
    sha256: str
    mc_value: float
    visit_count: int
    num_rollouts: int
    num_searches: int
    histogram: tuple[int, ...]
    rows: list[tuple[Any, ...]]

    @classmethod
    def build(cls, run_id: str, tree: dict[str, Any], data: bytes, *, num_rollouts: int,
              num_searches: int, nodes: list[NodeRow] | None = None) -> "TreeEntry":
        """``tree`` (a SPEC §4 record, checked by :func:`flatten_tree` unless ``nodes`` are
        given) stored as ``data``."""
        nodes = nodes if nodes is not None else flatten_tree(tree)
        return cls(problem_id=tree["id"], key=tree_key(run_id, tree["id"]), sha256=hashlib.sha256(data).hexdigest(),
                   mc_value=float(tree["mc_value"]), visit_count=nodes[0].visit_count, num_rollouts=num_rollouts,
                   num_searches=num_searches, histogram=tuple(mc_histogram(nodes)), rows=list(_node_rows(nodes)))


def mc_bucket(mc_value: float) -> int:
    """0-based decile of an MC value: ``[0, .1) -> 0`` ... ``[.9, 1] -> 9``; SQL
    ``least(floor(mc_value * 10), 9)`` gives the same (same float arithmetic)."""
    return min(int(mc_value * MC_BUCKETS), MC_BUCKETS - 1)


def mc_histogram(nodes: Sequence[NodeRow]) -> list[int]:
    counts = [0] * MC_BUCKETS
    for node in nodes:
        counts[mc_bucket(node.mc_value)] += 1
    return counts


# Tree objects and the steps column: the JSON of ``json.dumps(obj, ensure_ascii=False)`` without
# its spaces, several times faster; the annotate write path encodes every tree and node on its hot path.
encode_json = msgspec.json.encode


def _encode_steps(steps: list[str]) -> str:
    return encode_json(steps).decode()


def _node_rows(nodes: Sequence[NodeRow]):
    """COPY rows of one tree's nodes in pre-order: :data:`STEP_NODE_COLUMNS` but the tree id."""
    prefix_len = [0] * len(nodes)
    for node in nodes:
        parent_index = node.parent_index
        if parent_index is None:
            is_first_error = False
        else:
            parent = nodes[parent_index]
            prefix_len[node.node_index] = prefix_len[parent_index] + len(parent.steps)
            is_first_error = node.mc_value == 0 and parent.mc_value > 0
        yield (node.node_index, parent_index, node.depth, prefix_len[node.node_index], len(node.steps),
               _encode_steps(list(node.steps)), node.mc_value, node.visit_count, node.num_correct,
               node.num_incorrect, is_first_error)


_UPSERT_TREES = (
    "INSERT INTO trees (run_id, problem_id, root_mc_value, visit_count, num_nodes, num_rollouts,"
    " num_searches, tree_key, tree_sha256, config_hash, mc_histogram)"
    " SELECT %(run)s, t.problem_id, t.mc, t.visits, t.nodes, t.rollouts, t.searches, t.key, t.sha, %(chash)s,"
    " t.hist::int[]"
    " FROM unnest(%(pids)s::text[], %(mcs)s::float8[], %(visits)s::int[], %(nodes)s::int[], %(rollouts)s::int[],"
    " %(searches)s::int[], %(keys)s::text[], %(shas)s::text[], %(hists)s::text[])"
    " AS t(problem_id, mc, visits, nodes, rollouts, searches, key, sha, hist)"
    " ON CONFLICT (run_id, problem_id) DO UPDATE SET root_mc_value = EXCLUDED.root_mc_value,"
    " visit_count = EXCLUDED.visit_count, num_nodes = EXCLUDED.num_nodes,"
    " num_rollouts = EXCLUDED.num_rollouts, num_searches = EXCLUDED.num_searches,"
    " tree_key = EXCLUDED.tree_key, tree_sha256 = EXCLUDED.tree_sha256,"
    " config_hash = EXCLUDED.config_hash, mc_histogram = EXCLUDED.mc_histogram, created_at = now()"
    # xmax = 0: the row was inserted now (a new tree has no old nodes to delete)
    " RETURNING problem_id, tree_id, xmax = 0")


def write_trees(conn: sa.Connection, run_id: str, config_hash: str, entries: Sequence[TreeEntry]) -> dict[str, int]:
    """Upsert ``entries`` as trees of ``run_id`` and replace their nodes, inside ``conn``'s
    transaction.  Returns problem id -> tree id.  Problem ids must be distinct.

    On the driver's cursor (the same transaction): a fixed statement for the trees, a delete of
    old nodes only for trees that existed, and COPY for the nodes.
    """
    if not entries:
        return {}
    with conn.connection.driver_connection.cursor() as cursor:
        cursor.execute(_UPSERT_TREES, {
            "run": run_id, "chash": config_hash,
            "pids": [e.problem_id for e in entries], "mcs": [e.mc_value for e in entries],
            "visits": [e.visit_count for e in entries], "nodes": [len(e.rows) for e in entries],
            "rollouts": [e.num_rollouts for e in entries], "searches": [e.num_searches for e in entries],
            "keys": [e.key for e in entries], "shas": [e.sha256 for e in entries],
            "hists": ["{" + ",".join(map(str, e.histogram)) + "}" for e in entries],
        })
        returned = cursor.fetchall()
        ids = {problem_id: tree_id for problem_id, tree_id, _ in returned}
        replaced = [tree_id for _, tree_id, inserted in returned if not inserted]
        if replaced:
            cursor.execute("DELETE FROM step_nodes WHERE tree_id = ANY(%s::bigint[])", (replaced,))
        with cursor.copy(f"COPY step_nodes ({', '.join(STEP_NODE_COLUMNS)}) FROM STDIN") as copy:
            for entry in entries:
                tree_id = ids[entry.problem_id]
                for row in entry.rows:
                    copy.write_row((tree_id, *row))
    return ids


# ---------------------------------------------------------------------------------------------
# Bringing trees made elsewhere (the original release's pipeline) into a run

IMPORT_BATCH_NODES = 50_000  # nodes per transaction: large enough to amortise the commit
IMPORT_UPLOADS = 8  # tree objects written at once


@dataclass
class ImportReport:
    run_id: str
    source: str
    trees: int = 0
    nodes: int = 0
    seconds: float = 0.0
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"record", "error"}

    @property
    def nodes_per_second(self) -> float:
        return self.nodes / self.seconds if self.seconds else 0.0


def _split_records(name: str, lines: Iterable[bytes]) -> Iterator[tuple[str, bytes]]:
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield f"{name}:{number}", line


def _tree_records(source: str, settings: Settings) -> Iterator[tuple[str, bytes]]:
    """(record name, record bytes) of every tree under ``source``: a local file or folder, or an
    object-store URI naming one object or a prefix (``s3://bucket/trees/``).  A ``.json`` file is
    one tree; a ``.jsonl`` file one per line (read line by line when local)."""
    if "://" not in source:
        root = Path(source)
        if not root.exists():
            raise ConfigurationError(f"{source}: no such file or folder")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".json", ".jsonl"))
        jsonl = [path for path in files if path.suffix == ".jsonl"]
        for path in jsonl:
            with path.open("rb") as handle:
                yield from _split_records(str(path), handle)
        # One tree per .json file: read ahead a few at a time on threads (reads wait on the disk).
        single = [path for path in files if path.suffix != ".jsonl"]
        with ThreadPoolExecutor(IMPORT_UPLOADS, thread_name_prefix="import-read") as readers:
            for start in range(0, len(single), 64):
                group = single[start : start + 64]
                yield from zip(map(str, group), readers.map(Path.read_bytes, group))
        return
    store, key = open_uri(source, settings)
    # A key ending in "/" is a prefix (S3 servers may report folder markers as objects).
    keys = [key] if key and not key.endswith("/") and store.exists(key) else sorted(
        k for k in store.iter_keys(key.rstrip("/") + "/" if key else "") if k.endswith((".json", ".jsonl")))
    for name in keys:
        data = store.get_bytes(name)
        if name.endswith(".jsonl"):
            yield from _split_records(store.uri(name), data.splitlines())
        else:
            yield store.uri(name), data


IMPORT_PROCESSES = 2  # records are parsed and checked on up to this many worker processes
_GROUP = 64  # records per task sent to a worker


def _prepare_records(run_id: str, records: list[tuple[str, bytes]]) -> list[TreeEntry | str]:
    """Parse and check ``records`` (in a worker process): each becomes a :class:`TreeEntry`, or
    the reason it is rejected (the field at fault)."""
    out: list[TreeEntry | str] = []
    for _, data in records:
        try:
            tree, bad = load_json(data)
            if not isinstance(tree, dict):
                raise TreeRecordError(f"record: expected an object, got {type(tree).__name__}")
            for required in ("id", "question", "answer", "image_path"):
                if not isinstance(tree.get(required), str):
                    raise TreeRecordError(f"{required}: missing or not a string")
            check_id(tree["id"])  # it names the tree's object
            nodes = flatten_tree(tree)
            # A NUL would fail the whole batch's COPY (after its objects were put); control
            # characters and NaN are refused as in every other input.
            if bad:
                raise bad
            entry: TreeEntry | str = TreeEntry.build(
                run_id, tree, data, nodes=nodes, num_searches=sum(n.visit_count for n in nodes),
                num_rollouts=sum(n.num_correct + n.num_incorrect for n in nodes))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and TreeRecordError included
            entry = str(exc)
        out.append(entry)
    return out


def _prepared(parsers: ProcessPoolExecutor, workers: int, records: Iterator[tuple[str, bytes]], run_id: str
              ) -> Iterator[list[tuple[str, bytes, TreeEntry | str]]]:
    """Groups of prepared records in input order, with at most two groups per worker in flight."""
    in_flight: deque[tuple[list[tuple[str, bytes]], Future]] = deque()
    while True:
        group = list(itertools.islice(records, _GROUP))
        if group:
            in_flight.append((group, parsers.submit(_prepare_records, run_id, group)))
        if in_flight and (not group or len(in_flight) > 2 * workers):
            sent, future = in_flight.popleft()
            yield [(name, data, entry) for (name, data), entry in zip(sent, future.result())]
        elif not group:
            return


def _import_run(conn: sa.Connection, run_id: str, source: str, policy_model: str) -> str:
    """The run's config hash; an unknown run is created as an imported, finished run."""
    found = conn.execute(sa.text("SELECT config_hash FROM annotation_runs WHERE run_id = :r"),
                         {"r": run_id}).scalar_one_or_none()
    if found is not None:
        return found
    config = {"imported_from": source, "policy": {"backend": "imported", "model": policy_model}}
    chash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    conn.execute(sa.text(
        "INSERT INTO annotation_runs (run_id, policy_backend, policy_model, config, config_hash, status, finished_at)"
        " VALUES (:r, 'imported', :m, CAST(:c AS JSONB), :h, 'succeeded', now())"),
        {"r": run_id, "m": policy_model, "c": json.dumps(config), "h": chash})
    return chash


def import_trees(settings: Settings, source: str, run_id: str, *, policy_model: str = "unknown",
                 batch_nodes: int = IMPORT_BATCH_NODES, progress: Callable[[int], None] | None = None) -> ImportReport:
    """Load SPEC §4 tree records (the original release's output) from ``source`` into ``run_id``.

    Each tree is stored as ``trees/<run>/<problem>.json`` and indexed like an annotated one;
    re-importing upserts.  A record that is not valid JSON or not a SPEC §4 tree, whose problem is
    not in the index (ingest the seeds first), or whose problem already came earlier in this
    import, is rejected with its file (and line) and the field at fault; the others still land.
    ``num_searches`` of an imported tree is the sum of its visit counts (one per selection) and
    ``num_rollouts`` the distinct rollouts the record kept (the file does not say how many were drawn).
    """
    started = time.perf_counter()
    check_id(run_id, "run_id")
    engine = get_engine(settings)
    require_schema(engine)
    store = open_store(settings)
    report = ImportReport(run_id=run_id, source=source)
    with engine.begin() as conn:
        chash = _import_run(conn, run_id, source, policy_model)
        known = set(conn.execute(sa.text("SELECT problem_id FROM seed_problems")).scalars())
    seen: set[str] = set()
    batch: list[tuple[TreeEntry, bytes]] = []
    batch_nodes_now = 0

    def write(entries: list[tuple[TreeEntry, bytes]]) -> None:
        # Objects first: a crash between the two leaves objects a re-import overwrites, never
        # index rows pointing at nothing.  Object writes wait on the disk or the network, so
        # several go at once.
        list(uploads.map(lambda item: store.put_bytes(item[0].key, item[1], "application/json"), entries))
        with engine.begin() as conn:
            write_trees(conn, run_id, chash, [entry for entry, _ in entries])
        report.trees += len(entries)
        report.nodes += sum(len(entry.rows) for entry, _ in entries)
        if progress:
            progress(len(entries))

    # Worker processes parse and check the records (the CPU-bound part); this process keeps the
    # order, rejects unknown and repeated problems, and writes one batch (object store and COPY,
    # mostly waiting on I/O) while the next is prepared.
    workers = max(1, min(IMPORT_PROCESSES, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as parsers, \
            ThreadPoolExecutor(1, thread_name_prefix="import-writer") as writer, \
            ThreadPoolExecutor(IMPORT_UPLOADS, thread_name_prefix="import-upload") as uploads:
        pending: Future | None = None
        for prepared in _prepared(parsers, workers, _tree_records(source, settings), run_id):
            for record_name, record_bytes, entry in prepared:
                if isinstance(entry, str):
                    report.rejected.append({"record": record_name, "error": entry})
                    continue
                if entry.problem_id not in known:
                    report.rejected.append({"record": record_name, "error": f"id: problem {entry.problem_id!r} is "
                                            "not in the step index (ingest its seeds first)"})
                    continue
                if entry.problem_id in seen:
                    report.rejected.append({"record": record_name, "error": f"id: problem {entry.problem_id!r} "
                                            "already came earlier in this import"})
                    continue
                seen.add(entry.problem_id)
                batch.append((entry, record_bytes))
                batch_nodes_now += len(entry.rows)
                if batch_nodes_now >= batch_nodes:
                    if pending is not None:
                        pending.result()
                    pending, batch, batch_nodes_now = writer.submit(write, batch), [], 0
        if pending is not None:
            pending.result()
        if batch:
            write(batch)
    if report.trees:
        analyze_index(engine)
    report.seconds = time.perf_counter() - started
    return report


def analyze_index(engine: sa.Engine) -> None:
    """Fresh planner statistics after a bulk write: without them the README's first-error query
    took 640 ms at 1.1M imported nodes instead of ~100 ms, until autovacuum came round."""
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE trees, step_nodes"))
