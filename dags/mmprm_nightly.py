"""mmprm_nightly_refresh: annotate only new problems and those annotated by an older policy or
config, then publish the trees; mmprm_dataset rebuilds the dataset from every run under the
current config (the trees event says so)."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from mmprm_wiring import params as P
from mmprm_wiring import tasks as T


@dag(
    dag_id="mmprm_nightly_refresh",
    description="Daily: reads the seed problems, annotates only new ones and those annotated by an older policy or config (the mmprm_trees asset); next: mmprm_dataset.",
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    # Paused until someone turns it on: on a fresh stack it would run at once on an empty index.
    is_paused_upon_creation=True,
    max_active_runs=1,
    tags=["mmprm", "annotation", "nightly"],
    # split defaults to train: the nightly refresh never annotates the evaluation split unasked.
    params=P.params("annotation_run_id", "split", *P.ANNOTATION),
    doc_md=__doc__,
)
def mmprm_nightly_refresh():
    sharded = T.shard(selection="stale")
    T.preflight_annotation() >> sharded
    annotated = T.annotate_chunk.partial(sharded=sharded).expand(chunk_index=T.chunk_indices(sharded))
    T.index_summary(sharded, annotated, all_current_runs=True)


dag = mmprm_nightly_refresh()
