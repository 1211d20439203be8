"""Rollouts per second of the OmegaPRM search: many trees per engine call vs one tree at a time.

Both runs use the SAME backend object (loaded once, warmed up once), the same problems, the same
search settings and seed; only ``search.concurrent_problems`` differs (1 for the baseline, the
one-problem-at-a-time loop of the original release).  The result is reported as a ratio
measured in this run, never against a number from elsewhere.  Order is alternated across
repeats so neither mode always runs on a warmer machine.

    .venv/bin/python bench/bench_search.py --out bench-search.json
    .venv/bin/python bench/bench_search.py --problems 16 --concurrent 16 --repeats 3 --out r.json

Defaults: the shipped toy policy (``mmprm_tasks/assets/toy_policy``) on the transformers
backend, 8 toy problems, 8 rollouts per estimate, 5 searches per tree.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmprm_tasks.policy import GenerationRequest, load_policy
from mmprm_tasks.search import SearchProblem, is_rollout_engine, run_search
from mmprm_tasks.settings import Settings
from mmprm_tasks.toy.world import generate_seeds
from mmprm_tasks.verify import AnswerVerifier


@dataclass
class Counting:
    """Counts what the engine was asked for and the time spent in it."""

    inner: object
    calls: int = 0
    requests: int = 0
    rollouts: int = 0
    seconds: float = 0.0

    def generate(self, requests: Sequence[GenerationRequest], *, seed: int | None = None):
        start = time.perf_counter()
        out = self.inner.generate(requests, seed=seed)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.requests += len(requests)
        self.rollouts += sum(r.n for r in requests)
        return out


@dataclass
class CountingEngine(Counting):
    """Counting for a backend that takes requests one at a time (vLLM's async engine, an
    OpenAI-compatible server): each submit is one engine request, counted as one call."""

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    def submit(self, request: GenerationRequest):
        self.calls += 1
        self.requests += 1
        self.rollouts += request.n
        return self.inner.submit(request)


@dataclass
class ModeResult:
    mode: str
    concurrent_problems: int
    repeat: int
    wall_s: float
    trees: int
    rollouts: int
    searches: int
    mc_estimations: int
    generate_calls: int
    generate_s: float
    mean_requests_per_call: float
    mean_rollouts_per_call: float
    rollouts_per_s: float
    stop_reasons: dict[str, int] = field(default_factory=dict)


def load_problems(n: int, seed: int, workdir: Path) -> list[SearchProblem]:
    paths = generate_seeds(workdir, n_train=n, n_test=0, seed=seed)
    records = json.loads(paths["train"].read_text())
    base = paths["train"].parent
    return [
        SearchProblem(
            id=r["id"],
            question=r["question"],
            answer=r["correct_answer"],
            image=(base / r["image_path"]).read_bytes(),
            image_path=r["image_path"],
        )
        for r in records
    ]


def run_mode(mode: str, concurrent: int, repeat: int, problems, policy, verifier, settings, seed):
    cfg = settings.search.model_copy(update={"concurrent_problems": concurrent})
    counting = CountingEngine(policy) if is_rollout_engine(policy) else Counting(policy)
    start = time.perf_counter()
    results = list(run_search(problems, counting, verifier, cfg, seed))
    wall = time.perf_counter() - start
    rollouts = sum(r.stats["rollouts"] for r in results)
    assert rollouts == counting.rollouts, (rollouts, counting.rollouts)
    reasons: dict[str, int] = {}
    for r in results:
        reasons[r.stats["stop_reason"]] = reasons.get(r.stats["stop_reason"], 0) + 1
    return ModeResult(
        mode=mode,
        concurrent_problems=concurrent,
        repeat=repeat,
        wall_s=wall,
        trees=len(results),
        rollouts=rollouts,
        searches=sum(r.stats["searches"] for r in results),
        mc_estimations=sum(r.stats["mc_estimations"] for r in results),
        generate_calls=counting.calls,
        generate_s=counting.seconds,
        mean_requests_per_call=counting.requests / max(counting.calls, 1),
        mean_rollouts_per_call=counting.rollouts / max(counting.calls, 1),
        rollouts_per_s=rollouts / wall if wall > 0 else 0.0,
        stop_reasons=reasons,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--concurrent", type=int, default=None, help="default: --problems")
    ap.add_argument("--num-rollouts", type=int, default=8)
    ap.add_argument("--max-search-count", type=int, default=5)
    ap.add_argument("--rollout-budget", type=int, default=1000)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="policy.batch_size (sequences per forward pass)")
    ap.add_argument("--model", default=None,
                    help="policy checkpoint (default: the shipped toy policy)")
    ap.add_argument("--backend", default="transformers")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    overrides = {
        "policy.backend": args.backend,
        "policy.device": args.device,
        "policy.model": args.model,
        "policy.batch_size": args.batch_size,
        "sampling.max_new_tokens": args.max_new_tokens,
        "search.num_rollouts": args.num_rollouts,
        "search.max_search_count": args.max_search_count,
        "search.rollout_budget": args.rollout_budget,
    }
    settings = Settings().with_overrides(overrides)
    concurrent = args.concurrent or args.problems
    console = Console(width=max(Console().width, 132))

    with tempfile.TemporaryDirectory() as tmp:
        problems = load_problems(args.problems, args.seed, Path(tmp))
    t0 = time.perf_counter()
    policy = load_policy(settings)
    load_s = time.perf_counter() - t0
    verifier = AnswerVerifier(settings.verify)
    try:
        # Warm-up (kernels, allocator, verifier workers) outside the timed runs.
        warm = problems[0]
        policy.generate([GenerationRequest(warm.question, warm.image, (), 2)], seed=args.seed)
        verifier.check_many([(warm.answer, warm.answer)])

        runs: list[ModeResult] = []
        for repeat in range(args.repeats):
            modes = [("one_at_a_time", 1), ("concurrent", concurrent)]
            if repeat % 2:
                modes.reverse()
            for mode, k in modes:
                res = run_mode(mode, k, repeat, problems, policy, verifier, settings, args.seed)
                console.log(f"{mode} (repeat {repeat}): {res.rollouts} rollouts "
                            f"in {res.wall_s:.2f}s")
                runs.append(res)
    finally:
        verifier.close()
        policy.close()

    def median(mode: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs if r.mode == mode)

    base_rps = median("one_at_a_time", "rollouts_per_s")
    conc_rps = median("concurrent", "rollouts_per_s")
    speedup = conc_rps / base_rps if base_rps else float("nan")

    table = Table(title=f"OmegaPRM search throughput ({args.problems} problems, "
                        f"{args.num_rollouts} rollouts/estimate, {args.max_search_count} searches)")
    for col in ("mode", "concurrent", "wall s", "rollouts", "rollouts/s", "generate calls",
                "prompts/call", "rollouts/call", "generate s"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    for mode in ("one_at_a_time", "concurrent"):
        sel = [r for r in runs if r.mode == mode]
        table.add_row(
            mode,
            str(sel[0].concurrent_problems),
            f"{median(mode, 'wall_s'):.2f}",
            f"{median(mode, 'rollouts'):.0f}",
            f"{median(mode, 'rollouts_per_s'):.1f}",
            f"{median(mode, 'generate_calls'):.0f}",
            f"{median(mode, 'mean_requests_per_call'):.2f}",
            f"{median(mode, 'mean_rollouts_per_call'):.1f}",
            f"{median(mode, 'generate_s'):.2f}",
        )
    console.print(table)
    console.print(f"[bold]concurrent / one-at-a-time rollouts per second: {speedup:.2f}x[/bold]")

    import torch

    device = getattr(policy, "device", args.device)
    report = {
        "benchmark": "search_rollouts_per_second",
        "speedup": speedup,
        "baseline_rollouts_per_s": base_rps,
        "concurrent_rollouts_per_s": conc_rps,
        "config": {
            **vars(args),
            "out": str(args.out),
            "concurrent": concurrent,
            "search": settings.search.model_dump(),
            "sampling": settings.sampling.model_dump(),
            "policy_model": settings.policy.model,
        },
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": str(device),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "policy_load_s": load_s,
        },
        "runs": [asdict(r) for r in runs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
