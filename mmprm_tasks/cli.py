"""The ``mmprm`` command line: each command calls one stage function with the settings object."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .demo import DEMO_PROMISE, DEMO_TRAIN_PROBLEMS, promise_kept
from .progress import progress_display, track
from .settings import Settings, get_settings

class _ReportsFailures(typer.core.TyperGroup):
    """An outage or configuration error ends a command with its first cause in one line and a
    hint (mmprm_tasks.failures), not a chain of tracebacks; anything else (a bug) keeps its traceback."""

    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        from .failures import describe

        try:
            return super().invoke(ctx)
        except Exception as exc:
            failure = describe(exc)
            if failure is None:
                raise
            Console(stderr=True).print(f"[red]error:[/red] {escape(failure.cause)}\nhint: {escape(failure.hint)}",
                                       soft_wrap=True, highlight=False)
            raise typer.Exit(failure.exit_code) from None


app = typer.Typer(help="MM-PRM platform: step-level annotation, PRM training and Best-of-N evaluation.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=_ReportsFailures)
db_app = typer.Typer(help="The Postgres step index.", no_args_is_help=True)
app.add_typer(db_app, name="db")
export_app = typer.Typer(help="Write the platform's outputs in other tools' formats.", no_args_is_help=True)
app.add_typer(export_app, name="export")
stack_app = typer.Typer(help="The local Airflow stack (no Docker).", no_args_is_help=True)
app.add_typer(stack_app, name="stack")


def _mount_toy() -> None:
    from .toy.cli import toy_app

    app.add_typer(toy_app, name="toy", help="The synthetic multimodal math world and its tiny models.")


_mount_toy()
console = Console()


def _an_id(value: str | list[str] | None) -> str | list[str] | None:
    """Every id a user types (runs, datasets, checkpoints, evaluations) is held to the one id rule
    (mmprm_tasks.validation) before anything is searched or written: a usage error, exit 2."""
    from .validation import escape_text, id_problem

    for item in [value] if isinstance(value, str) else value or []:
        problem = id_problem(item)
        if problem:
            raise typer.BadParameter(escape_text(problem, 300))
    return value


def _settings(overrides: dict | None = None) -> Settings:
    return get_settings().with_overrides(overrides)


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
                         "checkpoints", "evaluations", "bon_candidates"]:
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
    from .seeds import ingest_file

    settings = _settings({"image_root": str(image_root) if image_root else None})
    with progress_display(console), track(f"ingest {seed_file.name}", None, "records") as progress:
        report = ingest_file(seed_file, settings, progress=progress.reached)
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
        shown = 20  # a long list is summarised here; the quarantine report holds all of it
        for r in report.rejected[:shown]:
            rejected.add_row(str(r.record_index), r.record_id or "", r.field, r.message)
        console.print(rejected)
        if len(report.rejected) > shown:
            reasons = ", ".join(f"{field} {n}" for field, n in report.reasons().most_common())
            console.print(f"... and {len(report.rejected) - shown} more rejected records (by field: {reasons})")
        console.print(f"quarantine report: {report.quarantine_uri}")
        raise typer.Exit(1)


@app.command()
def chunks(
    run_id: Annotated[Optional[str], typer.Option("--run", help="Run id (default: derived from the config)",
                                                  callback=_an_id)] = None,
    chunk_size: Annotated[Optional[int], typer.Option(min=1)] = None,
    selection: Annotated[str, typer.Option(help="all | stale (new or annotated under another config)")] = "all",
    split: Annotated[Optional[str], typer.Option(help="Only problems of this split")] = None,
) -> None:
    """Create an annotation run and shard its problems into chunks (idempotent per run)."""
    from .db import get_engine
    from .runs import default_run_id, run_progress, shard_run

    settings = _settings()
    result = shard_run(settings, run_id or default_run_id(settings), chunk_size=chunk_size,
                       selection=selection, split=split)  # type: ignore[arg-type]
    verb = "created" if result.created else "already had"
    console.print(f"run [bold]{result.run_id}[/]: {verb} {len(result.chunk_indices)} chunks over "
                  f"{result.num_problems} problems; progress {json.dumps(run_progress(get_engine(settings), result.run_id))}")


@app.command()
def annotate(
    run_id: Annotated[str, typer.Option("--run", help="Run id (sharded with `mmprm chunks`)", callback=_an_id)],
    chunk: Annotated[Optional[int], typer.Option("--chunk", min=0,
                                                 help="Annotate this chunk (then steal unclaimed work)")] = None,
    all_chunks: Annotated[bool, typer.Option("--all", help="Annotate every chunk of the run")] = False,
) -> None:
    """Grow OmegaPRM trees for a chunk (or all chunks) of a run; resumable and idempotent."""
    from .annotate import annotate_chunk, run_summary
    from .db import get_engine
    from .runs import lease_holders, reclaim_dead_attempts, run_progress

    if (chunk is None) == (not all_chunks):
        raise typer.BadParameter("give exactly one of --chunk ID or --all")
    settings = _settings()
    with progress_display(console):
        if all_chunks:
            # --all helps until the run is done: problems of workers that died on this host are taken
            # back at once and finished here.
            reclaim_dead_attempts(get_engine(settings), run_id, None)
            stats = annotate_chunk(settings, run_id, 0, worker=f"{run_id}/cli-all")
        else:
            stats = annotate_chunk(settings, run_id, chunk)
    console.print_json(data=stats)
    progress = run_progress(get_engine(settings), run_id)
    console.print(f"progress {json.dumps(progress)}")
    console.print_json(data=run_summary(settings, run_id))
    unfinished = {status: n for status, n in progress.items() if status != "done" and n}
    holders = lease_holders(get_engine(settings), run_id) if all_chunks and unfinished else []
    if all_chunks and set(unfinished) == {"leased"} and all(holder.live for holder in holders):
        # Peers are finishing the rest: this worker's part is done, and so will the run be.
        owners = ", ".join(f"{holder.owner} ({holder.problems})" for holder in holders)
        console.print(f"run {run_id}: nothing left to claim; {unfinished['leased']} problem(s) are being annotated "
                      f"by live workers: {owners}", soft_wrap=True, markup=False, highlight=False)
        return
    if all_chunks and unfinished:
        # Problems leased by another worker (maybe a dead one) come back when the lease expires.
        console.print(f"[red]run {run_id} is not finished: {unfinished}; leased problems return when their "
                      f"lease expires (lease_seconds={settings.lease_seconds:g}), then rerun "
                      f"`mmprm annotate --run {run_id} --all`", soft_wrap=True)
        raise typer.Exit(1)


@app.command("import-trees")
def import_trees_cmd(
    source: Annotated[str, typer.Argument(help="Tree JSON/JSONL file, folder, or s3:// / file:// URI (object or prefix)")],
    run_id: Annotated[str, typer.Option("--run", help="Run the trees join (created as an imported run if new)",
                                        callback=_an_id)],
    policy_model: Annotated[str, typer.Option(help="The policy that grew the trees, recorded on a new run")] = "unknown",
) -> None:
    """Load trees from the original release's pipeline (SPEC §4 records) into the step index."""
    from .tree_index import import_trees

    with progress_display(console), track("import", None, "trees") as progress:
        report = import_trees(_settings(), source, run_id, policy_model=policy_model, progress=progress.advance)
    console.print(f"run {run_id}: {report.trees} trees, {report.nodes} step nodes in {report.seconds:.1f} s "
                  f"({report.nodes_per_second:,.0f} nodes/s)")
    for rejected in report.rejected:
        console.print(f"[red]rejected[/red] {rejected['record']}: {rejected['error']}", soft_wrap=True)
    if report.rejected:
        console.print(f"[red]{len(report.rejected)} record(s) rejected; the others landed[/red]")
        raise typer.Exit(1)


@app.command()
def traverse(run_ids: Annotated[list[str], typer.Argument(help="Runs whose trees become paths", callback=_an_id)]) -> None:
    """Trees -> training paths (SPEC §5), registered as a dataset version."""
    from .pipeline import traverse_stage

    console.print_json(data=traverse_stage(_settings(), run_ids))


@app.command("format")
def format_cmd(dataset_id: Annotated[str, typer.Argument(callback=_an_id)]) -> None:
    """Write a dataset in the InternVL conversation format and the generic chat format."""
    from .pipeline import format_stage

    console.print_json(data=format_stage(_settings(), dataset_id))


@app.command()
def audit(
    dataset_id: Annotated[str, typer.Argument(help="Dataset version (from `mmprm traverse`)", callback=_an_id)],
    as_json: Annotated[bool, typer.Option("--json", help="The report as JSON, for machines")] = False,
) -> None:
    """A dataset's label audit: labels vs the toy world's ground truth by step kind, or vs the
    step judge (consensus filtering); computed and recorded when the dataset has none yet."""
    from .label_audit import dataset_label_audit, render_audit

    report = dataset_label_audit(_settings(), dataset_id)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    for part in render_audit(report):
        console.print(part, soft_wrap=True, highlight=False)


@app.command()
def train(
    dataset_id: Annotated[Optional[str], typer.Argument(help="Dataset version (default: latest)", callback=_an_id)] = None,
    label_mode: Annotated[Optional[str], typer.Option(help="soft | hard")] = None,
    max_steps: Annotated[Optional[int], typer.Option()] = None,
) -> None:
    """Train a PRM on a dataset; the checkpoint is uploaded and registered."""
    from .pipeline import train_stage

    with progress_display(console):
        result = train_stage(_settings({"train.label_mode": label_mode, "train.max_steps": max_steps}), dataset_id)
    console.print_json(data=result)


@app.command()
def evaluate(
    checkpoint_id: Annotated[Optional[str], typer.Argument(help="PRM checkpoint (default: latest)", callback=_an_id)] = None,
    split: Annotated[str, typer.Option()] = "test",
    limit: Annotated[Optional[int], typer.Option(min=1)] = None,
) -> None:
    """Best-of-N evaluation of a PRM: report JSON + PNG in the store, rows in Postgres."""
    from .evaluate import render_table
    from .pipeline import evaluate_stage
    from .storage import open_uri

    settings = _settings()
    with progress_display(console):
        result = evaluate_stage(settings, checkpoint_id, split=split, limit=limit)
    store, key = open_uri(result["report_uri"], settings)
    console.print(render_table(store.get_json(key)))
    console.print_json(data=result)


@app.command()
def score(
    candidates: Annotated[str, typer.Argument(help="Candidate file (path or object URI): the release's evaluation "
                                                   "format (solutions_splits, labels) or mmprm candidate JSONL")],
    checkpoint: Annotated[str, typer.Option(help="PRM checkpoint: an id in the index, a directory or a URI")],
    out: Annotated[Optional[Path], typer.Option(help="Output file (default: <name>.scored.json[l] beside the input)")] = None,
    name: Annotated[str, typer.Option(help="Scorer name the scores are kept under (mmprm format)")] = "prm",
    image_root: Annotated[Optional[Path], typer.Option(help="Root of relative image paths (default: the file's folder)")] = None,
) -> None:
    """Score every step of every candidate with a PRM; writes prm_scores (release format) or
    step_scores (mmprm format) and prints the Best-of-N table of the file."""
    from .candidates import score_file
    from .evaluate import render_table

    result = score_file(_settings(), candidates, checkpoint, out, name=name, image_root=image_root)
    if result["report"]:
        console.print(render_table(result["report"]))
    for line in result["rejected"]:
        console.print(f"rejected {line}", style="red", markup=False, soft_wrap=True, highlight=False)
    console.print(f"{result['format']} file: {result['problems']} problems, {result['candidates']} candidates, "
                  f"{result['steps_scored']} steps scored -> {result['out']}", soft_wrap=True, highlight=False)
    if result["rejected"]:
        raise typer.Exit(1)


@export_app.command("eval")
def export_eval(
    evaluation_id: Annotated[Optional[str], typer.Argument(help="Evaluation (default: the latest with candidates)",
                                                           callback=_an_id)] = None,
    out: Annotated[Path, typer.Option(help="Output folder: <evaluation_id>.json and images/")] = Path("eval-export"),
    scorer: Annotated[str, typer.Option(help="Whose step scores become prm_scores")] = "prm",
) -> None:
    """An evaluation's candidates in the release's evaluation format ({question, image_path,
    solutions_splits, labels, prm_scores}), so its extract_calculate.py runs on them."""
    from .candidates import export_evaluation

    path = export_evaluation(_settings(), evaluation_id, out, scorer=scorer)
    console.print(str(path), soft_wrap=True, highlight=False)


@export_app.command("internvl")
def export_internvl_cmd(
    dataset_id: Annotated[str, typer.Argument(help="Dataset version (from `mmprm traverse`)", callback=_an_id)],
    out_dir: Annotated[Path, typer.Argument(file_okay=False, help="Folder to write (created if missing)")],
) -> None:
    """A dataset as the original release's InternVL training folder: annotation.jsonl, images/
    and meta.json (the dataset description to list in the trainer's meta file)."""
    from .exports import export_internvl

    _export(export_internvl, dataset_id, out_dir)


@export_app.command("hf")
def export_hf_cmd(
    dataset_id: Annotated[str, typer.Argument(help="Dataset version (from `mmprm traverse`)", callback=_an_id)],
    out_dir: Annotated[Path, typer.Argument(file_okay=False, help="Folder to write (created if missing)")],
) -> None:
    """A dataset as Parquet with an image column and a dataset card, for datasets.load_dataset."""
    from .exports import write_hf_dataset

    _export(write_hf_dataset, dataset_id, out_dir)


def _export(write, dataset_id: str, out_dir: Path) -> None:
    from .exports import ExportError

    try:
        console.print_json(data=write(_settings(), dataset_id, out_dir))
    except (LookupError, ExportError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None


@stack_app.command("up")
def stack_up(
    home: Annotated[Optional[Path], typer.Option(help="AIRFLOW_HOME, service logs and the admin password "
                                                 "file (default: <MMPRM_HOME>/airflow-stack)")] = None,
    metadata_url: Annotated[Optional[str], typer.Option(help="Airflow metadata DB, created when missing "
                                                        "(default: the step index's server, database "
                                                        "<step index>_airflow)")] = None,
    port: Annotated[int, typer.Option(help="api-server port (0: a free one)")] = 8080,
    password: Annotated[Optional[str], typer.Option(help="password of user admin (default: random, "
                                                    "written to the passwords file)")] = None,
    toy_seeds: Annotated[bool, typer.Option(help="generate and ingest the toy world's train and test "
                                            "seeds")] = True,
    user: Annotated[Optional[list[str]], typer.Option(
        "--user", help="another user as NAME:ROLE (repeatable); ROLE viewer (reads everything, cannot trigger), "
                       "user (also triggers and clears runs), op (also connections, pools, variables) or admin. "
                       "Its password is generated and printed once, or read from --passwords-file")] = None,
    passwords_file: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False, help="JSON object {name: password} for the --user users it names")] = None,
) -> None:
    """Bring the local stack up: the step index (created, migrated), the toy seeds ingested, the
    Airflow services with the platform's DAGs (the nightly refresh paused); Ctrl-C stops it."""
    from sqlalchemy.engine import make_url

    from .airflow_stack import local_stack, parse_users, serve

    given = json.loads(passwords_file.read_text()) if passwords_file else {}
    try:
        users = parse_users(user or [], given)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings = _settings()
    step_index = make_url(settings.database_url)
    metadata_url = metadata_url or step_index.set(database=f"{step_index.database}_airflow").render_as_string(
        hide_password=False)
    stack = local_stack(settings, home=home or settings.home / "airflow-stack", metadata_url=metadata_url,
                        port=port, password=password, toy_seeds=(24, 16) if toy_seeds else None, users=users)
    def say(line: str) -> None:  # paths and URLs whole on one line, for copying
        console.print(line, soft_wrap=True, highlight=False, markup=False)

    say(f"step index {step_index.render_as_string(hide_password=True)} at the latest schema"
        + (f"; toy seeds ingested from {settings.allowed_seed_roots[0] / 'toy'}" if toy_seeds else ""))
    for name, (role, secret) in users.items():
        # Shown once: it is kept only in the stack's passwords file (mode 0600).
        say(f"user {name} ({role}): " + (f"password from {passwords_file}" if name in given else f"password {secret}"))
    raise typer.Exit(serve(stack, out=say))


@app.command("dags-path")
def dags_path() -> None:
    """Print the folder holding the installed DAGs (set it as AIRFLOW__CORE__DAGS_FOLDER)."""
    from .resources import dags_folder

    typer.echo(str(dags_folder()))


def headline_lines(reports: dict[str, dict]) -> list[str]:
    """The demo's conclusion in words: the headline aggregator (a setting, fixed before any
    result) at the largest N against the baselines, and soft against hard labels."""
    lines = []
    for mode, report in reports.items():
        top = report.get("headline")
        if not top:
            continue
        row = report["rows"][-1]
        extra = "".join(f", {name} {100 * acc:.1f}%" for name, acc in row.get("baselines", {}).items())
        vote = (f"; PRM-weighted vote {100 * row['weighted_vote']:.1f}% vs majority vote "
                f"{100 * row['majority_vote']:.1f}%" if "weighted_vote" in row else "")
        lines.append(f"headline: {mode}-label PRM, {top['aggregator']} aggregator, Best-of-{top['n']} "
                     f"{100 * top['accuracy']:.1f}% (random pick {100 * row['random']:.1f}%, majority vote "
                     f"{100 * row['majority_vote']:.1f}%{extra}) on {report['num_problems']} test problems{vote}")
    soft, hard = (reports.get(m, {}).get("headline") for m in ("soft", "hard"))
    if soft and hard:
        verdict = ("soft labels >= hard labels" if soft["accuracy"] >= hard["accuracy"]
                   else "soft labels did not beat hard labels")
        lines.append(f"{verdict}: Best-of-{soft['n']} {100 * soft['accuracy']:.1f}% vs {100 * hard['accuracy']:.1f}%")
    return lines


def where_the_demo_stands(counts: dict, report: dict | None = None, curve: dict | None = None) -> str:
    """The demo's point on the curve of PRM quality against annotated paths: with the shipped
    curve (``mmprm_tasks.scaling_curve``; None: the file is absent), the curve's Best-of-N at the
    demo's training paths beside the soft-label PRM's own ``report`` at the curve's N."""
    from .scaling_curve import place

    judged = (f" (consensus filtering kept {counts['consensus_kept']} of {counts['consensus_paths']}: the "
              "paths whose MC labels the base model's step likelihood agrees with)" if "consensus_paths" in counts
              else "")
    learnt = f"where the demo stands: its PRMs learnt from {counts.get('paths')} MC-labelled paths{judged}"
    if curve is not None and counts.get("paths"):
        try:
            line, _ = place(curve, counts["paths"], report)
        except ValueError as exc:  # a curve without MC-labelled points
            line = f"the shipped curve cannot place it: {exc}"
        return f"{learnt}; {line}"
    return (f"{learnt}; bench/bench_toy_scaling.py draws Best-of-8 against training paths (README, 'PRM quality "
            "against annotated paths')")


def engine_batch_row(stats: dict) -> tuple[str, str]:
    """How full the engine ran: rows per decode step on the continuous transformers engine,
    requests per call on a batch backend."""
    if stats.get("mean_rows_per_step"):
        return "mean rows per decode step", f"{stats['mean_rows_per_step']:.1f}"
    return "mean engine batch", f"{stats.get('mean_batch_size', 0):.1f}"


@app.command()
def demo(
    home: Annotated[Path, typer.Option(help="Where the embedded run keeps everything")] = Path(".mmprm/demo"),
    train_problems: Annotated[int, typer.Option("--train", min=4)] = DEMO_TRAIN_PROBLEMS,
    test_problems: Annotated[int, typer.Option("--test", min=4)] = 128,
    seed: Annotated[int, typer.Option()] = 0,
    hard: Annotated[bool, typer.Option("--hard", help="Also train and evaluate a hard-label PRM (the paper's "
                                       "soft-vs-hard ablation; a second training)")] = False,
) -> None:
    """The embedded end-to-end run: toy seeds, Airflow DAGs in-process, PRM training, Best-of-N."""
    from .demo import run_demo
    from .evaluate import render_first_error_table, render_table

    # The DAGs' tasks run in this thread (dag.test), so their stages draw progress bars here.
    with progress_display(console):
        result = run_demo(home, n_train=train_problems, n_test=test_problems, seed=seed,
                          label_modes=("soft", "hard") if hard else ("soft",), log=lambda msg: console.print(f"[bold cyan]{msg}"))
    s = result.summary
    table = Table(title="MM-PRM embedded run")
    table.add_column("what")
    table.add_column("value", justify="right")
    for label, value in [("problems annotated", s.get("problems")), ("trees", s.get("trees")),
                         ("trees with 0 < root MC < 1", s.get("trees_mixed_root")),
                         ("step annotations", s.get("step_annotations")), ("first-error steps", s.get("first_errors")),
                         ("rollouts", (s.get("stats") or {}).get("rollouts")),
                         engine_batch_row(s.get("stats") or {}),
                         ("dataset", s.get("dataset", {}).get("dataset_id")),
                         ("training paths", (s.get("dataset", {}).get("counts") or {}).get("paths")),
                         ("wall time", f"{result.seconds:.0f} s"),
                         ("stages (s)", ", ".join(f"{k} {v:.0f}" for k, v in (s.get("stage_seconds") or {}).items()))]:
        table.add_row(label, str(value))
    console.print(table)
    for report in result.reports.values():
        console.print(render_table(report))
    if any("first_error" in report for report in result.reports.values()):
        console.print(render_first_error_table(result.reports))
    for line in headline_lines(result.reports):
        console.print(line, soft_wrap=True)
    from .scaling_curve import load_curve

    console.print(where_the_demo_stands(s.get("dataset", {}).get("counts") or {}, result.reports.get("soft"),
                                        load_curve(_settings().scaling_curve)), soft_wrap=True)
    if "soft" in result.reports and result.reports["soft"].get("headline"):
        kept = promise_kept(result.reports["soft"])
        console.print(f"the demo's promise (soft PRM: min >= random pick + {100 * DEMO_PROMISE['min_over_random']:.0f}"
                      f" points, weighted vote >= majority vote + {100 * DEMO_PROMISE['weighted_vote_over_majority']:.0f}):"
                      f" {'kept' if kept else 'NOT kept at this scale'}", soft_wrap=True)
    outputs = Table(title="outputs")
    outputs.add_column("what")
    outputs.add_column("where", overflow="fold")
    for name, where in result.outputs.items():
        outputs.add_row(name, where)
    console.print(outputs)


def main() -> None:
    app()
