"""TaskFlow tasks shared by the DAGs. Each is one call into mmprm_tasks.pipeline.

Settings come from the environment (one settings object) with the run's Params applied; only ids,
counts and object URIs go through XCom.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from airflow.sdk import get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from mmprm_tasks import pipeline
from mmprm_tasks.failures import EXIT_CONFIGURATION, describe
from mmprm_tasks.params import TRIGGER_PARAMS, Endpoint, endpoint_from_connection, settings_from_params
from mmprm_tasks.settings import ConfigurationError, get_settings

from .assets import CHECKPOINT, DATASET, REPORT, SEEDS, TREES

_ORCH = get_settings().orchestration
# transformers draws a tqdm "Loading weights" bar on stderr at every model load, and a task log
# shows stderr at ERROR level: no bars in tasks, the stages log their own progress at INFO
# (mmprm_tasks/progress.py).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def fails_at_once_on_configuration_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """A configuration error (a missing checkpoint, an empty dataset, a split with no problems,
    S3 credentials refused: what mmprm_tasks.failures.describe calls configuration, the CLI's exit
    1) fails the task without retries: waiting cannot fix it."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            failure = describe(exc)
            if failure is None or failure.exit_code != EXIT_CONFIGURATION:
                raise
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AirflowFailException(f"configuration error (not retried): {first_line}") from exc

    return wrapper


def airflow_endpoint(conn_id: str) -> Endpoint:
    """A policy or judge endpoint from an Airflow Connection (URL and key never travel in Params)."""
    from airflow.sdk import Connection

    conn = Connection.get(conn_id)
    return endpoint_from_connection(conn_id, conn.host, conn.schema, conn.port, conn.password, conn.extra_dejson)


def run_settings():
    """The settings of this DAG run: environment + the run's Params (endpoints from Connections)."""
    params = get_current_context()["params"]
    return settings_from_params({k: v for k, v in params.items() if k in TRIGGER_PARAMS},
                                connections=airflow_endpoint)


def _param(name: str) -> Any:
    return get_current_context()["params"].get(name)


def _airflow_run() -> tuple[str, str]:
    context = get_current_context()
    return context["dag"].dag_id, context["run_id"]


def _set_event(asset: Any, **extra: Any) -> None:
    """The asset event's extra: the step index's ids (what the browser's /mmprm pages are keyed
    by), the counts, and the Airflow run that produced it."""
    dag_id, airflow_run_id = _airflow_run()
    get_current_context()["outlet_events"][asset].extra = {**extra, "airflow_dag_id": dag_id,
                                                           "airflow_run_id": airflow_run_id}


# Preflight tasks check what waiting cannot fix before any work starts; they are never retried.
_PREFLIGHT = {"retries": 0}


@task(outlets=[SEEDS])
@fails_at_once_on_configuration_errors
def ingest_seeds() -> dict[str, Any]:
    result = pipeline.ingest_stage(run_settings(), _param("seed_source"), _param("eval_seed_source"))
    _set_event(SEEDS, problems_indexed=result["problems_indexed"], splits=result["splits"],
               **{k: result[k] for k in ("inserted", "unchanged", "rejected", "quarantine_uris") if k in result})
    return result


@task(**_PREFLIGHT)
@fails_at_once_on_configuration_errors
def preflight_annotation() -> dict[str, Any]:
    return pipeline.preflight_annotation(run_settings(), _param("split"))


@task
@fails_at_once_on_configuration_errors
def shard(selection: str = "all") -> dict[str, Any]:
    context = get_current_context()
    run_id = _param("annotation_run_id")
    if not run_id and selection == "stale":
        run_id = f"nightly-{context['run_id']}".replace(":", "-").replace("+", "-")[:100]
    return pipeline.shard_stage(run_settings(), run_id, selection=selection, split=_param("split"),  # type: ignore[arg-type]
                                airflow_run=_airflow_run())


@task
@fails_at_once_on_configuration_errors
def chunk_indices(sharded: dict[str, Any]) -> list[int]:
    """The mapping input: chunks, never single problems."""
    return sharded["chunks"]


@task(
    inlets=[SEEDS],
    queue=_ORCH.gpu_queue,
    pool=_ORCH.gpu_pool,
    retries=_ORCH.retries,
    retry_delay=timedelta(seconds=_ORCH.retry_delay_s),
    retry_exponential_backoff=2.0,
    max_retry_delay=timedelta(seconds=_ORCH.max_retry_delay_s),
    execution_timeout=timedelta(seconds=_ORCH.annotate_timeout_s),
    map_index_template="chunk {{ task.op_kwargs['chunk_index'] }}",
)
@fails_at_once_on_configuration_errors
def annotate_chunk(sharded: dict[str, Any], chunk_index: int) -> dict[str, Any]:
    return pipeline.annotate_stage(run_settings(), sharded["run_id"], chunk_index)


# Runs when every chunk is done, failed ones included (to say which did not finish), but not when
# the preflight or the shard failed: then there is no run to sum up (and the DAG run fails).
@task(outlets=[TREES], trigger_rule="all_done_min_one_success")
@fails_at_once_on_configuration_errors
def index_summary(sharded: dict[str, Any], annotated: list[dict[str, Any]], all_current_runs: bool = False
                  ) -> dict[str, Any]:
    """``all_current_runs``: the trees event asks the dataset DAG to publish every run under the
    current config (the nightly refresh), not only this one."""
    summary = pipeline.summary_stage(run_settings(), sharded["run_id"])
    if summary["status"] != "succeeded":
        raise RuntimeError(f"run {sharded['run_id']} is {summary['status']}: some chunks did not finish; "
                           "clear the failed annotate_chunk tasks to resume")
    _set_event(TREES, run_id=sharded["run_id"], trees=summary["trees"], problems=summary["problems"],
               all_current_runs=all_current_runs)
    return summary


def _triggering_events() -> list[Any]:
    events = get_current_context().get("triggering_asset_events") or {}
    return [event for asset_events in events.values() for event in asset_events]


def _triggering(key: str) -> str | None:
    """The id carried by the latest asset event that triggered this run, if any."""
    for event in reversed(_triggering_events()):
        if event.extra and event.extra.get(key):
            return event.extra[key]
    return None


def annotation_runs_to_publish(settings: Any) -> list[str]:
    """The annotation_run_id Param, else the runs of every trees event that triggered this run
    (all runs under the current config when one came from the nightly refresh)."""
    if _param("annotation_run_id"):
        return [_param("annotation_run_id")]
    extras = [event.extra or {} for event in _triggering_events()]
    if any(extra.get("all_current_runs") for extra in extras):
        return pipeline.current_runs(settings)
    run_ids = sorted({extra["run_id"] for extra in extras if extra.get("run_id")})
    if not run_ids:
        raise ConfigurationError("no annotation run to publish: set annotation_run_id, or let a trees event "
                                 "trigger mmprm_dataset")
    return run_ids


@task(inlets=[TREES])
@fails_at_once_on_configuration_errors
def traverse() -> dict[str, Any]:
    settings = run_settings()
    return pipeline.traverse_stage(settings, annotation_runs_to_publish(settings))


@task(outlets=[DATASET])
@fails_at_once_on_configuration_errors
def format_dataset(traversed: dict[str, Any]) -> dict[str, Any]:
    result = pipeline.format_stage(run_settings(), traversed["dataset_id"])
    _set_event(DATASET, dataset_id=result["dataset_id"], records=result["records"], counts=traversed["counts"])
    return result


@task(**_PREFLIGHT)
@fails_at_once_on_configuration_errors
def preflight_training() -> dict[str, Any]:
    return pipeline.preflight_training(run_settings(), _param("dataset_id") or _triggering("dataset_id"))


@task(inlets=[DATASET], outlets=[CHECKPOINT], queue=_ORCH.gpu_queue, pool=_ORCH.gpu_pool,
      retries=_ORCH.retries, retry_delay=timedelta(seconds=_ORCH.retry_delay_s), retry_exponential_backoff=2.0,
      execution_timeout=timedelta(seconds=_ORCH.train_timeout_s))
@fails_at_once_on_configuration_errors
def train_prm(checked: dict[str, Any]) -> dict[str, Any]:
    result = pipeline.train_stage(run_settings(), checked["dataset_id"])
    _set_event(CHECKPOINT, checkpoint_id=result["checkpoint_id"], dataset_id=checked["dataset_id"],
               train_loss=result["metrics"].get("train_loss"))
    return {k: v for k, v in result.items() if k != "metrics"} | {"train_loss": result["metrics"].get("train_loss"),
                                                                  "dataset_id": checked["dataset_id"]}


@task(**_PREFLIGHT)
@fails_at_once_on_configuration_errors
def preflight_evaluation() -> dict[str, Any]:
    return pipeline.preflight_evaluation(run_settings(), _param("checkpoint_id") or _triggering("checkpoint_id"),
                                         _param("eval_split") or "test")


@task(inlets=[CHECKPOINT], outlets=[REPORT], queue=_ORCH.gpu_queue, pool=_ORCH.gpu_pool,
      retries=_ORCH.retries, retry_delay=timedelta(seconds=_ORCH.retry_delay_s), retry_exponential_backoff=2.0)
@fails_at_once_on_configuration_errors
def evaluate_best_of_n(checked: dict[str, Any]) -> dict[str, Any]:
    result = pipeline.evaluate_stage(run_settings(), checked["checkpoint_id"], split=checked["split"],
                                     limit=_param("eval_limit"))
    _set_event(REPORT, evaluation_id=result["evaluation_id"], checkpoint_id=result["checkpoint_id"],
               split=checked["split"])
    return result
