"""The search against a simulated GPU engine with continuous batching: does it keep the engine full?

Runs the real :func:`mmprm_tasks.search.run_search` at the default search settings twice on the
same simulated engine, the same synthetic problems and the same seed: once as the platform runs it
(continuous feeding) and once one problem at a time (``concurrent_problems=1``: the original
release's loop).  Reports engine utilisation, mean sequences in flight and rollouts per simulated
second, and the ratio between the two.  The clock is simulated, so the figures do not depend on
this machine; the search code, its requests and its answer checks are the real ones.

Cost model of the engine (vLLM-style continuous batching; defaults roughly an 8B model on one
H100, all flags):

* at most ``--capacity`` sequences run at once; others wait in a FIFO queue and start as soon
  as a slot frees (between decode iterations);
* one decode iteration advances every running sequence by one token and takes
  ``--step-ms + --per-seq-ms * running`` milliseconds;
* a request's prompt is prefilled once for its ``n`` samples (prefix caching) when its first
  sequence starts: ``--prefill-ms-per-token * prompt_tokens`` added to that iteration;
* a rollout is as many tokens as its text has words times ``--tokens-per-word``.

The policy is synthetic and request-deterministic: a problem has 6-12 steps of 20-50 words; each
sampled continuation goes wrong at each remaining step with probability ``--error-rate`` (a wrong
step makes the final answer wrong), drawn from the request's own seed.  Answers are checked exactly.

    .venv/bin/python bench/bench_search_engine.py --out .mmprm/bench/search-engine.json
    .venv/bin/python bench/bench_search_engine.py --problems 200 --capacity 512
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mmprm_tasks.policy import GenerationRequest
from mmprm_tasks.search import SearchProblem, run_search
from mmprm_tasks.settings import SearchConfig

WORDS = ("so", "the", "angle", "is", "equal", "to", "sum", "of", "sides", "hence", "area", "we", "get", "x", "y")


def _solution_length(question: str) -> int:
    return 6 + int(question.split()[-1]) % 7


def synthetic_rollouts(request: GenerationRequest, error_rate: float) -> list[list[str]]:
    """``request.n`` continuations of the request's prefix, a function of the request alone."""
    length = _solution_length(request.question)
    prefix_wrong = any(step.startswith("wrong") for step in request.prefix_steps)
    out = []
    for i in range(request.n):
        rng = random.Random(f"{request.seed}:{i}")
        steps, wrong = [], prefix_wrong
        for position in range(len(request.prefix_steps), length):
            slip = rng.random() < error_rate
            wrong = wrong or slip
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 50)))
            steps.append(f"{'wrong' if slip else 'step'} {position}: {words}.")
        steps.append("41" if wrong else "42")
        out.append(steps)
    return out


@dataclass
class _Request:
    future: Future
    result: list[list[str]]
    tokens_left: list[int]
    prompt_tokens: int
    started: int = 0  # sequences started
    running: int = 0
    done: int = 0


@dataclass
class SimulatedEngine:
    """A continuous-batching engine on a simulated clock (milliseconds); see the module docstring."""

    capacity: int
    step_ms: float
    per_seq_ms: float
    prefill_ms_per_token: float
    tokens_per_word: float
    error_rate: float
    now_ms: float = 0.0
    sequence_ms: float = 0.0  # integral of running sequences over time
    rollouts: int = 0
    iterations: int = 0
    _queue: deque = field(default_factory=deque)  # (request, sequence index) waiting for a slot
    _running: list = field(default_factory=list)  # [request, sequence index]
    _samples: list = field(default_factory=list)  # (now, running) after each iteration

    def submit(self, request: GenerationRequest) -> Future:
        result = synthetic_rollouts(request, self.error_rate)
        tokens = [max(1, round(sum(len(s.split()) for s in r) * self.tokens_per_word)) for r in result]
        prompt = round((len(request.question.split()) + sum(len(s.split()) for s in request.prefix_steps))
                       * self.tokens_per_word) + 256  # + image tokens
        job = _Request(Future(), result, tokens, prompt)
        job.future.set_running_or_notify_cancel()
        self._queue.extend((job, i) for i in range(request.n))
        return job.future

    def _iterate(self) -> None:
        prefill = 0.0
        while self._queue and len(self._running) < self.capacity:
            job, index = self._queue.popleft()
            if job.started == 0:
                prefill += self.prefill_ms_per_token * job.prompt_tokens
            job.started += 1
            self._running.append([job, index])
        running = len(self._running)
        if not running:
            return
        duration = self.step_ms + self.per_seq_ms * running + prefill
        self.now_ms += duration
        self.sequence_ms += running * duration
        self.iterations += 1
        still = []
        for job, index in self._running:
            job.tokens_left[index] -= 1
            if job.tokens_left[index] > 0:
                still.append([job, index])
                continue
            job.done += 1
            self.rollouts += 1
            if job.done == len(job.result):
                job.future.set_result(job.result)
        self._running = still

    def wait(self, futures: Sequence[Future]) -> None:
        """Run decode iterations until one of ``futures`` is done (the driver blocks here)."""
        while not any(f.done() for f in futures):
            if not self._queue and not self._running:
                raise RuntimeError("the driver waits on requests the engine does not hold")
            self._iterate()


@dataclass
class InstantVerifier:
    calls: int = 0

    def check_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        self.calls += 1
        return [candidate.strip() == gold for candidate, gold in pairs]


def _problems(n: int, engine: SimulatedEngine, marks: dict[str, float]):
    for i in range(n):
        yield SearchProblem(id=f"sim-{i}", question=f"Synthetic geometry problem {i}", answer="42",
                            image=b"", image_path=f"images/sim-{i}.png")
    # Steady state ends when the source runs dry (the search asks for a problem and there is none).
    marks.update(ms=engine.now_ms, sequence_ms=engine.sequence_ms)


def measure(args: argparse.Namespace, cfg: SearchConfig) -> dict[str, Any]:
    engine = SimulatedEngine(args.capacity, args.step_ms, args.per_seq_ms, args.prefill_ms_per_token,
                             args.tokens_per_word, args.error_rate)
    marks: dict[str, float] = {}
    verifier = InstantVerifier()
    started = time.perf_counter()
    trees = list(run_search(_problems(args.problems, engine, marks), engine, verifier, cfg, args.seed))
    wall = time.perf_counter() - started
    steady_ms = marks.get("ms") or engine.now_ms
    steady_sequences = (marks.get("sequence_ms", engine.sequence_ms) / steady_ms) if steady_ms else 0.0
    return {
        "concurrent_problems": cfg.concurrent_problems, "trees": len(trees),
        "rollouts": engine.rollouts, "simulated_s": engine.now_ms / 1000,
        "rollouts_per_s": engine.rollouts / (engine.now_ms / 1000),
        "steady_state_s": steady_ms / 1000,
        "mean_sequences_in_flight_steady": steady_sequences,
        "steady_utilisation": steady_sequences / args.capacity,
        "mean_sequences_in_flight_overall": engine.sequence_ms / engine.now_ms,
        "driver_wall_s": wall, "verifier_calls": verifier.calls, "engine_iterations": engine.iterations,
        "trees_by_problem": {t.problem_id: t.tree for t in trees},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=96)
    ap.add_argument("--capacity", type=int, default=256, help="sequences the engine runs at once")
    ap.add_argument("--step-ms", type=float, default=12.0)
    ap.add_argument("--per-seq-ms", type=float, default=0.04)
    ap.add_argument("--prefill-ms-per-token", type=float, default=0.02)
    ap.add_argument("--tokens-per-word", type=float, default=1.3)
    ap.add_argument("--error-rate", type=float, default=0.06, help="chance a sampled step goes wrong")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    defaults = SearchConfig()
    continuous_cfg = defaults.model_copy(update={"max_sequences_in_flight": args.capacity})
    continuous = measure(args, continuous_cfg)
    baseline = measure(args, continuous_cfg.model_copy(update={"concurrent_problems": 1}))
    same_trees = continuous.pop("trees_by_problem") == baseline.pop("trees_by_problem")
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "search": continuous_cfg.model_dump(),
        "continuous": continuous, "one_at_a_time": baseline,
        "speedup_rollouts_per_s": continuous["rollouts_per_s"] / baseline["rollouts_per_s"],
        "same_trees": same_trees,
    }
    table = Table(title=f"run_search on a simulated engine ({args.capacity} sequences, {args.problems} problems, "
                        "default search settings)")
    for column in ("driver", "rollouts/s", "seqs in flight (steady)", "of capacity", "overall", "simulated s"):
        table.add_column(column, justify="right")
    for name, r in (("continuous (platform)", continuous), ("one problem at a time", baseline)):
        table.add_row(name, f"{r['rollouts_per_s']:,.0f}", f"{r['mean_sequences_in_flight_steady']:.1f}",
                      f"{100 * r['steady_utilisation']:.1f}%", f"{r['mean_sequences_in_flight_overall']:.1f}",
                      f"{r['simulated_s']:,.0f}")
    console = Console()
    console.print(table)
    console.print(f"speed-up {result['speedup_rollouts_per_s']:.1f}x; identical trees: {same_trees}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
