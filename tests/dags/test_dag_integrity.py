"""DAG integrity: every DAG imports, wiring follows the platform's rules, lineage is declared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"
DAG_IDS = ["mmprm_ingest", "mmprm_annotate", "mmprm_nightly_refresh", "mmprm_dataset", "mmprm_train", "mmprm_evaluate"]


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    sys.path.insert(0, str(DAGS))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(DAGS))


def test_no_import_errors_and_expected_dags(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dags) == set(DAG_IDS)


# Which DAG each one's description names as the next (the last names none).
NEXT_DAG = {"mmprm_ingest": "mmprm_annotate", "mmprm_annotate": "mmprm_dataset", "mmprm_nightly_refresh": "mmprm_dataset",
            "mmprm_dataset": "mmprm_train", "mmprm_train": "mmprm_evaluate", "mmprm_evaluate": None}


def test_every_dag_has_a_one_line_description_naming_what_comes_next(dagbag):
    for dag_id, next_dag in NEXT_DAG.items():
        description = dagbag.dags[dag_id].description
        assert description and "\n" not in description and description.startswith(("Reads", "Start here", "Daily")), dag_id
        assert "Reads" in description or "reads" in description, dag_id  # what it reads
        if next_dag:
            assert description.endswith(f"next: {next_dag}."), (dag_id, description)
        else:
            assert description.endswith("the last stage."), description
    assert dagbag.dags["mmprm_ingest"].description.startswith("Start here:")
    assert sum(d.description.startswith("Start here") for d in dagbag.dags.values()) == 1


@pytest.mark.parametrize("dag_id", ["mmprm_annotate", "mmprm_nightly_refresh"])
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
    # The summary says which chunks did not finish, but never runs when preflight or shard failed.
    assert dag.get_task("index_summary").trigger_rule == "all_done_min_one_success"
    assert dag.catchup is False


@pytest.mark.parametrize(("dag_id", "order"), [
    ("mmprm_annotate", ["preflight_annotation", "shard", "chunk_indices", "annotate_chunk", "index_summary"]),
    ("mmprm_nightly_refresh", ["preflight_annotation", "shard", "chunk_indices", "annotate_chunk", "index_summary"]),
    ("mmprm_dataset", ["traverse", "format_dataset"]),
    ("mmprm_train", ["preflight_training", "train_prm"]),
    ("mmprm_evaluate", ["preflight_evaluation", "evaluate_best_of_n"]),
])
def test_task_order_with_preflight_first(dagbag, dag_id, order):
    dag = dagbag.dags[dag_id]
    for upstream, downstream in zip(order, order[1:]):
        assert downstream in dag.get_task(upstream).get_flat_relative_ids(upstream=False), (upstream, downstream)
    if order[0].startswith("preflight"):
        # What waiting cannot fix is checked once, before any work: never retried.
        assert dag.get_task(order[0]).retries == 0
        assert set(dag.get_task(order[0]).get_flat_relative_ids(upstream=True)) == set()


def test_only_the_nightly_refresh_starts_paused(dagbag):
    """A fresh stack must not annotate an empty index at once; triggered and asset-scheduled DAGs
    run as soon as they are asked to."""
    assert dagbag.dags["mmprm_nightly_refresh"].is_paused_upon_creation is True
    for dag_id in set(DAG_IDS) - {"mmprm_nightly_refresh"}:
        assert not dagbag.dags[dag_id].is_paused_upon_creation, dag_id


def test_nightly_is_daily_without_catchup(dagbag):
    dag = dagbag.dags["mmprm_nightly_refresh"]
    assert dag.catchup is False
    assert dag.timetable.expression == "0 0 * * *"
    assert "ingest_seeds" not in dag.task_ids


def test_lineage_is_the_chain_seeds_trees_dataset_checkpoint_report(dagbag):
    """The asset graph the UI draws (Airflow's own serialized DAG dependencies): each asset is
    produced by one stage and schedules the next, so lineage reads
    seeds -> annotate -> trees -> dataset -> dataset asset -> train -> checkpoint -> evaluate -> report;
    the nightly refresh is a second producer of trees only."""
    from airflow.serialization.serialized_objects import DagSerialization

    produces: dict[str, set[str]] = {}
    consumes: dict[str, set[str]] = {}
    for dag_id, dag in dagbag.dags.items():
        for dep in DagSerialization.serialize_dag(dag)["dag_dependencies"]:
            if dep["dependency_type"] != "asset":
                continue
            dep["dependency_id"] = json.loads(dep["dependency_id"])["name"]  # the asset's key: name + uri
            if dep["source"] == dag_id:
                produces.setdefault(dag_id, set()).add(dep["dependency_id"])
            elif dep["target"] == dag_id:
                consumes.setdefault(dag_id, set()).add(dep["dependency_id"])
    assert produces == {"mmprm_ingest": {"mmprm_seeds"}, "mmprm_annotate": {"mmprm_trees"},
                        "mmprm_nightly_refresh": {"mmprm_trees"}, "mmprm_dataset": {"mmprm_prm_dataset"},
                        "mmprm_train": {"mmprm_prm_checkpoint"}, "mmprm_evaluate": {"mmprm_bon_report"}}
    assert consumes == {"mmprm_annotate": {"mmprm_seeds"}, "mmprm_dataset": {"mmprm_trees"},
                        "mmprm_train": {"mmprm_prm_dataset"}, "mmprm_evaluate": {"mmprm_prm_checkpoint"}}
    # Walk the chain from the seeds: one consumer per asset, five assets in order.
    chain, asset = [], "mmprm_seeds"
    while asset:
        chain.append(asset)
        consumers = [dag_id for dag_id, assets in consumes.items() if asset in assets]
        assert len(consumers) <= 1, (asset, consumers)
        asset = next(iter(produces[consumers[0]])) if consumers else None
    assert chain == ["mmprm_seeds", "mmprm_trees", "mmprm_prm_dataset", "mmprm_prm_checkpoint", "mmprm_bon_report"]


def test_params_are_bounded_titled_and_described(dagbag):
    from airflow.sdk.definitions.param import ParamValidationError

    from mmprm_tasks.params import schema_bounds

    params = dagbag.dags["mmprm_annotate"].params
    for name in ["num_rollouts", "max_search_count", "rollout_budget", "chunk_size", "policy_backend"]:
        assert name in params
    # Airflow's own trigger form has a "Run ID"; ours is named so it cannot be taken for it.
    assert "annotation_run_id" in params and "run_id" not in params
    num_rollouts = params.get_param("num_rollouts")
    assert num_rollouts.resolve(8) == 8
    for out_of_range in (0, 300):  # refused, not clamped to 1 or 256
        with pytest.raises(ParamValidationError):
            num_rollouts.resolve(out_of_range)
    assert num_rollouts.schema["title"] == "Rollouts per expansion"
    assert "Unit: rollouts" in num_rollouts.description and ">= 1 and <= 256" in num_rollouts.description
    with pytest.raises(ParamValidationError):
        params.get_param("policy_backend").resolve("tensorflow")
    for dag_id in DAG_IDS:
        for name, param in dagbag.dags[dag_id].params.items():
            assert param.schema.get("title") and param.description, (dag_id, name)
            if schema_bounds(param.schema):
                assert "Allowed:" in param.description, (dag_id, name)
    assert "learning_rate" in dagbag.dags["mmprm_train"].params
    assert "eval_num_candidates" in dagbag.dags["mmprm_evaluate"].params
    assert set(dagbag.dags["mmprm_ingest"].params) == {"seed_source", "eval_seed_source"}


def test_airflow_cli_lists_dags_without_import_errors(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    airflow = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    subprocess.run([airflow, "dags", "reserialize"], env=env, check=True, capture_output=True)
    listed = subprocess.run([airflow, "dags", "list"], env=env, check=True, capture_output=True, text=True).stdout
    for dag_id in DAG_IDS:
        assert dag_id in listed
    errors = subprocess.run([airflow, "dags", "list-import-errors"], env=env, check=True, capture_output=True,
                            text=True).stdout
    assert "No data found" in errors


@pytest.mark.parametrize("dag_id", ["mmprm_annotate", "mmprm_nightly_refresh"])
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
