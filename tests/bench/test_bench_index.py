"""``bench/bench_index.py`` at a tiny size: it runs end to end and what it reports is consistent
(the full-size figures are in the README)."""

from __future__ import annotations

from helpers import load_bench


def test_index_bench_loads_every_generated_node_through_both_write_paths(pg_admin_url, tmp_path):
    bench = load_bench("bench_index")
    result = bench.main(["--trees", "60", "--persist-trees", "20", "--unannotated", "7", "--repeats", "3",
                         "--database-url", pg_admin_url, "--out", str(tmp_path / "index.json")])
    imported, persisted = result["import_trees"], result["annotate_write_path"]
    assert imported["trees"] == 60 and result["copy_baseline"]["rows"] == imported["nodes"]
    assert persisted["trees"] == 20 and 0 < persisted["rows"] < imported["nodes"]
    # Everything landed: the imported run, the persisted trees (the baseline's rows are removed).
    assert result["total_nodes"] == imported["nodes"] + persisted["rows"]
    assert result["readme_queries"]["problems never annotated"]["rows"] == 7
    assert result["readme_queries"]["MC distribution per run"]["rows"] > 0
    assert result["traversal"]["traverse"]["counts"]["trees_seen"] == 60
    assert (tmp_path / "index.json").exists()
