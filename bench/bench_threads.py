"""Torch threads per process on a busy box: torch's default (one per core) against the platform's
``torch_threads`` setting (default ``threads.default_torch_threads``), same work, in this one run.

The work is the demo's: the OmegaPRM search with the demo's settings on the continuous engine over
a slice of the demo's train problems (``--problems``), then one epoch of PRM training with the
demo's training settings on the paths those trees give.  Each measurement is a fresh process (a
process's thread pool is fixed once torch computes).  It runs twice per box state:

* busy: ``--burners`` CPU burners (``while True: pass``) run beside it, as other work on a
  shared box;
* quiet: nothing started beside it (whatever else runs on the machine is in the load figures).

Reported per run: wall seconds and CPU seconds of annotation and of training (the process and its
verifier processes), the 1-minute load average at its start and end; per box state the wall
ratio default / setting (above 1: the setting is faster).

    .venv/bin/python bench/bench_threads.py --out .mmprm/bench/threads.json
    .venv/bin/python bench/bench_threads.py --problems 8 --burners 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Benchmarks are scripts: the demo's settings and helpers of the neighbouring ones are shared.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine_cpu import DEMO_SAMPLING, DEMO_SEARCH, cpu_seconds, problems_of  # noqa: E402
from bench_prm_train import DEMO_TRAINING  # noqa: E402

from mmprm_tasks.threads import cores_available  # noqa: E402

# The variables that would pin torch's thread count from outside: the "torch default" runs must
# not inherit them (the tests export OMP_NUM_THREADS=1).
PINNING_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                "MMPRM_TORCH_THREADS")


def work(problems: int, setting: bool, threads: int | None, max_steps: int, seed: int) -> dict[str, Any]:
    """One measurement, in this process: annotate ``problems``, train one epoch on their paths;
    ``setting``: with the ``torch_threads`` setting (``threads``, or the default chosen here, as a
    stage chooses it when it starts), else torch's default."""
    import torch

    from mmprm_tasks.policy.hf_engine import ContinuousTransformersPolicy
    from mmprm_tasks.prm import PRMTrainingConfig, train_prm
    from mmprm_tasks.search import run_search
    from mmprm_tasks.settings import (TOY_FOUNDATION_DIR, TOY_POLICY_DIR, PolicyConfig, SearchConfig, TraverseConfig,
                                      VerifyConfig)
    from mmprm_tasks.threads import apply_torch_threads
    from mmprm_tasks.traverse import build_paths
    from mmprm_tasks.verify import AnswerVerifier

    if setting:
        apply_torch_threads(threads, "bench")
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        seeds_dir = Path(tmp) / "seeds"
        slice_ = problems_of(seeds_dir, problems, seed)
        policy = ContinuousTransformersPolicy(str(TOY_POLICY_DIR), policy=PolicyConfig(engine="continuous"),
                                              sampling=DEMO_SAMPLING, capacity=256)
        with AnswerVerifier(VerifyConfig()) as verifier:
            start_cpu, start = cpu_seconds(), time.perf_counter()
            searched = list(run_search(slice_, policy, verifier, SearchConfig(**DEMO_SEARCH), seed=seed))
            result["annotate"] = {"wall_s": round(time.perf_counter() - start, 2),
                                  "cpu_s": round(cpu_seconds() - start_cpu, 2), "trees": len(searched),
                                  "rollouts": sum(r.stats["rollouts"] for r in searched)}
        policy.close()
        paths = build_paths([r.tree for r in searched], TraverseConfig(min_words=3, label_granularity="step"), seed).paths
        start_cpu, start = cpu_seconds(), time.perf_counter()
        metrics = train_prm(TOY_FOUNDATION_DIR, paths, Path(tmp) / "prm",
                            PRMTrainingConfig(**DEMO_TRAINING, max_steps=max_steps), seed,
                            image_loader=lambda rel: (seeds_dir / rel).read_bytes())
        result["train"] = {"wall_s": round(time.perf_counter() - start, 2), "cpu_s": round(cpu_seconds() - start_cpu, 2),
                           "paths": len(paths), "steps": metrics["global_step"],
                           "last_loss": round(metrics["last_loss"], 4)}
    result["wall_s"] = round(result["annotate"]["wall_s"] + result["train"]["wall_s"], 2)
    return result


def measure(args: argparse.Namespace, setting: bool) -> dict[str, Any]:
    """:func:`work` in a fresh process (with the setting, or torch's default)."""
    env = {k: v for k, v in os.environ.items() if k not in PINNING_ENV}
    command = [sys.executable, __file__, "--worker", "--problems", str(args.problems), "--seed", str(args.seed),
               "--max-steps", str(args.max_steps), "--threads", str(args.threads or 0),
               *(["--setting"] if setting else [])]
    load_start = os.getloadavg()[0]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_1min"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    return result


def burners(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        p.kill()
        p.wait()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=12, help="train problems of the demo's slice")
    ap.add_argument("--burners", type=int, default=2, help="CPU burners beside the busy-box runs")
    ap.add_argument("--threads", type=int, default=None,
                    help="the setting's thread count (default: threads.default_torch_threads(), chosen by each "
                         "measurement's process as it starts, as a stage does)")
    ap.add_argument("--setting", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--max-steps", type=int, default=-1, help="cap training steps (-1: the whole epoch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(work(args.problems, args.setting, args.threads or None, args.max_steps, args.seed)))
        return {}
    console = Console()
    report: dict[str, Any] = {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cores": cores_available()},
        "settings": {**DEMO_SEARCH, "max_new_tokens": DEMO_SAMPLING.max_new_tokens, **DEMO_TRAINING,
                     "problems": args.problems, "max_steps": args.max_steps, "burners": args.burners,
                     "setting_threads": args.threads or "default", "seed": args.seed},
        "runs": {}}
    for box, count in (("busy", args.burners), ("quiet", 0)):
        started = burners(count)
        try:
            runs = {}
            with console.status(f"{box} box: torch default threads"):
                runs["torch_default"] = measure(args, False)
            with console.status(f"{box} box: the torch_threads setting ({args.threads or 'default'})"):
                runs["setting"] = measure(args, True)
        finally:
            stop(started)
        runs["wall_ratio"] = round(runs["torch_default"]["wall_s"] / runs["setting"]["wall_s"], 2)
        report["runs"][box] = runs

    table = Table(title=f"{args.problems} problems annotated + one training epoch, {cores_available()} cores")
    for column in ("box", "threads", "annotate wall s", "annotate CPU s", "train wall s", "train CPU s",
                   "load (start, end)", "default / setting"):
        table.add_column(column, justify="right")
    for box, runs in report["runs"].items():
        for name in ("torch_default", "setting"):
            r = runs[name]
            table.add_row(box, f"{r['torch_threads']} ({name})", f"{r['annotate']['wall_s']:.1f}",
                          f"{r['annotate']['cpu_s']:.1f}", f"{r['train']['wall_s']:.1f}", f"{r['train']['cpu_s']:.1f}",
                          ", ".join(f"{x:.2f}" for x in r["load_1min"]),
                          f"{runs['wall_ratio']:.2f}" if name == "setting" else "")
    console.print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
