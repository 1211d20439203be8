"""Best-of-N candidates as records (mmprm_tasks.candidates): the release's evaluation format both
ways, storage in the object store (real S3) and Postgres, and `mmprm score` / `mmprm export eval`
with the shipped tiny model as the PRM."""

from __future__ import annotations

import json
import random

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from mmprm_tasks.candidates import (
    BASE_LIKELIHOOD_SCORER,
    PRM_SCORER,
    best_of_n_input,
    export_release,
    from_sampled,
    image_reader,
    load_candidates,
    read_candidates,
    store_candidates,
    to_release,
)
from mmprm_tasks.db import get_engine
from mmprm_tasks.evaluate import best_of_n
from mmprm_tasks.settings import TOY_POLICY_DIR
from mmprm_tasks.storage import open_store
from tests.helpers import write_png


def _problems(store, image_file, count: int = 12, n: int = 6, seed: int = 3):
    """Scored candidates as an evaluation holds them: random steps, answers and correctness,
    scores on a coarse grid so that ties happen, one empty candidate; the image in ``store``."""
    rng = random.Random(seed)
    image = store.put_content_addressed("images", image_file.read_bytes(), ".png", "image/png")
    problems = []
    for p in range(count):
        sampled, prm, base = [], [], []
        for i in range(n):
            steps = [] if (p, i) == (0, 0) else [f"step {k} of {i}" for k in range(rng.randint(1, 4))] + [str(rng.randint(1, 3))]
            sampled.append({"steps": steps, "final_answer": steps[-1] if steps else None, "correct": bool(steps) and steps[-1] == "2"})
            prm.append([rng.choice([0.1, 0.5, 0.9, 1.0]) for _ in steps])
            base.append([rng.random() for _ in steps])
        problems.append(from_sampled(f"p{p}", f"question {p}?", "2", image, sampled,
                                     {PRM_SCORER: prm, BASE_LIKELIHOOD_SCORER: base}))
    return problems


def _accuracies(report):
    return [(row["n"], row["accuracy"], row["prm_ties"], row["majority_vote"], row["random"]) for row in report["rows"]]


def test_release_export_round_trip_gives_the_same_best_of_n(s3_settings, tmp_path):
    store = open_store(s3_settings)
    problems = _problems(store, write_png(tmp_path / "x.png"))
    before = best_of_n(best_of_n_input(problems), [1, 2, 4, 6], seed=5)
    assert sum(before["rows"][-1]["prm_ties"].values()) > 0  # the grid makes ties: they must survive too
    path = export_release(problems, tmp_path / "export", "eval-x", image_reader(s3_settings))
    records = json.loads(path.read_text())
    assert set(records[0]) >= {"question", "image_path", "solutions_splits", "labels", "prm_scores"}
    assert all(label in (0, 1) and type(label) is int for r in records for label in r["labels"])
    assert (tmp_path / "export" / records[0]["image_path"]).read_bytes() == (tmp_path / "x.png").read_bytes()
    kind, back, rejected = read_candidates(path.read_text())
    assert kind == "release" and not rejected and len(back) == len(problems)
    after = best_of_n(best_of_n_input(back), [1, 2, 4, 6], seed=5)
    assert _accuracies(after) == _accuracies(before)
    # the release's own aggregation (first index wins ties) reads the same fields we wrote
    for record, problem in zip(records, problems, strict=True):
        assert record["prm_scores"] == [c.step_scores[PRM_SCORER] for c in problem.candidates]
        assert record["labels"] == [int(c.correct) for c in problem.candidates]


def test_bad_release_records_are_named_and_good_ones_kept():
    good = {"question": "q", "image_path": "a.png", "solutions_splits": [["s1", "7"], []], "labels": [1, 0]}
    records = [
        good,
        {**good, "labels": [1]},                                   # one label for two candidates
        {k: v for k, v in good.items() if k != "image_path"},       # missing field
        {**good, "id": "x9", "prm_scores": [[0.5], []]},           # one score for two steps
        {**good, "labels": [1, 2]},
        "not an object",
    ]
    kind, problems, rejected = read_candidates(json.dumps(records))
    assert kind == "release" and [p.problem_id for p in problems] == ["#0"]
    assert problems[0].candidates[1].final_answer is None and problems[0].candidates[0].final_answer == "7"
    described = [r.describe() for r in rejected]
    assert [r.record_index for r in rejected] == [1, 2, 3, 4, 5]
    assert "field 'labels'" in described[0]
    assert "field 'image_path'" in described[1] and "missing" in described[1]
    assert "(id 'x9')" in described[2] and "field 'prm_scores'" in described[2] and "candidate 0" in described[2]
    assert "0 or 1" in described[3]
    assert "record 5" in described[4]


def test_evaluation_candidates_land_in_the_store_and_postgres_idempotently(s3_settings, tmp_path):
    engine = get_engine(s3_settings)
    store = open_store(s3_settings)
    problems = _problems(store, write_png(tmp_path / "x.png"), count=3, n=4)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO evaluations (evaluation_id, policy_model, num_problems, num_candidates,"
                             " report_key) VALUES ('eval-1', 'toy', 3, 4, 'reports/eval-1/report.json')"))
    uri = store_candidates(engine, store, "eval-1", problems)
    assert uri.startswith("s3://") and uri.endswith("reports/eval-1/candidates.jsonl")
    store_candidates(engine, store, "eval-1", problems)  # again: same rows, no duplicates
    assert load_candidates(store, "eval-1") == problems
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT problem_id, candidate_index, steps, final_answer, correct, step_scores"
                                    " FROM bon_candidates ORDER BY problem_id, candidate_index")).all()
        key = conn.execute(sa.text("SELECT candidates_key FROM evaluations")).scalar_one()
    assert key == "reports/eval-1/candidates.jsonl" and len(rows) == 12
    first = problems[1].candidates[2]
    row = rows[4 + 2]
    assert (row.problem_id, row.candidate_index, row.steps, row.final_answer, row.correct) == (
        "p1", 2, first.steps, first.final_answer, first.correct)
    assert row.step_scores == first.step_scores
    # a re-run with fewer candidates leaves no stale rows
    fewer = [p.model_copy(update={"candidates": p.candidates[:2]}) for p in problems]
    store_candidates(engine, store, "eval-1", fewer)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM bon_candidates")).scalar_one() == 6


def _release_file(tmp_path):
    write_png(tmp_path / "imgs" / "a.png")
    write_png(tmp_path / "imgs" / "b.png", color=(10, 10, 200))
    records = [
        {"question": "What is 3 + 4?", "image_path": "imgs/a.png",
         "solutions_splits": [["3 + 4 = 7", "The final answer is 7"], ["3 + 4 = 8", "8"], ["7"]], "labels": [1, 0, 1]},
        {"question": "What is 2 * 5?", "image_path": "imgs/b.png", "extra_field": "kept",
         "solutions_splits": [["2 * 5 = 10", "10"], ["2 * 5 = 12", "12"]], "labels": [1, 0]},
    ]
    path = tmp_path / "k12_prm.json"
    path.write_text(json.dumps(records))
    return path, records


def test_score_writes_a_prm_score_for_every_step_of_a_release_file(cli_settings, tmp_path):
    from mmprm_tasks import cli

    path, records = _release_file(tmp_path)
    out = tmp_path / "scored.json"
    result = CliRunner().invoke(cli.app, ["score", str(path), "--checkpoint", str(TOY_POLICY_DIR), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "release file: 2 problems, 5 candidates, 9 steps scored" in result.output
    assert "PRM min" in result.output  # the Best-of-N table of the file
    scored = json.loads(out.read_text())
    for given, got in zip(records, scored, strict=True):
        assert {k: v for k, v in got.items() if k != "prm_scores"} == given  # the record as given
        assert [len(s) for s in got["prm_scores"]] == [len(s) for s in given["solutions_splits"]]
        assert all(0.0 < p < 1.0 for scores in got["prm_scores"] for p in scores)
    # the scored file reads back with its scores, and scoring it again gives the same scores
    kind, back, rejected = read_candidates(out.read_text())
    assert kind == "release" and not rejected
    assert [c.step_scores[PRM_SCORER] for c in back[0].candidates] == scored[0]["prm_scores"]


def test_score_reports_bad_records_and_scores_the_rest(cli_settings, tmp_path):
    from mmprm_tasks import cli

    path, records = _release_file(tmp_path)
    records.append({"question": "q", "image_path": "imgs/a.png", "solutions_splits": [["x"]]})
    path.write_text(json.dumps(records))
    out = tmp_path / "scored.json"
    result = CliRunner().invoke(cli.app, ["score", str(path), "--checkpoint", str(TOY_POLICY_DIR), "--out", str(out)])
    assert result.exit_code == 1
    assert "record 2: field 'labels': missing" in result.output
    assert len(json.loads(out.read_text())) == 2


def test_score_and_export_of_mmprm_candidates(cli_settings, tmp_path):
    """The project's own format: scores land under the given name beside the ones already there;
    `mmprm export eval` writes a stored evaluation in the release's format."""
    from mmprm_tasks import cli

    settings = cli_settings
    store = open_store(settings)
    problems = _problems(store, write_png(tmp_path / "x.png"), count=2, n=3)
    source = tmp_path / "cands.jsonl"
    source.write_text("".join(p.model_dump_json() + "\n" for p in problems))
    result = CliRunner().invoke(cli.app, ["score", str(source), "--checkpoint", str(TOY_POLICY_DIR), "--name", "toy"])
    assert result.exit_code == 0, result.output
    kind, scored, rejected = read_candidates((tmp_path / "cands.scored.jsonl").read_text())
    assert kind == "mmprm" and not rejected
    for before, after in zip(problems, scored, strict=True):
        for b, a in zip(before.candidates, after.candidates, strict=True):
            assert set(a.step_scores) == {PRM_SCORER, BASE_LIKELIHOOD_SCORER, "toy"}
            assert len(a.step_scores["toy"]) == len(a.steps) and a.step_scores[PRM_SCORER] == b.step_scores[PRM_SCORER]

    engine = get_engine(settings)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO evaluations (evaluation_id, policy_model, num_problems, num_candidates,"
                             " report_key) VALUES ('eval-2', 'toy', 2, 3, 'reports/eval-2/report.json')"))
    store_candidates(engine, store, "eval-2", scored)
    result = CliRunner().invoke(cli.app, ["export", "eval", "--out", str(tmp_path / "release"), "--scorer", "toy"])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "release" / "eval-2.json").read_text())
    assert [r["prm_scores"] for r in records] == [[c.step_scores["toy"] for c in p.candidates] for p in scored]
    assert (tmp_path / "release" / records[0]["image_path"]).read_bytes() == (tmp_path / "x.png").read_bytes()


def test_score_takes_a_checkpoint_id_of_the_index(settings):
    from mmprm_tasks.candidates import resolve_checkpoint

    with get_engine(settings).begin() as conn:
        conn.execute(sa.text("INSERT INTO datasets (dataset_id, run_ids, params, counts, paths_key)"
                             " VALUES ('ds-1', '{}', '{}', '{}', 'datasets/ds-1/paths.jsonl')"))
        conn.execute(sa.text("INSERT INTO checkpoints (checkpoint_id, dataset_id, base_model, uri, config)"
                             " VALUES ('ckpt-toy', 'ds-1', 'base', :u, '{}')"), {"u": str(TOY_POLICY_DIR)})
    assert resolve_checkpoint(settings, "ckpt-toy") == str(TOY_POLICY_DIR)
    assert resolve_checkpoint(settings, str(TOY_POLICY_DIR)) == str(TOY_POLICY_DIR)
    with pytest.raises(LookupError, match="'ckpt-none' is neither a checkpoint id in the index nor a path"):
        resolve_checkpoint(settings, "ckpt-none")


@pytest.mark.parametrize("given", ["not json at all\n", '[{"question": '])
def test_unreadable_candidate_files(given):
    from mmprm_tasks.candidates import CandidateFileError

    if given.startswith("["):
        with pytest.raises(CandidateFileError, match="not a JSON array"):
            read_candidates(given)
    else:
        _, problems, rejected = read_candidates(given)
        assert not problems and "line 1: not JSON" in rejected[0].message


def test_every_evaluation_stores_its_candidates_and_exports_round_trip(s3_settings, tmp_path):
    """A real Best-of-N run (toy seeds, the shipped toy policy and a tiny PRM, real Postgres and
    S3): every candidate lands with both scorers' step scores, and the release export of the run
    re-imported gives the report's accuracies for every aggregator and N."""
    from mmprm_tasks.candidates import export_evaluation
    from mmprm_tasks.pipeline import evaluate_stage
    from mmprm_tasks.seeds import ingest_file
    from mmprm_tasks.settings import TOY_FOUNDATION_DIR
    from mmprm_tasks.storage import open_uri
    from mmprm_tasks.toy.world import generate_seeds

    settings = s3_settings.with_overrides({
        "eval.num_candidates": 3, "eval.ns": [1, 2, 3], "sampling.max_new_tokens": 96, "policy.device": "cpu",
        "seed_roots": [str(tmp_path)]})
    seeds = generate_seeds(tmp_path / "seeds", n_train=0, n_test=3, seed=1)
    assert ingest_file(seeds["test"], settings).inserted == 3
    engine = get_engine(settings)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO datasets (dataset_id, run_ids, params, counts, paths_key)"
                             " VALUES ('ds-1', '{}', '{}', '{}', 'datasets/ds-1/paths.jsonl')"))
        conn.execute(sa.text("INSERT INTO checkpoints (checkpoint_id, dataset_id, base_model, uri, config)"
                             " VALUES ('ckpt-toy', 'ds-1', :b, :u, '{}')"),
                     {"b": str(TOY_FOUNDATION_DIR), "u": str(TOY_POLICY_DIR)})
    result = evaluate_stage(settings, "ckpt-toy")
    store, key = open_uri(result["report_uri"], settings)
    report = store.get_json(key)
    assert report["candidates_key"] == f"reports/{result['evaluation_id']}/candidates.jsonl"
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT steps, step_scores FROM bon_candidates WHERE evaluation_id = :e"),
                            {"e": result["evaluation_id"]}).all()
    assert len(rows) == 3 * 3
    for row in rows:
        assert set(row.step_scores) == {PRM_SCORER, BASE_LIKELIHOOD_SCORER}
        assert all(len(scores) == len(row.steps) for scores in row.step_scores.values())
    path = export_evaluation(settings, None, tmp_path / "release")
    assert path.name == f"{result['evaluation_id']}.json"
    _, back, rejected = read_candidates(path.read_text())
    assert not rejected
    again = best_of_n(best_of_n_input(back), report["ns"], settings.seed, headline=report["headline"]["aggregator"])
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in report["rows"]]
    assert [r["prm_ties"] for r in again["rows"]] == [r["prm_ties"] for r in report["rows"]]
