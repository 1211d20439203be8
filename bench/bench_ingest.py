"""Seed ingestion of a large file: peak memory against the file's size.

Generates a seed file of ``--megabytes`` (SPEC §1 records with long questions, a share of them
bad so the rejection path and the quarantine report are exercised, images shared among records),
as a JSON array and as JSONL, then ingests each in a fresh process and reports that process's
peak RSS (VmHWM) against, measured in the same run, a fresh process that imports the same code,
opens the database and reads the file through once without parsing it (the floor).

    .venv/bin/python bench/bench_ingest.py --out .mmprm/bench/ingest.json           # 200 MB
    .venv/bin/python bench/bench_ingest.py --megabytes 2 --out r.json                 # quick

Exits non-zero when an ingest peaks above ``--max-peak-mb`` (300 MB: issue 13's bar).
The database is an embedded Postgres in a temporary folder unless ``--database-url`` names a
server (a fresh database is created there and dropped afterwards).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from mmprm_tasks import db
from mmprm_tasks.settings import Settings, StoreConfig

QUESTION_CHARS = 3_000
DISTINCT_IMAGES = 64

_PROBE = """
import json, resource, sys, time
from mmprm_tasks.db import get_engine
from mmprm_tasks.seeds import ingest_file
from mmprm_tasks.settings import Settings
settings = Settings.model_validate_json(sys.argv[2])
start = time.perf_counter()
if sys.argv[1] == "ingest":
    report = ingest_file(sys.argv[3], settings)
    out = {"total": report.total, "inserted": report.inserted, "unchanged": report.unchanged,
           "rejected": len(report.rejected), "quarantine": bool(report.quarantine_uri)}
else:  # the floor: the same imports and database, the file read through once, nothing kept
    with get_engine(settings).connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    size = 0
    with open(sys.argv[3], "rb") as stream:
        while block := stream.read(1 << 20):
            size += len(block)
    out = {"bytes": size}
# VmHWM is this process's own peak (ru_maxrss would carry the forking parent's peak across exec).
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak = int(hwm[0]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak, **out}))
"""


def _images(folder: Path) -> list[str]:
    from PIL import Image

    names = []
    for i in range(DISTINCT_IMAGES):
        name = f"images/img{i}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (i * 4 % 256, 90, 200)).save(folder / name, format="PNG")
        names.append(name)
    return names


def _records(megabytes: float, bad_fraction: float, images: list[str], seed: int):
    """Records until about ``megabytes`` of JSON: good ones, and a share with a bad field."""
    rng = random.Random(seed)
    budget, i = megabytes * 2**20, 0
    filler = "Consider the figure carefully. " * (QUESTION_CHARS // 31)
    while budget > 0:
        record: dict[str, Any] = {"id": f"q{i:07d}", "question": f"Problem {i}: {filler}What is {i} + 1?",
                                  "correct_answer": str(i + 1), "image_path": images[i % len(images)],
                                  "split": "train"}
        if rng.random() < bad_fraction:
            record[rng.choice(["question", "image_path", "correct_answer"])] = None
        text = json.dumps(record)
        budget -= len(text) + 2
        i += 1
        yield text


def _write(folder: Path, megabytes: float, bad_fraction: float, seed: int) -> dict[str, Path]:
    images = _images(folder)
    files = {"json": folder / "seeds.json", "jsonl": folder / "seeds.jsonl"}
    with files["json"].open("w") as array, files["jsonl"].open("w") as lines:
        array.write("[")
        for n, text in enumerate(_records(megabytes, bad_fraction, images, seed)):
            array.write((",\n" if n else "") + text)
            lines.write(text + "\n")
        array.write("]")
    return files


def _probe(mode: str, settings: Settings, path: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode, settings.model_dump_json(), str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode} of {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=200.0)
    parser.add_argument("--bad-fraction", type=float, default=0.25, help="share of records with a bad field")
    parser.add_argument("--max-peak-mb", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database-url", help="a Postgres server to create a scratch database on")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    console = Console()

    results: dict[str, Any] = {"megabytes": args.megabytes, "bad_fraction": args.bad_fraction}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "data"
        data.mkdir()
        files = _write(data, args.megabytes, args.bad_fraction, args.seed)
        with db.scratch_database(args.database_url, tmp_path / "home", "mmprm_bench_ingest") as url:
            for fmt, path in files.items():
                settings = Settings(home=tmp_path / "home", database_url=url,
                                    store=StoreConfig(kind="local", root=tmp_path / f"objects-{fmt}"))
                db.upgrade(db.get_engine(settings))
                with db.get_engine(settings).begin() as conn:  # each format lands into an empty index
                    conn.exec_driver_sql("TRUNCATE seed_problems CASCADE")
                floor = _probe("read", settings, path)
                ingest = _probe("ingest", settings, path)
                results[fmt] = {"file_mb": path.stat().st_size / 2**20, "floor": floor, "ingest": ingest,
                                "peak_over_floor_mb": ingest["peak_rss_mb"] - floor["peak_rss_mb"]}
                console.print(f"{fmt}: {results[fmt]['file_mb']:.0f} MB, {ingest['total']:,} records, "
                              f"peak RSS {ingest['peak_rss_mb']:.0f} MB (floor {floor['peak_rss_mb']:.0f} MB) "
                              f"in {ingest['seconds']:.0f} s")

    table = Table(title=f"ingest of a {args.megabytes:g} MB seed file")
    for column in ("format", "records", "inserted", "rejected", "seconds", "peak RSS MB", "floor MB"):
        table.add_column(column, justify="right")
    for fmt in files:
        r = results[fmt]
        table.add_row(fmt, f"{r['ingest']['total']:,}", f"{r['ingest']['inserted']:,}", f"{r['ingest']['rejected']:,}",
                      f"{r['ingest']['seconds']:.0f}", f"{r['ingest']['peak_rss_mb']:.0f}",
                      f"{r['floor']['peak_rss_mb']:.0f}")
    console.print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    over = [fmt for fmt in files if results[fmt]["ingest"]["peak_rss_mb"] > args.max_peak_mb]
    if over and argv is None:
        raise SystemExit(f"peak RSS above {args.max_peak_mb:g} MB for {over}")
    return results


if __name__ == "__main__":
    main()
