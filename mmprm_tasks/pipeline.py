"""The pipeline's stages as the orchestrator sees them: settings in, small JSON-able dicts out.

Each function wires one library stage to the step index and the object store, so an Airflow task
(or a CLI command) is a one-line call and only ids and object URIs travel through XCom.  Every
stage is idempotent: outputs are keyed by content (dataset, checkpoint and evaluation ids are
hashes of their inputs) and rows are upserted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .db import get_engine, require_schema
from .policy import resolve_model_path
from .runs import Selection, default_run_id, shard_run
from .settings import ConfigurationError, Settings
from .storage import ObjectStore, location, open_store, open_uri
from .threads import apply_torch_threads, local_processes

log = logging.getLogger(__name__)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode() if lines else b""


# ---------------------------------------------------------------------------------------------
# Seeds and annotation


def ingest_stage(settings: Settings, seed_source: str | None, eval_seed_source: str | None = None
                 ) -> dict[str, Any]:
    """Ingest a seed file, and the evaluation split's file, when given; bad records are
    quarantined, good ones land.  The result counts the indexed problems of each split.

    ``seed_source`` comes from whoever may trigger a DAG, so it must name a file inside
    ``settings.allowed_seed_roots`` (else ConfigurationError, never retried): a trigger cannot make
    a worker read, and copy into the quarantine report, any file it can reach."""
    from .seeds import ingest_file

    engine = get_engine(settings)
    require_schema(engine)
    result: dict[str, Any] = {"source": seed_source}
    if eval_seed_source:
        result["eval_source"] = eval_seed_source
    for name, source in (("seed_source", seed_source), ("eval_seed_source", eval_seed_source)):
        if not source:
            continue
        path = Path(source[len("file://"):] if source.startswith("file://") else source).resolve()
        roots = settings.allowed_seed_roots
        if not any(path.is_relative_to(root) for root in roots):
            raise ConfigurationError(f"{name} {source!r} is outside the allowed seed roots "
                                     f"{[str(r) for r in roots]} (setting seed_roots, MMPRM_SEED_ROOTS)")
        if not path.is_file():
            raise ConfigurationError(f"{name} {source!r}: no such file")
        report = ingest_file(path, settings)
        for field, count in (("inserted", report.inserted), ("unchanged", report.unchanged),
                             ("rejected", len(report.rejected))):
            result[field] = result.get(field, 0) + count
        result.setdefault("quarantine_uris", []).extend([report.quarantine_uri] if report.quarantine_uri else [])
        for rejection in report.rejected[:20]:
            log.warning("rejected %s", rejection.describe())
    with engine.connect() as conn:
        splits = dict(conn.execute(sa.text("SELECT split, count(*) FROM seed_problems GROUP BY split")).all())
    result["problems_indexed"] = sum(splits.values())
    result["splits"] = splits
    return result


def shard_stage(settings: Settings, run_id: str | None, *, selection: Selection = "all",
                split: str | None = None, airflow_run: tuple[str, str] | None = None) -> dict[str, Any]:
    """Create (or resume) the annotation run; ``airflow_run`` (dag id, dag run id) is recorded with
    it (annotation_runs.airflow_dag_id / airflow_run_id: the latest Airflow run that worked on it)."""
    result = shard_run(settings, run_id or default_run_id(settings), selection=selection, split=split)
    if airflow_run is not None:
        with get_engine(settings).begin() as conn:
            conn.execute(sa.text("UPDATE annotation_runs SET airflow_dag_id = :d, airflow_run_id = :a"
                                 " WHERE run_id = :r"), {"d": airflow_run[0], "a": airflow_run[1], "r": result.run_id})
    return {"run_id": result.run_id, "chunks": result.chunk_indices, "problems": result.num_problems}


# ---------------------------------------------------------------------------------------------
# Preflight: what retrying cannot fix is checked before any work starts (ConfigurationError).


def _require_model(model: str, what: str, settings: Settings) -> None:
    """A local or object-store checkpoint must resolve to a directory with a config.json."""
    try:
        path = Path(resolve_model_path(model, settings))
    except (OSError, ValueError, LookupError) as exc:
        raise ConfigurationError(f"{what} {model!r} cannot be fetched: {exc}") from exc
    if not (path / "config.json").is_file():
        raise ConfigurationError(f"{what} {model!r} is not a model checkpoint (no config.json in {path})")


def preflight_annotation(settings: Settings, split: str | None) -> dict[str, Any]:
    """Before annotating: the policy checkpoint is there (unless served) and seeds of the split exist."""
    if settings.policy.backend != "openai":
        _require_model(settings.policy.model, "policy model", settings)
    engine = get_engine(settings)
    require_schema(engine)
    with engine.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM seed_problems WHERE CAST(:s AS TEXT) IS NULL"
                                     " OR split = :s"), {"s": split}).scalar_one()
    if not count:
        raise ConfigurationError(f"no seed problems{f' of split {split!r}' if split else ''} in the step index "
                                 "(ingest a seed file first: mmprm_ingest or mmprm ingest)")
    return {"split": split, "problems": count, "policy_model": settings.policy.model}


def preflight_training(settings: Settings, dataset_id: str | None) -> dict[str, Any]:
    """Before training: the dataset exists, is formatted and has records; the base model is there."""
    dataset_id = dataset_id or latest_dataset(settings)
    with get_engine(settings).connect() as conn:
        row = conn.execute(sa.text("SELECT counts, formats FROM datasets WHERE dataset_id = :d"),
                           {"d": dataset_id}).one_or_none()
    if row is None:
        raise ConfigurationError(f"dataset {dataset_id!r} is not in the step index")
    if not row.formats:
        raise ConfigurationError(f"dataset {dataset_id!r} is not formatted yet (run mmprm_dataset)")
    if not sum(v for v in (row.counts or {}).values() if isinstance(v, int)):
        raise ConfigurationError(f"dataset {dataset_id!r} is empty (counts {row.counts}): nothing to train on")
    _require_model(settings.train.base_model, "base model", settings)
    return {"dataset_id": dataset_id, "counts": row.counts}


def preflight_evaluation(settings: Settings, checkpoint_id: str | None, split: str) -> dict[str, Any]:
    """Before evaluating: the checkpoint exists, the split has problems, none of which the PRM
    learnt from, and the policy checkpoint is there (unless served)."""
    checkpoint_id = checkpoint_id or latest_checkpoint(settings)
    engine = get_engine(settings)
    with engine.connect() as conn:
        dataset_id = conn.execute(sa.text("SELECT dataset_id FROM checkpoints WHERE checkpoint_id = :c"),
                                  {"c": checkpoint_id}).scalar_one_or_none()
        if dataset_id is None:
            raise ConfigurationError(f"checkpoint {checkpoint_id!r} is not in the step index")
        problems = list(conn.execute(sa.text("SELECT problem_id FROM seed_problems WHERE split = :s"),
                                     {"s": split}).scalars())
        if not problems:
            raise ConfigurationError(f"no seed problems of split {split!r} to evaluate on (ingest them first: "
                                     "mmprm_ingest's eval_seed_source)")
        _refuse_training_problems(conn, checkpoint_id, dataset_id, problems)
    if settings.policy.backend != "openai":
        _require_model(settings.policy.model, "policy model", settings)
    return {"checkpoint_id": checkpoint_id, "split": split, "problems": len(problems)}


def _refuse_training_problems(conn: sa.Connection, checkpoint_id: str, dataset_id: str,
                              problem_ids: list[str]) -> None:
    """Evaluating a PRM on problems its dataset contains measures memory, not judgement."""
    overlap = list(conn.execute(sa.text(
        "SELECT DISTINCT t.problem_id FROM trees t JOIN datasets d ON t.run_id = ANY(d.run_ids)"
        " WHERE d.dataset_id = :d AND t.problem_id = ANY(:p) ORDER BY t.problem_id"),
        {"d": dataset_id, "p": problem_ids}).scalars())
    if overlap:
        shown = ", ".join(overlap[:5]) + (f" and {len(overlap) - 5} more" if len(overlap) > 5 else "")
        raise ConfigurationError(f"evaluation refused: {len(overlap)} of its {len(problem_ids)} problems are in "
                                 f"dataset {dataset_id} that checkpoint {checkpoint_id} was trained on ({shown})")


def annotate_stage(settings: Settings, run_id: str, chunk_index: int) -> dict[str, Any]:
    from .annotate import annotate_chunk

    return annotate_chunk(settings, run_id, chunk_index)


def summary_stage(settings: Settings, run_id: str) -> dict[str, Any]:
    from .annotate import run_summary

    return run_summary(settings, run_id)


# ---------------------------------------------------------------------------------------------
# Trees -> dataset


def _run_trees(conn: sa.Connection, run_ids: list[str]) -> list[sa.Row]:
    """The newest tree of each problem among the runs (a problem re-annotated counts once), with
    the key of the problem's stored image."""
    return conn.execute(sa.text(
        "SELECT DISTINCT ON (t.problem_id) t.tree_id, t.run_id, t.problem_id, t.tree_key, t.tree_sha256,"
        " s.image_key FROM trees t JOIN seed_problems s USING (problem_id)"
        " WHERE t.run_id = ANY(:runs) ORDER BY t.problem_id, t.created_at DESC, t.tree_id DESC"),
        {"runs": run_ids}).all()


def current_runs(settings: Settings) -> list[str]:
    """Runs made under the current policy and search config (what the nightly refresh publishes)."""
    from .runs import config_hash

    with get_engine(settings).connect() as conn:
        return list(conn.execute(sa.text(
            "SELECT run_id FROM annotation_runs WHERE config_hash = :h ORDER BY created_at"),
            {"h": config_hash(settings)}).scalars())


# Settings fields added after dataset and checkpoint ids were first derived from their groups:
# left out of an id while at their default, so the ids made before them stay the same.
_LATER_FIELDS: dict[str, Any] = {"label_values": "mc", "group_by_length": False, "trust_remote_code": False,
                                 "consensus_judge": "none", "consensus_threshold": 0.2, "cut_negatives": False}


def key_fields(group: Any) -> dict[str, Any]:
    """A settings group as it enters a dataset or checkpoint id."""
    later = {name for name, default in _LATER_FIELDS.items()
             if name in type(group).model_fields and getattr(group, name) == default}
    return group.model_dump(exclude=later)


def traverse_stage(settings: Settings, run_ids: list[str]) -> dict[str, Any]:
    """Trees of the runs -> training paths (SPEC §5), stored and registered as a dataset version
    with its label audit (mmprm_tasks.label_audit)."""
    from .label_audit import write_label_audit
    from .traverse import iter_paths

    engine = get_engine(settings)
    store = open_store(settings)
    with engine.connect() as conn:
        known = set(conn.execute(sa.text("SELECT run_id FROM annotation_runs WHERE run_id = ANY(:r)"),
                                 {"r": list(run_ids)}).scalars())
        if unknown := [run_id for run_id in run_ids if run_id not in known]:
            raise LookupError(f"annotation runs not in the step index: {unknown} (a dataset of no run's trees "
                              "would be registered empty)")
        rows = _run_trees(conn, run_ids)
    params = {"traverse": key_fields(settings.traverse), "seed": settings.seed}
    dataset_id = "ds-" + _hash({"trees": [r.tree_sha256 for r in rows], **params})
    with engine.connect() as conn:
        existing = conn.execute(sa.text("SELECT counts FROM datasets WHERE dataset_id = :d"),
                                {"d": dataset_id}).scalar_one_or_none()
    if existing is not None:
        return {"dataset_id": dataset_id, "counts": existing, "created": False}
    # Streamed tree by tree into a spooled file, then uploaded (multipart on S3): memory does not
    # grow with the number of trees.
    trees = (store.get_json(row.tree_key) for row in rows)
    # A path keeps the seed's image_path (the release's format) and gains image_key, the stored
    # copy that training and the exports read (trees are keyed by their problem's id): a key of
    # the store, never its URI, so a home or a bucket can move.
    image_keys = {row.problem_id: row.image_key for row in rows}
    counts: dict[str, int] = {}
    paths_key = f"datasets/{dataset_id}/paths.jsonl"
    paths = ({**path, "image_key": image_keys[path["tree_id"]]}
             for path in iter_paths(trees, settings.traverse, settings.seed, counts))
    if settings.traverse.consensus_judge != "none":
        paths = _consensus_paths(settings, paths, counts)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", encoding="utf-8") as spool:
        for path in paths:
            spool.write(json.dumps(path, ensure_ascii=False) + "\n")
        spool.flush()
        store.put_file(paths_key, spool.name, "application/x-ndjson")
        with open(spool.name, encoding="utf-8") as written:
            audit_key = write_label_audit(settings, dataset_id, map(json.loads, written),
                                          [row.problem_id for row in rows], settings.traverse)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO datasets (dataset_id, run_ids, params, counts, paths_key, label_audit_key)"
            " VALUES (:d, :runs, CAST(:p AS JSONB), CAST(:c AS JSONB), :k, :a) ON CONFLICT (dataset_id) DO NOTHING"),
            {"d": dataset_id, "runs": sorted(run_ids), "p": json.dumps(params), "c": json.dumps(counts),
             "k": paths_key, "a": audit_key})
    return {"dataset_id": dataset_id, "counts": counts, "created": True}


def _consensus_paths(settings: Settings, paths: Iterable[dict[str, Any]],
                     counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    """The paths that pass consensus filtering (see :mod:`mmprm_tasks.consensus`), judged a batch at
    a time. ``counts`` gains ``consensus_<kind>`` for each of the filter's counts, and its
    ``paths``, ``labels``, ``positives`` and ``negatives`` count what is kept."""
    from .consensus import consensus_filter
    from .prm import StepLikelihoodScorer

    cfg = settings.traverse
    apply_torch_threads(settings.torch_threads, "consensus judge")  # a scorer, as evaluation's
    judge = StepLikelihoodScorer(resolve_model_path(settings.train.base_model, settings),
                                 batch_size=settings.eval.prm_batch_size)
    store = open_store(settings)
    iterator = iter(paths)
    while batch := list(itertools.islice(iterator, 256)):
        result = consensus_filter(batch, judge, cfg.consensus_threshold, lambda p: store.get_bytes(p["image_key"]),
                                  mc_threshold=cfg.mc_threshold, cut_negatives=cfg.cut_negatives)
        for name, value in result.counts.items():
            counts[f"consensus_{name}"] = counts.get(f"consensus_{name}", 0) + value
        for sign, group in ((-1, batch), (1, result.kept)):
            for p in group:
                counts["paths"] += sign
                counts["labels"] += sign * len(p["labels"])
                counts[p["polarity"] + "s"] += sign
        yield from result.kept


def format_stage(settings: Settings, dataset_id: str) -> dict[str, Any]:
    """The dataset as the release's InternVL folder (annotation, images, description; see
    :mod:`mmprm_tasks.exports`) and in the generic chat format."""
    from .exports import INTERNVL_ANNOTATION, INTERNVL_META, iter_dataset_paths, write_internvl_folder
    from .formats import chat_line

    engine = get_engine(settings)
    store = open_store(settings)
    paths = iter_dataset_paths(settings, dataset_id)
    prefix = f"datasets/{dataset_id}"
    keys = {
        "internvl": f"{prefix}/internvl/{INTERNVL_ANNOTATION}",
        "internvl_description": f"{prefix}/internvl/{INTERNVL_META}",
        "chat": f"{prefix}/chat.jsonl",
    }
    # Both formats in one pass over the paths, each spooled to a file: flat in the dataset's size.
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".jsonl") as chat:
        written = write_internvl_folder(settings, dataset_id, paths, store, f"{prefix}/internvl",
                                        each=lambda n, path: chat.write(chat_line(n, path) + "\n"))
        chat.flush()
        store.put_file(keys["chat"], chat.name, "application/x-ndjson")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE datasets SET formats = CAST(:f AS JSONB) WHERE dataset_id = :d"),
                     {"f": json.dumps(keys), "d": dataset_id})
    return {"dataset_id": dataset_id, "records": written["records"],
            "uris": {k: store.uri(v) for k, v in keys.items()}}


def latest_dataset(settings: Settings) -> str:
    with get_engine(settings).connect() as conn:
        found = conn.execute(sa.text("SELECT dataset_id FROM datasets WHERE formats <> '{}'::jsonb"
                                     " ORDER BY created_at DESC LIMIT 1")).scalar_one_or_none()
    if found is None:
        raise LookupError("no formatted dataset in the step index: run traverse and format first")
    return found


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def _image_loader(settings: Settings):
    """Reads a training record's image: a key of the configured store (what the format stage
    writes, so a moved home or bucket still trains) or an object URI (datasets formatted before)."""
    store = open_store(settings)

    def load(ref: str) -> bytes:
        if "://" in ref:
            other, key = open_uri(ref, settings)
            return other.get_bytes(key)
        return store.get_bytes(ref)

    return load


def train_stage(settings: Settings, dataset_id: str | None = None) -> dict[str, Any]:
    """Train a PRM on a dataset version; the checkpoint is uploaded and registered."""
    from .formats import read_chat
    from .prm import train_prm

    # An unknown, unformatted or empty dataset is one line, as in the DAG's preflight.
    dataset_id = preflight_training(settings, dataset_id)["dataset_id"]
    engine = get_engine(settings)
    store = open_store(settings)
    train_cfg = key_fields(settings.train)
    checkpoint_id = "ckpt-" + _hash({"dataset": dataset_id, "train": train_cfg, "seed": settings.seed})
    with engine.connect() as conn:
        existing = conn.execute(sa.text("SELECT checkpoint_key, uri, metrics FROM checkpoints WHERE checkpoint_id = :c"),
                                {"c": checkpoint_id}).one_or_none()
        formats = conn.execute(sa.text("SELECT formats FROM datasets WHERE dataset_id = :d"),
                               {"d": dataset_id}).scalar_one()
    if existing is not None:
        return {"checkpoint_id": checkpoint_id, "uri": location(store, existing.checkpoint_key, existing.uri),
                "metrics": existing.metrics, "created": False}
    records = read_chat(store.get_bytes(formats["chat"]).decode())
    base_dir = resolve_model_path(settings.train.base_model, settings)
    apply_torch_threads(settings.torch_threads, "trainer", local_processes())
    out_dir = Path(tempfile.mkdtemp(prefix="mmprm-prm-"))
    try:
        metrics = train_prm(base_dir, records, out_dir, settings.train, settings.seed,
                            image_loader=_image_loader(settings))
        checkpoint_key = f"checkpoints/{checkpoint_id}"
        uri = store.put_dir(checkpoint_key, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO checkpoints (checkpoint_id, dataset_id, base_model, checkpoint_key, config, metrics)"
            " VALUES (:c, :d, :b, :k, CAST(:cfg AS JSONB), CAST(:m AS JSONB)) ON CONFLICT (checkpoint_id) DO NOTHING"),
            {"c": checkpoint_id, "d": dataset_id, "b": settings.train.base_model, "k": checkpoint_key,
             "cfg": json.dumps(train_cfg), "m": json.dumps(metrics, default=str)})
    return {"checkpoint_id": checkpoint_id, "uri": uri, "metrics": metrics, "created": True}


def latest_checkpoint(settings: Settings) -> str:
    with get_engine(settings).connect() as conn:
        found = conn.execute(sa.text("SELECT checkpoint_id FROM checkpoints ORDER BY created_at DESC LIMIT 1")
                             ).scalar_one_or_none()
    if found is None:
        raise LookupError("no PRM checkpoint in the step index: run training first")
    return found


def _eval_problems(conn: sa.Connection, store: ObjectStore, split: str, limit: int | None) -> list[dict[str, Any]]:
    rows = conn.execute(sa.text(
        "SELECT problem_id, question, correct_answer, image_key, extra FROM seed_problems WHERE split = :s"
        " ORDER BY problem_id" + (" LIMIT :n" if limit else "")), {"s": split, "n": limit}).all()
    if not rows:
        raise ConfigurationError(f"no seed problems of split {split!r} to evaluate on (ingest them first)")
    return [{"id": r.problem_id, "question": r.question, "answer": r.correct_answer,
             "image": store.get_bytes(r.image_key), "image_key": r.image_key, "extra": r.extra}
            for r in rows]


def _model_fingerprint(model_dir: str) -> str:
    """Names, sizes and modification times of a checkpoint directory's files: a changed
    checkpoint at the same path is a different model."""
    root = Path(model_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return _hash([(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def candidates_stage(settings: Settings, problems: list[dict[str, Any]]) -> tuple[str, list[list[dict[str, Any]]]]:
    """``settings.eval.num_candidates`` verified policy samples per problem, stored as JSONL under
    ``candidates/<id>.jsonl`` (one line per problem) and reused: the id hashes the policy (and its
    files), the problems, the sampling settings and the seed, so every PRM evaluated on the same
    problems is compared on the same candidates."""
    from .evaluate import sample_candidates
    from .policy import load_policy
    from .verify import AnswerVerifier

    store = open_store(settings)
    policy_dir = resolve_model_path(settings.policy.model, settings) if settings.policy.backend != "openai" else ""
    candidates_id = "cand-" + _hash({
        "policy": settings.policy.model, "backend": settings.policy.backend,
        "files": _model_fingerprint(policy_dir) if policy_dir else None,
        "problems": [p["id"] for p in problems], "n": settings.eval.num_candidates,
        "sampling": settings.sampling.model_dump(), "seed": settings.seed,
        # the default preset leaves existing candidate ids as they were
        **({"prompt": settings.policy.prompt_preset} if settings.policy.prompt_preset != "platform" else {})})
    key = f"candidates/{candidates_id}.jsonl"
    if store.exists(key):
        lines = store.get_jsonl(key)
        by_problem = {line["problem_id"]: line["candidates"] for line in lines}
        if all(p["id"] in by_problem for p in problems):
            return candidates_id, [by_problem[p["id"]] for p in problems]
    policy = load_policy(settings)
    try:
        with AnswerVerifier(settings.verify) as verifier:
            candidates = sample_candidates(problems, policy, verifier, settings.eval.num_candidates,
                                           settings.seed)
    finally:
        policy.close()
    store.put_bytes(key, _jsonl([json.dumps({"problem_id": p["id"], "candidates": c}, ensure_ascii=False)
                                 for p, c in zip(problems, candidates, strict=True)]), "application/x-ndjson")
    return candidates_id, candidates


def evaluate_stage(settings: Settings, checkpoint_id: str | None = None, *, split: str = "test",
                   limit: int | None = None) -> dict[str, Any]:
    """Best-of-N with the PRM on a split: report JSON + PNG in the store, rows in Postgres, and
    every candidate with its step scores (JSONL + ``bon_candidates`` rows, see candidates.py)."""
    from .candidates import BASE_LIKELIHOOD_SCORER, PRM_SCORER, candidates_key, from_sampled, store_candidates
    from .evaluate import add_baseline, best_of_n, plot_report, score_candidates
    from .prm import PRMScorer, StepLikelihoodScorer

    checkpoint_id = preflight_evaluation(settings, checkpoint_id, split)["checkpoint_id"]
    engine = get_engine(settings)
    store = open_store(settings)
    with engine.connect() as conn:
        ckpt = conn.execute(sa.text("SELECT checkpoint_key, uri, dataset_id, base_model, config FROM checkpoints"
                                    " WHERE checkpoint_id = :c"), {"c": checkpoint_id}).one()
        problems = _eval_problems(conn, store, split, limit)
        _refuse_training_problems(conn, checkpoint_id, ckpt.dataset_id, [p["id"] for p in problems])
        toy_trees = _toy_trees(conn, store, ckpt.dataset_id)
    evaluation_id = "eval-" + _hash({"checkpoint": checkpoint_id, "policy": settings.policy.model,
                                     "problems": [p["id"] for p in problems], "eval": settings.eval.model_dump(),
                                     "sampling": settings.sampling.model_dump(), "seed": settings.seed})
    prefix = f"reports/{evaluation_id}"
    candidates_id, candidates = candidates_stage(settings, problems)
    apply_torch_threads(settings.torch_threads, "scorer")
    scorer = PRMScorer(resolve_model_path(location(store, ckpt.checkpoint_key, ckpt.uri), settings),
                       batch_size=settings.eval.prm_batch_size)
    scored = score_candidates(scorer, problems, candidates)
    del scorer
    report = best_of_n(scored, settings.eval.ns, settings.seed, headline=settings.eval.headline_aggregator)
    step_scores = {PRM_SCORER: [[c["step_scores"] for c in cands] for cands in scored]}
    if settings.eval.base_likelihood_baseline:
        base = StepLikelihoodScorer(resolve_model_path(ckpt.base_model, settings),
                                    batch_size=settings.eval.prm_batch_size)
        base_scored = score_candidates(base, problems, candidates)
        add_baseline(report, BASE_LIKELIHOOD_SCORER, base_scored, seed=settings.seed)
        step_scores[BASE_LIKELIHOOD_SCORER] = [[c["step_scores"] for c in cands] for cands in base_scored]
    records = [from_sampled(p["id"], p["question"], p["answer"], p["image_key"], cands,
                            {name: per_problem[i] for name, per_problem in step_scores.items()})
               for i, (p, cands) in enumerate(zip(problems, candidates, strict=True))]
    report = {**report, "evaluation_id": evaluation_id, "checkpoint_id": checkpoint_id,
              "candidates_id": candidates_id, "candidates_key": candidates_key(evaluation_id),
              "label_mode": ckpt.config.get("label_mode"),
              "policy_model": settings.policy.model, "base_model": ckpt.base_model,
              "split": split, "num_problems": len(problems)}
    first_error = _toy_first_error_report(problems, scored, toy_trees)
    if first_error:
        report["first_error"] = first_error
    report_uri = store.put_json(f"{prefix}/report.json", report)
    with tempfile.TemporaryDirectory() as tmp:
        plot_path = plot_report(report, Path(tmp) / "bon.png", title=f"Best-of-N, {checkpoint_id}")
        plot_uri = store.put_file(f"{prefix}/bon.png", plot_path, "image/png")
    _record_evaluation(engine, evaluation_id, checkpoint_id, settings, len(problems), f"{prefix}/report.json",
                       f"{prefix}/bon.png", report)
    candidates_uri = store_candidates(engine, store, evaluation_id, records)
    return {"evaluation_id": evaluation_id, "report_uri": report_uri, "plot_uri": plot_uri,
            "candidates_uri": candidates_uri, "checkpoint_id": checkpoint_id}


def _toy_first_error_report(problems: list[dict[str, Any]], scored: list[list[dict[str, Any]]],
                            trees: list[tuple[dict[str, Any], list[str]]]) -> dict | None:
    """Where the generator's ground truth is known, score first-error calls against it: the PRM's
    on the sampled candidates, and the MC labels' on the annotated trees the PRM learnt from."""
    from .evaluate import first_error_metrics, prm_first_error
    from .toy.labels import mc_first_error_pairs, prefix_first_error

    report: dict[str, Any] = {}
    predicted, truth = [], []
    for problem, candidates in zip(problems, scored):
        gt_steps = (problem.get("extra") or {}).get("gt_steps")
        if not gt_steps:
            continue
        for candidate in candidates:
            if candidate["steps"]:
                predicted.append(prm_first_error(candidate["step_scores"]))
                truth.append(prefix_first_error(gt_steps, candidate["steps"]))
    if predicted:
        report["prm"] = first_error_metrics(predicted, truth) | {"solutions": len(predicted)}
    predicted, truth = [], []
    for tree, gt_steps in trees:
        p, t = mc_first_error_pairs(tree, gt_steps)
        predicted += p
        truth += t
    if predicted:
        report["mc_labels"] = first_error_metrics(predicted, truth) | {"paths": len(predicted)}
    return report or None


def _toy_trees(conn: sa.Connection, store: ObjectStore, dataset_id: str) -> list[tuple[dict[str, Any], list[str]]]:
    """Annotated trees behind a dataset, for problems whose ground-truth steps are known."""
    run_ids = conn.execute(sa.text("SELECT run_ids FROM datasets WHERE dataset_id = :d"), {"d": dataset_id}).scalar_one()
    rows = conn.execute(sa.text(
        "SELECT t.tree_key, p.extra -> 'gt_steps' AS gt FROM trees t JOIN seed_problems p USING (problem_id)"
        " WHERE t.run_id = ANY(:runs) AND p.extra ? 'gt_steps'"), {"runs": list(run_ids)}).all()
    return [(store.get_json(r.tree_key), r.gt) for r in rows]


def _record_evaluation(engine: sa.Engine, evaluation_id: str, checkpoint_id: str, settings: Settings,
                       num_problems: int, report_key: str, plot_key: str, report: dict[str, Any]) -> None:
    rows = []
    for row in report["rows"]:
        methods = {**row["accuracy"], **row.get("baselines", {}), "random": row["random"],
                   "majority_vote": row["majority_vote"],
                   "oracle": row["oracle"], **{f"pass@{k}": v for k, v in row["pass_at_k"].items()}}
        rows += [{"e": evaluation_id, "m": method, "n": row["n"], "a": float(acc)} for method, acc in methods.items()]
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO evaluations (evaluation_id, checkpoint_id, policy_model, num_problems, num_candidates,"
            " report_key, plot_key) VALUES (:e, :c, :p, :np, :nc, :r, :pk) ON CONFLICT (evaluation_id) DO UPDATE"
            " SET report_key = EXCLUDED.report_key, plot_key = EXCLUDED.plot_key"),
            {"e": evaluation_id, "c": checkpoint_id, "p": settings.policy.model, "np": num_problems,
             "nc": settings.eval.num_candidates, "r": report_key, "pk": plot_key})
        conn.execute(sa.text("DELETE FROM evaluation_results WHERE evaluation_id = :e"), {"e": evaluation_id})
        if rows:
            conn.execute(sa.text("INSERT INTO evaluation_results (evaluation_id, method, n, accuracy)"
                                 " VALUES (:e, :m, :n, :a)"), rows)
