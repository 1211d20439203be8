"""Step-index content for the annotation browser's tests, made by the platform's own stages.

``record_evaluation`` registers a Best-of-N evaluation the way ``pipeline.evaluate_stage`` does
(report JSON and plot PNG in the store, result rows, and the candidates with their step scores
through ``candidates.store_candidates``) for candidates and scores given by the test, so the
browser can be checked without training a PRM.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mmprm_tasks.candidates import PRM_SCORER, candidates_key, from_sampled, store_candidates
from mmprm_tasks.db import get_engine
from mmprm_tasks.evaluate import best_of_n, plot_report
from mmprm_tasks.pipeline import _record_evaluation
from mmprm_tasks.settings import TOY_FOUNDATION_DIR, Settings
from mmprm_tasks.storage import open_store


# Metrics as train_prm records them: a few scalars and the logged loss of every step.
METRICS = {"train_loss": 0.5, "global_step": 3, "label_mode": "soft",
           "loss_history": [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.55}, {"step": 3, "loss": 0.41}]}


def register_checkpoint(settings: Settings, dataset_id: str, checkpoint_id: str = "ckpt-browser",
                        uri: str = str(TOY_FOUNDATION_DIR)) -> str:
    """A checkpoint row for ``dataset_id`` whose URI is a real model folder (the shipped foundation)."""
    with get_engine(settings).begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO checkpoints (checkpoint_id, dataset_id, base_model, uri, config, metrics)"
            " VALUES (:c, :d, :b, :u, '{\"label_mode\": \"soft\"}', CAST(:m AS JSONB))"
            " ON CONFLICT (checkpoint_id) DO NOTHING"),
            {"c": checkpoint_id, "d": dataset_id, "b": str(TOY_FOUNDATION_DIR), "u": uri, "m": json.dumps(METRICS)})
    return checkpoint_id


def candidates_from_trees(settings: Settings, run_id: str, per_problem: int = 4, seed: int = 0
                          ) -> dict[str, list[dict[str, Any]]]:
    """Candidates per problem: the run's root rollouts (real policy output with its verdicts),
    each with seeded step scores (higher on correct candidates, so the PRM is informative)."""
    rng = random.Random(seed)
    store = open_store(settings)
    with get_engine(settings).connect() as conn:
        rows = conn.execute(sa.text("SELECT problem_id, tree_key FROM trees WHERE run_id = :r ORDER BY problem_id"),
                            {"r": run_id}).all()
    out = {}
    for row in rows:
        tree = store.get_json(row.tree_key)
        pool = [(r, True) for r in tree.get("correct_rollouts") or []] + \
               [(r, False) for r in tree.get("incorrect_rollouts") or []]
        for child in tree.get("children") or []:
            pool += [(child["partial_solution"] + r, True) for r in child.get("correct_rollouts") or []]
        cands = []
        for steps, correct in pool[:per_problem]:
            scores = [round(min(1.0, max(0.0, rng.gauss(0.75 if correct else 0.35, 0.15))), 3) for _ in steps]
            cands.append({"steps": list(steps), "final_answer": steps[-1] if steps else None, "correct": correct,
                          "step_scores": scores})
        if cands:
            out[row.problem_id] = cands
    return out


def record_evaluation(settings: Settings, checkpoint_id: str, candidates: dict[str, list[dict[str, Any]]],
                      evaluation_id: str = "eval-browser", *, scorers: tuple[str, ...] = (PRM_SCORER,),
                      as_rows: bool = True) -> str:
    """An evaluation of ``candidates`` (problem id -> candidates with ``step_scores``) as
    ``evaluate_stage`` records one: report and plot in the store, result rows, and the candidates
    through ``candidates.store_candidates`` with their step scores under each of ``scorers`` (the
    extra scorers' scores are the PRM's reversed, so they differ).  ``as_rows=False`` leaves the
    candidates as an evaluation made before they were rows had them: the sampled file alone,
    without step scores."""
    store = open_store(settings)
    engine = get_engine(settings)
    candidates_id = f"cand-{evaluation_id}"
    report = best_of_n(list(candidates.values()), seed=0)
    report = {**report, "evaluation_id": evaluation_id, "checkpoint_id": checkpoint_id,
              "candidates_id": candidates_id, "split": "train", "num_problems": len(candidates)}
    if as_rows:
        report["candidates_key"] = candidates_key(evaluation_id)
    else:
        store.put_bytes(f"candidates/{candidates_id}.jsonl", "".join(
            json.dumps({"problem_id": pid, "candidates": [{k: v for k, v in c.items() if k != "step_scores"}
                                                          for c in cands]}) + "\n"
            for pid, cands in candidates.items()).encode(), "application/x-ndjson")
    prefix = f"reports/{evaluation_id}"
    store.put_json(f"{prefix}/report.json", report)
    with tempfile.TemporaryDirectory() as tmp:
        store.put_file(f"{prefix}/bon.png", plot_report(report, Path(tmp) / "bon.png"), "image/png")
    _record_evaluation(engine, evaluation_id, checkpoint_id, settings, len(candidates),
                       f"{prefix}/report.json", f"{prefix}/bon.png", report)
    if as_rows:
        with engine.connect() as conn:
            problems = {r.problem_id: r for r in conn.execute(sa.text(
                "SELECT problem_id, question, correct_answer, image_key FROM seed_problems"
                " WHERE problem_id = ANY(:p)"), {"p": list(candidates)})}
        records = []
        for pid, cands in candidates.items():
            prm = [c["step_scores"] for c in cands]
            scores = {name: prm if name == PRM_SCORER else [list(reversed(s)) for s in prm] for name in scorers}
            row = problems[pid]
            records.append(from_sampled(pid, row.question, row.correct_answer, row.image_key, cands, scores))
        store_candidates(engine, store, evaluation_id, records)
    return evaluation_id
