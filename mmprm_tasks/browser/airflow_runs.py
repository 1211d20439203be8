"""From an Airflow DAG run to what it made: read its tasks' return values (XCom) in the metadata
database of the api-server the browser runs in."""

from __future__ import annotations

from typing import Any

# return-value field -> browser page, in the order a DAG run's link prefers them. Fields, not task
# ids: any task of any of the platform's DAGs that returns one of these ids made that record.
PRODUCED = (
    ("run_id", "runs"),
    ("evaluation_id", "evaluations"),
    ("checkpoint_id", "checkpoints"),
    ("dataset_id", "datasets"),
)


def produced(dag_id: str, run_id: str) -> list[tuple[str, str]]:
    """(page, id) of everything the DAG run made so far, in :data:`PRODUCED` order."""
    import sqlalchemy as sa
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        values: list[Any] = [
            XComModel.deserialize_value(xcom)
            for xcom in session.scalars(sa.select(XComModel).where(
                XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == "return_value",
                XComModel.map_index == -1).order_by(XComModel.timestamp))]
    out: list[tuple[str, str]] = []
    for field, page in PRODUCED:
        for value in values:
            if isinstance(value, dict) and isinstance(value.get(field), str) and value[field]:
                if (page, value[field]) not in out:
                    out.append((page, value[field]))
    return out
