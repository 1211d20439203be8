"""``bench/bench_ingest.py`` at a tiny size: it runs end to end, every generated record is either
landed or rejected, and the ingest's peak RSS is measured against the floor (the 200 MB figure is
in the README)."""

from __future__ import annotations

from helpers import load_bench


def test_ingest_bench_measures_both_formats(pg_admin_url, tmp_path):
    bench = load_bench("bench_ingest")
    result = bench.main(["--megabytes", "0.5", "--bad-fraction", "0.3", "--database-url", pg_admin_url,
                         "--out", str(tmp_path / "ingest.json")])
    for fmt in ("json", "jsonl"):
        ingest = result[fmt]["ingest"]
        assert ingest["total"] > 100 and ingest["inserted"] + ingest["rejected"] == ingest["total"]
        assert 0 < ingest["rejected"] < ingest["total"] and ingest["quarantine"]
        assert ingest["peak_rss_mb"] >= result[fmt]["floor"]["peak_rss_mb"] * 0.5 > 0
    assert result["json"]["ingest"]["inserted"] == result["jsonl"]["ingest"]["inserted"]
    assert (tmp_path / "ingest.json").exists()
