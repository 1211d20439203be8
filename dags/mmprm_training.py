"""mmprm_train: trains a PRM whenever a new dataset version is published (or by hand)."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from mmprm_wiring import params as P
from mmprm_wiring import tasks as T
from mmprm_wiring.assets import DATASET


@dag(
    dag_id="mmprm_train",
    description="Reads a dataset version, trains a PRM checkpoint (the mmprm_prm_checkpoint asset); next: mmprm_evaluate.",
    schedule=[DATASET],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mmprm", "training"],
    params=P.params(*P.TRAINING),
    doc_md=__doc__,
)
def mmprm_train():
    T.train_prm(T.preflight_training())



dag = mmprm_train()
