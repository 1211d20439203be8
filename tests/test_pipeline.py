"""The stages' preflight checks, the evaluation split kept apart from training, the Airflow-run
link of an annotation run, and ingesting the evaluation split with the training seeds."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from mmprm_tasks import db, pipeline
from mmprm_tasks.settings import ConfigurationError
from mmprm_tasks.toy.world import generate_seeds


@pytest.fixture
def seeded(settings, tmp_path):
    """The toy world's train and test seeds, ingested as a trigger would (both files at once)."""
    engine = db.get_engine(settings)
    db.upgrade(engine)
    settings = settings.model_copy(update={"seed_roots": [tmp_path / "seeds"]})
    seeds = generate_seeds(tmp_path / "seeds", n_train=4, n_test=3, seed=5)
    result = pipeline.ingest_stage(settings, str(seeds["train"]), str(seeds["test"]))
    return settings, seeds, result


def _ids(path) -> list[str]:
    return sorted(r["id"] for r in json.loads(path.read_text()))


def test_ingest_takes_the_evaluation_split_too_and_counts_each_split(seeded):
    settings, seeds, result = seeded
    assert result["splits"] == {"train": 4, "test": 3} and result["problems_indexed"] == 7
    assert result["inserted"] == 7 and result["rejected"] == 0
    again = pipeline.ingest_stage(settings, str(seeds["train"]), str(seeds["test"]))
    assert again["inserted"] == 0 and again["unchanged"] == 7  # idempotent


def test_an_evaluation_file_outside_the_seed_roots_is_refused(seeded, tmp_path):
    settings, seeds, _ = seeded
    outside = tmp_path / "elsewhere.json"
    outside.write_text(seeds["test"].read_text())
    with pytest.raises(ValueError, match="eval_seed_source"):
        pipeline.ingest_stage(settings, None, str(outside))


def test_annotation_preflight(seeded):
    settings, _, _ = seeded
    assert pipeline.preflight_annotation(settings, "train")["problems"] == 4
    with pytest.raises(ConfigurationError, match="no seed problems of split 'validation'"):
        pipeline.preflight_annotation(settings, "validation")
    missing = settings.with_overrides({"policy.model": "/nonexistent/policy"})
    with pytest.raises(ConfigurationError, match="policy model '/nonexistent/policy'"):
        pipeline.preflight_annotation(missing, "train")


def test_shard_records_the_airflow_run(seeded):
    settings, _, _ = seeded
    pipeline.shard_stage(settings, "linked", split="train", airflow_run=("mmprm_annotate", "manual__2026-12-01"))
    pipeline.shard_stage(settings, "cli-made", split="train")
    with db.get_engine(settings).connect() as conn:
        rows = dict((r.run_id, (r.airflow_dag_id, r.airflow_run_id)) for r in conn.execute(sa.text(
            "SELECT run_id, airflow_dag_id, airflow_run_id FROM annotation_runs")))
    assert rows == {"linked": ("mmprm_annotate", "manual__2026-12-01"), "cli-made": (None, None)}


def _trained_on(settings, problem_ids: list[str], *, dataset_id: str = "ds-x", checkpoint_id: str = "ckpt-x",
                counts: dict | None = None, formatted: bool = True) -> None:
    """A dataset made of trees of ``problem_ids`` and a checkpoint trained on it, as the index
    records them (the tree and model objects are not needed by the checks under test)."""
    pipeline.shard_stage(settings, "run-a", split=None)
    with db.get_engine(settings).begin() as conn:
        for pid in problem_ids:
            conn.execute(sa.text(
                "INSERT INTO trees (run_id, problem_id, root_mc_value, visit_count, num_nodes, num_rollouts,"
                " num_searches, tree_key, tree_sha256, config_hash, mc_histogram) VALUES ('run-a', :p, 0.5, 1, 1, 1, 1,"
                " :k, 'sha', 'h', ARRAY[0,0,0,0,0,1,0,0,0,0])"), {"p": pid, "k": f"trees/run-a/{pid}.json"})
        conn.execute(sa.text(
            "INSERT INTO datasets (dataset_id, run_ids, params, counts, paths_key, formats)"
            " VALUES (:d, ARRAY['run-a'], '{}', CAST(:c AS JSONB), 'k', CAST(:f AS JSONB))"),
            {"d": dataset_id, "c": json.dumps(counts if counts is not None else {"paths": 5}),
             "f": json.dumps({"chat": "k"} if formatted else {})})
        conn.execute(sa.text("INSERT INTO checkpoints (checkpoint_id, dataset_id, base_model, uri, config)"
                             " VALUES (:c, :d, 'b', 'file:///nowhere', '{}')"), {"c": checkpoint_id, "d": dataset_id})


def test_evaluation_refuses_problems_the_prms_dataset_contains(seeded):
    settings, seeds, _ = seeded
    test_ids = _ids(seeds["test"])
    _trained_on(settings, _ids(seeds["train"]) + test_ids[:1])
    with pytest.raises(ConfigurationError, match=rf"1 of its 3 problems are in dataset ds-x .*\({test_ids[0]}\)"):
        pipeline.preflight_evaluation(settings, "ckpt-x", "test")
    # The stage itself refuses too (before sampling anything), whoever calls it.
    with pytest.raises(ConfigurationError, match="evaluation refused"):
        pipeline.evaluate_stage(settings, "ckpt-x", split="test")


def test_evaluation_preflight_passes_on_a_disjoint_split_and_names_what_is_missing(seeded):
    settings, seeds, _ = seeded
    _trained_on(settings, _ids(seeds["train"]))
    assert pipeline.preflight_evaluation(settings, "ckpt-x", "test") == {
        "checkpoint_id": "ckpt-x", "split": "test", "problems": 3}
    with pytest.raises(ConfigurationError, match="no seed problems of split 'dev'"):
        pipeline.preflight_evaluation(settings, "ckpt-x", "dev")
    with pytest.raises(ConfigurationError, match="checkpoint 'ckpt-gone' is not in the step index"):
        pipeline.preflight_evaluation(settings, "ckpt-gone", "test")


def test_training_preflight(seeded):
    settings, seeds, _ = seeded
    _trained_on(settings, _ids(seeds["train"]))
    assert pipeline.preflight_training(settings, "ds-x")["dataset_id"] == "ds-x"
    with db.get_engine(settings).begin() as conn:
        conn.execute(sa.text("INSERT INTO datasets (dataset_id, run_ids, params, counts, paths_key, formats)"
                             " VALUES ('ds-empty', ARRAY['run-a'], '{}', '{\"paths\": 0}', 'k', '{\"chat\": \"k\"}'),"
                             " ('ds-raw', ARRAY['run-a'], '{}', '{\"paths\": 3}', 'k', '{}')"))
    with pytest.raises(ConfigurationError, match="dataset 'ds-empty' is empty"):
        pipeline.preflight_training(settings, "ds-empty")
    with pytest.raises(ConfigurationError, match="dataset 'ds-raw' is not formatted"):
        pipeline.preflight_training(settings, "ds-raw")
    with pytest.raises(ConfigurationError, match="dataset 'ds-gone' is not in the step index"):
        pipeline.preflight_training(settings, "ds-gone")
    no_base = settings.with_overrides({"train.base_model": "/nonexistent/base"})
    with pytest.raises(ConfigurationError, match="base model '/nonexistent/base'"):
        pipeline.preflight_training(no_base, "ds-x")
