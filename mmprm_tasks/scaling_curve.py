"""The measured curve of PRM quality against annotated paths, and where a PRM stands on it.

The curve is the JSON report of ``bench/bench_toy_scaling.py`` (``--out X.json``): PRMs trained
from the toy foundation on nested subsets of Monte Carlo labelled paths (and on the same paths'
ground-truth labels), each scored by Best-of-N on the same held-out candidates.  The package ships
one such report, a real bench run, at ``mmprm_tasks/toy/scaling_curve.json`` (the setting
``scaling_curve``, ``MMPRM_SCALING_CURVE``); without it there is no curve and the callers say so.

The report's fields used here: ``points`` (``{"paths", "labels" ("mc" | "mc-hard" | "truth" |
"base"), "min", "weighted_vote", "random", "majority_vote", "oracle", ...}``, accuracies as
fractions), ``n`` (Best-of-N's N), ``seed``, ``consensus_threshold`` (None: no consensus
filtering), and optionally ``cut_negatives``, ``label_values`` and ``demo_paths``.

Used by the demo's report (``mmprm_tasks.cli.where_the_demo_stands``), the annotation browser's
evaluation page (``mmprm_tasks.browser.data.evaluation_standing``, image
``/evaluations/{id}/curve.png``) and the bench's own plot (``bench/bench_toy_scaling.py``).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from .settings import SCALING_CURVE_FILE

DEFAULT = SCALING_CURVE_FILE
METRICS = ("min", "weighted_vote", "random", "majority_vote", "oracle")
# The label sets the plot draws, each in its colour (a "base" point is the untrained base, at 0 paths).
COLORS = {"mc": "tab:blue", "mc-hard": "tab:purple", "truth": "tab:green"}


def load_curve(path: str | Path = DEFAULT) -> dict[str, Any] | None:
    """The curve report at ``path``; None when there is no such file.  A file that is not a
    curve report (no ``points`` list, no ``n``) is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    curve = json.loads(path.read_text())
    if not isinstance(curve, dict) or not isinstance(curve.get("points"), list) or "n" not in curve:
        raise ValueError(f"{path} is not a bench_toy_scaling report (no 'points' list or no 'n')")
    return curve


def _series(curve: dict[str, Any], labels: str) -> list[dict[str, Any]]:
    points = sorted((p for p in curve["points"] if p.get("labels") == labels and p.get("paths", 0) > 0),
                    key=lambda p: p["paths"])
    if not points:
        raise ValueError(f"the curve has no points with {labels!r} labels")
    return points


def curve_at(curve: dict[str, Any], paths: float, labels: str = "mc") -> dict[str, Any]:
    """The curve's accuracies at ``paths`` training paths, for one label set.

    Linear in log(paths) between the two measured points around it; outside the measured range
    the nearest end's values (``clamped`` True, ``at`` the end's paths).  Returns ``{"paths":
    asked, "at": where the values are read, "clamped", "measured": [fewest, most paths],
    "labels", "n", "min", "weighted_vote", "random", "majority_vote", "oracle"}`` (fractions).
    """
    series = _series(curve, labels)
    lo, hi = series[0]["paths"], series[-1]["paths"]
    at = min(max(paths, lo), hi) if paths > 0 else lo
    values: dict[str, float] = {}
    for left, right in zip(series, series[1:] + series[-1:]):
        if left["paths"] <= at <= right["paths"]:
            span = math.log(right["paths"]) - math.log(left["paths"])
            t = (math.log(at) - math.log(left["paths"])) / span if span > 0 else 0.0
            values = {k: left[k] + t * (right[k] - left[k]) for k in METRICS if k in left and k in right}
            break
    return {"paths": paths, "at": at, "clamped": at != paths, "measured": [lo, hi], "labels": labels,
            "n": curve["n"], **values}


def describe(curve: dict[str, Any]) -> str:
    """What the curve was measured on, in words: ``seed 7, consensus judge < 0.2, Best-of-8``."""
    threshold = curve.get("consensus_threshold")
    if threshold is None:
        consensus = "no consensus filtering"
    else:
        consensus = f"consensus-filtered, judge < {threshold:g}" + (", negatives cut" if curve.get("cut_negatives")
                                                                     else "")
    return f"seed {curve.get('seed', '?')}, {consensus}, Best-of-{curve['n']}"


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.1f}%"


def where_it_stands(curve: dict[str, Any], paths: float, headline_accuracy: float | None,
                    weighted_vote: float | None, *, labels: str = "mc", aggregator: str = "min") -> str:
    """One line: the curve's ``min`` and PRM-weighted vote at ``paths`` training paths beside a
    PRM's own Best-of-N (its accuracy under ``aggregator``, ``min`` as the curve's, and its
    weighted vote; None where its report has no row at the curve's N)."""
    point = curve_at(curve, paths, labels)
    lo, hi = point["measured"]
    where = f"at {round(paths):,} paths"
    if point["clamped"]:
        side = "fewer than" if paths < lo else "more than"
        where += f" ({side} the measured {round(lo):,}-{round(hi):,}: its value at {round(point['at']):,})"
    label_set = "" if labels == "mc" else f" ({labels} labels)"
    if headline_accuracy is None and weighted_vote is None:
        mine = f"this PRM: no Best-of-{curve['n']} in its report"
    else:
        agg = "" if aggregator == "min" else f" ({aggregator})"
        mine = f"this PRM: {_pct(headline_accuracy)}{agg} / {_pct(weighted_vote)}"
    return (f"{where} the measured curve{label_set} ({describe(curve)}) gives min {_pct(point.get('min'))} / "
            f"weighted vote {_pct(point.get('weighted_vote'))}; {mine}")


def report_at(report: dict[str, Any] | None, n: int) -> dict[str, Any] | None:
    """A Best-of-N report's (``evaluate.best_of_n``) accuracy and weighted vote at ``n``: under
    ``min``, the curve's aggregator (the default headline), else under the report's headline
    aggregator.  None when the report has no row at ``n``."""
    row = next((r for r in (report or {}).get("rows") or [] if r.get("n") == n), None)
    if row is None:
        return None
    accuracy = row.get("accuracy") or {}
    aggregator = "min" if "min" in accuracy else ((report or {}).get("headline") or {}).get("aggregator")
    return {"n": n, "aggregator": aggregator or "min", "accuracy": accuracy.get(aggregator),
            "weighted_vote": row.get("weighted_vote")}


def place(curve: dict[str, Any], paths: float, report: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """A PRM trained on ``paths`` paths, with its Best-of-N ``report``, placed on the curve: the
    one-line comparison (:func:`where_it_stands`) and the point :func:`plot_curve_png` marks (None
    when its report has no row at the curve's N).  ValueError when the curve has no MC points."""
    mine = report_at(report, curve["n"]) or {}
    line = where_it_stands(curve, paths, mine.get("accuracy"), mine.get("weighted_vote"),
                           aggregator=mine.get("aggregator", "min"))
    measured = mine.get("accuracy") is not None or mine.get("weighted_vote") is not None
    point = {"paths": paths, "min": mine.get("accuracy"), "weighted_vote": mine.get("weighted_vote")} if measured else None
    return line, point


def plot_curve_png(curve: dict[str, Any], point: dict[str, Any] | None = None) -> bytes:
    """The curve as a PNG: Best-of-N ``min`` and PRM-weighted vote against training paths (log
    scale) for each label set, random pick, majority vote and oracle, the demo's paths when the
    report names them; and ``point`` (``{"paths", "min", "weighted_vote"}``, fractions, either
    accuracy may be None), a PRM placed on it, marked with stars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    points = curve["points"]
    for labels in dict.fromkeys(p["labels"] for p in points if p["labels"] in COLORS):
        color = COLORS[labels]
        xs = [p["paths"] for p in points if p["labels"] == labels]
        ax.plot(xs, [100 * p["min"] for p in points if p["labels"] == labels], marker="o", color=color,
                label=f"{labels} labels, min")
        ax.plot(xs, [100 * p["weighted_vote"] for p in points if p["labels"] == labels], marker="s",
                linestyle="--", color=color, label=f"{labels} labels, PRM-weighted vote")
    if points:
        base = points[0]
        for key, style, label in (("random", "--", "random pick"), ("majority_vote", "-.", "majority vote"),
                                  ("oracle", ":", "oracle")):
            ax.axhline(100 * base[key], color="k" if key != "majority_vote" else "tab:gray", linestyle=style,
                       label=label)
    if curve.get("demo_paths"):
        ax.axvline(curve["demo_paths"], color="tab:red", alpha=0.4, label="the demo's paths")
    if point and point.get("paths"):
        x, mine = point["paths"], f"this PRM ({round(point['paths']):,} paths)"
        if point.get("min") is not None:
            ax.plot([x], [100 * point["min"]], marker="*", markersize=16, color="tab:red", linestyle="none",
                    label=f"{mine}, min")
        if point.get("weighted_vote") is not None:
            ax.plot([x], [100 * point["weighted_vote"]], marker="*", markersize=16, markerfacecolor="none",
                    markeredgecolor="tab:red", linestyle="none", label=f"{mine}, PRM-weighted vote")
    ax.set_xscale("log")
    ax.set_xlabel("training paths")
    ax.set_ylabel(f"Best-of-{curve['n']} accuracy (%)")
    kept = (f", consensus-filtered (judge < {curve['consensus_threshold']})"
            if curve.get("consensus_threshold") is not None else "")
    ax.set_title(f"PRM quality against annotated paths (toy world, seed {curve['seed']}{kept})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
