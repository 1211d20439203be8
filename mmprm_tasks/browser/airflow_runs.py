"""From an Airflow DAG run to what it made: read its state and its tasks' return values (XCom) in
the metadata database of the api-server the browser runs in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# return-value field -> browser page, in the order a DAG run's link prefers them. Fields, not task
# ids: any task of any of the platform's DAGs that returns one of these ids made that record.
PRODUCED = (
    ("run_id", "runs"),
    ("evaluation_id", "evaluations"),
    ("checkpoint_id", "checkpoints"),
    ("dataset_id", "datasets"),
)
FINISHED_STATES = ("success", "failed")


@dataclass
class DagRunOutputs:
    """A DAG run's state and what its tasks returned so far."""

    state: str | None
    made: list[tuple[str, str]] = field(default_factory=list)  # (page, id) in PRODUCED order
    seeds: dict[str, Any] | None = None  # mmprm_ingest's result: counts per outcome and split

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


def dag_run_outputs(dag_id: str, run_id: str) -> DagRunOutputs:
    import sqlalchemy as sa
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        state = session.scalar(sa.select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        values: list[Any] = [
            XComModel.deserialize_value(xcom)
            for xcom in session.scalars(sa.select(XComModel).where(
                XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == "return_value",
                XComModel.map_index == -1).order_by(XComModel.timestamp))]
    return DagRunOutputs(state=str(state) if state else None, made=produced(values),
                         seeds=next((v for v in values if isinstance(v, dict) and "problems_indexed" in v), None))


def produced(values: list[Any]) -> list[tuple[str, str]]:
    """(page, id) of every record the return values name, in :data:`PRODUCED` order."""
    out: list[tuple[str, str]] = []
    for field_name, page in PRODUCED:
        for value in values:
            if isinstance(value, dict) and isinstance(value.get(field_name), str) and value[field_name]:
                if (page, value[field_name]) not in out:
                    out.append((page, value[field_name]))
    return out
