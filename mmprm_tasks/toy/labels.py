"""Scoring MC step labels against the toy world's ground truth.

The generator knows every problem's correct step list, so for any annotated tree we can say
whether a node's prefix already contains a wrong step, and so whether the MC labels (mc == 0
marks an unrecoverable prefix) put the first error where it really is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .world import _step_signature, is_correct_answer


def prefix_first_error(gt_steps: Sequence[str], prefix: Sequence[str]) -> int | None:
    """Index of the first wrong step of a (possibly partial) solution prefix; None if none yet.

    Positions before the ground truth's answer are reasoning steps compared by what they state;
    the step at the answer's position must state the right answer; anything past it is wrong.
    """
    answer_at = len(gt_steps) - 1
    for i, step in enumerate(prefix):
        if i < answer_at:
            if _step_signature(step) != _step_signature(gt_steps[i]):
                return i
        elif i == answer_at:
            if not is_correct_answer(gt_steps, [step]):
                return i
        else:
            return i
    return None


def tree_paths(tree: dict[str, Any], threshold: float = 0.0) -> Iterator[tuple[list[str], int | None]]:
    """Every root-to-end path of a SPEC §4 tree (as the traversal walks it): the path's steps and
    the index of the last step of the first node with ``mc <= threshold`` (None if no such node)."""

    def walk(node: dict[str, Any], steps: list[str]) -> Iterator[tuple[list[str], int | None]]:
        steps = steps + list(node.get("partial_solution", []))
        if node["mc_value"] <= threshold:
            yield steps, len(steps) - 1
            return
        if not node["children"]:
            yield steps, None
            return
        for child in node["children"]:
            yield from walk(child, steps)

    for child in tree["children"]:
        yield from walk(child, [])


def mc_first_error_pairs(tree: dict[str, Any], gt_steps: Sequence[str]) -> tuple[list[int | None], list[int | None]]:
    """(predicted, true) first-error indices over the tree's paths, for
    :func:`mmprm_tasks.evaluate.first_error_metrics`."""
    predicted, truth = [], []
    for steps, first_mc_zero in tree_paths(tree):
        predicted.append(first_mc_zero)
        truth.append(prefix_first_error(gt_steps, steps))
    return predicted, truth
