"""mmprm_ingest: seed files -> the seed problems of the step index (the `mmprm_seeds` Asset).

Triggered by hand with a seed file and, for evaluation, the evaluation split's file. Its asset
event starts mmprm_annotate; lineage reads seeds -> trees -> dataset -> checkpoint -> report.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from mmprm_wiring import params as P
from mmprm_wiring import tasks as T


@dag(
    dag_id="mmprm_ingest",
    description="Start here: reads a seed file (and the evaluation split's file) from the seed roots, indexes the seed problems (the mmprm_seeds asset); next: mmprm_annotate.",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mmprm", "seeds"],
    params=P.params("seed_source", "eval_seed_source"),
    doc_md=__doc__,
)
def mmprm_ingest():
    T.ingest_seeds()


dag = mmprm_ingest()
