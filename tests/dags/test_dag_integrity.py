"""DAG integrity: every DAG imports, wiring follows the platform's rules, lineage is declared."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    sys.path.insert(0, str(DAGS))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(DAGS))


def test_no_import_errors_and_expected_dags(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dags) == {"mmprm_pipeline", "mmprm_nightly_refresh", "mmprm_train", "mmprm_evaluate"}


@pytest.mark.parametrize("dag_id", ["mmprm_pipeline", "mmprm_nightly_refresh"])
def test_annotation_is_mapped_over_chunks_on_the_gpu_queue(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    annotate = dag.get_task("annotate_chunk")
    assert type(annotate).__name__ == "DecoratedMappedOperator"
    # Mapped over the chunk list the shard task returns, never over problems.
    assert set(annotate.op_kwargs_expand_input.value) == {"chunk_index"}
    assert annotate.upstream_task_ids >= {"chunk_indices", "shard"}
    assert annotate.queue == "gpu" and annotate.pool == "gpu"
    assert annotate.retries >= 1 and annotate.retry_exponential_backoff
    assert annotate.execution_timeout is not None and annotate.execution_timeout > timedelta(0)
    assert annotate.max_retry_delay is not None
    assert dag.catchup is False


def test_pipeline_order(dagbag):
    dag = dagbag.dags["mmprm_pipeline"]
    order = ["ingest_seeds", "shard", "chunk_indices", "annotate_chunk", "index_summary", "traverse", "format_dataset"]
    for upstream, downstream in zip(order, order[1:]):
        assert downstream in dag.get_task(upstream).get_flat_relative_ids(upstream=False), (upstream, downstream)


def test_only_the_nightly_refresh_starts_paused(dagbag):
    """A fresh stack must not annotate an empty index at once; triggered and asset-scheduled DAGs
    run as soon as they are asked to."""
    assert dagbag.dags["mmprm_nightly_refresh"].is_paused_upon_creation is True
    for dag_id in ("mmprm_pipeline", "mmprm_train", "mmprm_evaluate"):
        assert not dagbag.dags[dag_id].is_paused_upon_creation, dag_id


def test_nightly_is_daily_without_catchup(dagbag):
    dag = dagbag.dags["mmprm_nightly_refresh"]
    assert dag.catchup is False
    assert dag.timetable.expression == "0 0 * * *"
    assert "ingest_seeds" not in dag.task_ids


def test_lineage_seeds_trees_dataset_checkpoint_report(dagbag):
    def names(assets):
        return {a.name for a in assets}

    pipeline = dagbag.dags["mmprm_pipeline"]
    assert names(pipeline.get_task("ingest_seeds").outlets) == {"mmprm_seeds"}
    assert names(pipeline.get_task("index_summary").outlets) == {"mmprm_trees"}
    assert names(pipeline.get_task("format_dataset").outlets) == {"mmprm_prm_dataset"}
    train, evaluate = dagbag.dags["mmprm_train"], dagbag.dags["mmprm_evaluate"]
    assert "mmprm_prm_dataset" in str(train.timetable.asset_condition)
    assert names(train.get_task("train_prm").outlets) == {"mmprm_prm_checkpoint"}
    assert "mmprm_prm_checkpoint" in str(evaluate.timetable.asset_condition)
    assert names(evaluate.get_task("evaluate_best_of_n").outlets) == {"mmprm_bon_report"}


def test_params_are_bounded(dagbag):
    from airflow.sdk.definitions.param import ParamValidationError

    params = dagbag.dags["mmprm_pipeline"].params
    for name in ["num_rollouts", "max_search_count", "rollout_budget", "chunk_size", "policy_backend"]:
        assert name in params
    assert params.get_param("num_rollouts").resolve(8) == 8
    with pytest.raises(ParamValidationError):
        params.get_param("num_rollouts").resolve(0)
    with pytest.raises(ParamValidationError):
        params.get_param("policy_backend").resolve("tensorflow")
    assert "learning_rate" in dagbag.dags["mmprm_train"].params
    assert "eval_num_candidates" in dagbag.dags["mmprm_evaluate"].params


def test_airflow_cli_lists_dags_without_import_errors(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    airflow = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    subprocess.run([airflow, "dags", "reserialize"], env=env, check=True, capture_output=True)
    listed = subprocess.run([airflow, "dags", "list"], env=env, check=True, capture_output=True, text=True).stdout
    for dag_id in ["mmprm_pipeline", "mmprm_nightly_refresh", "mmprm_train", "mmprm_evaluate"]:
        assert dag_id in listed
    errors = subprocess.run([airflow, "dags", "list-import-errors"], env=env, check=True, capture_output=True,
                            text=True).stdout
    assert "No data found" in errors


@pytest.mark.parametrize("dag_id", ["mmprm_pipeline", "mmprm_nightly_refresh"])
def test_annotation_defaults_never_annotate_the_test_split(dagbag, dag_id, settings, tmp_path):
    """Evaluation problems must not become training data: the default split the DAGs shard is
    train, and sharding with it leaves every test problem out."""
    import json

    from mmprm_tasks import pipeline
    from mmprm_tasks.seeds import ingest_file
    from mmprm_tasks.toy.world import generate_seeds

    default = dagbag.dags[dag_id].params["split"]
    assert default == "train"
    seeds = generate_seeds(tmp_path / "seeds", n_train=5, n_test=4, seed=2)
    for split in ("train", "test"):
        ingest_file(seeds[split], settings)
    sharded = pipeline.shard_stage(settings, f"nightly-{dag_id}", selection="stale", split=default)
    train_ids = {r["id"] for r in json.loads(seeds["train"].read_text())}
    assert sharded["problems"] == len(train_ids) == 5
