"""``mmprm toy``: generate the synthetic seed set and train the tiny policy."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmprm_tasks.settings import TOY_POLICY_DIR

toy_app = typer.Typer(help="Synthetic multimodal math world and the tiny toy policy.", no_args_is_help=True)
console = Console(stderr=True)


@toy_app.command("seeds")
def seeds(
    out_dir: Path = typer.Argument(..., help="Directory for train.json, test.json and images/."),
    train: int = typer.Option(200, "--train", min=0, help="Number of train problems."),
    test: int = typer.Option(100, "--test", min=0, help="Number of test problems."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (the output is deterministic in it)."),
) -> None:
    """Write toy seed problems (SPEC §1 JSON arrays with PNG images)."""
    from mmprm_tasks.toy.world import generate_seeds

    try:
        paths = generate_seeds(out_dir, train, test, seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(json.dumps({split: str(path) for split, path in paths.items()}))


@toy_app.command("train-policy")
def train_policy_cmd(
    out: Path = typer.Option(TOY_POLICY_DIR, "--out", help="Checkpoint directory (save_pretrained)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Optimizer steps (default: the shipped run's)."),
    seed: int = typer.Option(0, "--seed"),
    wrong_step_rate: float | None = typer.Option(None, "--wrong-step-rate", min=0.0, max=1.0,
                                          help="Per-step rate of wrong steps in training targets."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: float = typer.Option(2e-3, "--lr"),
    eval_every: int = typer.Option(0, "--eval-every", min=0, help="Also measure greedy accuracy every N steps."),
    threads: int = typer.Option(2, "--threads", min=1),
    eval_problems: int = typer.Option(100, "--eval-problems", min=1,
                                      help="Held-out test problems for the greedy accuracy."),
    process_layout_rate: float = typer.Option(
        0.0, "--process-layout-rate", min=0.0, max=1.0,
        help="Share of examples laid out as the PRM reads a solution (a PRM base model's training)."),
    init_from: Path | None = typer.Option(None, "--init-from",
                                          help="Continue from this checkpoint instead of a fresh model."),
) -> None:
    """Train the toy policy for a fixed number of steps and save it with metrics.json."""
    from mmprm_tasks.toy.train_policy import DEFAULT_STEPS, DEFAULT_WRONG_STEP_RATE, train_policy

    steps = steps or DEFAULT_STEPS
    wrong_step_rate = DEFAULT_WRONG_STEP_RATE if wrong_step_rate is None else wrong_step_rate
    command = "mmprm toy " + shlex.join(sys.argv[sys.argv.index("train-policy"):]) if "train-policy" in sys.argv else None
    with Progress(
        TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), console=console,
    ) as bar:
        task = bar.add_task("train", total=steps, loss="-")

        def progress(step: int, loss: float) -> None:
            bar.update(task, completed=step, loss=f"{loss:.3f}")

        metrics = train_policy(
            out, steps=steps, seed=seed, wrong_step_rate=wrong_step_rate, batch_size=batch_size,
            lr=lr, eval_every=eval_every, threads=threads, eval_problems=eval_problems, progress=progress, command=command,
            init_from=init_from, process_layout_rate=process_layout_rate,
        )
    metrics.pop("history", None)
    typer.echo(json.dumps(metrics))
