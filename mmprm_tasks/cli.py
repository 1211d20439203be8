"""The ``mmprm`` command line: each command calls one stage function with the settings object."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .settings import Settings, get_settings

app = typer.Typer(help="MM-PRM platform: step-level annotation, PRM training and Best-of-N evaluation.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="The Postgres step index.", no_args_is_help=True)
app.add_typer(db_app, name="db")
console = Console()


def _settings(overrides: dict | None = None) -> Settings:
    return get_settings().with_overrides(overrides)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the missing schema migrations from sql/ (idempotent)."""
    from . import db

    engine = db.get_engine(_settings())
    applied = db.upgrade(engine)
    console.print(f"applied migrations: {applied or 'none (up to date)'}; schema version {db.current_version(engine)}")


@db_app.command("status")
def db_status() -> None:
    """Schema version and row counts of the step index."""
    import sqlalchemy as sa

    from . import db

    engine = db.get_engine(_settings())
    version = db.current_version(engine)
    latest = len(db.migrations())
    table = Table(title=f"step index at {engine.url.render_as_string(hide_password=True)}")
    table.add_column("table")
    table.add_column("rows", justify="right")
    if version:
        with engine.connect() as conn:
            for name in ["seed_problems", "annotation_runs", "chunks", "trees", "step_nodes", "datasets",
                         "checkpoints", "evaluations"]:
                table.add_row(name, str(conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar_one()))
    console.print(table)
    console.print(f"schema version {version} of {latest}" + ("" if version == latest else ": run `mmprm db upgrade`"))
    if version != latest:
        raise typer.Exit(1)


@app.command()
def ingest(
    seed_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSON array or JSONL of SPEC §1 records")],
    image_root: Annotated[Optional[Path], typer.Option(help="Extra directory images may resolve into")] = None,
) -> None:
    """Validate and index seed problems; images are stored content-addressed once."""
    from .seeds import ingest_file, read_records

    settings = _settings({"image_root": str(image_root) if image_root else None})
    total = len(read_records(seed_file))
    with _progress() as progress:
        task = progress.add_task(f"ingest {seed_file.name}", total=total)
        report = ingest_file(seed_file, settings, progress=lambda: progress.advance(task))
    summary = Table(title=f"ingest {seed_file}")
    for col in ["records", "inserted", "unchanged", "rejected", "images stored"]:
        summary.add_column(col, justify="right")
    summary.add_row(str(report.total), str(report.inserted), str(report.unchanged), str(len(report.rejected)),
                    str(report.images_stored))
    console.print(summary)
    if report.rejected:
        rejected = Table(title="rejected records", show_lines=False)
        for col in ["record", "id", "field", "reason"]:
            rejected.add_column(col, overflow="fold")
        for r in report.rejected:
            rejected.add_row(str(r.record_index), r.record_id or "", r.field, r.message)
        console.print(rejected)
        console.print(f"quarantine report: {report.quarantine_uri}")
        raise typer.Exit(1)


@app.command()
def chunks(
    run_id: Annotated[Optional[str], typer.Option("--run", help="Run id (default: derived from the config)")] = None,
    chunk_size: Annotated[Optional[int], typer.Option(min=1)] = None,
    selection: Annotated[str, typer.Option(help="all | stale (new or annotated under another config)")] = "all",
    split: Annotated[Optional[str], typer.Option(help="Only problems of this split")] = None,
) -> None:
    """Create an annotation run and shard its problems into chunks (idempotent per run)."""
    from .runs import default_run_id, run_progress, shard_run

    settings = _settings()
    result = shard_run(settings, run_id or default_run_id(settings), chunk_size=chunk_size,
                       selection=selection, split=split)  # type: ignore[arg-type]
    verb = "created" if result.created else "already had"
    console.print(f"run [bold]{result.run_id}[/]: {verb} {len(result.chunk_indices)} chunks over "
                  f"{result.num_problems} problems; progress {json.dumps(run_progress(settings, result.run_id))}")


def main() -> None:
    app()
