"""Trees into the step index: the COPY write path, and importing the original release's tree files."""

from __future__ import annotations

import json

import sqlalchemy as sa
from typer.testing import CliRunner

from mmprm_tasks import cli
from mmprm_tasks.annotate import annotate_chunk, run_summary
from mmprm_tasks.db import get_engine
from mmprm_tasks.runs import shard_run
from mmprm_tasks.seeds import ingest_file
from mmprm_tasks.storage import open_store
from mmprm_tasks.tree_index import import_trees, tree_key

from test_annotate import SMALL, arithmetic_script
from test_search import ExactVerifier, ScriptedPolicy
from test_seeds import make_seed_file

NODE_COLUMNS = ", ".join(f"n.{c}" for c in (
    "node_index", "parent_index", "depth", "prefix_len", "steps", "mc_value", "visit_count", "num_correct",
    "num_incorrect", "is_first_error"))


def _annotated(settings, tmp_path, n: int = 5) -> list[dict]:
    """Annotate ``n`` seed problems into run-a; returns their tree records from the store."""
    ingest_file(make_seed_file(tmp_path / "data", n), settings)
    s = settings.with_overrides(SMALL)
    shard_run(s, "run-a", chunk_size=n)
    annotate_chunk(s, "run-a", 0, policy=ScriptedPolicy(arithmetic_script), verifier=ExactVerifier(), steal=False)
    store = open_store(s)
    return [store.get_json(tree_key("run-a", f"p{i:04d}")) for i in range(n)]


def _nodes(settings, run_id: str) -> dict[str, list[tuple]]:
    with get_engine(settings).connect() as conn:
        rows = conn.execute(sa.text(
            f"SELECT t.problem_id, {NODE_COLUMNS} FROM step_nodes n JOIN trees t USING (tree_id)"
            " WHERE t.run_id = :r ORDER BY t.problem_id, n.node_index"), {"r": run_id}).all()
    out: dict[str, list[tuple]] = {}
    for row in rows:
        out.setdefault(row[0], []).append(tuple(row[1:]))
    return out


def _histograms(settings, run_id: str) -> tuple[dict, dict]:
    """(stored per-tree histograms, the same recomputed from the node rows)."""
    with get_engine(settings).connect() as conn:
        stored = dict(conn.execute(sa.text("SELECT problem_id, mc_histogram FROM trees WHERE run_id = :r"),
                                   {"r": run_id}).all())
        recomputed: dict[str, list[int]] = {pid: [0] * 10 for pid in stored}
        for pid, bucket, count in conn.execute(sa.text(
                "SELECT t.problem_id, least(floor(n.mc_value * 10), 9)::int + 1, count(*)"
                " FROM step_nodes n JOIN trees t USING (tree_id) WHERE t.run_id = :r GROUP BY 1, 2"), {"r": run_id}):
            recomputed[pid][bucket - 1] = count
    return stored, recomputed


def test_imported_release_files_index_exactly_like_annotated_trees(cli_settings, tmp_path):
    trees = _annotated(cli_settings, tmp_path)
    folder = tmp_path / "release-outputs"
    folder.mkdir()
    for tree in trees:  # the original pipeline writes one JSON file per problem
        (folder / f"{tree['id']}.json").write_text(json.dumps(tree))

    result = CliRunner().invoke(cli.app, ["import-trees", str(folder), "--run", "imported", "--policy-model", "mm-policy"])
    assert result.exit_code == 0, result.output
    assert "5 trees" in result.output

    assert _nodes(cli_settings, "imported") == _nodes(cli_settings, "run-a")
    for run_id in ("run-a", "imported"):
        stored, recomputed = _histograms(cli_settings, run_id)
        assert stored == recomputed and sum(map(sum, stored.values())) > 5
    a, b = run_summary(cli_settings, "run-a"), run_summary(cli_settings, "imported")
    for name in ("trees", "nodes", "first_errors", "trees_mixed_root", "mc_histogram"):
        assert a[name] == b[name], name
    assert b["status"] == "succeeded"
    with get_engine(cli_settings).connect() as conn:
        run = conn.execute(sa.text("SELECT policy_backend, policy_model FROM annotation_runs WHERE run_id = 'imported'")).one()
        searches = dict(conn.execute(sa.text("SELECT run_id, sum(num_searches) FROM trees GROUP BY 1")).all())
    assert tuple(run) == ("imported", "mm-policy")
    assert searches["imported"] == searches["run-a"]  # one visit per selection
    assert open_store(cli_settings).get_json(tree_key("imported", "p0000")) == trees[0]

    # Re-importing upserts: same rows, nothing doubled.
    again = import_trees(cli_settings, str(folder), "imported")
    assert (again.trees, again.rejected) == (5, [])
    assert _nodes(cli_settings, "imported") == _nodes(cli_settings, "run-a")

    # Deleting a run takes its trees (ON DELETE CASCADE) and their nodes (trigger) with it.
    with get_engine(cli_settings).begin() as conn:
        total = conn.execute(sa.text("SELECT count(*) FROM step_nodes")).scalar_one()
        conn.execute(sa.text("DELETE FROM annotation_runs WHERE run_id = 'imported'"))
        assert conn.execute(sa.text("SELECT count(*) FROM step_nodes")).scalar_one() == total // 2
        orphans = conn.execute(sa.text(
            "SELECT count(*) FROM step_nodes n LEFT JOIN trees t USING (tree_id) WHERE t.tree_id IS NULL")).scalar_one()
    assert orphans == 0 and len(_nodes(cli_settings, "run-a")) == 5


def test_bad_records_are_rejected_by_name_and_the_rest_land(cli_settings, tmp_path):
    trees = _annotated(cli_settings, tmp_path, n=3)
    broken = json.loads(json.dumps(trees[1]))
    del broken["children"][0]["mc_value"]
    stranger = {**trees[2], "id": "not-a-seed"}
    lines = [json.dumps(trees[0]), "{not json", json.dumps(broken), json.dumps(stranger), json.dumps(trees[0]),
             json.dumps(trees[2])]
    source = tmp_path / "trees.jsonl"
    source.write_text("\n".join(lines) + "\n")

    result = CliRunner().invoke(cli.app, ["import-trees", str(source), "--run", "imported"])
    assert result.exit_code == 1
    out = result.output.replace("\n", "")
    assert f"{source}:2" in out and f"{source}:3: children[0].mc_value: missing" in out
    assert "not-a-seed" in out and "ingest its seeds first" in out
    assert f"{source}:5" in out and "already came earlier" in out
    assert "4 record(s) rejected" in out
    assert sorted(_nodes(cli_settings, "imported")) == ["p0000", "p0002"]


def test_import_from_an_s3_prefix(s3_settings, tmp_path):
    trees = _annotated(s3_settings, tmp_path, n=3)
    store = open_store(s3_settings)
    for tree in trees:
        store.put_json(f"incoming/{tree['id']}.json", tree)
    store.put_bytes("incoming/README.txt", b"not a tree")  # other files under the prefix are ignored

    report = import_trees(s3_settings, f"s3://{s3_settings.store.bucket}/incoming/", "imported")
    assert (report.trees, report.rejected) == (3, [])
    assert _nodes(s3_settings, "imported") == _nodes(s3_settings, "run-a")


def test_bulk_writes_leave_the_planner_fresh_statistics(settings, tmp_path):
    """A finished annotation run and an import each ANALYZE the index themselves (pg_stat counts
    manual ANALYZEs apart from autovacuum's)."""

    def analyzed() -> dict[str, int]:
        with get_engine(settings).connect() as conn:
            return dict(conn.execute(sa.text("SELECT relname, analyze_count FROM pg_stat_user_tables"
                                             " WHERE relname IN ('trees', 'step_nodes')")).all())

    trees = _annotated(settings, tmp_path, n=2)
    after_annotation = analyzed()
    assert after_annotation == {"trees": 1, "step_nodes": 1}
    source = tmp_path / "trees.jsonl"
    source.write_text("\n".join(json.dumps(tree) for tree in trees) + "\n")
    import_trees(settings, str(source), "imported")
    assert analyzed() == {"trees": 2, "step_nodes": 2}
