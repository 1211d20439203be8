"""Progress of long work, one abstraction for every stage: annotation (problems, rollouts/s),
PRM training (steps, loss) and evaluation (candidates sampled, scored).

A stage opens :func:`track` and advances it; where it is shown is the caller's choice:

* under :func:`progress_display` (the CLI) a rich progress bar with done/total, the rate, the
  stage's own figures and the time left;
* elsewhere (Airflow tasks) one log line every ``progress_log_interval_s`` seconds
  (``MMPRM_PROGRESS_LOG_INTERVAL_S``, default 30) and one at the end, at INFO, so a task
  log says how far a long task is: ``annotation: 12/64 problems (19%), 0.2 problems/s, 41.3
  rollouts/s, ETA 4m20s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

log = logging.getLogger(__name__)

# The rich Progress a CLI command shows bars on; None: log lines.
_display: ContextVar[Any] = ContextVar("mmprm_progress_display", default=None)



def log_interval_s() -> float:
    """Seconds between two progress lines of one piece of work in a log (the setting)."""
    from .settings import get_settings

    return get_settings().progress_log_interval_s


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class StageProgress:
    """Done / total units of one piece of work, counters whose rate is shown (``rollouts``), and
    figures shown as they are (``loss``).  Thread-safe: stages advance it from worker threads."""

    def __init__(self, description: str, total: int | None, unit: str, *, rates: tuple[str, ...] = (),
                 display: Any = None, interval_s: float | None = None) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.completed = 0
        self.counters = dict.fromkeys(rates, 0)
        self.figures: dict[str, str] = {}
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._display = display
        self._task = display.add_task(f"{description} ({unit})", total=total, detail="") if display is not None else None
        self._interval_s = log_interval_s() if interval_s is None else interval_s
        self._last_line = self.started

    def add_total(self, n: int) -> None:
        """More work than announced (an annotation worker took problems of another chunk)."""
        with self._lock:
            self.total = (self.total or 0) + n
            if self._display is not None:
                self._display.update(self._task, total=self.total)

    def reached(self, completed: int, total: int | None = None) -> None:
        """``completed`` units done so far (of ``total``, when the work says so only now)."""
        with self._lock:
            self.completed = completed
            if total is not None and total != self.total:
                self.total = total
                if self._display is not None:
                    self._display.update(self._task, total=total)
            self._show(final=None)

    def advance(self, n: int = 1, **values: Any) -> None:
        """``n`` more units done; counters named at creation are added to, other values shown."""
        with self._lock:
            self.completed += n
            for name, value in values.items():
                if name in self.counters:
                    self.counters[name] += value
                else:
                    self.figures[name] = f"{value:.4f}" if isinstance(value, float) else str(value)
            self._show(final=None)

    def close(self, outcome: str = "done") -> None:
        with self._lock:
            self._show(final=outcome)

    def detail(self) -> str:
        """The rates and figures: ``41.3 rollouts/s, loss 0.6931``."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        parts = [f"{value / elapsed:.1f} {name}/s" for name, value in self.counters.items()]
        parts += [f"{name} {value}" for name, value in self.figures.items()]
        return ", ".join(parts)

    def line(self) -> str:
        """The one-line form of the progress (a log line)."""
        elapsed = time.monotonic() - self.started
        done = f"{self.completed}/{self.total}" if self.total else str(self.completed)
        parts = [f"{self.description}: {done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.completed / self.total:.0f}%)"
        rate = self.completed / elapsed if elapsed > 0 else 0.0
        parts.append(f"{rate:.2f} {self.unit}/s")
        if self.detail():
            parts.append(self.detail())
        if self.total and 0 < self.completed < self.total and rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.completed) / rate)}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        return ", ".join(parts)

    def _show(self, final: str | None) -> None:
        """``final``: the last line's outcome (``done``, or what stopped the work)."""
        if self._display is not None:
            self._display.update(self._task, completed=self.completed, detail=self.detail())
            return
        now = time.monotonic()
        if final or now - self._last_line >= self._interval_s:
            self._last_line = now
            log.info("%s%s", self.line(), f" ({final})" if final else "")


@contextmanager
def track(description: str, total: int | None, unit: str, *, rates: tuple[str, ...] = ()) -> Iterator[StageProgress]:
    """Progress of one piece of work, shown where the caller chose (:func:`progress_display`)."""
    progress = StageProgress(description, total, unit, rates=rates, display=_display.get())
    try:
        yield progress
    except BaseException as exc:
        progress.close(f"stopped by {type(exc).__name__}")
        raise
    progress.close()


@contextmanager
def progress_display(console: Any) -> Iterator[Any]:
    """Show the progress of the work run inside as rich bars on ``console`` (the CLI)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[detail]}"), TextColumn("ETA"), TimeRemainingColumn(),
                    TimeElapsedColumn(), console=console)
    token = _display.set(bars)
    try:
        with bars:
            yield bars
    finally:
        _display.reset(token)


def training_progress_callback() -> Any:
    """A ``transformers.TrainerCallback`` reporting PRM training: steps done / total, the last
    logged loss and the time left (made on demand: transformers is imported by training only)."""
    from transformers import TrainerCallback

    class TrainingProgress(TrainerCallback):
        def __init__(self) -> None:
            self.progress: StageProgress | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.progress = StageProgress("PRM training", state.max_steps, "steps", display=_display.get())

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.reached(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.progress is not None and logs and "loss" in logs:
                self.progress.advance(0, loss=float(logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.close()
                self.progress = None

    return TrainingProgress()
