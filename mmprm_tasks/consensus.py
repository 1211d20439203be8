"""Consensus filtering of training paths: keep a path only where its Monte Carlo labels and a
step judge agree on where its first error is.

This is the recipe of "The Lessons of Developing Process Reward Models in Mathematical
Reasoning" (Zhang et al., 2025): MC estimation alone labels a wrong step positive whenever
rollouts can still recover from it, and labels a whole rollout segment negative where only one of
its steps is wrong; a judge that reads the steps disagrees exactly on those paths, and dropping
them leaves fewer but cleaner labels.

A *path* (a record of :mod:`mmprm_tasks.traverse`) holds step groups, one ``<prm>`` each, with an
MC value per group.  Its MC first error is the first group at or below the threshold (negative
paths: the last group; positive paths: none).  The judge scores every *step* (a probability that
the step is right given the ones before it); its first error is the group holding the first step
scored below ``judge_threshold``.  The path is kept when both say the same group, or both say none.

A negative path's last group is one search node: a rollout segment of several steps under one
``<prm>``, MC 0 because one of them is wrong.  The PRM is scored with a ``<prm>`` after every step,
so with ``end_at_judged_step`` a kept negative path is cut where the judge puts the error: the
group's steps before it each get their own ``<prm>`` with the label of the group before (the
last MC estimate of that prefix), the judged step gets the group's label, and the steps after it
are dropped (a negative path ends at its first error, as the traversal's negatives do).

Judges: any object with ``score_many([(question, image, steps), ...]) -> [[p per step], ...]``.
On the toy world the judge is the PRM's foundation model itself, read as a generative verifier
(:class:`mmprm_tasks.prm.StepLikelihoodScorer`: the probability of the step's tokens), which picks
the right candidate at Best-of-8 far more often than majority vote does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mmprm_tasks.traverse import PRM_SEPARATOR, STEP_JOINER, render_process


class StepJudge(Protocol):
    def score_many(self, items: Sequence[tuple[str, Any, Sequence[str]]]) -> list[list[float]]: ...


def step_groups(process: str) -> list[list[str]]:
    """The steps under each ``<prm>`` of a path's process text (traverse.render_process's layout)."""
    return [[s.strip() for s in group.split(STEP_JOINER) if s.strip()]
            for group in process.split(PRM_SEPARATOR)[:-1]]


def mc_first_error(mc_values: Sequence[float], threshold: float = 0.0) -> int | None:
    """The first group whose MC value is at or below ``threshold``; None if none."""
    return next((i for i, v in enumerate(mc_values) if v <= threshold), None)


def judge_first_error(groups: Sequence[Sequence[str]], step_scores: Sequence[float],
                      judge_threshold: float) -> int | None:
    """The group holding the first step the judge scores below ``judge_threshold``; None if none."""
    step = 0
    for index, group in enumerate(groups):
        for _ in group:
            if step_scores[step] < judge_threshold:
                return index
            step += 1
    return None


@dataclass
class ConsensusResult:
    kept: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def end_at_judged_step(path: dict[str, Any], groups: Sequence[Sequence[str]], step_scores: Sequence[float],
                       judge_threshold: float) -> dict[str, Any]:
    """A kept negative path cut at the judge's first wrong step (see the module docstring); a path
    whose error group is its first is left as it is (no label before it to give its steps)."""
    last = len(groups) - 1
    if last == 0:
        return path
    first_step = sum(len(g) for g in groups[:last])
    wrong = next(i for i, s in enumerate(step_scores[first_step:]) if s < judge_threshold)
    new_groups = [list(g) for g in groups[:last]] + [[s] for s in groups[last][: wrong + 1]]
    before = path["labels"][last - 1], path["mc_values"][last - 1]
    cut = {"process": render_process(new_groups),
           "labels": list(path["labels"][:last]) + [before[0]] * wrong + [path["labels"][last]],
           "mc_values": list(path["mc_values"][:last]) + [before[1]] * wrong + [path["mc_values"][last]],
           "judge_scores": list(step_scores[: first_step + wrong + 1])}
    return {**path, **cut}


def consensus_filter(paths: Sequence[dict[str, Any]], judge: StepJudge, judge_threshold: float,
                     image_of: Callable[[dict[str, Any]], Any], *, mc_threshold: float = 0.0,
                     cut_negatives: bool = False) -> ConsensusResult:
    """The paths whose MC first error and judge first error agree (see the module docstring);
    ``image_of(path)`` gives a path's image for the judge.

    Each kept path gains ``judge_scores`` (per step). ``counts``: ``paths``, ``kept``, and the
    disagreements by kind: ``judge_earlier`` (the judge finds an error before the MC one, or in a
    positive path), ``judge_later`` (its first error lies after the MC one), ``judge_none`` (it
    finds no error in a negative path).
    """
    items, groups_of = [], []
    for p in paths:
        groups = step_groups(p["process"])
        if len(groups) != len(p["mc_values"]):
            raise ValueError(f"path of tree {p.get('tree_id')!r}: {len(groups)} <prm> groups for "
                             f"{len(p['mc_values'])} mc_values")
        groups_of.append(groups)
        items.append((p["question"], image_of(p), [s for g in groups for s in g]))
    scores = judge.score_many(items)
    result = ConsensusResult(counts={"paths": len(paths), "kept": 0, "judge_earlier": 0, "judge_later": 0,
                                     "judge_none": 0})
    for p, groups, step_scores in zip(paths, groups_of, scores, strict=True):
        mc_at = mc_first_error(p["mc_values"], mc_threshold)
        judge_at = judge_first_error(groups, step_scores, judge_threshold)
        if mc_at == judge_at:
            kept = {**p, "judge_scores": step_scores}
            if cut_negatives and mc_at is not None:
                kept = end_at_judged_step(kept, groups, step_scores, judge_threshold)
            result.kept.append(kept)
            result.counts["kept"] += 1
        elif judge_at is None:
            result.counts["judge_none"] += 1
        elif mc_at is None or judge_at < mc_at:
            result.counts["judge_earlier"] += 1
        else:
            result.counts["judge_later"] += 1
    return result
