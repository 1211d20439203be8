"""The paper's PRM ablations, reproduced on the toy world: soft against hard labels, and three
learning rates, each a PRM trained on the same annotated dataset and evaluated by Best-of-N on the
same test problems and the same candidates (the evaluation caches them by policy and problems).

Run it on the home of a finished embedded run (``make demo`` leaves ``.mmprm/demo``); it uses the
run's dataset and test split and the demo's settings, and reuses the demo's own two PRMs (a
checkpoint is keyed by its dataset and training settings), so only the other learning rates are
trained here::

    .venv/bin/python bench/bench_toy_ablations.py --home .mmprm/demo --out .mmprm/bench/ablations.json

Reported per PRM: Best-of-N accuracy at the largest N under the headline aggregator (a setting
named before any result was seen), random pick and majority vote on the same candidates, the
base model's own step likelihood under that aggregator, and first-error F1 on the test
candidates (with the MC labels' F1 on the training paths for reference).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=Path(".mmprm/demo"), help="home of a finished embedded run")
    ap.add_argument("--learning-rates", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3],
                    help="soft-label PRMs at these peak learning rates (the demo's own is one of them)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = ap.parse_args(argv)

    from mmprm_tasks.demo import _prepare_environment
    from mmprm_tasks.pipeline import evaluate_stage, latest_dataset, train_stage
    from mmprm_tasks.settings import get_settings
    from mmprm_tasks.storage import open_uri

    if not (args.home / "demo-summary.json").exists():
        raise SystemExit(f"{args.home} holds no finished embedded run: run `make demo` (or mmprm demo --home) first")
    _prepare_environment(args.home)
    settings = get_settings()
    dataset_id = latest_dataset(settings)
    demo_lr = settings.train.learning_rate
    configs = [("soft", lr) for lr in sorted(set(args.learning_rates) | {demo_lr})] + [("hard", demo_lr)]
    started = time.time()
    results = []
    for label_mode, lr in configs:
        variant = settings.with_overrides({"train.label_mode": label_mode, "train.learning_rate": lr})
        checkpoint = train_stage(variant, dataset_id)
        evaluation = evaluate_stage(variant, checkpoint["checkpoint_id"])
        store, key = open_uri(evaluation["report_uri"], variant)
        report = store.get_json(key)
        row = report["rows"][-1]
        first_error = report.get("first_error") or {}
        results.append({
            "label_mode": label_mode, "learning_rate": lr, "demo_setting": lr == demo_lr,
            "checkpoint_id": checkpoint["checkpoint_id"], "evaluation_id": report["evaluation_id"],
            "n": row["n"], "headline_aggregator": report["headline"]["aggregator"],
            "prm": row["accuracy"][report["headline"]["aggregator"]],
            "random": row["random"], "majority_vote": row["majority_vote"], "oracle": row["oracle"],
            "baselines": row.get("baselines", {}),
            "first_error_f1": (first_error.get("prm") or {}).get("f1"),
            "mc_labels_f1": (first_error.get("mc_labels") or {}).get("f1"),
            "num_problems": report["num_problems"],
        })
    summary = {"home": str(args.home), "dataset_id": dataset_id, "results": results,
               "wall_s": round(time.time() - started, 1)}

    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    first = results[0]
    table = Table(title=f"Toy-world ablations: Best-of-{first['n']} on {first['num_problems']} test problems "
                        f"({first['headline_aggregator']} aggregator)")
    for column in ("labels", "learning rate", "PRM", "random", "majority", "base likelihood", "first-error F1"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r["label_mode"], f"{r['learning_rate']:g}" + (" (demo)" if r["demo_setting"] else ""),
                      fmt(r["prm"]), fmt(r["random"]), fmt(r["majority_vote"]),
                      fmt(next(iter(r["baselines"].values()), None)), fmt(r["first_error_f1"]))
    console = Console()
    console.print(table)
    console.print(f"MC labels' first-error F1 on the training paths: {fmt(first['mc_labels_f1'])}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
