"""The browser's charts as PNG bytes (matplotlib, no display)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


def _axes() -> tuple[Any, Any]:
    """A figure of the browser's chart size and its one axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _finish(fig: Any, ax: Any, *, title: str, xlabel: str, ylabel: str, grid_axis: str = "both") -> bytes:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis=grid_axis, alpha=0.3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def _nothing(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def bar_chart(labels: Sequence[str], values: Sequence[float], *, title: str, xlabel: str, ylabel: str,
              color: str = "tab:blue") -> bytes:
    fig, ax = _axes()
    if labels:
        ax.bar(range(len(labels)), values, color=color)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45 if len(labels) > 8 else 0, fontsize=8)
    else:
        _nothing(ax, "nothing annotated yet")
    return _finish(fig, ax, title=title, xlabel=xlabel, ylabel=ylabel, grid_axis="y")


def mc_histogram_png(histogram: dict[str, int]) -> bytes:
    """Node counts per MC decile (``run_summary``'s ``mc_histogram``; empty deciles shown as 0)."""
    if not histogram:
        return bar_chart([], [], title="MC values of the run's step nodes", xlabel="MC value", ylabel="nodes")
    labels = [f"{b / 10:.1f}-{(b + 1) / 10:.1f}" for b in range(10)]
    return bar_chart(labels, [histogram.get(label, 0) for label in labels],
                     title="MC values of the run's step nodes", xlabel="MC value", ylabel="nodes")


def first_error_png(positions: Sequence[tuple[int, int]]) -> bytes:
    """First-error nodes per step position (0-based step of the solution)."""
    if not positions:
        return bar_chart([], [], title="First-error positions", xlabel="step", ylabel="first errors")
    last = max(step for step, _ in positions)
    counts = dict(positions)
    return bar_chart([str(s) for s in range(last + 1)], [counts.get(s, 0) for s in range(last + 1)],
                     title="First-error positions", xlabel="step (0-based)", ylabel="first errors",
                     color="tab:red")


def loss_curve_png(history: Sequence[tuple[int, float]]) -> bytes:
    """The training loss against the optimizer step, as the checkpoint's metrics logged it."""
    fig, ax = _axes()
    if history:
        ax.plot([step for step, _ in history], [loss for _, loss in history],
                marker="o" if len(history) < 40 else None, color="tab:blue")
    else:
        _nothing(ax, "no loss logged")
    return _finish(fig, ax, title="PRM training loss", xlabel="step", ylabel="loss")
