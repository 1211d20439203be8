"""From search trees to PRM training paths (SPEC §5).

Only trees whose root ``mc_value`` lies strictly between 0 and 1 are used.  A depth-first walk
from the root's children builds paths: each node appends its steps (each stripped, joined by a
blank line) followed by the separator ``<prm>`` and a blank line, and appends its ``mc_value``
to the path's label list.  A node with ``mc_value <= threshold`` ends a *negative* path there
(its subtree is not walked); a leaf with ``mc_value > threshold`` ends a *positive* path.

Where SPEC §5 is silent this module follows the original release's ``traverse.py``
(ModalMinds/MM-PRM, ``data_pipeline/traverse.py``):

* the stored ``process`` is the accumulated text ``.strip()``-ed, so it ends with ``<prm>``
  (no trailing blank line) and steps are glued to their separator (``"...step<prm>\\n\\nnext"``);
* de-duplication is by ``process`` text only, first occurrence (in DFS order) wins;
* de-duplication and balancing are done **per tree**: all negatives of a tree are kept and its
  positives are sampled down to its number of negatives (when it has fewer positives than
  negatives, all are kept);
* the root itself contributes no step and no label.

Step granularity (``label_granularity = "step"``, off by default): the release labels a node,
so a correct rollout's steps (one node, ``mc_value`` 1.0) share one ``<prm>`` after the last of
them, while the PRM is scored with a ``<prm>`` after every step.  On short solutions this leaves
the inner steps of every correct solution unlabelled (on the toy world the PRM learned "an
equation step is wrong" and scored every second equation ~0).  With "step", each step of a node
whose ``mc_value`` is above the threshold gets its own ``<prm>`` with the node's ``mc_value``:
every prefix inside such a node continues, through the node's remaining steps, into the
rollouts that gave the node its estimate (for a correct rollout, into that correct answer).  A
node at or below the threshold keeps its steps under one ``<prm>``: its error may be any of them.

Deliberate differences from the release (documented so the numbers can be compared):

* word counting uses ``str.split()`` on the process with the separators removed (the release
  uses ``split(' ')`` on the raw text, which counts ``"a\\n\\nb"`` as one word);
* sampling uses a ``random.Random`` seeded from ``(seed, tree id)`` instead of the global RNG,
  so a tree's paths do not depend on the order or the chunking in which trees are read.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmprm_tasks.settings import TraverseConfig

PRM_SEPARATOR = "<prm>"
STEP_JOINER = "\n\n"


def render_step_group(steps: Sequence[str]) -> str:
    """One node's text: its steps, each stripped, joined by a blank line, then ``<prm>\\n\\n``."""
    return STEP_JOINER.join(s.strip() for s in steps) + PRM_SEPARATOR + STEP_JOINER


def render_process(step_groups: Sequence[Sequence[str]]) -> str:
    """The ``process`` text of a path whose nodes hold ``step_groups`` (one ``<prm>`` per group).

    Used both here (training paths) and by :class:`mmprm_tasks.prm.PRMScorer` (one group per
    step of a candidate), so training and scoring see the same layout.
    """
    return "".join(render_step_group(g) for g in step_groups).strip()


def process_words(process: str) -> int:
    """Whitespace-separated words of a process text, separators not counted."""
    return len(process.replace(PRM_SEPARATOR, " ").split())


def hard_label(mc_value: float, threshold: float = 0.0) -> float:
    """The hard-label variant (SPEC §6): 1.0 if ``mc_value > threshold`` else 0.0."""
    return 1.0 if mc_value > threshold else 0.0


def relative_labels(mc_values: Sequence[float], root_mc: float) -> list[float]:
    """Each label divided by the one before it (the root's MC value before the first), at most 1:
    how much of its prefix's chance of ending right a step keeps.  Every prefix before a path's
    last node has an MC value above the threshold (0 by default), so no division is by zero; a
    parent at 0 gives 0."""
    out, before = [], root_mc
    for value in mc_values:
        out.append(min(1.0, value / before) if before > 0 else 0.0)
        before = value
    return out


@dataclass
class PathSet:
    """Training paths and what happened on the way.

    ``paths``: records ``{question, answer, image_path, process, labels, mc_values, tree_id,
    polarity}``; ``labels`` are the training targets (soft MC values, or relative ones with
    ``label_values == "relative"``, or hard 0/1 when ``label_mode == "hard"``) and
    ``mc_values`` always holds the nodes' MC values.

    ``counts``: ``trees_seen``, ``trees_used`` (root mc strictly inside (0, 1)),
    ``trees_skipped_root_mc``, ``positives``/``negatives`` (kept),
    ``positives_found``/``negatives_found`` (before dedupe and balancing, after the length
    filter), ``dropped_short``, ``duplicates``, ``positives_dropped_by_balance``, ``paths``,
    ``labels`` (one per ``<prm>``).
    """

    paths: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    label_mode: str = "soft"

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self):
        return iter(self.paths)


def _tree_paths(
    tree: dict[str, Any], cfg: TraverseConfig, counts: dict[str, int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Positive and negative paths of one tree, length-filtered (not yet deduped/balanced)."""
    positives: list[dict[str, Any]] = []
    negatives: list[dict[str, Any]] = []
    base = {
        "question": tree["question"],
        "answer": tree.get("answer"),
        "image_path": tree.get("image_path"),
    }
    threshold = cfg.mc_threshold

    def emit(prefix: str, mcs: list[float], target: list[dict[str, Any]]) -> None:
        process = prefix.strip()
        if process_words(process) <= cfg.min_words:
            counts["dropped_short"] += 1
            return
        target.append({**base, "process": process, "mc_values": list(mcs)})

    # Iterative DFS (trees can be deep); children are visited in stored order, as the
    # release's recursive walk does.
    stack: list[tuple[dict[str, Any], str, list[float]]] = [
        (child, "", []) for child in reversed(tree.get("children") or [])
    ]
    while stack:
        node, prefix, mcs = stack.pop()
        steps = node.get("partial_solution") or []
        mc = float(node["mc_value"])
        if cfg.label_granularity == "step" and mc > threshold and len(steps) > 1:
            prefix = prefix + "".join(render_step_group([s]) for s in steps)
            mcs = mcs + [mc] * len(steps)
        else:
            prefix = prefix + render_step_group(steps)
            mcs = mcs + [mc]
        if mc <= threshold:
            emit(prefix, mcs, negatives)
            continue
        children = node.get("children") or []
        if children:
            stack.extend((child, prefix, mcs) for child in reversed(children))
        else:
            emit(prefix, mcs, positives)
    return positives, negatives


def _dedupe(paths: list[dict[str, Any]], counts: dict[str, int]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for p in paths:
        if p["process"] in seen:
            counts["duplicates"] += 1
            continue
        seen[p["process"]] = p
    return list(seen.values())


COUNT_NAMES = (
    "trees_seen",
    "trees_used",
    "trees_skipped_root_mc",
    "positives_found",
    "negatives_found",
    "dropped_short",
    "duplicates",
    "positives_dropped_by_balance",
    "positives",
    "negatives",
    "paths",
    "labels",
)


def iter_paths(
    trees: Iterable[dict[str, Any]], cfg: TraverseConfig, seed: int, counts: dict[str, int]
) -> Iterator[dict[str, Any]]:
    """Training paths of ``trees``, tree by tree, as the trees are read (memory does not grow with
    the number of trees); ``counts`` (keys :data:`COUNT_NAMES`) is updated as it goes.

    Deterministic for a given ``seed``: the positives kept for a tree depend only on the seed,
    the tree's ``id`` and its content.
    """
    for name in COUNT_NAMES:
        counts.setdefault(name, 0)
    for index, tree in enumerate(trees):
        counts["trees_seen"] += 1
        root_mc = float(tree["mc_value"])
        if not 0.0 < root_mc < 1.0:
            counts["trees_skipped_root_mc"] += 1
            continue
        counts["trees_used"] += 1
        positives, negatives = _tree_paths(tree, cfg, counts)
        counts["positives_found"] += len(positives)
        counts["negatives_found"] += len(negatives)
        negatives = _dedupe(negatives, counts)
        positives = _dedupe(positives, counts)
        tree_id = tree.get("id", index)
        if cfg.balance and len(positives) > len(negatives):
            rng = random.Random(f"{seed}:{tree_id}")
            kept = sorted(rng.sample(range(len(positives)), len(negatives)))
            counts["positives_dropped_by_balance"] += len(positives) - len(kept)
            positives = [positives[i] for i in kept]
        counts["negatives"] += len(negatives)
        counts["positives"] += len(positives)
        for polarity, group in (("negative", negatives), ("positive", positives)):
            for p in group:
                values = (relative_labels(p["mc_values"], root_mc) if cfg.label_values == "relative"
                          else list(p["mc_values"]))
                labels = [hard_label(v, cfg.mc_threshold) for v in values] if cfg.label_mode == "hard" else values
                counts["paths"] += 1
                counts["labels"] += len(labels)
                yield {**p, "labels": labels, "tree_id": tree_id, "polarity": polarity}


def build_paths(trees: Iterable[dict[str, Any]], cfg: TraverseConfig, seed: int) -> PathSet:
    """All training paths of ``trees`` in memory (see :func:`iter_paths`)."""
    counts: dict[str, int] = {}
    paths = list(iter_paths(trees, cfg, seed, counts))
    return PathSet(paths=paths, counts=counts, label_mode=cfg.label_mode)
