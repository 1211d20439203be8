"""``mmprm toy``: generate the synthetic seed set and train the tiny foundation and policy."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmprm_tasks.settings import TOY_FOUNDATION_DIR, TOY_POLICY_DIR

toy_app = typer.Typer(help="Synthetic multimodal math world and its tiny models.", no_args_is_help=True)
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


def _train(name: str, out: Path, cfg, init_from: Path | None) -> None:
    from mmprm_tasks.toy.training import train_toy_model

    # The command that reproduces this run, every knob explicit (defaults change between releases).
    options = {"--out": out, "--steps": cfg.steps, "--seed": cfg.seed, "--lr": cfg.lr,
               "--eval-problems": cfg.eval_problems, "--threads": cfg.threads}
    if init_from is not None:
        options |= {"--init-from": init_from, "--wrong-step-rate": cfg.wrong_step_rate}
    command = shlex.join(["mmprm", "toy", name, *(str(v) for kv in options.items() for v in kv)])
    with Progress(
        TextColumn(name), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), console=console,
    ) as bar:
        task = bar.add_task(name, total=cfg.steps, loss="-")

        def progress(step: int, loss: float) -> None:
            bar.update(task, completed=step, loss=f"{loss:.3f}")

        metrics = train_toy_model(out, cfg, init_from=init_from, command=command, progress=progress)
    typer.echo(json.dumps(metrics))


@toy_app.command("train-foundation")
def train_foundation_cmd(
    out: Path = typer.Option(TOY_FOUNDATION_DIR, "--out", help="Checkpoint directory (save_pretrained)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Optimizer steps (default: the shipped run's)."),
    seed: int = typer.Option(0, "--seed"),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default: the shipped run's)."),
    eval_problems: int = typer.Option(200, "--eval-problems", min=1, help="Held-out test problems for the metrics."),
    threads: int = typer.Option(2, "--threads", min=1),
) -> None:
    """Train the toy foundation from scratch (the PRM's base) and save it with metrics.json."""
    from mmprm_tasks.toy.training import FOUNDATION

    cfg = replace(FOUNDATION, steps=steps or FOUNDATION.steps, seed=seed, lr=lr or FOUNDATION.lr,
                  eval_problems=eval_problems, threads=threads)
    _train("train-foundation", out, cfg, None)


@toy_app.command("train-policy")
def train_policy_cmd(
    out: Path = typer.Option(TOY_POLICY_DIR, "--out", help="Checkpoint directory (save_pretrained)."),
    init_from: Path = typer.Option(TOY_FOUNDATION_DIR, "--init-from", help="The foundation to fine-tune."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Optimizer steps (default: the shipped run's)."),
    seed: int = typer.Option(0, "--seed"),
    wrong_step_rate: float | None = typer.Option(None, "--wrong-step-rate", min=0.0, max=1.0,
                                                 help="Per-step rate of wrong steps in training targets."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default: the shipped run's)."),
    eval_problems: int = typer.Option(200, "--eval-problems", min=1, help="Held-out test problems for the metrics."),
    threads: int = typer.Option(2, "--threads", min=1),
) -> None:
    """Fine-tune the foundation into the toy policy (tagged steps with controlled errors)."""
    from mmprm_tasks.toy.training import POLICY

    cfg = replace(POLICY, steps=steps or POLICY.steps, seed=seed, lr=lr or POLICY.lr,
                  wrong_step_rate=POLICY.wrong_step_rate if wrong_step_rate is None else wrong_step_rate,
                  eval_problems=eval_problems, threads=threads)
    _train("train-policy", out, cfg, init_from)
