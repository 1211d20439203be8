"""What the annotation browser shows, read from the step index (Postgres) and the object store.

Plain functions of :class:`~mmprm_tasks.settings.Settings` returning plain data; the FastAPI app
(:mod:`mmprm_tasks.browser.app`) only renders them.  A missing record raises :class:`NotFound`
naming what was asked for.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa

from ..annotate import run_summary
from ..db import get_engine
from ..settings import Settings
from ..storage import ObjectNotFound, location, open_store

LISTED = 50  # rows per list on the index page and per run


class NotFound(LookupError):
    """The run, problem, dataset, checkpoint or evaluation asked for is not in the step index."""


def _one(conn: sa.Connection, sql: str, params: dict[str, Any], what: str) -> sa.Row:
    row = conn.execute(sa.text(sql), params).first()
    if row is None:
        raise NotFound(what)
    return row


def overview(settings: Settings) -> dict[str, list[sa.Row]]:
    """The newest runs, datasets, checkpoints and evaluations."""
    store = open_store(settings)
    with get_engine(settings).connect() as conn:
        return {
            "runs": conn.execute(sa.text(
                "SELECT r.run_id, r.status, r.policy_model, r.created_at,"
                " (SELECT count(*) FROM chunk_problems p WHERE p.run_id = r.run_id) AS problems,"
                " (SELECT count(*) FROM trees t WHERE t.run_id = r.run_id) AS trees"
                " FROM annotation_runs r ORDER BY r.created_at DESC LIMIT :n"), {"n": LISTED}).all(),
            "datasets": conn.execute(sa.text(
                "SELECT dataset_id, run_ids, counts, created_at FROM datasets ORDER BY created_at DESC LIMIT :n"),
                {"n": LISTED}).all(),
            "checkpoints": [{**row._asdict(), "uri": location(store, row.checkpoint_key, row.uri)} for row in conn.execute(
                sa.text("SELECT checkpoint_id, dataset_id, checkpoint_key, uri, created_at FROM checkpoints"
                        " ORDER BY created_at DESC LIMIT :n"), {"n": LISTED})],
            "evaluations": conn.execute(sa.text(
                "SELECT evaluation_id, checkpoint_id, num_problems, num_candidates, created_at FROM evaluations"
                " ORDER BY created_at DESC LIMIT :n"), {"n": LISTED}).all(),
        }


def _seconds(start: datetime, end: datetime | None) -> float:
    return max(((end or datetime.now(timezone.utc)) - start).total_seconds(), 0.0)


def require_run(settings: Settings, run_id: str) -> None:
    with get_engine(settings).connect() as conn:
        _one(conn, "SELECT 1 FROM annotation_runs WHERE run_id = :r", {"r": run_id}, f"run {run_id!r}")


def first_error_positions(settings: Settings, run_id: str) -> list[tuple[int, int]]:
    """(0-based step, first errors there) of a run; reads the covering partial index only."""
    with get_engine(settings).connect() as conn:
        return [(row.step, row.count) for row in conn.execute(sa.text(
            "SELECT n.prefix_len + n.num_steps - 1 AS step, count(*) FROM trees t JOIN step_nodes n USING (tree_id)"
            " WHERE t.run_id = :r AND n.is_first_error GROUP BY 1 ORDER BY 1"), {"r": run_id})]


def run_view(settings: Settings, run_id: str, *, offset: int = 0, limit: int = 200) -> dict[str, Any]:
    """A run's progress (problems done / leased / left, rollouts/s, engine batches, ETA) and its
    problems ``offset`` to ``offset + limit`` (a paper-scale run has thousands)."""
    engine = get_engine(settings)
    with engine.connect() as conn:
        run = _one(conn, "SELECT run_id, status, policy_backend, policy_model, config, stats, created_at,"
                         " finished_at FROM annotation_runs WHERE run_id = :r", {"r": run_id}, f"run {run_id!r}")
        statuses = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM chunk_problems WHERE run_id = :r GROUP BY status"), {"r": run_id}).all())
        problems = conn.execute(sa.text(
            "SELECT p.problem_id, p.chunk_index, p.status, p.attempts, p.error, t.root_mc_value, t.num_nodes,"
            " t.num_rollouts, (SELECT min(n.prefix_len + n.num_steps - 1) FROM step_nodes n"
            "   WHERE n.tree_id = t.tree_id AND n.is_first_error) AS first_error_step"
            " FROM chunk_problems p LEFT JOIN trees t ON t.run_id = p.run_id AND t.problem_id = p.problem_id"
            " WHERE p.run_id = :r ORDER BY p.chunk_index, p.problem_id OFFSET :o LIMIT :n"),
            {"r": run_id, "o": offset, "n": limit}).all()
        # Trees of an imported run have no chunk rows.
        imported = conn.execute(sa.text(
            "SELECT problem_id, root_mc_value, num_nodes, num_rollouts FROM trees t WHERE run_id = :r"
            " AND NOT EXISTS (SELECT 1 FROM chunk_problems p WHERE p.run_id = t.run_id AND p.problem_id = t.problem_id)"
            " ORDER BY problem_id OFFSET :o LIMIT :n"), {"r": run_id, "o": offset, "n": limit}).all()
    summary = run_summary(settings, run_id)
    done = statuses.get("done", 0)
    total = sum(statuses.values())
    left = total - done
    elapsed = _seconds(run.created_at, run.finished_at)
    rollouts = summary["stats"]["rollouts"]
    per_second = done / elapsed if elapsed > 0 else 0.0
    stats = run.stats or {}
    return {
        "run": run, "summary": summary,
        "progress": {
            "total": total, "done": done, "leased": statuses.get("leased", 0),
            "pending": statuses.get("pending", 0), "failed": statuses.get("failed", 0), "left": left,
            "elapsed_s": elapsed, "rollouts": rollouts,
            "rollouts_per_s": rollouts / elapsed if elapsed > 0 else 0.0,
            # Engine work is added to the run's stats when an attempt ends (see annotate_chunk).
            "engine_calls": stats.get("engine_calls", 0), "mean_batch_size": stats.get("mean_batch_size", 0.0),
            "rollouts_per_call": (stats.get("engine_rollouts", 0) / stats["engine_calls"]
                                  if stats.get("engine_calls") else 0.0),
            "max_sequences_in_flight": settings.search.max_sequences_in_flight,
            "eta_s": left / per_second if per_second > 0 and left and run.status != "succeeded" else None,
        },
        "problems": problems, "imported": imported,
        "page": {"offset": offset, "limit": limit,
                 "more": len(problems) == limit or len(imported) == limit},
    }


def _walk(record: dict[str, Any]) -> list[dict[str, Any]]:
    """SPEC §4 tree record nodes in pre-order (the step index's ``node_index``)."""
    out: list[dict[str, Any]] = []
    stack = [record]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(reversed(node.get("children") or []))
    return out


def problem_row(settings: Settings, problem_id: str) -> sa.Row:
    with get_engine(settings).connect() as conn:
        return _one(conn, "SELECT problem_id, question, correct_answer, image_key, split, source, extra"
                          " FROM seed_problems WHERE problem_id = :p", {"p": problem_id}, f"problem {problem_id!r}")


def problem_view(settings: Settings, problem_id: str) -> dict[str, Any]:
    """A seed problem and the runs that annotated it."""
    problem = problem_row(settings, problem_id)
    with get_engine(settings).connect() as conn:
        trees = conn.execute(sa.text(
            "SELECT run_id, root_mc_value, num_nodes, num_rollouts, created_at FROM trees WHERE problem_id = :p"
            " ORDER BY created_at DESC"), {"p": problem_id}).all()
    return {"problem": problem, "trees": trees}


def tree_view(settings: Settings, run_id: str, problem_id: str) -> dict[str, Any]:
    """One problem's tree in a run: every node with its steps, MC value, visits, correct and
    incorrect rollout counts, the first-error nodes marked, and the rollouts themselves."""
    problem = problem_row(settings, problem_id)
    with get_engine(settings).connect() as conn:
        tree = _one(conn, "SELECT tree_id, tree_key, root_mc_value, visit_count, num_nodes, num_rollouts,"
                          " num_searches, created_at FROM trees WHERE run_id = :r AND problem_id = :p",
                    {"r": run_id, "p": problem_id}, f"tree of problem {problem_id!r} in run {run_id!r}")
        nodes = conn.execute(sa.text(
            "SELECT node_index, parent_index, depth, prefix_len, steps, mc_value, visit_count, num_correct,"
            " num_incorrect, is_first_error FROM step_nodes WHERE tree_id = :t ORDER BY node_index"),
            {"t": tree.tree_id}).all()
        # The search settings the run's MC values were estimated with (the run's own config).
        search = conn.execute(sa.text("SELECT config -> 'search' FROM annotation_runs WHERE run_id = :r"),
                              {"r": run_id}).scalar_one_or_none() or {}
    try:
        record = open_store(settings).get_json(tree.tree_key)
        rollouts = [(n.get("correct_rollouts") or [], n.get("incorrect_rollouts") or []) for n in _walk(record)]
    except ObjectNotFound:
        record, rollouts = None, []
    view_nodes = []
    for row in nodes:
        correct, incorrect = rollouts[row.node_index] if row.node_index < len(rollouts) else ([], [])
        view_nodes.append({
            "mc_basis": mc_basis(row.mc_value, row.num_correct + row.num_incorrect, search.get("num_rollouts"),
                                 search.get("rollout_budget")),
            "index": row.node_index, "parent": row.parent_index, "depth": row.depth,
            "first_step": row.prefix_len, "steps": list(row.steps), "mc": row.mc_value,
            "visits": row.visit_count, "num_correct": row.num_correct, "num_incorrect": row.num_incorrect,
            "first_error": row.is_first_error, "correct_rollouts": correct, "incorrect_rollouts": incorrect,
        })
    first_errors = [n for n in view_nodes if n["first_error"]]
    return {"problem": problem, "tree": tree, "nodes": view_nodes, "first_errors": first_errors,
            "tree_object_missing": record is None}


def mc_basis(mc: float, distinct_rollouts: int, num_rollouts: int | None, rollout_budget: int | None) -> str:
    """What a node's MC value is computed from, in words, so it visibly agrees with the rollout
    counts beside it: one estimate of ``num_rollouts`` sampled continuations of the node's prefix
    (fewer when the problem's rollout budget ran short), of which the share whose answer was
    right; the counts shown are distinct rollouts (a repeated sample counts in MC, is kept once)."""
    if distinct_rollouts == 0:
        return ("not estimated: these steps come from a correct rollout of the parent, "
                "so every continuation from here reached the right answer (MC 1 by construction)")
    if not num_rollouts:
        return "share of correct answers among this node's sampled continuations"
    correct = mc * num_rollouts
    budget = f", rollout budget {rollout_budget} per problem" if rollout_budget else ""
    if abs(correct - round(correct)) < 1e-6:
        return (f"{round(correct)} of {num_rollouts} sampled continuations reached the right answer "
                f"(num_rollouts {num_rollouts}{budget}); the counts beside it are distinct rollouts, "
                "a repeated sample counts in MC but is listed once")
    return (f"share of right answers among the fewer than {num_rollouts} continuations sampled here: the "
            f"problem's rollout budget ran short, or some answers could not be verified{budget}")


def problem_image(settings: Settings, problem_id: str) -> tuple[bytes, str]:
    problem = problem_row(settings, problem_id)
    data = open_store(settings).get_bytes(problem.image_key)
    suffix = problem.image_key.rsplit(".", 1)[-1].lower()
    return data, {"jpg": "image/jpeg", "jpeg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}.get(
        suffix, "image/png")


def split_process(process: str, labels: list[float]) -> list[tuple[str, float | None]]:
    """A path's process text cut at every ``<prm>``, each piece with its label (SPEC §5)."""
    pieces = process.split("<prm>")
    out: list[tuple[str, float | None]] = []
    for i, piece in enumerate(pieces):
        text = piece.strip()
        if i < len(labels):
            out.append((text, labels[i]))
        elif text:
            out.append((text, None))
    return out


def dataset_view(settings: Settings, dataset_id: str, *, limit: int = LISTED) -> dict[str, Any]:
    """A dataset version: its counts, label balance and its first ``limit`` paths."""
    with get_engine(settings).connect() as conn:
        ds = _one(conn, "SELECT dataset_id, run_ids, params, counts, paths_key, formats, created_at FROM datasets"
                        " WHERE dataset_id = :d", {"d": dataset_id}, f"dataset {dataset_id!r}")
        checkpoints = conn.execute(sa.text(
            "SELECT checkpoint_id FROM checkpoints WHERE dataset_id = :d ORDER BY created_at DESC"),
            {"d": dataset_id}).scalars().all()
    paths, positives, labels_total, labels_zero = [], 0, 0, 0
    total = 0
    for path in open_store(settings).get_jsonl(ds.paths_key):
        total += 1
        labels = [float(x) for x in path.get("labels", [])]
        positives += bool(labels) and labels[-1] > 0
        labels_total += len(labels)
        labels_zero += sum(x <= 0 for x in labels)
        if len(paths) < limit:
            paths.append({**path, "pieces": split_process(path.get("process", ""), labels)})
    return {"dataset": ds, "paths": paths, "checkpoints": checkpoints,
            "balance": {"paths": total, "positive": positives, "negative": total - positives,
                        "labels": labels_total, "labels_zero": labels_zero,
                        "labels_positive": labels_total - labels_zero}}


def checkpoint_view(settings: Settings, checkpoint_id: str) -> dict[str, Any]:
    with get_engine(settings).connect() as conn:
        ckpt = _one(conn, "SELECT checkpoint_id, dataset_id, base_model, checkpoint_key, uri, config, metrics, created_at"
                          " FROM checkpoints WHERE checkpoint_id = :c", {"c": checkpoint_id},
                    f"checkpoint {checkpoint_id!r}")
        evaluations = conn.execute(sa.text(
            "SELECT evaluation_id FROM evaluations WHERE checkpoint_id = :c ORDER BY created_at DESC"),
            {"c": checkpoint_id}).scalars().all()
    metrics = {k: v for k, v in (ckpt.metrics or {}).items() if k != "loss_history"}  # the history is plotted
    where = location(open_store(settings), ckpt.checkpoint_key, ckpt.uri)
    return {"checkpoint": {**ckpt._asdict(), "uri": where}, "evaluations": evaluations,
            "snippet": from_pretrained_snippet(where),
            "metrics": metrics, "has_loss_curve": bool(loss_history(ckpt.metrics))}


def loss_history(metrics: dict[str, Any] | None) -> list[tuple[int, float]]:
    """(step, loss) of every logged training step of a checkpoint's metrics."""
    return [(int(e["step"]), float(e["loss"])) for e in (metrics or {}).get("loss_history", [])]


def checkpoint_loss(settings: Settings, checkpoint_id: str) -> list[tuple[int, float]]:
    with get_engine(settings).connect() as conn:
        ckpt = _one(conn, "SELECT metrics FROM checkpoints WHERE checkpoint_id = :c", {"c": checkpoint_id},
                    f"checkpoint {checkpoint_id!r}")
    return loss_history(ckpt.metrics)


def from_pretrained_snippet(uri: str) -> str:
    """Python that loads the checkpoint (a local folder, or an ``s3://`` URI fetched to the cache)."""
    return (
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "from mmprm_tasks.policy import resolve_model_path\n"
        "from mmprm_tasks.settings import get_settings\n\n"
        f"path = resolve_model_path({uri!r}, get_settings())  # s3:// is fetched to a local cache\n"
        "model = AutoModelForImageTextToText.from_pretrained(path)\n"
        "processor = AutoProcessor.from_pretrained(path)\n"
    )


def _legacy_candidates(settings: Settings, report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """problem id -> sampled candidates (steps, answer, verdict; no step scores) of an evaluation
    made before candidates became rows (``candidates/<candidates_id>.jsonl``)."""
    if not report.get("candidates_id"):
        return {}
    try:
        lines = open_store(settings).get_jsonl(f"candidates/{report['candidates_id']}.jsonl")
    except ObjectNotFound:
        return {}
    return {str(line["problem_id"]): [{"index": i, **c} for i, c in enumerate(line.get("candidates") or [])]
            for line in lines}


def evaluation_view(settings: Settings, evaluation_id: str) -> dict[str, Any]:
    """An evaluation's report (Best-of-N table with ties) and, per problem, its candidates: counts
    and the scorers whose step scores were stored (``bon_candidates``, see candidates.py)."""
    with get_engine(settings).connect() as conn:
        ev = _one(conn, "SELECT evaluation_id, checkpoint_id, policy_model, num_problems, num_candidates,"
                        " report_key, plot_key, created_at FROM evaluations WHERE evaluation_id = :e",
                  {"e": evaluation_id}, f"evaluation {evaluation_id!r}")
        problems = [{"problem_id": r.problem_id, "candidates": r.n, "correct": r.correct,
                     "scorers": sorted(r.scorers or [])} for r in conn.execute(sa.text(
            "SELECT problem_id, count(*) AS n, count(*) FILTER (WHERE correct) AS correct,"
            " (SELECT array_agg(DISTINCT k) FROM bon_candidates b2, jsonb_object_keys(b2.step_scores) AS k"
            "  WHERE b2.evaluation_id = b.evaluation_id AND b2.problem_id = b.problem_id) AS scorers"
            " FROM bon_candidates b WHERE evaluation_id = :e GROUP BY evaluation_id, problem_id ORDER BY problem_id"),
            {"e": evaluation_id})]
    report = open_store(settings).get_json(ev.report_key)
    if not problems:
        problems = [{"problem_id": pid, "candidates": len(cands), "correct": sum(bool(c.get("correct")) for c in cands),
                     "scorers": []} for pid, cands in _legacy_candidates(settings, report).items()]
    return {"evaluation": ev, "report": report, "problems": problems}


def evaluation_standing(settings: Settings, evaluation_id: str,
                        report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where an evaluation's PRM stands on the shipped curve of PRM quality against annotated
    paths (:mod:`mmprm_tasks.scaling_curve`, file: the setting ``scaling_curve``): ``{"curve":
    the report or None, "point": {"paths", "min", "weighted_vote"} or None, "line": the one-line
    comparison or None, "note": why there is no line, or None}``.  The point's paths are the
    checkpoint's dataset's ``counts["paths"]``; its accuracies the evaluation ``report``'s (read
    from the store when not given) at the curve's N."""
    from ..scaling_curve import load_curve, place

    with get_engine(settings).connect() as conn:
        ev = _one(conn, "SELECT e.report_key, d.counts FROM evaluations e"
                        " LEFT JOIN checkpoints c ON c.checkpoint_id = e.checkpoint_id"
                        " LEFT JOIN datasets d ON d.dataset_id = c.dataset_id WHERE e.evaluation_id = :e",
                  {"e": evaluation_id}, f"evaluation {evaluation_id!r}")
    out: dict[str, Any] = {"curve": None, "point": None, "line": None, "note": None}
    try:
        out["curve"] = load_curve(settings.scaling_curve)
    except ValueError as exc:
        out["note"] = f"The scaling curve file cannot be read: {exc}"
        return out
    if out["curve"] is None:
        out["note"] = ("No scaling curve is shipped with this installation (mmprm_tasks/toy/scaling_curve.json, "
                       "setting MMPRM_SCALING_CURVE): there is no measured curve to place this PRM on.")
        return out
    paths = (ev.counts or {}).get("paths")
    if not paths:
        out["note"] = ("This evaluation's checkpoint has no dataset with training paths in the step index, "
                       "so it has no place on the curve.")
        return out
    if report is None:
        report = open_store(settings).get_json(ev.report_key)
    try:
        out["line"], out["point"] = place(out["curve"], paths, report)
    except ValueError as exc:  # a curve without MC-labelled points
        out["note"] = f"The scaling curve cannot place this PRM: {exc}"
    return out


def evaluation_problem_view(settings: Settings, evaluation_id: str, problem_id: str,
                            scorer: str | None = None) -> dict[str, Any]:
    """One evaluated problem: its image and each candidate's steps with one scorer's step scores
    (``scorer``, default the PRM's: ``candidates.PRM_SCORER``)."""
    from ..candidates import PRM_SCORER

    view = evaluation_view(settings, evaluation_id)
    with get_engine(settings).connect() as conn:
        rows = [{"index": r.candidate_index, "steps": r.steps, "final_answer": r.final_answer, "correct": r.correct,
                 "step_scores": r.step_scores} for r in conn.execute(sa.text(
            "SELECT candidate_index, steps, final_answer, correct, step_scores FROM bon_candidates"
            " WHERE evaluation_id = :e AND problem_id = :p ORDER BY candidate_index"),
            {"e": evaluation_id, "p": problem_id})]
    if not rows:
        rows = _legacy_candidates(settings, view["report"]).get(problem_id, [])
    if not rows:
        raise NotFound(f"problem {problem_id!r} in the candidates of evaluation {evaluation_id!r}")
    problem = problem_row(settings, problem_id)
    scorers = sorted({name for row in rows for name in row.get("step_scores") or {}})
    chosen = scorer if scorer in scorers else (PRM_SCORER if PRM_SCORER in scorers else (scorers or [None])[0])
    candidates = []
    for row in rows:
        scores = (row.get("step_scores") or {}).get(chosen) if chosen else None
        steps = list(row.get("steps") or [])
        candidates.append({"index": row["index"], "correct": bool(row.get("correct")), "answer": row.get("final_answer"),
                           "steps": [(s, scores[j] if scores and j < len(scores) else None)
                                     for j, s in enumerate(steps)], "has_scores": scores is not None})
    return {"evaluation": view["evaluation"], "report": view["report"], "problem": problem,
            "candidates": candidates, "scorers": scorers, "scorer": chosen}


def evaluation_plot(settings: Settings, evaluation_id: str) -> bytes:
    with get_engine(settings).connect() as conn:
        ev = _one(conn, "SELECT plot_key FROM evaluations WHERE evaluation_id = :e", {"e": evaluation_id},
                  f"evaluation {evaluation_id!r}")
    if not ev.plot_key:
        raise NotFound(f"plot of evaluation {evaluation_id!r}")
    return open_store(settings).get_bytes(ev.plot_key)
