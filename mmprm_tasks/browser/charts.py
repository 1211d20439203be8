"""The browser's charts as PNG bytes (matplotlib, no display)."""

from __future__ import annotations

import io
from collections.abc import Sequence


def bar_chart(labels: Sequence[str], values: Sequence[float], *, title: str, xlabel: str, ylabel: str,
              color: str = "tab:blue") -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if labels:
        ax.bar(range(len(labels)), values, color=color)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45 if len(labels) > 8 else 0, fontsize=8)
    else:
        ax.text(0.5, 0.5, "nothing annotated yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


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
