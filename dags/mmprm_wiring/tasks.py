"""TaskFlow tasks shared by the DAGs. Each is one call into mmprm_tasks.pipeline.

Settings come from the environment (one settings object) with the run's Params applied; only ids,
counts and object URIs go through XCom.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from airflow.sdk import get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from mmprm_tasks import pipeline
from mmprm_tasks.params import TRIGGER_PARAMS, Endpoint, endpoint_from_connection, settings_from_params
from mmprm_tasks.settings import ConfigurationError, get_settings

from .assets import CHECKPOINT, DATASET, REPORT, SEEDS, TREES

_ORCH = get_settings().orchestration


def fails_at_once_on_configuration_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """A :class:`~mmprm_tasks.settings.ConfigurationError` (a missing checkpoint, an empty dataset,
    a split with no problems) fails the task without retries: waiting cannot fix it."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except ConfigurationError as exc:
            raise AirflowFailException(f"configuration error (not retried): {exc}") from exc

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


@task(outlets=[SEEDS])
@fails_at_once_on_configuration_errors
def ingest_seeds() -> dict[str, Any]:
    return pipeline.ingest_stage(run_settings(), _param("seed_source"))


@task
@fails_at_once_on_configuration_errors
def shard(selection: str = "all") -> dict[str, Any]:
    context = get_current_context()
    run_id = _param("run_id")
    if not run_id and selection == "stale":
        run_id = f"nightly-{context['run_id']}".replace(":", "-").replace("+", "-")[:100]
    return pipeline.shard_stage(run_settings(), run_id, selection=selection, split=_param("split"))  # type: ignore[arg-type]


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


@task(outlets=[TREES], trigger_rule="all_done")
@fails_at_once_on_configuration_errors
def index_summary(sharded: dict[str, Any], annotated: list[dict[str, Any]]) -> dict[str, Any]:
    summary = pipeline.summary_stage(run_settings(), sharded["run_id"])
    if summary["status"] != "succeeded":
        raise RuntimeError(f"run {sharded['run_id']} is {summary['status']}: some chunks did not finish; "
                           "clear the failed annotate_chunk tasks to resume")
    get_current_context()["outlet_events"][TREES].extra = {"run_id": sharded["run_id"], "trees": summary["trees"]}
    return summary


@task(inlets=[TREES])
@fails_at_once_on_configuration_errors
def traverse(sharded: dict[str, Any], all_current_runs: bool = False) -> dict[str, Any]:
    settings = run_settings()
    run_ids = pipeline.current_runs(settings) if all_current_runs else [sharded["run_id"]]
    return pipeline.traverse_stage(settings, run_ids)


@task(outlets=[DATASET])
@fails_at_once_on_configuration_errors
def format_dataset(traversed: dict[str, Any]) -> dict[str, Any]:
    result = pipeline.format_stage(run_settings(), traversed["dataset_id"])
    get_current_context()["outlet_events"][DATASET].extra = {"dataset_id": result["dataset_id"]}
    return result


def _triggering(key: str) -> str | None:
    """The id carried by the asset event that triggered this run, if any."""
    events = get_current_context().get("triggering_asset_events") or {}
    for asset_events in events.values():
        for event in reversed(list(asset_events)):
            if event.extra and event.extra.get(key):
                return event.extra[key]
    return None


@task(inlets=[DATASET], outlets=[CHECKPOINT], queue=_ORCH.gpu_queue, pool=_ORCH.gpu_pool,
      retries=_ORCH.retries, retry_delay=timedelta(seconds=_ORCH.retry_delay_s), retry_exponential_backoff=2.0,
      execution_timeout=timedelta(seconds=_ORCH.train_timeout_s))
@fails_at_once_on_configuration_errors
def train_prm() -> dict[str, Any]:
    dataset_id = _param("dataset_id") or _triggering("dataset_id")
    result = pipeline.train_stage(run_settings(), dataset_id)
    get_current_context()["outlet_events"][CHECKPOINT].extra = {"checkpoint_id": result["checkpoint_id"]}
    return {k: v for k, v in result.items() if k != "metrics"} | {"train_loss": result["metrics"].get("train_loss")}


@task(inlets=[CHECKPOINT], outlets=[REPORT], queue=_ORCH.gpu_queue, pool=_ORCH.gpu_pool,
      retries=_ORCH.retries, retry_delay=timedelta(seconds=_ORCH.retry_delay_s), retry_exponential_backoff=2.0)
@fails_at_once_on_configuration_errors
def evaluate_best_of_n() -> dict[str, Any]:
    checkpoint_id = _param("checkpoint_id") or _triggering("checkpoint_id")
    result = pipeline.evaluate_stage(run_settings(), checkpoint_id, split=_param("eval_split") or "test",
                                     limit=_param("eval_limit"))
    get_current_context()["outlet_events"][REPORT].extra = {"evaluation_id": result["evaluation_id"]}
    return result
