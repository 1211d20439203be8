"""How well can a PRM fine-tuned from a given base (default: the shipped toy foundation) learn to
judge toy steps at all?

Monte Carlo labels are a noisy estimate of step correctness; this benchmark removes that noise.
It trains the PRM exactly as ``mmprm train`` does (:func:`mmprm_tasks.prm.train_prm`), twice from
the same base in the same run, on toy paths laid out exactly as traversal lays them out (one
``<prm>`` per step, a path ends at its first wrong step):

* **ground truth**: each step labelled by the toy generator's own first-error index, the best
  labels any search could produce;
* **surface control**: each step labelled by a feature visible in its own text (its last digit is
  below 5), which needs no arithmetic and no image.

Both PRMs then score held-out test-split solutions. Reported: the ROC AUC of the step scores
(right steps against first wrong steps, per step position, and overall with pairs compared only
at the same position, since a PRM that learnt position alone would otherwise look informative),
the AUC of the min-aggregated solution score (correct against wrong solutions of the same problem
kind), the control's AUC (pairs at the same position), and the
ratio ``(AUC_truth - 0.5) / (AUC_control - 0.5)``: the share of a learnable signal the base turns
into a judgement of correctness. A ratio near 0 with a control near 1 says the training loop
works and the base cannot learn to verify at this data and step budget, so no labelling scheme
will lift Best-of-N with it.

    .venv/bin/python bench/bench_prm_ceiling.py --out .mmprm/bench/prm-ceiling.json
    .venv/bin/python bench/bench_prm_ceiling.py --base path/to/checkpoint --train 3000 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmprm_tasks.evaluate import roc_auc, stratified_auc
from mmprm_tasks.prm import PRMScorer, train_prm
from mmprm_tasks.settings import TOY_FOUNDATION_DIR, TrainConfig
from mmprm_tasks.toy.world import Problem, error_kind, first_error_index, problems_for_split, render_image, solve
from mmprm_tasks.traverse import render_process

Sample = tuple[Problem, list[str], int | None]  # problem, steps (answer last), first error


def draw_solutions(split: str, n: int, wrong_step_rate: float, rng: random.Random) -> list[Sample]:
    """``n`` generated solutions of random ``split`` problems, with their first-error index."""
    pool = problems_for_split(split)
    samples = []
    for _ in range(n):
        problem = rng.choice(pool)
        steps = solve(problem, rng, wrong_step_rate=wrong_step_rate)
        samples.append((problem, steps, first_error_index(problem.solution(), steps)))
    return samples


def truth_labels(steps: Sequence[str], first_error: int | None) -> list[float]:
    return [1.0 if first_error is None or i < first_error else 0.0 for i in range(len(steps))]


def surface_labels(steps: Sequence[str], first_error: int | None) -> list[float]:
    return [1.0 if int(re.findall(r"\d", s)[-1]) < 5 else 0.0 for s in steps]


def path_records(
    samples: Sequence[Sample],
    labeller: Callable[[Sequence[str], int | None], list[float]],
    image_path: Callable[[Problem], str],
) -> list[dict]:
    """Path records as traversal writes them: a path stops at its first wrong step."""
    records = []
    for problem, steps, first_error in samples:
        kept = steps if first_error is None else steps[: first_error + 1]
        records.append({
            "id": len(records),
            "question": problem.question,
            "process": render_process([[s] for s in kept]),
            "labels": labeller(kept, first_error),
            "image_path": image_path(problem),
        })
    return records


def train_and_score(
    base: str, records: list[dict], test: Sequence[Sample], cfg: TrainConfig, seed: int,
    out_dir: Path, image_path: Callable[[Problem], str],
) -> tuple[list[list[float]], dict]:
    metrics = train_prm(base, records, out_dir, cfg, seed)
    scorer = PRMScorer(out_dir, batch_size=32)
    scores = scorer.score_many([(p.question, image_path(p), steps) for p, steps, _ in test])
    return scores, {k: metrics[k] for k in ("first_loss", "last_loss", "train_runtime", "global_step")}


def truth_report(test: Sequence[Sample], scores: Sequence[Sequence[float]]) -> dict:
    right: dict[int, list[float]] = {}
    wrong: dict[int, list[float]] = {}
    solutions: dict[str, tuple[list[float], list[float]]] = {}
    for (problem, _, first_error), row in zip(test, scores, strict=True):
        for i, score in enumerate(row):
            if first_error is None or i < first_error:
                right.setdefault(i, []).append(score)
            elif i == first_error:
                wrong.setdefault(i, []).append(score)
        by_kind = solutions.setdefault(problem.kind, ([], []))
        by_kind[0 if first_error is None else 1].append(min(row))
    positions = sorted(set(right) | set(wrong))
    by_kind: dict[str, dict[int, tuple[list[float], list[float]]]] = {}
    for (problem, steps, first_error), row in zip(test, scores, strict=True):
        if first_error is not None and first_error < len(row):
            kind = error_kind(problem.solution(), steps, first_error)
            groups = by_kind.setdefault(kind, {})
            groups.setdefault(first_error, ([], []))[1].append(row[first_error])
    for groups in by_kind.values():
        for i in groups:
            groups[i][0].extend(right.get(i, []))
    return {
        "step_auc": stratified_auc({i: (right.get(i, []), wrong.get(i, [])) for i in positions}),
        "step_auc_by_position": {
            i: {"auc": roc_auc(right.get(i, []), wrong.get(i, [])),
                "right": len(right.get(i, [])), "first_wrong": len(wrong.get(i, []))}
            for i in positions
        },
        "step_auc_by_error_kind": {kind: stratified_auc(groups) for kind, groups in sorted(by_kind.items())},
        "solution_min_auc": stratified_auc(solutions),
    }


def surface_report(test: Sequence[Sample], scores: Sequence[Sequence[float]]) -> dict:
    groups: dict[int, tuple[list[float], list[float]]] = {}
    for (_, steps, first_error), row in zip(test, scores, strict=True):
        for i, (label, score) in enumerate(zip(surface_labels(steps, first_error), row, strict=True)):
            groups.setdefault(i, ([], []))[0 if label else 1].append(score)
    return {"step_auc": stratified_auc(groups)}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=str(TOY_FOUNDATION_DIR), help="PRM base checkpoint")
    ap.add_argument("--train", type=int, default=1500, help="training paths")
    ap.add_argument("--test", type=int, default=400, help="held-out test solutions")
    ap.add_argument("--epochs", type=float, default=8.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--wrong-step-rate", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep the ground-truth PRM here (a base that already verifies, for fine-tuning checks)")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    train = draw_solutions("train", args.train, args.wrong_step_rate, rng)
    test = draw_solutions("test", args.test, args.wrong_step_rate, rng)
    cfg = TrainConfig(
        learning_rate=args.lr, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, max_length=512,
    )
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mmprm-bench-ceiling-") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()

        def image_path(problem: Problem) -> str:
            path = images / f"{problem.id}.png"
            if not path.exists():
                render_image(problem.numbers).save(path)
            return str(path)

        truth_scores, truth_training = train_and_score(
            args.base, path_records(train, truth_labels, image_path), test, cfg, args.seed,
            Path(tmp) / "truth", image_path,
        )
        if args.keep:
            shutil.copytree(Path(tmp) / "truth", args.keep, dirs_exist_ok=True)
        surface_scores, surface_training = train_and_score(
            args.base, path_records(train, surface_labels, image_path), test, cfg, args.seed,
            Path(tmp) / "surface", image_path,
        )
    truth = truth_report(test, truth_scores)
    surface = surface_report(test, surface_scores)
    ratio = None
    if truth["step_auc"] is not None and surface["step_auc"] not in (None, 0.5):
        ratio = (truth["step_auc"] - 0.5) / (surface["step_auc"] - 0.5)
    report = {
        "base": args.base,
        "train_paths": args.train, "test_solutions": args.test, "epochs": args.epochs,
        "learning_rate": args.lr, "wrong_step_rate": args.wrong_step_rate, "seed": args.seed,
        "ground_truth": {**truth, "training": truth_training},
        "surface_control": {**surface, "training": surface_training},
        "verification_share_of_learnable": ratio,
        "wall_s": round(time.time() - started, 1),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
    }
    table = Table(title=f"PRM ceiling from {args.base}")
    table.add_column("labels")
    table.add_column("step AUC", justify="right")
    table.add_column("solution AUC (min)", justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    table.add_row("ground truth", fmt(truth["step_auc"]), fmt(truth["solution_min_auc"]))
    table.add_row("surface control", fmt(surface["step_auc"]), "-")
    console = Console(stderr=True)
    console.print(table)
    console.print(f"verification share of learnable signal: {fmt(ratio)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
