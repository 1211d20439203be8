"""mmprm_annotate: seed problems -> chunked MCTS annotation -> trees (the `mmprm_trees` Asset).

Runs when mmprm_ingest publishes seeds, or by hand with Params (the annotation run id, the split,
the search knobs). A preflight task checks the policy checkpoint and the split's seeds first.
mmprm_dataset follows on the trees event, then mmprm_train and mmprm_evaluate.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from mmprm_wiring import params as P
from mmprm_wiring import tasks as T
from mmprm_wiring.assets import SEEDS


@dag(
    dag_id="mmprm_annotate",
    description="Reads the seed problems, grows OmegaPRM trees in chunks on the policy (the mmprm_trees asset); next: mmprm_dataset.",
    schedule=[SEEDS],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["mmprm", "annotation"],
    params=P.params("annotation_run_id", "split", *P.ANNOTATION),
    doc_md=__doc__,
)
def mmprm_annotate():
    sharded = T.shard()
    T.preflight_annotation() >> sharded
    annotated = T.annotate_chunk.partial(sharded=sharded).expand(chunk_index=T.chunk_indices(sharded))
    T.index_summary(sharded, annotated)


dag = mmprm_annotate()
