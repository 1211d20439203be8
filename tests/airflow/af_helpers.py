"""REST and step-index helpers of the distributed-run tests (every poll has a timeout)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mmprm_tasks.settings import Settings

# The annotation DAG: seeds -> trees (mmprm_ingest and mmprm_dataset are the stages around it).
DAG_ID = "mmprm_annotate"


def ingest_directly(settings: Settings, seeds: dict[str, Any]) -> None:
    """The toy seeds into the step index without mmprm_ingest, so no seeds event starts an
    annotation run of its own (idempotent: a second call changes nothing)."""
    from mmprm_tasks.seeds import ingest_file

    for path in seeds.values():
        ingest_file(path, settings)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def unpause(client, dag_id: str = DAG_ID) -> None:
    response = client.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False})
    assert response.status_code == 200, response.text
    assert response.json()["is_paused"] is False


def trigger(client, conf: dict[str, Any], dag_id: str = DAG_ID) -> dict[str, Any]:
    response = client.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
    assert response.status_code == 200, response.text
    return response.json()


def dag_run_state(client, run_id: str, dag_id: str = DAG_ID) -> str:
    response = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
    response.raise_for_status()
    return response.json()["state"]


def wait_for_run(client, run_id: str, timeout: float, dag_id: str = DAG_ID) -> str:
    """Poll the run until it finishes; returns its final state."""
    state = wait_for(lambda: (s := dag_run_state(client, run_id, dag_id)) in ("success", "failed") and s,
                     timeout, f"dag run {run_id} to finish", interval=1.0)
    return state


def task_instances(client, run_id: str, dag_id: str = DAG_ID) -> list[dict[str, Any]]:
    response = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000})
    response.raise_for_status()
    return response.json()["task_instances"]


def step_index_check(settings: Settings, run_id: str) -> dict[str, Any]:
    """Every problem of the run has exactly one tree row and one tree object; all problems done."""
    import sqlalchemy as sa

    from mmprm_tasks.db import get_engine
    from mmprm_tasks.storage import open_store

    with get_engine(settings).connect() as conn:
        sharded = set(conn.execute(sa.text("SELECT problem_id FROM chunk_problems WHERE run_id = :r"),
                                   {"r": run_id}).scalars())
        statuses = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM chunk_problems WHERE run_id = :r GROUP BY status"), {"r": run_id}).all())
        trees = conn.execute(sa.text("SELECT problem_id, tree_key FROM trees WHERE run_id = :r"), {"r": run_id}).all()
        chunk_statuses = set(conn.execute(sa.text("SELECT status FROM chunks WHERE run_id = :r"),
                                          {"r": run_id}).scalars())
        run_status = conn.execute(sa.text("SELECT status FROM annotation_runs WHERE run_id = :r"),
                                  {"r": run_id}).scalar_one()
    assert sharded, f"run {run_id} has no problems"
    assert statuses == {"done": len(sharded)}, statuses
    assert chunk_statuses == {"done"} and run_status == "succeeded", (chunk_statuses, run_status)
    problem_ids = [row.problem_id for row in trees]
    assert len(problem_ids) == len(set(problem_ids)) == len(sharded), (len(problem_ids), len(sharded))
    assert set(problem_ids) == sharded
    keys = open_store(settings).list_keys(f"trees/{run_id}/")
    assert sorted(keys) == sorted(f"trees/{run_id}/{pid}.json" for pid in sharded), keys
    assert {row.tree_key for row in trees} == set(keys)
    return {"problems": len(sharded), "trees": len(trees)}


def xcom(client, run_id: str, task_id: str, map_index: int = -1, dag_id: str = DAG_ID) -> Any:
    response = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
                          params={"map_index": map_index})
    assert response.status_code == 200, response.text
    return response.json()["value"]


def task_log(client, run_id: str, task_id: str, map_index: int = -1, try_number: int = 1,
             dag_id: str = DAG_ID) -> list[dict[str, Any]]:
    """A task try's log as the UI reads it: one entry per line (``event``, ``level``, ...)."""
    response = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                          params={"map_index": map_index}, headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    return [line for line in response.json()["content"] if isinstance(line, dict)]
