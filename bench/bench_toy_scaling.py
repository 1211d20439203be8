"""The paper's claim made measurable on the toy world: Best-of-N of PRMs trained on more and more
Monte Carlo (MC) annotated paths, against PRMs trained on the *same paths* with the toy world's
ground-truth step labels.

1. Annotate up to ``--problems`` train problems once (the demo's search settings on the
   continuous engine; trees cached under ``--work`` by seed and count, so reruns reuse them).
2. Traverse them (the demo's traversal: step granularity, 3-word floor) into paths; give every
   path both label sets: its MC labels (``--label-values mc`` or ``relative``) and its
   ground-truth labels (1 while no step up to the ``<prm>`` is wrong).
3. For nested subsets of the trees (``--scales``: at least that many paths, whole trees, the
   same order for every scale), train a PRM from the toy foundation on each label set (the
   demo's training settings), score the same held-out test candidates (``--candidates`` per
   problem, sampled once), and report Best-of-N with the ``min`` headline and the PRM-weighted
   vote, beside random pick, majority vote and oracle.
4. Print the table, write the JSON report and a plot of accuracy against paths (``--out``).
   A report of a full run is the curve the package ships (``mmprm_tasks/toy/scaling_curve.json``,
   ``mmprm_tasks/scaling_curve.py``): the demo and the browser place a PRM on it.

    .venv/bin/python bench/bench_toy_scaling.py --seed 7 --out .mmprm/bench/scaling-seed7.json
    .venv/bin/python bench/bench_toy_scaling.py --seed 1 --problems 600 --scales 800,2000,4000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from mmprm_tasks.consensus import consensus_filter, step_groups
from mmprm_tasks.evaluate import best_of_n, sample_candidates, score_candidates
from mmprm_tasks.policy.hf_engine import ContinuousTransformersPolicy
from mmprm_tasks.prm import PRMScorer, PRMTrainingConfig, StepLikelihoodScorer, train_prm
from mmprm_tasks.scaling_curve import plot_curve_png
from mmprm_tasks.search import SearchProblem, run_search
from mmprm_tasks.settings import (TOY_FOUNDATION_DIR, TOY_POLICY_DIR, PolicyConfig, SamplingConfig, SearchConfig,
                                  TraverseConfig, VerifyConfig)
from mmprm_tasks.toy.labels import prefix_first_error
from mmprm_tasks.toy.world import generate_seeds
from mmprm_tasks.traverse import build_paths, hard_label
from mmprm_tasks.verify import AnswerVerifier

# The demo's settings (mmprm_tasks/demo.py DEMO_SETTINGS).
SEARCH = SearchConfig(num_rollouts=8, max_search_count=12, rollout_budget=160, concurrent_problems=32)
SAMPLING = SamplingConfig(max_new_tokens=96)
TRAINING = dict(learning_rate=1e-4, per_device_train_batch_size=16, max_length=512, warmup_ratio=0.03)


def annotate(records: list[dict[str, Any]], seeds_dir: Path, policy: Any, cache: Path, seed: int) -> list[dict]:
    """Trees of ``records`` (read from ``cache`` when an earlier run wrote them)."""
    if cache.exists():
        trees = [json.loads(line) for line in cache.read_text().splitlines() if line]
        if len(trees) == len(records):
            return trees
    problems = [SearchProblem(r["id"], r["question"], r["correct_answer"], (seeds_dir / r["image_path"]).read_bytes(),
                              r["image_path"]) for r in records]
    with AnswerVerifier(VerifyConfig()) as verifier:
        trees = [result.tree for result in run_search(problems, policy, verifier, SEARCH, seed=seed)]
    cache.write_text("".join(json.dumps(t) + "\n" for t in trees))
    return trees


def truth_labels(process: str, gt_steps: Sequence[str]) -> list[float]:
    """1.0 for a ``<prm>`` whose prefix holds no wrong step yet, else 0.0."""
    labels, prefix = [], []
    for group in step_groups(process):
        prefix.extend(s.strip() for s in group)
        labels.append(1.0 if prefix_first_error(gt_steps, prefix) is None else 0.0)
    return labels


# What each label set trains on, from a path record.
LABEL_SETS = {
    "mc": lambda p: p["labels"],
    "mc-hard": lambda p: [hard_label(v) for v in p["labels"]],
    "truth": lambda p: p["truth_labels"],
}


class CachedJudge:
    """A step judge whose scores are kept in a JSON file by (question, steps): the judge reads each
    path once across runs of the bench."""

    def __init__(self, judge: Any, path: Path) -> None:
        self.judge, self.path = judge, path
        self.scores: dict[str, list[float]] = json.loads(path.read_text()) if path.exists() else {}

    @staticmethod
    def _key(question: str, steps: Sequence[str]) -> str:
        return json.dumps([question, list(steps)])

    def score_many(self, items: Sequence[tuple[str, Any, Sequence[str]]]) -> list[list[float]]:
        missing = [item for item in items if self._key(item[0], item[2]) not in self.scores]
        for (question, _, steps), scores in zip(missing, self.judge.score_many(missing), strict=True):
            self.scores[self._key(question, steps)] = scores
        return [self.scores[self._key(question, steps)] for question, _, steps in items]

    def save(self) -> None:
        self.path.write_text(json.dumps(self.scores))


def nested_subsets(paths: list[dict[str, Any]], scales: Sequence[int], seed: int) -> dict[int, list[dict[str, Any]]]:
    """For each scale, the paths of the first trees (one seeded order for all scales) that hold at
    least that many paths: every smaller subset lies inside every larger one."""
    by_tree: dict[Any, list[dict[str, Any]]] = {}
    for p in paths:
        by_tree.setdefault(p["tree_id"], []).append(p)
    order = sorted(by_tree)
    random.Random(seed).shuffle(order)
    subsets, taken = {}, []
    trees = iter(order)
    for scale in sorted(scales):
        while len(taken) < scale:
            tree = next(trees, None)
            if tree is None:
                break
            taken.extend(by_tree[tree])
        subsets[scale] = list(taken)
    return subsets


def evaluate(checkpoint: Path, test: list[dict[str, Any]], candidates: list[list[dict]], n: int) -> dict[str, float]:
    scored = score_candidates(PRMScorer(checkpoint, batch_size=32), test, candidates)
    report = best_of_n(scored, ns=[n])
    row = report["rows"][-1]
    return {"min": row["accuracy"]["min"], "weighted_vote": row["weighted_vote"], "random": row["random"],
            "majority_vote": row["majority_vote"], "oracle": row["oracle"]}


def plot(report: dict[str, Any], path: Path) -> None:
    """The report's curve as a PNG at ``path`` (the one plot of it: ``scaling_curve.plot_curve_png``,
    which the browser also draws from the shipped report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plot_curve_png(report))


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--problems", type=int, default=1250, help="train problems annotated (about 8 paths each)")
    ap.add_argument("--scales", default="800,2000,5000,10000", help="training paths of the nested subsets")
    ap.add_argument("--test", type=int, default=128, help="held-out test problems")
    ap.add_argument("--candidates", type=int, default=8, help="candidates per test problem (Best-of-N's N)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--label-values", default="mc", choices=["mc", "relative"])
    ap.add_argument("--labels", default="mc,truth",
                    help="label sets to train on: mc (soft MC values), mc-hard (1 if MC > 0), truth")
    ap.add_argument("--consensus-threshold", type=float, default=None,
                    help="keep only the paths where the MC labels and the foundation's step likelihood "
                         "(judge: a step is wrong below this probability) agree on the first error")
    ap.add_argument("--cut-negatives", action="store_true",
                    help="with --consensus-threshold: end each negative path at the judged wrong step")
    ap.add_argument("--base", type=Path, default=TOY_FOUNDATION_DIR,
                    help="train every PRM from this checkpoint (default: the toy foundation); a base other than "
                         "the foundation is also evaluated as it is, at 0 paths")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--demo-paths", type=int, default=8796, help="where the demo stands, drawn on the plot")
    ap.add_argument("--work", type=Path, default=Path(".mmprm/bench/scaling-work"))
    ap.add_argument("--out", type=Path, default=None, help="JSON report; the plot beside it (.png)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    started = time.perf_counter()
    scales = [int(s) for s in args.scales.split(",")]
    seeds_dir = args.work / f"seeds-{args.seed}-{args.problems}-{args.test}"
    if not (seeds_dir / "test.json").exists():
        generate_seeds(seeds_dir, n_train=args.problems, n_test=args.test, seed=args.seed)
    train = json.loads((seeds_dir / "train.json").read_text())
    test = json.loads((seeds_dir / "test.json").read_text())
    gt = {r["id"]: r["gt_steps"] for r in train}
    policy = ContinuousTransformersPolicy(TOY_POLICY_DIR, policy=PolicyConfig(), sampling=SAMPLING,
                                          capacity=SEARCH.max_sequences_in_flight)
    timings: dict[str, float] = {}
    try:
        t = time.perf_counter()
        with console.status(f"annotating {len(train)} train problems"):
            trees = annotate(train, seeds_dir, policy, seeds_dir / "trees.jsonl", args.seed)
        timings["annotate_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        problems = [{"id": r["id"], "question": r["question"], "answer": r["correct_answer"],
                     "image": (seeds_dir / r["image_path"]).read_bytes()} for r in test]
        cached = seeds_dir / f"candidates-{args.candidates}.json"
        if cached.exists():
            candidates = json.loads(cached.read_text())
        else:
            with console.status(f"sampling {args.candidates} candidates for {len(test)} test problems"):
                with AnswerVerifier(VerifyConfig()) as verifier:
                    candidates = sample_candidates(problems, policy, verifier, args.candidates, args.seed)
            cached.write_text(json.dumps(candidates))
        timings["candidates_s"] = round(time.perf_counter() - t, 1)
    finally:
        policy.close()
    cfg = TraverseConfig(min_words=3, label_granularity="step", label_values=args.label_values)
    paths = build_paths(trees, cfg, args.seed).paths
    load_image = lambda rel: (seeds_dir / rel).read_bytes()  # noqa: E731
    consensus = None
    if args.consensus_threshold is not None:
        t = time.perf_counter()
        with console.status(f"judging the steps of {len(paths)} paths"):
            judge = CachedJudge(StepLikelihoodScorer(TOY_FOUNDATION_DIR, batch_size=32),
                                seeds_dir / "judge-step-likelihood.json")
            result = consensus_filter(paths, judge, args.consensus_threshold, lambda p: load_image(p["image_path"]),
                                      cut_negatives=args.cut_negatives)
            judge.save()
        timings["judge_s"] = round(time.perf_counter() - t, 1)
        paths, consensus = result.kept, result.counts
        console.print(f"consensus (judge threshold {args.consensus_threshold}): {consensus}")
    for p in paths:
        p["truth_labels"] = truth_labels(p["process"], gt[p["tree_id"]])
    agreement = [m > 0 for p in paths for m in p["labels"]], [g > 0 for p in paths for g in p["truth_labels"]]
    label_agreement = sum(a == b for a, b in zip(*agreement)) / max(len(agreement[0]), 1)
    subsets = nested_subsets(paths, scales, args.seed)
    points = []

    def add_point(scale: int, labels: str, n_paths: int, result: dict[str, float], seconds: float) -> None:
        points.append({"scale": scale, "paths": n_paths, "labels": labels, **result, "seconds": round(seconds, 1)})
        console.print(f"{labels:>7} labels, {n_paths:>6} paths: min {100 * result['min']:.1f}%, "
                      f"weighted vote {100 * result['weighted_vote']:.1f}% (random {100 * result['random']:.1f}%, "
                      f"majority {100 * result['majority_vote']:.1f}%)")

    if args.base != TOY_FOUNDATION_DIR:
        t = time.perf_counter()
        add_point(0, "base", 0, evaluate(args.base, problems, candidates, args.candidates), time.perf_counter() - t)
    for scale, subset in subsets.items():
        for labels in args.labels.split(","):
            records = [{**p, "labels": LABEL_SETS[labels](p)} for p in subset]
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as out, console.status(f"{labels} labels, {len(records)} paths"):
                train_prm(args.base, records, out, PRMTrainingConfig(**TRAINING, num_train_epochs=args.epochs),
                          args.seed, image_loader=load_image)
                result = evaluate(Path(out), problems, candidates, args.candidates)
            add_point(scale, labels, len(records), result, time.perf_counter() - t)
    report = {"seed": args.seed, "n": args.candidates, "problems": len(train), "trees": len(trees),
              "paths": len(paths), "label_values": args.label_values, "epochs": args.epochs,
              "mc_vs_truth_agreement": round(label_agreement, 3), "demo_paths": args.demo_paths,
              "consensus_threshold": args.consensus_threshold, "consensus": consensus,
              "cut_negatives": args.cut_negatives, "base": str(args.base),
              "points": points, "timings": timings, "wall_s": round(time.perf_counter() - started, 1),
              # CPU-seconds of this process and its children (the verifier pool): on a shared box
              # the wall time says little; with 1 thread this is the quiet 1-core wall time.
              "cpu_s": round(sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF,
                                 resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime")), 1),
              "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
                          "threads": args.threads, "loadavg": [round(x, 2) for x in os.getloadavg()]}}
    table = Table(title=f"Best-of-{args.candidates} against training paths, seed {args.seed} "
                        f"({len(test)} test problems; MC labels: {args.label_values})")
    for column in ("labels", "paths", "min", "weighted vote", "random", "majority", "oracle"):
        table.add_column(column, justify="right")
    for p in points:
        table.add_row(p["labels"], str(p["paths"]), *(f"{100 * p[k]:.1f}" for k in
                                                      ("min", "weighted_vote", "random", "majority_vote", "oracle")))
    console.print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        if points:
            plot(report, args.out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
