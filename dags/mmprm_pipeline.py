"""mmprm_pipeline: seeds -> chunked MCTS annotation -> trees -> PRM dataset.

Triggered by hand with Params. Training (mmprm_train) and evaluation (mmprm_evaluate) follow on
the Assets this DAG emits, so lineage reads seeds -> trees -> dataset -> checkpoint -> report.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from mmprm_wiring import params as P
from mmprm_wiring import tasks as T


@dag(
    dag_id="mmprm_pipeline",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["mmprm", "annotation"],
    params=P.params("seed_source", "run_id", "split", *P.ANNOTATION),
    doc_md=__doc__,
)
def mmprm_pipeline():
    ingested = T.ingest_seeds()
    sharded = T.shard()
    ingested >> sharded
    annotated = T.annotate_chunk.partial(sharded=sharded).expand(chunk_index=T.chunk_indices(sharded))
    summary = T.index_summary(sharded, annotated)
    traversed = T.traverse(sharded)
    summary >> traversed
    T.format_dataset(traversed)



dag = mmprm_pipeline()
