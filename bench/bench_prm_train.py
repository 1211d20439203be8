"""PRM training samples per second on a demo's own dataset: uniformly shuffled batches (the
trainer before issue 22) against length-grouped batches (``train.group_by_length``), same records,
settings, seed and thread count, one epoch each, in this one run.  Also reports the padding each
order computes (token slots of the padded batches over the records' own tokens).

    .venv/bin/python bench/bench_prm_train.py --home .mmprm/demo --out .mmprm/bench/prm-train.json
    .venv/bin/python bench/bench_prm_train.py --home /tmp/demo --threads 1 --limit 800

``--home`` is a finished ``mmprm demo`` home (its newest dataset is used).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from mmprm_tasks.formats import read_chat
from mmprm_tasks.prm import PRMCollator, PRMTrainingConfig, ensure_prm_tokens, record_length, train_prm
from mmprm_tasks.settings import TOY_FOUNDATION_DIR, Settings
from mmprm_tasks.storage import open_uri

# The demo's training settings (mmprm_tasks/demo.py DEMO_SETTINGS), one epoch.
DEMO_TRAINING = dict(learning_rate=1e-4, per_device_train_batch_size=16, max_length=512, warmup_ratio=0.03,
                     num_train_epochs=1.0)


def newest_dataset(home: Path) -> Path:
    found = sorted((home / "objects" / "datasets").glob("*/chat.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"no dataset under {home}/objects/datasets: run `mmprm demo --home {home}` first")
    return found[-1]


def padding(records: list[dict[str, Any]], order: Sequence[int], batch_size: int, collator: PRMCollator) -> float:
    """Token slots computed by batches taken in ``order`` over the records' own tokens."""
    computed = useful = 0
    for start in range(0, len(order), batch_size):
        batch = collator([records[i] for i in order[start:start + batch_size]])
        computed += batch["input_ids"].numel()
        useful += int(batch["attention_mask"].sum())
    return computed / useful


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=Path(".mmprm/demo"))
    ap.add_argument("--base", default=str(TOY_FOUNDATION_DIR))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--limit", type=int, default=None, help="first N paths only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    chat = newest_dataset(args.home)
    records = read_chat(chat.read_text())[: args.limit]
    settings = Settings(home=args.home)

    def load_image(uri: str) -> bytes:
        store, key = open_uri(uri, settings)
        return store.get_bytes(key)

    load = os.getloadavg()
    report: dict[str, Any] = {"dataset": str(chat), "paths": len(records), "threads": args.threads,
                              "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                                          "cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in load]},
                              "runs": {}}
    with tempfile.TemporaryDirectory() as out, console.status("warm-up (not measured)"):
        train_prm(args.base, records[:64], out, PRMTrainingConfig(**{**DEMO_TRAINING, "num_train_epochs": 1.0}),
                  args.seed, image_loader=load_image)
    for name, grouped in (("shuffled", False), ("length-grouped", True)):
        cfg = PRMTrainingConfig(**DEMO_TRAINING, group_by_length=grouped)
        with tempfile.TemporaryDirectory() as out, console.status(f"one epoch, {name} batches"):
            cpu, wall = time.process_time(), time.perf_counter()
            metrics = train_prm(args.base, records, out, cfg, args.seed, image_loader=load_image)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        report["runs"][name] = {"train_runtime_s": round(metrics["train_runtime"], 2),
                                "samples_per_s": round(len(records) / metrics["train_runtime"], 1),
                                "cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "last_loss": metrics["last_loss"]}
    # Padding of each order, measured with the collator the trainer used.
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.trainer_pt_utils import get_length_grouped_indices

    processor = AutoProcessor.from_pretrained(args.base)
    tokens = ensure_prm_tokens(processor, AutoModelForImageTextToText.from_pretrained(args.base))
    collator = PRMCollator(processor, tokens, max_length=512, image_loader=load_image)
    generator = torch.Generator().manual_seed(args.seed)
    shuffled = torch.randperm(len(records), generator=generator).tolist()
    grouped = get_length_grouped_indices([record_length(r) for r in records], 16, generator=generator)
    report["runs"]["shuffled"]["padded_over_useful_tokens"] = round(padding(records, shuffled, 16, collator), 3)
    report["runs"]["length-grouped"]["padded_over_useful_tokens"] = round(padding(records, grouped, 16, collator), 3)
    base, new = report["runs"]["shuffled"], report["runs"]["length-grouped"]
    report["ratio_samples_per_s"] = round(new["samples_per_s"] / base["samples_per_s"], 2)
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    table = Table(title=f"PRM training, {len(records)} paths of {chat.parent.name}, {args.threads} thread(s), "
                        f"load {load[0]:.2f} at start")
    for column in ("batches", "samples/s", "CPU s", "padded / useful tokens"):
        table.add_column(column, justify="right")
    for name, r in report["runs"].items():
        table.add_row(name, f"{r['samples_per_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['padded_over_useful_tokens']:.3f}")
    console.print(table)
    console.print(f"length-grouped / shuffled samples per second: {report['ratio_samples_per_s']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
