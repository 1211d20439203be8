"""mmprm_nightly_refresh: annotate only new problems and those annotated by an older policy or
config, then republish the trees and the dataset built from every run under the current config."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from mmprm_wiring import params as P
from mmprm_wiring import tasks as T


@dag(
    dag_id="mmprm_nightly_refresh",
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    # Paused until someone turns it on: on a fresh stack it would run at once on an empty index.
    is_paused_upon_creation=True,
    max_active_runs=1,
    tags=["mmprm", "annotation", "nightly"],
    params=P.params("run_id", "split", *P.ANNOTATION),
    doc_md=__doc__,
)
def mmprm_nightly_refresh():
    sharded = T.shard(selection="stale")
    annotated = T.annotate_chunk.partial(sharded=sharded).expand(chunk_index=T.chunk_indices(sharded))
    summary = T.index_summary(sharded, annotated)
    traversed = T.traverse(sharded, all_current_runs=True)
    summary >> traversed
    T.format_dataset(traversed)



dag = mmprm_nightly_refresh()
