"""Best-of-N evaluation (SPEC §7): aggregators, baselines, first-error metrics, report, plot.

For each test problem N candidate solutions are sampled from a policy, verified (0/1), scored
step by step by the PRM, and one candidate is picked per aggregator of its step scores.
Accuracy = share of problems whose picked candidate is correct.

Conventions (where SPEC §7 is silent; the original release's ``extract_calculate.py`` differs
where noted):

* **Epsilon.** Before ``log`` and odds, step scores are clipped to ``[EPSILON, 1 - EPSILON]``
  with ``EPSILON = 1e-9`` (the release substitutes -9999 for ``log(0)`` and 9999 for the odds of
  1).  Clipping keeps the order of scores inside the interval.
* **Empty candidates.** A candidate with no steps scores ``-inf`` under every aggregator, so it
  is only picked when every candidate is empty (the release gives it 0, which *wins* under
  ``sum_logprob``/``sum_logit``).
* **Ties** between the best aggregate scores are broken by a seeded random choice among the tied
  candidates (``random.Random(f"{seed}:{problem}:{N}:{aggregator}")``), so a PRM that cannot tell
  candidates apart scores the random-pick expectation, not the first candidate's correctness
  (the release takes the first).  Per aggregator and N the report counts the problems whose best
  score is tied (``prm_ties``) and, among them, those where the tied candidates differ in
  correctness (``prm_ties_decisive``: the draw, not the PRM, decided the pick).
* **First N.** For each N the first N candidates of every problem are used (problems with fewer
  use all they have; one with none counts as wrong everywhere).
* **Random pick** is the exact expectation: mean correctness of the first N candidates.
* **pass@k** (k in 2, 4, 8, 16, k <= N) is the exact expectation of drawing k of the first N
  candidates without replacement, ``1 - C(n - c, k) / C(n, k)`` (the release draws one sample);
  ``oracle`` is pass@N (any of the first N correct).
* **Majority vote** over final answers normalized by collapsing whitespace (or ``answer_key``);
  candidates without an answer do not vote; ties go to the answer whose first occurrence comes
  first among the candidates; the vote is correct when the first candidate with the winning
  answer is correct.
* **PRM-weighted vote** (``weighted_vote`` per row): the same vote, each candidate weighted by
  its solution score under the headline aggregator (under ``min`` when the headline is not a
  probability, e.g. ``sum_logit``), as "Let's Verify Step by Step" and the PRM lessons papers
  weight votes; same ties and empties.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .progress import track

EPSILON = 1e-9
DEFAULT_KS = (2, 4, 8, 16)


def _clip(p: float) -> float:
    return min(max(float(p), EPSILON), 1.0 - EPSILON)


def _sum_logprob(scores: Sequence[float]) -> float:
    return sum(math.log(_clip(p)) for p in scores)


def _sum_logit(scores: Sequence[float]) -> float:
    return sum(math.log(_clip(p) / (1.0 - _clip(p))) for p in scores)


def _mean_odd(scores: Sequence[float]) -> float:
    return sum(_clip(p) / (1.0 - _clip(p)) for p in scores) / len(scores)


AGGREGATORS: dict[str, Callable[[Sequence[float]], float]] = {
    "min": lambda s: float(min(s)),
    "last": lambda s: float(s[-1]),
    "product": lambda s: float(math.prod(s)),
    "average": lambda s: float(sum(s) / len(s)),
    "sum_logprob": _sum_logprob,
    "max": lambda s: float(max(s)),
    "sum_logit": _sum_logit,
    "mean_odd": _mean_odd,
}


def aggregate(name: str, step_scores: Sequence[float]) -> float:
    """The solution score of ``step_scores`` under aggregator ``name`` (``-inf`` when empty or
    NaN, so such a candidate is never preferred)."""
    if name not in AGGREGATORS:
        raise KeyError(f"unknown aggregator {name!r}; known: {', '.join(AGGREGATORS)}")
    scores = list(step_scores)
    if not scores:
        return -math.inf
    value = AGGREGATORS[name](scores)
    return -math.inf if math.isnan(value) else value


@dataclass(frozen=True)
class ScoredCandidate:
    step_scores: tuple[float, ...]
    correct: bool
    final_answer: str | None


def _candidate(item: Any) -> ScoredCandidate:
    if isinstance(item, ScoredCandidate):
        return item
    if isinstance(item, dict):
        scores = item.get("step_scores", item.get("scores", ()))
        return ScoredCandidate(tuple(scores), bool(item["correct"]), item.get("final_answer"))
    scores, correct, final_answer = item
    return ScoredCandidate(tuple(scores), bool(correct), final_answer)


def _normalize_answer(answer: Any) -> str:
    return " ".join(str(answer).split())


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that ``k`` of ``n`` candidates (``c`` correct), drawn without replacement, hold a
    correct one (``k`` is capped at ``n``)."""
    if n == 0:
        return 0.0
    k = min(k, n)
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(
    candidates: Sequence[ScoredCandidate], answer_key: Callable[[Any], str] | None = None,
    weight: Callable[[ScoredCandidate], float] | None = None,
) -> bool:
    """Whether the majority answer is correct, each candidate counting 1 or ``weight(candidate)``
    (see the module docstring for ties/empties)."""
    key = answer_key or _normalize_answer
    counts: dict[str, float] = {}
    first: dict[str, ScoredCandidate] = {}
    for cand in candidates:
        if cand.final_answer is None or not str(cand.final_answer).strip():
            continue
        k = key(cand.final_answer)
        counts[k] = counts.get(k, 0) + (1 if weight is None else weight(cand))
        first.setdefault(k, cand)
    if not counts:
        return False
    winner = max(counts, key=counts.__getitem__)  # max() keeps the first of equal counts
    return first[winner].correct


# Aggregators whose solution scores are probabilities, and so can weight a vote.
PROBABILITY_AGGREGATORS = ("min", "last", "product", "average", "max")


def vote_aggregator(headline: str) -> str:
    """The aggregator that weights the PRM-weighted vote: the headline's when it is a probability."""
    return headline if headline in PROBABILITY_AGGREGATORS else "min"


def best_of_n(
    candidates: Sequence[Sequence[Any]],
    ns: Sequence[int] | None = None,
    seed: int = 0,
    *,
    aggregators: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    answer_key: Callable[[Any], str] | None = None,
    headline: str = "min",
) -> dict[str, Any]:
    """The Best-of-N report of ``candidates`` (per problem, a list of ``(step_scores, correct,
    final_answer)`` tuples, dicts or :class:`ScoredCandidate`).

    Returns ``{"num_problems", "ns", "seed", "epsilon", "aggregators", "ks", "max_candidates",
    "rows": [{"n", "accuracy": {aggregator: acc}, "random", "majority_vote", "oracle",
    "pass_at_k": {"k": acc}, "prm_ties": {aggregator: problems}, "prm_ties_decisive":
    {aggregator: problems}}], "headline": {"n",
    "aggregator", "accuracy"}, "best": {...}}``; accuracies are fractions in [0, 1].
    ``headline`` is the aggregator named before the results are seen (a setting), so the number
    to quote is not the best of eight tried on the test set; ``best`` is that best, for reference.
    """
    problems = [[_candidate(c) for c in cands] for cands in candidates]
    names = list(aggregators or AGGREGATORS)
    if headline not in names:
        raise KeyError(f"headline aggregator {headline!r} is not among {names}")
    for name in names:
        if name not in AGGREGATORS:
            raise KeyError(f"unknown aggregator {name!r}")
    max_candidates = max((len(p) for p in problems), default=0)
    ns = sorted(set(ns)) if ns else [n for n in (1, 2, 4, 8, 16) if n <= max(max_candidates, 1)]
    total = len(problems)
    voter = vote_aggregator(headline)
    vote_weight = lambda cand: max(aggregate(voter, cand.step_scores), 0.0)  # noqa: E731 - empty: -inf -> 0
    rows = []
    for n in ns:
        if n < 1:
            raise ValueError(f"N must be >= 1, got {n}")
        correct = dict.fromkeys(names, 0)
        ties = dict.fromkeys(names, 0)
        decisive_ties = dict.fromkeys(names, 0)
        random_sum = majority = weighted = oracle = 0.0
        pass_sums = {k: 0.0 for k in ks if k <= n}
        for index, cands in enumerate(problems):
            head = cands[:n]
            if not head:
                continue
            c = sum(cand.correct for cand in head)
            random_sum += c / len(head)
            oracle += c > 0
            for k in pass_sums:
                pass_sums[k] += pass_at_k(len(head), c, k)
            majority += majority_vote(head, answer_key)
            weighted += majority_vote(head, answer_key, vote_weight)
            for name in names:
                scores = [aggregate(name, cand.step_scores) for cand in head]
                top = max(scores)
                tied = [i for i, s in enumerate(scores) if s == top]
                if len(tied) > 1:
                    ties[name] += 1
                    decisive_ties[name] += len({head[i].correct for i in tied}) > 1
                    pick = random.Random(f"{seed}:{index}:{n}:{name}").choice(tied)
                else:
                    pick = tied[0]
                correct[name] += head[pick].correct
        denom = total or 1
        rows.append(
            {
                "n": n,
                "accuracy": {name: correct[name] / denom for name in names},
                "random": random_sum / denom,
                "majority_vote": majority / denom,
                "weighted_vote": weighted / denom,
                "oracle": oracle / denom,
                "pass_at_k": {str(k): v / denom for k, v in pass_sums.items()},
                "prm_ties": ties,
                "prm_ties_decisive": decisive_ties,
            }
        )
    best = top = None
    if rows:
        last = rows[-1]
        name = max(names, key=lambda a: last["accuracy"][a])
        best = {"n": last["n"], "aggregator": name, "accuracy": last["accuracy"][name]}
        top = {"n": last["n"], "aggregator": headline, "accuracy": last["accuracy"][headline]}
    return {
        "num_problems": total,
        "ns": list(ns),
        "seed": seed,
        "epsilon": EPSILON,
        "aggregators": names,
        "weighted_vote_aggregator": voter,
        "ks": list(ks),
        "max_candidates": max_candidates,
        "rows": rows,
        "headline": top,
        "best": best,
    }


def add_baseline(
    report: dict[str, Any], name: str, candidates: Sequence[Sequence[Any]], *, seed: int = 0
) -> dict[str, Any]:
    """Add another scorer's Best-of-N accuracy, under the report's headline aggregator, to each
    row as ``row["baselines"][name]`` (e.g. a base model's own step likelihood: how much of the
    PRM's pick was in the base already). ``candidates`` are laid out as for :func:`best_of_n`,
    with that scorer's step scores."""
    headline = report["headline"]["aggregator"]
    other = best_of_n(candidates, report["ns"], seed, aggregators=[headline], ks=(), headline=headline)
    for row, theirs in zip(report["rows"], other["rows"], strict=True):
        row.setdefault("baselines", {})[name] = theirs["accuracy"][headline]
    return report


# ------------------------------------------------------------------------------- ROC AUC


def stratified_auc(groups: dict[Any, tuple[Sequence[float], Sequence[float]]]) -> float | None:
    """ROC AUC over the (positive, negative) score pairs that share a group, ties counted half:
    P(a positive outscores a negative of its own group). Comparing only within groups (a step
    position, a problem kind) keeps a scorer that learnt the group alone from looking
    informative. None when no group has both."""
    wins = pairs = 0.0
    for positives, negatives in groups.values():
        ordered = sorted(negatives)
        for p in positives:
            below = bisect.bisect_left(ordered, p)
            equal = bisect.bisect_right(ordered, p) - below
            wins += below + 0.5 * equal
        pairs += len(positives) * len(negatives)
    return wins / pairs if pairs else None


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """P(score of a random positive > a random negative), ties counted half."""
    return stratified_auc({None: (positives, negatives)})


# ------------------------------------------------------------------------ first-error metrics


def prm_first_error(step_scores: Sequence[float], threshold: float = 0.5) -> int | None:
    """The PRM's predicted first error: the first step with score ``< threshold`` (or None)."""
    for i, p in enumerate(step_scores):
        if p < threshold:
            return i
    return None


def mc_first_error(mc_values: Sequence[float], threshold: float = 0.0) -> int | None:
    """The MC labels' first error: the first node with ``mc <= threshold`` (mc == 0 by default)."""
    for i, v in enumerate(mc_values):
        if v <= threshold:
            return i
    return None


def first_error_metrics(
    predicted_first_error: Sequence[int | None], true_first_error: Sequence[int | None]
) -> dict[str, float | int]:
    """Precision/recall/F1 of step-level first-error detection.

    One entry per solution: the index of its first erroneous step, or ``None`` for a solution
    without error (the prediction: e.g. :func:`prm_first_error` — first step with PRM score
    < 0.5 — or :func:`mc_first_error` — first node with mc == 0; the truth: e.g. the toy
    world's ``first_error_index``).  A prediction is the pair (solution, step index):

    * true positive: an error is predicted at exactly the true first-error step;
    * false positive: an error is predicted, but the solution has none or it is elsewhere;
    * false negative: the solution has an error that was not predicted at its step
      (no prediction, or a wrong index — so a wrong index counts as both FP and FN).

    ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)``, ``f1`` their harmonic mean
    (each 0.0 when its denominator is 0); ``accuracy`` is the share of solutions where the
    prediction equals the truth, ``None == None`` included.
    """
    if len(predicted_first_error) != len(true_first_error):
        raise ValueError("predicted and true first errors differ in length")
    tp = fp = fn = exact = 0
    for pred, true in zip(predicted_first_error, true_first_error, strict=True):
        exact += pred == true
        if pred is not None and pred == true:
            tp += 1
            continue
        if pred is not None:
            fp += 1
        if true is not None:
            fn += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    total = len(true_first_error)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": exact / total if total else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "solutions": total,
        "with_error": sum(t is not None for t in true_first_error),
    }


# ------------------------------------------------------------------- sampling and scoring


def _field(obj: Any, *names: str) -> Any:
    for name in names:
        if isinstance(obj, dict) and name in obj:
            return obj[name]
        if hasattr(obj, name):
            return getattr(obj, name)
    raise KeyError(f"problem has none of the fields {names}")


def sample_candidates(
    problems: Sequence[Any],
    policy: Any,
    verifier: Any,
    n: int,
    seed: int,
    *,
    batch_size: int = 16,
) -> list[list[dict[str, Any]]]:
    """``n`` candidate solutions per problem, verified.

    ``problems``: objects or dicts with ``question``, ``image`` (bytes) and the gold answer
    (``answer`` or ``correct_answer``).  Problems are sent ``batch_size`` at a time as
    ``GenerationRequest(question, image, (), n)`` with ``seed + batch index``.  Returns per
    problem a list of ``{"steps": rollout, "final_answer": rollout[-1] or None, "correct":
    bool}``.  A rollout with no tagged steps has no answer: it is wrong without asking the
    verifier (that is the policy's failure, not an infrastructure failure); verifier and policy
    errors propagate, and so does an answer the verifier could not judge (``None``: no judge is
    configured for answers the rules cannot read), since Best-of-N accuracy over candidates of
    unknown correctness would be a guess.
    """
    out: list[list[dict[str, Any]]] = []
    with track("candidates sampled", len(problems) * n, "candidates", rates=("problems",)) as progress:
        for b, start in enumerate(range(0, len(problems), batch_size)):
            chunk = problems[start : start + batch_size]
            out.extend(_sample_batch(chunk, start, policy, verifier, n, seed + b))
            progress.advance(n * len(chunk), problems=len(chunk))
    return out


def _sample_batch(chunk: Sequence[Any], start: int, policy: Any, verifier: Any, n: int, seed: int
                  ) -> list[list[dict[str, Any]]]:
    """:func:`sample_candidates` for the problems ``chunk`` (from index ``start``), one seed."""
    from mmprm_tasks.policy import GenerationRequest

    requests = [
        GenerationRequest(
            question=_field(p, "question"), image=_field(p, "image"), prefix_steps=(), n=n
        )
        for p in chunk
    ]
    rollouts = policy.generate(requests, seed=seed)
    if len(rollouts) != len(chunk):
        raise RuntimeError(f"policy returned {len(rollouts)} results for {len(chunk)} requests")
    pairs, where = [], []
    for i, (p, rs) in enumerate(zip(chunk, rollouts, strict=True)):
        gold = _field(p, "answer", "correct_answer")
        for j, r in enumerate(rs):
            if r:
                pairs.append((r[-1], gold))
                where.append((i, j))
    verdicts = verifier.check_many(pairs) if pairs else []
    results = [
        [{"steps": list(r), "final_answer": r[-1] if r else None, "correct": False} for r in rs]
        for rs in rollouts
    ]
    for (i, j), ok in zip(where, verdicts, strict=True):
        if ok is None:
            from mmprm_tasks.verify import VerificationError

            try:
                name = _field(chunk[i], "id")
            except KeyError:
                name = f"#{start + i}"
            raise VerificationError(
                f"problem {name}: candidate answer {results[i][j]['final_answer']!r} cannot be "
                f"checked against the gold {_field(chunk[i], 'answer', 'correct_answer')!r} by the "
                "rules and no judge is configured (verify.judge_base_url)"
            )
        results[i][j]["correct"] = ok
    return results


def score_candidates(
    scorer: Any, problems: Sequence[Any], candidates: Sequence[Sequence[dict[str, Any]]]
) -> list[list[dict[str, Any]]]:
    """Add ``step_scores`` (``scorer.score``, e.g. :class:`mmprm_tasks.prm.PRMScorer`) to each
    candidate; the result feeds :func:`best_of_n` directly."""
    if len(problems) != len(candidates):
        raise ValueError("one candidate list per problem is needed")
    scored = []
    with track(f"candidates scored ({getattr(scorer, 'name', type(scorer).__name__)})",
               sum(len(c) for c in candidates), "candidates") as progress:
        for problem, cands in zip(problems, candidates, strict=True):
            steps = [c["steps"] for c in cands]
            scores = scorer.score(_field(problem, "question"), _field(problem, "image"), steps)
            scored.append([{**c, "step_scores": list(s)} for c, s in zip(cands, scores, strict=True)])
            progress.advance(len(cands))
    return scored


# ------------------------------------------------------------------------------ presentation

_BASELINES = (
    ("random", "random pick"),
    ("majority_vote", "majority vote"),
    ("oracle", "oracle (pass@N)"),
)


def plot_report(report: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """A PNG of accuracy (%) against N for every aggregator and the baselines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["rows"]
    ns = [r["n"] for r in rows]
    fig = Figure(figsize=(7.5, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name in report["aggregators"]:
        ax.plot(ns, [100 * r["accuracy"][name] for r in rows], marker="o", label=f"PRM {name}")
    if rows and "weighted_vote" in rows[0]:
        ax.plot(ns, [100 * r["weighted_vote"] for r in rows], color="tab:purple", linestyle="-.", marker="s",
                label=f"PRM-weighted vote ({report['weighted_vote_aggregator']})")
    styles = {"random": ("k", "--"), "majority_vote": ("tab:gray", "-."), "oracle": ("k", ":")}
    for key, label in _BASELINES:
        color, style = styles[key]
        ax.plot(ns, [100 * r[key] for r in rows], color=color, linestyle=style, label=label)
    headline = (report.get("headline") or {}).get("aggregator")
    for name in rows[0].get("baselines", {}) if rows else ():
        ax.plot(ns, [100 * r["baselines"][name] for r in rows], color="tab:brown", linestyle=(0, (1, 1)),
                marker="x", label=f"{name} ({headline})")
    if len(ns) > 1 and min(ns) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("N (candidates per problem)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or f"Best-of-N ({report['num_problems']} problems)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def render_table(report: dict[str, Any]):
    """A ``rich.table.Table``: one row per method, one column per N, accuracy in %."""
    from rich.table import Table

    rows = report["rows"]
    mode = f"{report['label_mode']}-label PRM, " if report.get("label_mode") else ""
    table = Table(title=f"Best-of-N accuracy (%), {mode}{report['num_problems']} problems")
    table.add_column("method")
    for r in rows:
        table.add_column(f"N={r['n']}", justify="right")
    headline = (report.get("headline") or {}).get("aggregator")
    for name in report["aggregators"]:
        label = f"PRM {name}" + (" (headline)" if headline == name else "")
        table.add_row(label, *(f"{100 * r['accuracy'][name]:.2f}" for r in rows))
    if rows and "weighted_vote" in rows[0]:
        table.add_row(f"PRM-weighted vote ({report['weighted_vote_aggregator']})",
                      *(f"{100 * r['weighted_vote']:.2f}" for r in rows))
    for key, label in _BASELINES:
        table.add_row(label, *(f"{100 * r[key]:.2f}" for r in rows))
    for name in rows[0].get("baselines", {}) if rows else ():
        table.add_row(f"{name} ({headline})", *(f"{100 * r['baselines'][name]:.2f}" for r in rows))
    if headline and rows and "prm_ties" in rows[0]:
        # Ties are broken by a seeded random pick; how often that pick, not the PRM, chose.
        table.add_row(f"problems tied ({headline})", *(str(r["prm_ties"][headline]) for r in rows))
        if "prm_ties_decisive" in rows[0]:
            table.add_row(f"  tied right/wrong ({headline})",
                          *(str(r["prm_ties_decisive"][headline]) for r in rows))
    for k in report["ks"]:
        table.add_row(
            f"pass@{k}",
            *(
                f"{100 * r['pass_at_k'][str(k)]:.2f}" if str(k) in r["pass_at_k"] else "-"
                for r in rows
            ),
        )
    return table


def render_first_error_table(reports: dict[str, dict[str, Any]]):
    """A ``rich.table.Table`` of first-error detection against the toy ground truth: one row per
    PRM (keyed by label mode) and one for the MC labels they were trained on."""
    from rich.table import Table

    table = Table(title="First-error step detection vs ground truth (toy world)")
    for column in ("labels from", "precision", "recall", "F1", "solutions"):
        table.add_column(column, justify="left" if column == "labels from" else "right")

    def row(name: str, m: dict[str, Any]) -> None:
        table.add_row(name, *(f"{m[k]:.3f}" for k in ("precision", "recall", "f1")), str(m["solutions"]))

    mc = None
    for label_mode, report in reports.items():
        metrics = report.get("first_error")
        if metrics:
            row(f"{label_mode}-label PRM", metrics["prm"])
            mc = mc or metrics.get("mc_labels")
    if mc:
        row("MC labels (training paths)", mc)
    return table
