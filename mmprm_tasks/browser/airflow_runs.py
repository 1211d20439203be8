"""From an Airflow DAG run to what it made: read its tasks' return values (XCom) in the metadata
database of the api-server the browser runs in."""

from __future__ import annotations

from typing import Any

# task id -> (return-value field, browser page); the first one a DAG run has wins.
PRODUCED = (
    ("shard", "run_id", "runs"),
    ("evaluate_best_of_n", "evaluation_id", "evaluations"),
    ("train_prm", "checkpoint_id", "checkpoints"),
    ("format_dataset", "dataset_id", "datasets"),
    ("traverse", "dataset_id", "datasets"),
)


def produced(dag_id: str, run_id: str) -> list[tuple[str, str]]:
    """(page, id) of everything the DAG run made so far, in :data:`PRODUCED` order."""
    import sqlalchemy as sa
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    tasks = [task for task, _, _ in PRODUCED]
    with create_session() as session:
        values: dict[str, Any] = {
            xcom.task_id: XComModel.deserialize_value(xcom)
            for xcom in session.scalars(sa.select(XComModel).where(
                XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == "return_value",
                XComModel.map_index == -1, XComModel.task_id.in_(tasks)))}
    out = []
    for task, field, page in PRODUCED:
        value = values.get(task)
        if isinstance(value, dict) and value.get(field) and (page, str(value[field])) not in out:
            out.append((page, str(value[field])))
    return out
