"""mmprm_dataset: annotated trees -> training paths -> the PRM dataset (the `mmprm_prm_dataset` Asset).

Runs on each trees event (the runs it names; every run under the current config after the nightly
refresh), or by hand for one annotation run. mmprm_train follows on the dataset event.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from mmprm_wiring import params as P
from mmprm_wiring import tasks as T
from mmprm_wiring.assets import TREES


@dag(
    dag_id="mmprm_dataset",
    description="Reads the annotated trees, makes training paths and a PRM dataset version (the mmprm_prm_dataset asset); next: mmprm_train.",
    schedule=[TREES],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mmprm", "dataset"],
    params=P.params("annotation_run_id", "label_values", "consensus_judge"),
    doc_md=__doc__,
)
def mmprm_dataset():
    T.format_dataset(T.traverse())


dag = mmprm_dataset()
