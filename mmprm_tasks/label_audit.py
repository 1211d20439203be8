"""How right a dataset's step labels are: each label against the toy world's ground truth, or
against the step judge where consensus filtering ran and no ground truth is known.

Monte Carlo labels are estimates, and they go wrong in known ways (issue 23): a wrong step that
rollouts can still recover from gets a positive label, a right step after which every rollout
fails by chance gets 0, and on the toy world answer steps are labelled 1 every time.  The audit
measures this per dataset, per *step kind*, so a label recipe (soft/hard, relative, consensus) is
judged by numbers rather than by the PRM trained on it.

Each ``<prm>`` of a path labels the prefix that ends with its group's last step.  The *truth* of
that prefix is "right" when no step of it is wrong:

* **ground truth** (toy problems, ``seed_problems.extra['gt_steps']``): the prefix's first wrong
  step by :func:`mmprm_tasks.toy.labels.prefix_first_error`, its kind by
  :func:`mmprm_tasks.toy.world.error_kind`;
* **judge** (paths with ``judge_scores``, one per step): a step scored below the judge threshold
  (``traverse.consensus_threshold``) is wrong.  Consensus filtering keeps only paths where the
  judge and the MC labels put the first error in the same group, so there the first-error
  agreement is 1 by construction and the per-step table is what says something.

A label *says right* when it is above ``mc_threshold`` (the hard reading, SPEC §6).  The step
kind is that of the group's last step: ``reading`` (the first step; on the toy world it reads the
image), ``equation`` and ``answer``; with ground truth by position (before the answer's position:
an equation step; at or past it: the answer), without by shape (an ``x op y = z`` step is an
equation, the last step of a positive path is its answer, anything else is ``other``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from .consensus import judge_first_error, mc_first_error, step_groups
from .db import get_engine
from .settings import Settings, TraverseConfig
from .storage import open_store
from .toy.labels import prefix_first_error
from .toy.world import _step_signature, error_kind

STEP_KINDS = ("reading", "equation", "answer", "other")
GROUND_TRUTH = "ground_truth"
JUDGE = "judge"
# How a path's first error by its labels relates to its true (or judged) first error.
FIRST_ERROR_OUTCOMES = ("agree", "labels_earlier", "labels_later", "labels_missed", "labels_spurious")


def label_audit_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/label_audit.json"


def step_kind(position: int, step: str, gt_steps: Sequence[str] | None, ends_positive_path: bool) -> str:
    """The kind of the step at ``position`` of a path (see the module docstring)."""
    if position == 0:
        return "reading"
    if gt_steps is not None:
        return "answer" if position >= len(gt_steps) - 1 else "equation"
    if _step_signature(step)[0] == "eq":
        return "equation"
    return "answer" if ends_positive_path else "other"


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


@dataclass
class LabelTally:
    """Labels of some prefixes, read hard (above the threshold: says right), against the truth
    where it is known (``right`` None: unknown, counted in the distribution only)."""

    labels: int = 0
    labelled_right: int = 0
    label_sum: float = 0.0
    right_labelled_right: int = 0
    right_labelled_wrong: int = 0
    wrong_labelled_right: int = 0
    wrong_labelled_wrong: int = 0
    right_label_sum: float = 0.0
    wrong_label_sum: float = 0.0

    def add(self, label: float, says_right: bool, right: bool | None) -> None:
        self.labels += 1
        self.labelled_right += says_right
        self.label_sum += label
        if right is True:
            self.right_labelled_right += says_right
            self.right_labelled_wrong += not says_right
            self.right_label_sum += label
        elif right is False:
            self.wrong_labelled_right += says_right
            self.wrong_labelled_wrong += not says_right
            self.wrong_label_sum += label

    def distribution(self) -> dict[str, Any]:
        return {"labels": self.labels, "labelled_right": self.labelled_right,
                "labelled_wrong": self.labels - self.labelled_right,
                "mean_label": _ratio(self.label_sum, self.labels)}

    def against_truth(self) -> dict[str, Any]:
        """Confusion counts, agreement, precision and recall of "the label says wrong", and the
        mean soft label of right and of wrong prefixes (None where nothing was counted)."""
        right = self.right_labelled_right + self.right_labelled_wrong
        wrong = self.wrong_labelled_right + self.wrong_labelled_wrong
        said_wrong = self.right_labelled_wrong + self.wrong_labelled_wrong
        return {"labels": right + wrong, "right": right, "wrong": wrong,
                "right_labelled_right": self.right_labelled_right, "right_labelled_wrong": self.right_labelled_wrong,
                "wrong_labelled_right": self.wrong_labelled_right, "wrong_labelled_wrong": self.wrong_labelled_wrong,
                "agreement": _ratio(self.right_labelled_right + self.wrong_labelled_wrong, right + wrong),
                "precision_wrong": _ratio(self.wrong_labelled_wrong, said_wrong),
                "recall_wrong": _ratio(self.wrong_labelled_wrong, wrong),
                "mean_label_right": _ratio(self.right_label_sum, right),
                "mean_label_wrong": _ratio(self.wrong_label_sum, wrong)}


@dataclass
class _Reference:
    """The audit against one reference (ground truth or judge)."""

    paths: int = 0
    all: LabelTally = field(default_factory=LabelTally)
    by_step_kind: dict[str, LabelTally] = field(default_factory=dict)
    by_error_kind: dict[str, LabelTally] = field(default_factory=dict)
    first_error: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FIRST_ERROR_OUTCOMES, 0))

    def as_dict(self, with_error_kinds: bool) -> dict[str, Any]:
        out = {"paths": self.paths, "all": self.all.against_truth(),
               "by_step_kind": {k: self.by_step_kind[k].against_truth() for k in STEP_KINDS if k in self.by_step_kind},
               "first_error": {**self.first_error, "agreement": _ratio(self.first_error["agree"], self.paths)}}
        if with_error_kinds:
            out["by_error_kind"] = {k: t.against_truth() for k, t in sorted(self.by_error_kind.items())}
        return out


def _first_error_outcome(by_labels: int | None, truth: int | None) -> str:
    if by_labels == truth:
        return "agree"
    if by_labels is None:
        return "labels_missed"
    if truth is None:
        return "labels_spurious"
    return "labels_earlier" if by_labels < truth else "labels_later"


def audit_labels(paths: Iterable[Mapping[str, Any]], gt_steps_by_problem: Mapping[str, Sequence[str]], *,
                 mc_threshold: float = 0.0, judge_threshold: float | None = None) -> dict[str, Any]:
    """The label audit of a dataset's paths (records of :mod:`mmprm_tasks.traverse`).

    A path is audited against the ground truth of its problem (``tree_id``) where
    ``gt_steps_by_problem`` has it, else against its ``judge_scores`` where it has them and a
    ``judge_threshold`` is given, else only counted in the label distribution.  See the module
    docstring for what is measured.
    """
    distribution, distribution_by_kind = LabelTally(), {}
    references = {GROUND_TRUTH: _Reference(), JUDGE: _Reference()}
    total_paths = unaudited = 0
    for n, path in enumerate(paths):
        total_paths += 1
        groups, labels = step_groups(path["process"]), list(path["labels"])
        if len(groups) != len(labels):
            raise ValueError(f"path {n} of tree {path.get('tree_id')!r}: {len(groups)} <prm> groups for "
                             f"{len(labels)} labels")
        steps = [s for g in groups for s in g]
        group_ends = [sum(map(len, groups[: g + 1])) - 1 for g in range(len(groups))]
        gt_steps = gt_steps_by_problem.get(str(path.get("tree_id")))
        first_wrong_kind = None
        if gt_steps is not None:
            reference = references[GROUND_TRUTH]
            first_wrong_step = prefix_first_error(gt_steps, steps)
            truth = None if first_wrong_step is None else next(
                g for g, end in enumerate(group_ends) if end >= first_wrong_step)
            if first_wrong_step is not None:
                first_wrong_kind = error_kind(gt_steps, steps, first_wrong_step)
        elif path.get("judge_scores") is not None and judge_threshold is not None:
            reference = references[JUDGE]
            if len(path["judge_scores"]) != len(steps):
                raise ValueError(f"path {n} of tree {path.get('tree_id')!r}: {len(path['judge_scores'])} judge "
                                 f"scores for {len(steps)} steps")
            truth = judge_first_error(groups, path["judge_scores"], judge_threshold)
        else:
            reference, truth = None, None
            unaudited += 1
        ends_positive = path.get("polarity") == "positive"
        for g, (label, end) in enumerate(zip(labels, group_ends)):
            # a group with no step (a node with an empty partial solution) ends where the one
            # before it ended; before any step it stands at the first position
            kind = step_kind(max(end, 0), steps[end] if end >= 0 else "", gt_steps,
                             ends_positive and g == len(groups) - 1)
            says_right = label > mc_threshold
            right = None if reference is None else truth is None or g < truth
            distribution.add(label, says_right, None)
            distribution_by_kind.setdefault(kind, LabelTally()).add(label, says_right, None)
            if reference is None:
                continue
            reference.all.add(label, says_right, right)
            reference.by_step_kind.setdefault(kind, LabelTally()).add(label, says_right, right)
            if not right and first_wrong_kind is not None:
                reference.by_error_kind.setdefault(first_wrong_kind, LabelTally()).add(label, says_right, right)
        if reference is not None:
            reference.paths += 1
            reference.first_error[_first_error_outcome(mc_first_error(labels, mc_threshold), truth)] += 1
    report = {
        "paths": total_paths, "labels": distribution.labels, "mc_threshold": mc_threshold,
        "judge_threshold": judge_threshold,
        "label_distribution": {"all": distribution.distribution(),
                               "by_step_kind": {k: distribution_by_kind[k].distribution()
                                                for k in STEP_KINDS if k in distribution_by_kind}},
        GROUND_TRUTH: references[GROUND_TRUTH].as_dict(True) if references[GROUND_TRUTH].paths else None,
        JUDGE: references[JUDGE].as_dict(False) if references[JUDGE].paths else None,
        "unaudited_paths": unaudited,
    }
    report["summary"] = summary_lines(report)
    return report


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """The audit in words: what each reference says, and plainly when there is none."""
    lines = [f"{report['labels']} labels on {report['paths']} paths"]
    names = {GROUND_TRUTH: "the toy world's ground truth", JUDGE: "the step judge"}
    for name, words in names.items():
        table = report.get(name)
        if not table:
            continue
        a, fe = table["all"], table["first_error"]
        lines.append(f"against {words} ({table['paths']} paths): label agreement {_fmt(a['agreement'])}, "
                     f"'label says wrong' precision {_fmt(a['precision_wrong'])} recall {_fmt(a['recall_wrong'])}, "
                     f"mean label {_fmt(a['mean_label_right'])} on right and {_fmt(a['mean_label_wrong'])} on "
                     f"wrong prefixes; first error agrees on {fe['agree']} of {table['paths']} paths")
    if report.get(JUDGE):
        lines.append("judge scores exist only on paths consensus filtering kept, where the judge and the labels "
                     "agree on the first error by construction: read the per-step table")
    if not report.get(GROUND_TRUTH) and not report.get(JUDGE):
        lines.append("no ground truth and no judge scores for this dataset: label distribution only")
    elif report["unaudited_paths"]:
        lines.append(f"{report['unaudited_paths']} paths have neither ground truth nor judge scores "
                     "(label distribution only)")
    return lines


# ---------------------------------------------------------------------------------------------
# A dataset version's audit in the store and the step index


def ground_truth_steps(conn: sa.Connection, problem_ids: Sequence[str]) -> dict[str, list[str]]:
    """The ground-truth steps of the problems that have them (the toy world's seeds)."""
    return dict(conn.execute(sa.text(
        "SELECT problem_id, extra -> 'gt_steps' FROM seed_problems"
        " WHERE problem_id = ANY(:ids) AND extra ? 'gt_steps'"), {"ids": list(problem_ids)}).all())


def write_label_audit(settings: Settings, dataset_id: str, paths: Iterable[Mapping[str, Any]],
                      problem_ids: Sequence[str], traverse: TraverseConfig) -> str:
    """Audit a dataset version's paths (read as they come: the dataset stage streams them from
    its spool file) and store the report beside them; returns its key.  ``problem_ids``: the
    problems behind the paths, whose ground truth is looked up."""
    with get_engine(settings).connect() as conn:
        gt = ground_truth_steps(conn, problem_ids)
    judged = traverse.consensus_judge != "none"
    report = {"dataset_id": dataset_id, **audit_labels(
        paths, gt, mc_threshold=traverse.mc_threshold,
        judge_threshold=traverse.consensus_threshold if judged else None)}
    key = label_audit_key(dataset_id)
    open_store(settings).put_bytes(key, json.dumps(report, indent=1).encode(), "application/json")
    return key


def dataset_label_audit(settings: Settings, dataset_id: str) -> dict[str, Any]:
    """A dataset version's label audit; computed, stored and recorded on its row when missing
    (datasets made before the audit existed), with the thresholds the dataset was made with."""
    store = open_store(settings)
    engine = get_engine(settings)
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT paths_key, params, label_audit_key FROM datasets WHERE dataset_id = :d"),
                           {"d": dataset_id}).one_or_none()
    if row is None:
        raise LookupError(f"no dataset {dataset_id!r} in the step index (run traverse first)")
    if row.label_audit_key and store.exists(row.label_audit_key):
        return store.get_json(row.label_audit_key)
    paths = store.get_jsonl(row.paths_key)
    key = write_label_audit(settings, dataset_id, paths, sorted({str(p.get("tree_id")) for p in paths}),
                            TraverseConfig(**row.params.get("traverse", {})))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE datasets SET label_audit_key = :k WHERE dataset_id = :d"),
                     {"k": key, "d": dataset_id})
    return store.get_json(key)


def render_audit(report: Mapping[str, Any]) -> list[Any]:
    """``rich`` tables of a label audit, narrow enough for a terminal: per reference, one column
    per step kind (rows: the measures) and the wrong prefixes by the kind of their first error;
    then the label distribution and the summary lines."""
    from rich.table import Table

    def table(title: str, first: str, headers: Sequence[str]) -> Table:
        t = Table(title=title)
        t.add_column(first)
        for header in headers:
            t.add_column(header, justify="right")
        return t

    def cell(value: float | int | None) -> str:
        return str(value) if isinstance(value, int) else _fmt(value)

    measures = [("labels", "labels"), ("right", "right prefixes"), ("wrong", "wrong prefixes"),
                ("right_labelled_wrong", "right, labelled wrong"), ("wrong_labelled_right", "wrong, labelled right"),
                ("agreement", "agreement"), ("precision_wrong", "precision of 'wrong'"),
                ("recall_wrong", "recall of 'wrong'"), ("mean_label_right", "mean label, right"),
                ("mean_label_wrong", "mean label, wrong")]
    out: list[Any] = []
    for name, title in ((GROUND_TRUTH, "labels vs ground truth"), (JUDGE, "labels vs judge")):
        found = report.get(name)
        if not found:
            continue
        columns = {**found["by_step_kind"], "all": found["all"]}
        by_kind = table(f"{title}, {found['paths']} paths (a label says right when > {report['mc_threshold']:g})",
                        "by step kind", list(columns))
        for key, label in measures:
            by_kind.add_row(label, *(cell(counts[key]) for counts in columns.values()))
        out.append(by_kind)
        if found.get("by_error_kind"):
            errors = table("wrong prefixes by their first error", "error kind",
                           ["prefixes", "labelled wrong", "labelled right", "mean label"])
            for kind, counts in found["by_error_kind"].items():
                errors.add_row(kind, *(cell(counts[k]) for k in ("wrong", "wrong_labelled_wrong",
                                                                  "wrong_labelled_right", "mean_label_wrong")))
            out.append(errors)
        fe = found["first_error"]
        out.append("first error per path: " + ", ".join(f"{k} {fe[k]}" for k in FIRST_ERROR_OUTCOMES)
                   + f" (agreement {_fmt(fe['agreement'])})")
    dist = table("label distribution", "step kind", ["labels", "labelled right", "labelled wrong", "mean label"])
    distribution = report["label_distribution"]
    for kind, d in [*distribution["by_step_kind"].items(), ("all", distribution["all"])]:
        dist.add_row(kind, *(cell(d[k]) for k in ("labels", "labelled_right", "labelled_wrong", "mean_label")))
    out.append(dist)
    out.extend(report["summary"])
    return out
