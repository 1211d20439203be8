"""Tokens per CPU-second of the transformers backend: ``model.generate`` on fixed batches (the
engine before issue 22, kept as the reference) against the continuous-batching engine
(``mmprm_tasks/policy/hf_engine.py``), fp32 and int8, on the demo's own rollout requests.

1. **Annotation end to end**: the OmegaPRM search with the demo's settings (8 rollouts per
   estimate, 12 searches, budget 160, 96 new tokens) over the demo's train problems, once on each
   engine: rollouts per CPU-second (this process and the answer checker's processes).
2. **Replay**: every rollout request that search made (prefix, ``n``, seed), sent again to
   (a) the reference exactly as the backend called it (calls of up to ``capacity`` sequences,
   ``batch_size`` rows per ``generate``), (b) the continuous engine (all submitted at once, as
   the search keeps it fed), (c) the same with int8 linear layers: generated tokens per CPU-second.

Same weights, sampling settings and thread count for all; ratios are measured in this one run.

    .venv/bin/python bench/bench_engine_cpu.py --out .mmprm/bench/engine-cpu.json
    .venv/bin/python bench/bench_engine_cpu.py --problems 24 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.table import Table

from mmprm_tasks.policy import GenerationRequest
from mmprm_tasks.policy.hf import TransformersPolicy
from mmprm_tasks.policy.hf_engine import ContinuousTransformersPolicy
from mmprm_tasks.search import SearchProblem, run_search
from mmprm_tasks.settings import TOY_POLICY_DIR, PolicyConfig, SamplingConfig, SearchConfig, VerifyConfig
from mmprm_tasks.toy.world import generate_seeds
from mmprm_tasks.verify import AnswerVerifier

# The demo's search and sampling settings (mmprm_tasks/demo.py DEMO_SETTINGS).
DEMO_SEARCH = dict(num_rollouts=8, max_search_count=12, rollout_budget=160, concurrent_problems=32)
DEMO_SAMPLING = SamplingConfig(max_new_tokens=96)


def cpu_seconds() -> float:
    """CPU time of this process and its live children (the answer checker's worker processes)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


class Recorder:
    """A RolloutEngine in front of the continuous engine that keeps every request it was sent."""

    def __init__(self, inner: ContinuousTransformersPolicy) -> None:
        self.inner = inner
        self.capacity = inner.capacity
        self.requests: list[GenerationRequest] = []

    def submit(self, request: GenerationRequest) -> Future:
        self.requests.append(request)
        return self.inner.submit(request)


def problems_of(folder: Path, n: int, seed: int) -> list[SearchProblem]:
    seeds = generate_seeds(folder, n_train=n, n_test=4, seed=seed)
    records = json.loads(seeds["train"].read_text())
    return [SearchProblem(r["id"], r["question"], r["correct_answer"], (folder / r["image_path"]).read_bytes(),
                          r["image_path"]) for r in records]


def annotate(problems: list[SearchProblem], policy: Any, capacity: int, seed: int) -> dict[str, float]:
    cfg = SearchConfig(**DEMO_SEARCH, max_sequences_in_flight=capacity)
    with AnswerVerifier(VerifyConfig()) as verifier:
        start_cpu, start = cpu_seconds(), time.perf_counter()
        trees = list(run_search(problems, policy, verifier, cfg, seed=seed))
        cpu, wall = cpu_seconds() - start_cpu, time.perf_counter() - start
    rollouts = sum(t.stats["rollouts"] for t in trees)
    return {"trees": len(trees), "rollouts": rollouts, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "rollouts_per_cpu_s": round(rollouts / cpu, 2)}


def replay(complete: Callable[[list[GenerationRequest]], list[list[Any]]], calls: list[list[GenerationRequest]]) -> dict:
    start_cpu, start = cpu_seconds(), time.perf_counter()
    tokens = rows = 0
    for call in calls:
        for per_request in complete(call):
            rows += len(per_request)
            tokens += sum(c.completion_tokens for c in per_request)
    cpu, wall = cpu_seconds() - start_cpu, time.perf_counter() - start
    return {"rows": rows, "tokens": tokens, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "tokens_per_cpu_s": round(tokens / cpu, 1)}


def completer(policy: TransformersPolicy) -> Callable[[list[GenerationRequest]], list[list[Any]]]:
    from mmprm_tasks.policy import chat_messages
    from mmprm_tasks.policy.hf import ChatPrompt

    def complete(requests: list[GenerationRequest]) -> list[list[Any]]:
        prompts = [ChatPrompt(chat_messages(r.prompt), [r.image]) for r in requests]
        return policy.complete(prompts, [r.n for r in requests], seeds=[r.seed for r in requests])

    return complete


def calls_of(requests: Sequence[GenerationRequest], capacity: int) -> list[list[GenerationRequest]]:
    """Requests grouped as the batching engine handed them to ``generate``: up to ``capacity``
    sequences a call, in arrival order."""
    calls: list[list[GenerationRequest]] = [[]]
    size = 0
    for request in requests:
        if calls[-1] and size + request.n > capacity:
            calls.append([])
            size = 0
        calls[-1].append(request)
        size += request.n
    return calls


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(TOY_POLICY_DIR))
    ap.add_argument("--problems", type=int, default=96, help="train problems (the demo's 96)")
    ap.add_argument("--capacity", type=int, default=256, help="search.max_sequences_in_flight")
    ap.add_argument("--batch-size", type=int, default=64, help="policy.batch_size of the reference")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU check (no int8 there; see wall_s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-annotation", action="store_true", help="replay only (record with the new engine)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    load = os.getloadavg()
    reference = TransformersPolicy(args.model, policy=PolicyConfig(batch_size=args.batch_size, engine="generate",
                                                                   device=args.device), sampling=DEMO_SAMPLING)
    engine = ContinuousTransformersPolicy(args.model, policy=PolicyConfig(engine="continuous", device=args.device),
                                          sampling=DEMO_SAMPLING, capacity=args.capacity)
    report: dict[str, Any] = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                                          "cpus": os.cpu_count(), "torch_threads": args.threads,
                                          "loadavg_at_start": [round(x, 2) for x in load]},
                              "settings": {**DEMO_SEARCH, "max_new_tokens": DEMO_SAMPLING.max_new_tokens,
                                           "capacity": args.capacity, "batch_size": args.batch_size,
                                           "problems": args.problems, "seed": args.seed}}
    with tempfile.TemporaryDirectory() as tmp:
        problems = problems_of(Path(tmp), args.problems, args.seed)
        recorder = Recorder(engine)
        with console.status("annotation on the continuous engine (recording its requests)"):
            after = annotate(problems, recorder, args.capacity, args.seed)
        annotation = {"continuous": after}
        if not args.skip_annotation:
            with console.status("annotation on model.generate (the reference)"):
                annotation["generate"] = annotate(problems, reference, args.capacity, args.seed)
            annotation["ratio"] = round(after["rollouts_per_cpu_s"] / annotation["generate"]["rollouts_per_cpu_s"], 2)
        report["annotation"] = annotation

    requests = recorder.requests
    report["requests"] = {"count": len(requests), "rows": sum(r.n for r in requests)}
    replays: dict[str, Any] = {}
    with console.status("replay on model.generate"):
        replays["generate"] = replay(completer(reference), calls_of(requests, args.capacity))
    with console.status("replay on the continuous engine"):
        replays["continuous"] = replay(completer(engine), [list(requests)])
    engine.close()
    if args.device == "cpu":
        quantized = ContinuousTransformersPolicy(args.model, policy=PolicyConfig(engine="continuous", quantize="int8"),
                                                 sampling=DEMO_SAMPLING, capacity=args.capacity)
        with console.status("replay on the continuous engine, int8"):
            replays["continuous_int8"] = replay(completer(quantized), [list(requests)])
        quantized.close()
    base = replays["generate"]
    for name, r in replays.items():
        if name != "generate":
            r["ratio"] = round(r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"], 2)
            r["wall_ratio"] = round(base["wall_s"] / r["wall_s"], 2)
    report["replay"] = replays
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    table = Table(title=f"{len(requests)} requests, {report['requests']['rows']} rows; "
                        f"{args.threads} torch thread(s); load {load[0]:.2f} at start")
    for column in ("engine", "tokens", "CPU s", "tokens / CPU-s", "x generate", "wall s", "x generate (wall)"):
        table.add_column(column, justify="right")
    for name, r in replays.items():
        table.add_row(name, str(r["tokens"]), f"{r['cpu_s']:.1f}", f"{r['tokens_per_cpu_s']:.0f}",
                      f"{r.get('ratio', 1.0):.2f}", f"{r['wall_s']:.1f}", f"{r.get('wall_ratio', 1.0):.2f}")
    console.print(table)
    for name, r in annotation.items():
        if isinstance(r, dict):
            console.print(f"annotation on {name}: {r['trees']} trees, {r['rollouts']} rollouts, "
                          f"{r['cpu_s']:.1f} CPU-s, {r['rollouts_per_cpu_s']:.2f} rollouts/CPU-s")
    if "ratio" in annotation:
        console.print(f"annotation rollouts per CPU-second, continuous / generate: {annotation['ratio']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
