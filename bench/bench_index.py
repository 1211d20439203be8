"""The step index at paper scale: loading a million step nodes, and the README's queries on them.

Generates realistic OmegaPRM trees in the original release's format (SPEC §4: a root whose
correct rollouts are whole-solution children, binary-search chains of probes holding a few steps
each, distinct rollouts kept at every estimated node, step texts of a few dozen words), writes
them as one JSON file per problem (as the release's pipeline does), registers their seed rows, then
measures in one run on one database:

* **COPY baseline:** the same node rows streamed by a bare ``COPY step_nodes`` (nothing else);
* **import-trees:** ``mmprm_tasks.tree_index.import_trees`` on the folder (read, parse, validate,
  store each tree JSON, index), nodes/s and the ratio to COPY;
* **annotate write path:** ``mmprm_tasks.annotate.TreeWriter`` as a chunk uses it (writer threads,
  one transaction per tree: object write, tree upsert, node COPY, done-mark), on
  ``--persist-trees`` of the trees, rows/s;
* **README queries** (read from ``README.md``, "Inspecting the step index") at the loaded size:
  p50/p90 ms as a client sees them (psycopg, every row fetched, as psql would) and the server's
  execution time (EXPLAIN ANALYZE), with the rows each returns;
* **traversal:** ``traverse_stage`` over the imported run in a fresh process, peak RSS and time,
  against the same process only reading every tree JSON from the store (the floor).

    .venv/bin/python bench/bench_index.py --out .mmprm/bench/index.json            # ~1M nodes
    .venv/bin/python bench/bench_index.py --trees 2000 --out r.json                  # quick

The database is an embedded Postgres in a temporary folder unless ``--database-url`` names a
server (a fresh database is created there and dropped afterwards).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from mmprm_tasks import db
from mmprm_tasks.annotate import TreeWriter
from mmprm_tasks.search import SearchResult, flatten_tree
from mmprm_tasks.settings import Settings, StoreConfig
from mmprm_tasks.tree_index import STEP_NODE_COLUMNS, TreeEntry, import_trees

WORDS = ("the", "area", "of", "triangle", "is", "half", "base", "times", "height", "so", "we", "get", "angle",
         "sum", "degrees", "therefore", "circle", "radius", "equals", "from", "figure", "side", "length", "x",
         "substituting", "into", "equation", "gives", "which", "means", "value", "answer", "by", "theorem")

# The README's inspection queries, exactly as documented there (R = the loaded run).
def readme_queries(readme: Path = Path(__file__).resolve().parents[1] / "README.md") -> dict[str, str]:
    """The SQL blocks of README's "Inspecting the step index", keyed by their comment line: the
    benchmark times exactly what the README tells users to run."""
    text = readme.read_text()
    section = text[text.index("## Inspecting the step index"):]
    section = section[: section.index("\n## ", 1)]
    queries: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        if not line.startswith("    "):
            continue
        line = line.strip()
        if line.startswith("--"):
            name = line[2:].split(":")[0].split(" (")[0].strip()  # the comment, up to its detail
            queries[name] = ""
        elif name:
            queries[name] = (queries[name] + " " + line).strip()
    return {name: sql.rstrip(";") for name, sql in queries.items()}


def _step(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40))) + "."


def _solution(rng: random.Random, length: int) -> list[str]:
    return [_step(rng) for _ in range(length)]


def _mc(rng: random.Random, num_rollouts: int) -> float:
    return rng.randint(0, num_rollouts) / num_rollouts


def make_tree(rng: random.Random, problem_id: str, target_nodes: int, rollouts_kept: int) -> dict[str, Any]:
    """One realistic tree: root estimated, correct rollouts as whole-solution children, and
    binary-search chains (probes of a few steps, each estimated) until ``target_nodes``."""
    length = rng.randint(6, 12)

    def node(steps: list[str], mc: float, estimated: bool) -> dict[str, Any]:
        rollouts = lambda: [_solution(rng, rng.randint(1, 4)) for _ in range(rng.randint(0, rollouts_kept))]  # noqa: E731
        return {"partial_solution": steps, "mc_value": mc, "visit_count": 0,
                "correct_rollouts": rollouts() if estimated and mc > 0 else [],
                "incorrect_rollouts": rollouts() if estimated and mc < 1 else [], "children": []}

    root = {"id": problem_id, "question": f"Question {problem_id}: " + _step(rng), "answer": str(rng.randint(1, 99)),
            "image_path": f"images/{problem_id}.png", **node([], _mc(rng, 16), True)}
    root.pop("partial_solution")
    states = [(root, 0)]  # (node, steps before it + its own)
    count = 1
    for _ in range(rng.randint(1, 4)):  # distinct correct rollouts of the root
        root["children"].append(node(_solution(rng, length), 1.0, False))
        count += 1
    while count < target_nodes:
        state, depth = rng.choice(states)
        if depth >= length - 1:
            continue
        state["visit_count"] += 1
        left, current = depth, state
        while left < length and count < target_nodes:  # one binary search along an incorrect rollout
            width = max(1, (length - left) // 2)
            child = node(_solution(rng, width), _mc(rng, 16), True)
            current["children"].append(child)
            count += 1
            if child["mc_value"] == 0.0:
                break
            left += width
            current = child
            states.append((child, left))
    return root


def _generate(folder: Path, n_trees: int, nodes_per_tree: int, rollouts_kept: int, seed: int) -> tuple[list[str], int]:
    rng = random.Random(seed)
    ids, nodes = [], 0
    for i in range(n_trees):
        pid = f"q{i:07d}"
        tree = make_tree(rng, pid, rng.randint(nodes_per_tree // 2, nodes_per_tree * 3 // 2), rollouts_kept)
        nodes += len(flatten_tree(tree))
        (folder / f"{pid}.json").write_text(json.dumps(tree))
        ids.append(pid)
    return ids, nodes


def _register_seeds(engine: sa.Engine, ids: list[str], extra: int) -> None:
    """Seed rows for the trees (plus ``extra`` never annotated), as ingest would have left them."""
    with engine.begin() as conn, conn.connection.driver_connection.cursor() as cursor:
        with cursor.copy("COPY seed_problems (problem_id, question, correct_answer, image_key, image_sha256,"
                         " content_hash, source, split) FROM STDIN") as copy:
            for pid in ids + [f"u{i:07d}" for i in range(extra)]:
                copy.write_row((pid, "q", "1", f"images/{pid}.png", "0" * 64, pid, "bench", "train"))


def _run_row(conn: sa.Connection, run_id: str) -> None:
    conn.execute(sa.text("INSERT INTO annotation_runs (run_id, policy_backend, policy_model, config, config_hash)"
                         " VALUES (:r, 'bench', 'bench', '{}', 'bench')"), {"r": run_id})


def _copy_baseline(engine: sa.Engine, folder: Path, ids: list[str]) -> dict[str, float]:
    """Bare COPY of the same node rows (built before the clock starts) into a scratch run."""
    with engine.begin() as conn:
        _run_row(conn, "copy-baseline")
        tree_ids = dict(conn.execute(sa.text(
            "INSERT INTO trees (run_id, problem_id, root_mc_value, visit_count, num_nodes, num_rollouts, num_searches,"
            " tree_key, tree_sha256, config_hash, mc_histogram) SELECT 'copy-baseline', p, 0.5, 0, 0, 0, 0, 'k', 's', 'c',"
            " '{0,0,0,0,0,0,0,0,0,0}' FROM unnest(CAST(:ids AS text[])) AS p RETURNING problem_id, tree_id"),
            {"ids": ids}).all())
    rows = [(tree_ids[pid], *row) for pid in ids
            for row in TreeEntry.build("copy-baseline", json.loads((folder / f"{pid}.json").read_text()), b"",
                                       num_rollouts=0, num_searches=0).rows]
    start = time.perf_counter()
    with engine.begin() as conn, conn.connection.driver_connection.cursor() as cursor:
        with cursor.copy(f"COPY step_nodes ({', '.join(STEP_NODE_COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    seconds = time.perf_counter() - start
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM annotation_runs WHERE run_id = 'copy-baseline'"))
    return {"rows": len(rows), "seconds": seconds, "rows_per_s": len(rows) / seconds}


def _persist(engine: sa.Engine, settings: Settings, folder: Path, ids: list[str]) -> dict[str, float]:
    """The annotate write path as a chunk uses it: finished trees handed to a TreeWriter
    (``settings.index_writers`` threads, one transaction per tree with its done-mark)."""
    from mmprm_tasks.storage import open_store

    store = open_store(settings)
    owner = "bench-writer"
    with engine.begin() as conn:
        _run_row(conn, "annotated")
        # The problems leased to the writer, as a chunk's claims leave them.
        conn.execute(sa.text("INSERT INTO chunks (run_id, chunk_index, status) VALUES ('annotated', 0, 'running')"))
        conn.execute(sa.text(
            "INSERT INTO chunk_problems (run_id, chunk_index, problem_id, status, lease_owner, lease_expires_at)"
            " SELECT 'annotated', 0, p, 'leased', :owner, now() + interval '1 hour'"
            " FROM unnest(CAST(:ids AS text[])) AS p"), {"owner": owner, "ids": ids})
    results = []
    for pid in ids:
        tree = json.loads((folder / f"{pid}.json").read_text())
        results.append(SearchResult(pid, tree, {"rollouts": 0, "searches": 0, "nodes": 0}))
    nodes = sum(len(flatten_tree(r.tree)) for r in results)
    start = time.perf_counter()
    writer = TreeWriter(engine, store, settings, "annotated", "bench", owner)
    for result in results:
        writer.submit(result)
    writer.close()
    seconds = time.perf_counter() - start
    if writer.lost or len(writer.written) != len(results):
        raise SystemExit(f"the writer lost leases or trees: {writer.lost[:3]}")
    return {"trees": len(results), "rows": nodes, "seconds": seconds, "rows_per_s": nodes / seconds,
            "ms_per_tree": 1000 * seconds / len(results), "writer_threads": settings.index_writers}


def _queries(engine: sa.Engine, run_id: str, repeats: int) -> dict[str, dict[str, float]]:
    """Each README query as a client runs it (psycopg cursor, every row fetched: what psql does),
    p50/p90 over ``repeats``, and the server's own execution time (EXPLAIN ANALYZE, p50)."""
    out = {}
    # After a bulk load, as autovacuum would soon do: statistics and the visibility map.
    with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))
    with engine.connect() as conn:
        problem = conn.execute(sa.text(
            "SELECT t.problem_id FROM trees t JOIN step_nodes n USING (tree_id) WHERE t.run_id = :r"
            " AND n.is_first_error LIMIT 1"), {"r": run_id}).scalar_one()
        cursor = conn.connection.driver_connection.cursor()
        for name, sql in readme_queries().items():
            sql = sql.replace("'R'", f"'{run_id}'").replace("'P'", f"'{problem}'")
            times, server, rows = [], [], 0
            for _ in range(repeats):
                start = time.perf_counter()
                cursor.execute(sql)
                rows = len(cursor.fetchall())
                times.append(1000 * (time.perf_counter() - start))
                cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)
                server.append(cursor.fetchone()[0][0]["Execution Time"])
            times.sort()
            out[name] = {"p50_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))],
                         "server_p50_ms": statistics.median(server), "rows": rows}
        conn.rollback()
    return out


_TRAVERSAL_PROBE = """
import json, resource, sys, time
from mmprm_tasks import pipeline
from mmprm_tasks.settings import Settings
settings = Settings.model_validate_json(sys.argv[2])
start = time.perf_counter()
if sys.argv[1] == "traverse":
    out = pipeline.traverse_stage(settings, ["imported"])["counts"]
else:  # the floor: read and parse every tree of the run, keep nothing
    from mmprm_tasks.db import get_engine
    from mmprm_tasks.storage import open_store
    store = open_store(settings)
    with get_engine(settings).connect() as conn:
        rows = pipeline._run_trees(conn, ["imported"])
    out = {"trees": sum(1 for r in rows if json.loads(store.get_bytes(r.tree_key)))}
# VmHWM is this process's own peak (ru_maxrss would carry the forking parent's peak across exec).
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak = int(hwm[0]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak, "counts": out}))
"""


def _traversal(settings: Settings) -> dict[str, Any]:
    import subprocess

    out = {}
    for mode in ("read-trees", "traverse"):
        done = subprocess.run([sys.executable, "-c", _TRAVERSAL_PROBE, mode, settings.model_dump_json()],
                              capture_output=True, text=True, check=True)
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    out["rss_ratio"] = out["traverse"]["peak_rss_mb"] / out["read-trees"]["peak_rss_mb"]
    out["time_ratio"] = out["traverse"]["seconds"] / out["read-trees"]["seconds"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", type=int, default=15_000)
    parser.add_argument("--nodes-per-tree", type=int, default=70, help="mean nodes per tree (uniform ±50%%)")
    parser.add_argument("--rollouts-kept", type=int, default=2, help="most distinct rollouts kept per estimated node")
    parser.add_argument("--persist-trees", type=int, default=1_000, help="trees sent through the annotate write path")
    parser.add_argument("--unannotated", type=int, default=1_000, help="extra seed problems with no tree")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database-url", help="a Postgres server to create a scratch database on")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    console = Console()

    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        tmp_path = Path(tmp)
        folder = tmp_path / "release-trees"
        folder.mkdir()
        started = time.perf_counter()
        ids, nodes = _generate(folder, args.trees, args.nodes_per_tree, args.rollouts_kept, args.seed)
        megabytes = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        console.print(f"generated {len(ids):,} trees, {nodes:,} nodes, {megabytes:,.0f} MB of JSON "
                      f"in {time.perf_counter() - started:.0f} s")
        with db.scratch_database(args.database_url, tmp_path / "home", "mmprm_bench_index") as url:
            settings = Settings(home=tmp_path / "home", database_url=url,
                                store=StoreConfig(kind="local", root=tmp_path / "objects"))
            engine = db.get_engine(settings)
            db.upgrade(engine)
            _register_seeds(engine, ids, args.unannotated)

            baseline = _copy_baseline(engine, folder, ids)
            console.print(f"COPY baseline: {baseline['rows_per_s']:,.0f} rows/s")
            report = import_trees(settings, str(folder), "imported", policy_model="bench")
            if report.rejected:
                raise SystemExit(f"generated trees were rejected: {report.rejected[:3]}")
            imported = {"trees": report.trees, "nodes": report.nodes, "seconds": report.seconds,
                        "nodes_per_s": report.nodes_per_second,
                        "ratio_to_copy": report.nodes_per_second / baseline["rows_per_s"]}
            console.print(f"import-trees: {imported['nodes_per_s']:,.0f} nodes/s, {report.seconds:.1f} s")
            persisted = _persist(engine, settings, folder, ids[: args.persist_trees])
            persisted["ratio_to_copy"] = persisted["rows_per_s"] / baseline["rows_per_s"]
            console.print(f"annotate write path: {persisted['rows_per_s']:,.0f} rows/s")
            with engine.connect() as conn:
                total_nodes = conn.execute(sa.text("SELECT count(*) FROM step_nodes")).scalar_one()
            queries = _queries(engine, "imported", args.repeats)
            traversal = _traversal(settings)

    table = Table(title=f"step index at {total_nodes:,} nodes")
    for column in ("measure", "value", "ratio to COPY"):
        table.add_column(column)
    table.add_row("COPY baseline", f"{baseline['rows_per_s']:,.0f} rows/s", "1.00")
    table.add_row("import-trees", f"{imported['nodes_per_s']:,.0f} nodes/s ({imported['seconds']:.1f} s)",
                  f"{imported['ratio_to_copy']:.2f}")
    table.add_row("annotate write path", f"{persisted['rows_per_s']:,.0f} rows/s ({persisted['ms_per_tree']:.1f} ms/tree)",
                  f"{persisted['ratio_to_copy']:.2f}")
    for name, q in queries.items():
        table.add_row(f"query: {name}", f"p50 {q['p50_ms']:.1f} ms, p90 {q['p90_ms']:.1f} ms, server "
                      f"{q['server_p50_ms']:.1f} ms ({q['rows']:,} rows)", "")
    for mode in ("read-trees", "traverse"):
        t = traversal[mode]
        table.add_row(f"traversal: {mode}", f"peak RSS {t['peak_rss_mb']:.0f} MB, {t['seconds']:.1f} s",
                      "" if mode == "read-trees" else f"RSS x{traversal['rss_ratio']:.2f} of reading")
    console.print(table)
    result = {"config": vars(args) | {"out": str(args.out) if args.out else None}, "total_nodes": total_nodes,
              "json_megabytes": megabytes, "copy_baseline": baseline, "import_trees": imported,
              "annotate_write_path": persisted, "readme_queries": queries, "traversal": traversal,
              "machine": {"python": sys.version.split()[0], "platform": platform.platform()}}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
