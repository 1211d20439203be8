"""mmprm_evaluate: Best-of-N evaluation of each new PRM checkpoint (or one named by hand)."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from mmprm_wiring import params as P
from mmprm_wiring import tasks as T
from mmprm_wiring.assets import CHECKPOINT


@dag(
    dag_id="mmprm_evaluate",
    description="Reads a PRM checkpoint, samples and scores Best-of-N candidates on the evaluation split (the mmprm_bon_report asset); the last stage.",
    schedule=[CHECKPOINT],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mmprm", "evaluation"],
    params=P.params(*P.EVALUATION),
    doc_md=__doc__,
)
def mmprm_evaluate():
    T.evaluate_best_of_n(T.preflight_evaluation())



dag = mmprm_evaluate()
