"""Answer verification (SPEC §3): is a rollout's final answer the gold answer?

Rules first: math-verify ``parse`` + ``verify`` of candidate against gold, run in a pool of worker
*processes* with a hard per-check timeout (math-verify can hang inside sympy; a hung worker is
killed and replaced).  Answers the rules cannot parse (text, options, "I don't know") fall back
to an optional LLM judge behind an OpenAI-compatible endpoint that must answer exactly "Yes" or
"No".

The one rule of this module: a check that cannot be made (a timeout, a crashed worker, a judge
that is down or answers nonsense) raises :class:`VerificationError`.  It is never turned into
``False``; a wrong label silently poisons every MC value above it in the tree.  An answer the
rules cannot read when no judge is configured (gold "one", rollout "1") is not a failure of the
infrastructure but not a verdict either: it is ``None`` ("unverifiable"), counted in ``stats``,
and callers leave it out of every label.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import multiprocessing.connection
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import process as mp_process
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from mmprm_tasks.settings import VerifyConfig

log = logging.getLogger(__name__)

# What a rule check concludes: the answers agree, disagree, or the rules cannot tell.
RuleResult = Literal["true", "false", "undecided"]

JUDGE_PROMPT = (
    "You are checking the final answer of a math solution against the ground-truth answer.\n"
    "Decide whether the candidate answer is mathematically or semantically the same as the "
    "ground truth. Ignore formatting differences (LaTeX, \\boxed{{}}, dollar signs, units "
    "written or omitted, phrases such as \"The final answer is\").\n\n"
    "Ground truth: {gold}\n"
    "Candidate answer: {candidate}\n\n"
    "Reply with exactly one word: Yes or No."
)

# Seconds a fresh worker may take to import math-verify before the pool gives up on it.
WORKER_START_TIMEOUT_S = 120.0


class VerificationError(RuntimeError):
    """A check could not be made (timeout, worker crash, judge failure). Never a label."""


# --------------------------------------------------------------------------------------------
# The rules (run inside worker processes)
# --------------------------------------------------------------------------------------------

_CHOICE = re.compile(r"^\(?([A-Ha-h])\)?\.?$")
_LEADS = re.compile(
    r"^\s*(?:answer\s*:)?\s*(?:the\s+(?:final\s+)?answer\s+is\s*:?)?\s*", re.IGNORECASE
)
_BOXED = re.compile(r"\\boxed\s*\{(.*)\}", re.DOTALL)


def normalize_answer(text: str) -> str:
    """A plain-string form of an answer: lead-in phrases, ``$``, ``\\boxed{}``, case dropped."""
    text = text.strip()
    boxed = _BOXED.search(text)
    if boxed:
        text = boxed.group(1)
    text = _LEADS.sub("", text)
    text = text.replace("$", "").replace("\\(", "").replace("\\)", "")
    text = re.sub(r"\s+", " ", text).strip().rstrip(".").strip()
    text = re.sub(r"^\((\w)\)$", r"\1", text)  # "(B)" -> "B"
    return text.lower()


def rule_check(candidate: str, gold: str) -> RuleResult:
    """math-verify's verdict on ``candidate`` against ``gold`` (no timeout of its own).

    ``"undecided"`` when either side does not parse to a mathematical object and the plain
    strings differ: the judge (if any) decides those.
    """
    from math_verify import StringExtractionConfig, parse, verify

    gold_choice = _CHOICE.match(gold.strip())
    if gold_choice:
        # Multiple choice: compare option letters ("The final answer is (B)" vs "B").
        config = [StringExtractionConfig()]
        unwrap = re.compile(r"\(([A-Ha-h])\)")  # "(B)" -> "B"
        parsed_gold = parse(gold_choice.group(1), extraction_config=config, parsing_timeout=None)
        parsed_cand = parse(
            unwrap.sub(r"\1", candidate), extraction_config=config, parsing_timeout=None
        )
    else:
        parsed_gold = parse(gold, parsing_timeout=None)
        parsed_cand = parse(candidate, parsing_timeout=None)
    if parsed_gold and parsed_cand:
        if verify(parsed_gold, parsed_cand, timeout_seconds=None):
            return "true"
        if not gold_choice:
            return "false"
        # A letter that differs may still be the option's text: fall through to strings/judge.
    if normalize_answer(candidate) and normalize_answer(candidate) == normalize_answer(gold):
        return "true"
    if gold_choice and parsed_cand:
        return "false"
    return "undecided"


def slow_rule_check(
    candidate: str, gold: str, *, delay_s: float, trigger: str | None = None
) -> RuleResult:
    """Fault injection: :func:`rule_check` after sleeping ``delay_s`` (only for ``trigger``).

    Simulates a math-verify call that hangs; pass it as ``rule_fn`` (via functools.partial).
    """
    if trigger is None or candidate == trigger:
        time.sleep(delay_s)
    return rule_check(candidate, gold)


def _worker_main(conn: multiprocessing.connection.Connection, rule_fn: Callable) -> None:
    """Worker loop: warm math-verify up, say ready, then answer ``(task_id, cand, gold)``."""
    import logging as _logging

    from mmprm_tasks.threads import use_one_thread

    # Short rule checks beside the policy's threads: more threads would only compete with them.
    use_one_thread()

    # math-verify warns once that its own (signal based) timeout is off: ours is the hard one.
    _logging.getLogger("math_verify").setLevel(_logging.ERROR)
    try:
        rule_check("1", "1")
    except Exception:  # pragma: no cover - an unusable install shows up on the first check
        pass
    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, candidate, gold = msg
        try:
            result = rule_fn(candidate, gold)
            conn.send((task_id, "ok", result))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
            conn.send((task_id, "error", f"{type(exc).__name__}: {exc}"))


# --------------------------------------------------------------------------------------------
# The worker pool (parent side)
# --------------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    """One rule check's fate: a result, or why there is none."""

    result: RuleResult | None = None
    failure: str | None = None  # "timeout ..." / "error ..." / "worker died ..."


class _Worker:
    def __init__(self, ctx: Any, rule_fn: Callable) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, rule_fn), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.started_ok = False  # said "ready" once
        self.started = time.monotonic()
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        try:
            self.conn.close()
        except OSError:
            pass


def _allow_child_processes() -> None:
    """Let this process start the pool's worker processes, whatever host forked it.

    Airflow forks each task process from the worker that runs it.  On a Celery prefork worker that
    is a billiard pool process, which registers itself as multiprocessing's current process: the
    fork inherits it, daemonic and with billiard's authkey, so ``Process.start()`` fails
    ("daemonic processes are not allowed to have children", then "Pickling an
    AuthenticationString object is disallowed").  The task process is the root of its own
    processes: it drops the inherited daemon flag and takes an authkey of its own.
    """
    config = mp_process.current_process()._config  # noqa: SLF001
    config.pop("daemon", None)
    if type(config.get("authkey")) is not mp_process.AuthenticationString:
        config["authkey"] = mp_process.AuthenticationString(os.urandom(32))


class RulePool:
    """``workers`` processes running ``rule_fn``; each check gets ``timeout_s`` of wall time.

    The clock of a check starts when it is handed to a warmed-up worker, so the start-up of a
    replacement worker never eats into a check's budget.
    """

    def __init__(self, workers: int, timeout_s: float, rule_fn: Callable = rule_check) -> None:
        self.size = workers
        self.timeout_s = timeout_s
        self.rule_fn = rule_fn
        # spawn: safe in threaded parents (uvicorn, httpx, torch); math-verify imports in ~0.4 s.
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self.restarts = 0

    def _fill(self) -> None:
        _allow_child_processes()
        while len(self._workers) < self.size:
            self._workers.append(_Worker(self._ctx, self.rule_fn))

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)
        self.restarts += 1
        self._fill()

    def run(self, pairs: Sequence[tuple[str, str]]) -> list[_Outcome]:
        outcomes = [_Outcome() for _ in pairs]
        pending = deque(range(len(pairs)))
        self._fill()
        while pending or any(w.task is not None for w in self._workers):
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.ready and worker.task is None and pending:
                    index = pending.popleft()
                    try:
                        worker.conn.send((index, pairs[index][0], pairs[index][1]))
                    except (OSError, ValueError):
                        # Died while idle (OOM killer, ...): replace it, the check waits.
                        pending.appendleft(index)
                        self._replace(worker)
                        continue
                    worker.task, worker.deadline = index, now + self.timeout_s
            deadlines = [w.deadline for w in self._workers if w.task is not None] + [
                w.started + WORKER_START_TIMEOUT_S for w in self._workers if not w.ready
            ]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            readable = multiprocessing.connection.wait(
                [w.conn for w in self._workers if w.task is not None or not w.ready], wait_s
            )
            by_conn = {id(w.conn): w for w in self._workers}
            for conn in readable:
                worker = by_conn[id(conn)]
                try:
                    task_id, status, value = conn.recv()
                except (EOFError, OSError):
                    worker.proc.join(timeout=5)
                    if worker.task is not None:
                        outcomes[worker.task].failure = (
                            f"worker died (exit code {worker.proc.exitcode})"
                        )
                    elif worker.proc.exitcode is not None and worker.started_ok is False:
                        self._workers.remove(worker)
                        worker.kill()
                        raise VerificationError(
                            f"verifier worker failed to start (exit code {worker.proc.exitcode})"
                        ) from None
                    self._replace(worker)
                    continue
                if task_id == "ready":
                    worker.ready = worker.started_ok = True
                    continue
                if status == "ok" and value in ("true", "false", "undecided"):
                    outcomes[task_id].result = value
                else:
                    outcomes[task_id].failure = f"error in rule check: {value}"
                worker.task = None
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.task is not None and now >= worker.deadline:
                    outcomes[worker.task].failure = f"timed out after {self.timeout_s:g} s"
                    log.warning(
                        "math-verify check %r vs %r timed out after %.1f s; replacing worker",
                        pairs[worker.task][0][:80],
                        pairs[worker.task][1][:80],
                        self.timeout_s,
                    )
                    self._replace(worker)
                elif not worker.ready and now >= worker.started + WORKER_START_TIMEOUT_S:
                    worker.kill()
                    self._workers.remove(worker)
                    raise VerificationError(
                        f"verifier worker did not start within {WORKER_START_TIMEOUT_S:g} s"
                    )
        return outcomes

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers.clear()


# --------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------


class Judge:
    """An LLM behind ``{base_url}/chat/completions`` that answers "Yes" or "No"."""

    def __init__(self, cfg: VerifyConfig, *, backoff_s: float = 0.5) -> None:
        if not cfg.judge_base_url or not cfg.judge_model:
            raise ValueError("a judge needs both verify.judge_base_url and verify.judge_model")
        self.cfg = cfg
        self.backoff_s = backoff_s
        headers = {}
        if cfg.judge_api_key is not None:
            headers["Authorization"] = f"Bearer {cfg.judge_api_key.get_secret_value()}"
        self._client = httpx.Client(
            base_url=cfg.judge_base_url.rstrip("/"), timeout=cfg.judge_timeout_s, headers=headers
        )
        self.calls = 0
        self._calls_lock = threading.Lock()

    def ask(self, candidate: str, gold: str) -> bool:
        body = {
            "model": self.cfg.judge_model,
            "messages": [
                {"role": "user", "content": JUDGE_PROMPT.format(gold=gold, candidate=candidate)}
            ],
            "max_tokens": self.cfg.judge_max_tokens,
            "temperature": self.cfg.judge_temperature,
            "n": 1,
        }
        problems: list[str] = []
        for attempt in range(self.cfg.judge_max_tries):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
            with self._calls_lock:
                self.calls += 1
            try:
                response = self._client.post("/chat/completions", json=body)
            except httpx.HTTPError as exc:
                problems.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code != 200:
                problems.append(f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            try:
                content = response.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                problems.append(f"malformed response: {response.text[:200]}")
                continue
            verdict = re.sub(r"[^a-z]", "", content.strip().lower())
            if verdict == "yes":
                return True
            if verdict == "no":
                return False
            problems.append(f"unusable verdict {content!r}")
        raise VerificationError(
            f"judge {self.cfg.judge_model} at {self.cfg.judge_base_url} gave no verdict on "
            f"{candidate!r} vs {gold!r} after {self.cfg.judge_max_tries} tries: "
            + "; ".join(problems[-3:])
        )

    def close(self) -> None:
        self._client.close()


# --------------------------------------------------------------------------------------------
# The verifier
# --------------------------------------------------------------------------------------------


def _cache_key(candidate: str, gold: str) -> tuple[str, str]:
    return re.sub(r"\s+", " ", candidate.strip()), re.sub(r"\s+", " ", gold.strip())


Verdict = bool | None  # None: unverifiable (the rules cannot read it and no judge is configured)


class AnswerVerifier:
    """``check_many([(candidate, gold), ...]) -> [True | False | None, ...]`` with rules, judge
    and a cache; ``None`` only without a judge, for answers the rules cannot read.

    ``rule_fn`` replaces the rule check run in the workers (a picklable callable returning
    ``"true" | "false" | "undecided"``; tests inject :func:`slow_rule_check`).  Thread-safe:
    concurrent calls are serialised.
    """

    def __init__(
        self,
        cfg: VerifyConfig | None = None,
        *,
        rule_fn: Callable[[str, str], RuleResult] = rule_check,
        judge_backoff_s: float = 0.5,
        judge_concurrency: int = 8,
    ) -> None:
        self.cfg = cfg or VerifyConfig()
        if bool(self.cfg.judge_base_url) != bool(self.cfg.judge_model):
            raise ValueError("set both verify.judge_base_url and verify.judge_model, or neither")
        self._judge = (
            Judge(self.cfg, backoff_s=judge_backoff_s) if self.cfg.judge_base_url else None
        )
        self._pool = RulePool(self.cfg.workers, self.cfg.timeout_s, rule_fn)
        self._judge_concurrency = judge_concurrency
        self._cache: dict[tuple[str, str], Verdict] = {}
        self._lock = threading.Lock()
        self.stats = {"checks": 0, "cache_hits": 0, "rule": 0, "judge": 0, "timeouts": 0, "unverifiable": 0}

    @property
    def has_judge(self) -> bool:
        return self._judge is not None

    def check(self, candidate: str, gold: str) -> Verdict:
        return self.check_many([(candidate, gold)])[0]

    def check_many(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        with self._lock:
            return self._check_many(pairs)

    def _check_many(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        keys = [_cache_key(str(c), str(g)) for c, g in pairs]
        self.stats["checks"] += len(keys)
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        self.stats["cache_hits"] += len(keys) - len(todo)
        if todo:
            outcomes = self._pool.run(todo)
            for_judge: list[tuple[str, str]] = []
            failures: list[str] = []
            for key, outcome in zip(todo, outcomes):
                if outcome.result in ("true", "false"):
                    self._cache[key] = outcome.result == "true"
                    self.stats["rule"] += 1
                    continue
                if outcome.failure and outcome.failure.startswith("timed out"):
                    self.stats["timeouts"] += 1
                if self._judge is not None:
                    for_judge.append(key)
                elif outcome.result == "undecided":
                    # Rules cannot read the answer and no judge is configured: no verdict.
                    self._cache[key] = None
                    self.stats["unverifiable"] += 1
                else:
                    failures.append(f"{key[0]!r} vs {key[1]!r}: {outcome.failure}")
            if failures:
                raise VerificationError(
                    f"{len(failures)} answer check(s) could not be made: " + "; ".join(failures[:5])
                )
            if for_judge:
                self._ask_judge(for_judge)
        return [self._cache[k] for k in keys]

    def _ask_judge(self, keys: list[tuple[str, str]]) -> None:
        assert self._judge is not None
        judge = self._judge
        with ThreadPoolExecutor(min(self._judge_concurrency, len(keys))) as executor:
            futures = {key: executor.submit(judge.ask, *key) for key in keys}
        errors: list[BaseException] = []
        for key, future in futures.items():
            exc = future.exception()
            if exc is not None:
                errors.append(exc)
                continue
            self._cache[key] = future.result()
            self.stats["judge"] += 1
        if errors:
            if isinstance(errors[0], VerificationError):
                raise errors[0]
            raise VerificationError(f"judge failed: {errors[0]!r}") from errors[0]

    def cache_size(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        self._pool.close()
        if self._judge is not None:
            self._judge.close()

    def __enter__(self) -> "AnswerVerifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
