"""Distributed run, part 1: ``mmprm_annotate`` on real Airflow services (LocalExecutor, Postgres),
driven only through the REST API, survives an annotation task killed with SIGKILL mid-run, and
the scheduler killed (its process group, SIGKILL) mid-run and started again.

The killed chunk is retried by Airflow, the retry resumes the dead attempt's leases, and the step
index ends with exactly one tree per problem of the run; after the scheduler's crash the new
scheduler runs again the chunks the dead one had running.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import psutil
import pytest

from af_helpers import (DAG_ID, DEADLINE_S, ingest_directly, step_index_check, task_instances, trigger, unpause, wait_for,
                        wait_for_run, xcom)

pytestmark = pytest.mark.airflow_services


@pytest.fixture(scope="module")
def stack(stack_factory):
    return stack_factory(executor="LocalExecutor")


def test_auth_and_trigger_validation(stack, client, toy_seeds):
    import httpx

    api = stack.api_url
    assert httpx.post(f"{api}/auth/token", json={"username": "admin", "password": "wrong"}).status_code == 401
    assert httpx.get(f"{api}/api/v2/dags/{DAG_ID}").status_code == 401
    conf = {"annotation_run_id": "never-created", "split": "train"}
    with stack.client("ops", "ops-pw") as viewer:
        assert viewer.get(f"/api/v2/dags/{DAG_ID}").status_code == 200
        assert viewer.post(f"/api/v2/dags/{DAG_ID}/dagRuns",
                           json={"logical_date": None, "conf": conf}).status_code == 403
    # Out-of-bounds Params are refused at trigger time (not clamped to 1 or 256); no run is created.
    for out_of_range in (0, 300):
        response = client.post(f"/api/v2/dags/{DAG_ID}/dagRuns",
                               json={"logical_date": None, "conf": {**conf, "num_rollouts": out_of_range}})
        assert response.status_code == 400, response.text
        assert "num_rollouts" in response.text
    assert client.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"conf": conf}).status_code == 422
    runs = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns").json()
    assert runs["total_entries"] == 0


def _task_process(stack, ti_id: str) -> psutil.Process | None:
    """The process running task instance ``ti_id``: a descendant of the scheduler (the
    LocalExecutor's supervisor forks it) whose title the task runner set to ``airflow worker -- <id>``."""
    service_pids = {s.pid for s in stack.services.values()}
    for proc in stack.services["scheduler"].descendants():
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if f"airflow worker -- {ti_id}" in title and proc.pid not in service_pids:
            return proc
    return None


def _leases(settings, run_id: str) -> dict[int, int]:
    """chunk index -> problems it holds a lease on right now (the task is mid-annotation)."""
    import sqlalchemy as sa

    from mmprm_tasks.db import get_engine

    with get_engine(settings).connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT lease_owner, count(*) FROM chunk_problems WHERE run_id = :r AND status = 'leased'"
            " GROUP BY lease_owner"), {"r": run_id}).all()
    # Owners name the attempt: "<run>/chunk-<i>@<host>:<pid>:<token>".
    return {int(owner.rsplit("/chunk-", 1)[1].split("@")[0]): n for owner, n in rows}


def _mapped_chunks(client, airflow_run: str) -> list[dict[str, Any]]:
    """The run's annotate_chunk task instances, one per chunk."""
    response = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{airflow_run}/taskInstances/annotate_chunk/listMapped")
    response.raise_for_status()
    return response.json()["task_instances"]


def _an_annotating_task(stack, client, task_settings, airflow_run: str, run_id: str,
                        timeout: float) -> tuple[dict[str, Any], psutil.Process, int]:
    """An annotate_chunk instance running and holding problem leases (mid-annotation): its task
    instance, its task process and its chunk."""
    deadline = time.monotonic() + timeout
    scheduler = stack.services["scheduler"]
    while time.monotonic() < deadline:
        for chunk in _leases(task_settings, run_id):
            ti = next((t for t in _mapped_chunks(client, airflow_run) if t["rendered_map_index"] == f"chunk {chunk}"
                       and t["state"] == "running"), None)
            proc = ti and _task_process(stack, ti["id"])
            if not proc:
                continue
            # The task's own process (the api-server has it as the instance's pid), under the
            # scheduler's LocalExecutor, and not a service.
            assert ti["pid"] == proc.pid
            assert proc.pid != scheduler.pid and scheduler.pid in {p.pid for p in proc.parents()}
            return ti, proc, chunk
        state = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{airflow_run}").json()["state"]
        assert state in ("queued", "running"), f"run ended ({state}) before an annotation task was seen annotating"
        time.sleep(0.1)
    raise TimeoutError(f"no annotate_chunk task seen holding leases within {timeout}s")


def _kill_an_annotating_task(stack, client, task_settings, airflow_run: str, run_id: str,
                             timeout: float) -> dict[str, Any]:
    """SIGKILL the task process of an annotate_chunk instance while it holds problem leases."""
    ti, proc, chunk = _an_annotating_task(stack, client, task_settings, airflow_run, run_id, timeout)
    title = " ".join(proc.cmdline())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert stack.services["scheduler"].alive()
    return {"map_index": ti["map_index"], "chunk": chunk, "ti_id": ti["id"], "pid": proc.pid,
            "ti_pid": ti["pid"], "title": title,
            "leases_after_kill": _leases(task_settings, run_id).get(chunk, 0)}


def _tries(client, airflow_run: str, map_index: int) -> list[dict[str, Any]]:
    """The tries of one annotate_chunk instance, first to last."""
    response = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{airflow_run}/taskInstances/annotate_chunk/"
                          f"{map_index}/tries")
    assert response.status_code == 200, response.text
    return sorted(response.json()["task_instances"], key=lambda t: t["try_number"])


def test_pipeline_survives_a_killed_annotation_task(stack, client, toy_seeds, task_settings):
    start = time.monotonic()
    run_id = "af-rest-kill"
    ingest_directly(task_settings, toy_seeds)
    dag_run = trigger(client, {"annotation_run_id": run_id, "split": "train"})
    airflow_run = dag_run["dag_run_id"]

    killed = _kill_an_annotating_task(stack, client, task_settings, airflow_run, run_id, timeout=DEADLINE_S)
    print(f"killed {killed} after {time.monotonic() - start:.1f}s")

    state = wait_for_run(client, airflow_run)
    print(f"run {airflow_run} {state} after {time.monotonic() - start:.1f}s")
    assert state == "success"

    tries = _tries(client, airflow_run, killed["map_index"])
    assert len(tries) >= 2, tries
    assert tries[0]["try_number"] == 1
    assert tries[0]["state"] == "failed", tries[0]
    assert tries[-1]["state"] == "success", tries[-1]

    # Every other task succeeded on its first try.
    for ti in task_instances(client, airflow_run):
        assert ti["state"] == "success", ti
        if not (ti["task_id"] == "annotate_chunk" and ti["map_index"] == killed["map_index"]):
            assert ti["try_number"] == 1, ti

    counts = step_index_check(task_settings, run_id)
    assert xcom(client, airflow_run, "shard")["problems"] == counts["problems"] == 9
    summary = xcom(client, airflow_run, "index_summary")
    print("index summary:", {k: summary[k] for k in ("status", "problems", "trees", "nodes", "step_annotations")})
    assert summary["status"] == "succeeded" and summary["trees"] == 9

    # The retry took back the leases the killed attempt died holding (no wait for their expiry).
    retry = xcom(client, airflow_run, "annotate_chunk", killed["map_index"])
    print("retry of the killed chunk:", retry)
    if killed["leases_after_kill"]:
        assert retry["resumed_leases"] == killed["leases_after_kill"]


# A new scheduler resets the task instances a dead one had queued (the LocalExecutor cannot adopt
# them) in its orphaned-task check: once as it starts and then every
# [scheduler] orphaned_tasks_check_interval, 300 s by default; and only once the dead scheduler's
# last heartbeat is older than [scheduler] scheduler_health_check_threshold (30 s).  A restart
# within seconds of the crash comes too early for the first check, so the default would leave the
# orphaned instances "running" for 5 minutes; 5 s makes it the threshold.
# ([scheduler] task_instance_heartbeat_timeout plays no part: a scheduler fails instances on it
# only among those it queued itself.)
ORPHANED_TASKS_CHECK_INTERVAL_S = "5"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_pipeline_survives_a_scheduler_restart(stack, client, toy_seeds, task_settings):
    """The scheduler crashes (SIGKILL of its process group) while annotate_chunk tasks annotate,
    a new one starts: the run succeeds, with every chunk that was running retried, one tree row
    per problem of the run and its tree objects in the store."""
    start = time.monotonic()
    run_id = "af-rest-scheduler"
    ingest_directly(task_settings, toy_seeds)
    airflow_run = trigger(client, {"annotation_run_id": run_id, "split": "train"})["dag_run_id"]

    annotating, _, chunk = _an_annotating_task(stack, client, task_settings, airflow_run, run_id, timeout=DEADLINE_S)
    running = {t["map_index"]: _task_process(stack, t["id"]) for t in _mapped_chunks(client, airflow_run)
               if t["state"] == "running"}
    old = stack.services["scheduler"]
    crashed_at = time.monotonic()
    kill_s = stack.kill_service("scheduler")
    assert not old.alive()
    # The task processes left the scheduler's group (the supervisor gives each its own), so they
    # outlive the crash, cut off from their supervisor: their next log line or print meets a
    # closed socket, and the BrokenPipeError fails the attempt, which hands its leases back.
    orphans = {i: p for i, p in running.items() if p is not None and _alive(p)}
    orphan_exits: dict[int, float] = {}

    def note_orphan_exits() -> None:
        for i, proc in orphans.items():
            if i not in orphan_exits and not _alive(proc):
                orphan_exits[i] = round(time.monotonic() - crashed_at, 1)

    print(f"scheduler (pid {old.pid}) killed {crashed_at - start:.1f}s after the trigger, while chunk {chunk}"
          f" held leases; its process group was gone in {kill_s:.2f}s; annotate_chunk running then:"
          f" {sorted(running)}, their task processes alive after the kill: {sorted(orphans)}")

    new = stack.restart_service("scheduler",
                                AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL=ORPHANED_TASKS_CHECK_INTERVAL_S)
    restarted_s = time.monotonic() - crashed_at
    assert new.pid != old.pid and new.alive()

    def retried() -> bool:
        note_orphan_exits()
        ti = next(t for t in _mapped_chunks(client, airflow_run) if t["map_index"] == annotating["map_index"])
        return ti["try_number"] >= 2 and ti["state"] in ("running", "success")

    wait_for(retried, f"a new try of annotate_chunk {annotating['map_index']} after the scheduler restart")
    retried_s = time.monotonic() - crashed_at
    state = wait_for_run(client, airflow_run)
    done_s = time.monotonic() - crashed_at
    print(f"new scheduler (pid {new.pid}) heartbeating {restarted_s:.1f}s after the kill; the killed chunk's"
          f" new try running {retried_s:.1f}s after; run {airflow_run} {state} {done_s:.1f}s after"
          f" ({time.monotonic() - start:.1f}s after the trigger); orphaned task processes gone (s after the"
          f" kill, by chunk): {orphan_exits or 'none by the retry'}")
    assert state == "success"
    # No task process of the dead scheduler is left working (or holding leases).
    wait_for(lambda: not any(_alive(p) for p in orphans.values()), "the task processes of the dead scheduler to end",
             timeout=60)

    # Every chunk running at the crash: that try ended failed (nothing was left to report its end,
    # and the LocalExecutor cannot adopt it) and a later one succeeded; or it had just finished.
    for map_index in sorted(running):
        tries = _tries(client, airflow_run, map_index)
        print(f"annotate_chunk {map_index} tries:", [(t["try_number"], t["state"]) for t in tries])
        assert tries[-1]["state"] == "success", tries[-1]
        assert all(t["state"] == "failed" for t in tries[:-1]), tries
        if map_index == annotating["map_index"]:
            assert len(tries) >= 2, tries
    for ti in task_instances(client, airflow_run):
        assert ti["state"] == "success", ti

    counts = step_index_check(task_settings, run_id)
    assert xcom(client, airflow_run, "shard")["problems"] == counts["problems"] == 9
    summary = xcom(client, airflow_run, "index_summary")
    assert summary["status"] == "succeeded" and summary["trees"] == 9, summary


def test_a_configuration_error_fails_with_one_try(stack, client, toy_seeds, task_settings):
    """A policy checkpoint that is not there cannot appear by waiting: the preflight task fails
    on its first try (retries are for outages) with a one-line cause, and no annotation starts."""
    ingest_directly(task_settings, toy_seeds)
    conf = {"annotation_run_id": "bad-policy", "split": "train", "policy_model": "/nonexistent/policy-checkpoint"}
    dag_run = trigger(client, conf)
    assert wait_for_run(client, dag_run["dag_run_id"]) == "failed"
    tis = {ti["task_id"]: ti for ti in task_instances(client, dag_run["dag_run_id"])}
    preflight = tis["preflight_annotation"]
    assert (preflight["state"], preflight["try_number"]) == ("failed", 1), preflight
    assert tis["shard"]["state"] == "upstream_failed", tis["shard"]
    assert tis["index_summary"]["state"] == "upstream_failed", tis["index_summary"]
    log = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{dag_run['dag_run_id']}/taskInstances/preflight_annotation/logs/1",
                     headers={"Accept": "application/json"}).text
    assert "configuration error (not retried): policy model '/nonexistent/policy-checkpoint'" in log, log[-2000:]


def test_the_stages_follow_each_other_on_asset_events(stack, client, toy_seeds, task_settings):
    """mmprm_ingest's seeds event starts mmprm_annotate, whose trees event starts mmprm_dataset:
    the lineage chain runs on real services, each event carries the step index's ids and counts,
    and the annotation run records the Airflow run that made it."""
    import sqlalchemy as sa

    from mmprm_tasks.db import get_engine

    for dag_id in ("mmprm_ingest", "mmprm_dataset"):
        stack.wait_for_dag(client, dag_id)
        unpause(client, dag_id)
    trigger(client, {"seed_source": str(toy_seeds["train"]), "eval_seed_source": str(toy_seeds["test"])},
            dag_id="mmprm_ingest")

    def asset_run(dag_id: str) -> dict[str, Any] | None:
        runs = client.get(f"/api/v2/dags/{dag_id}/dagRuns", params={"run_type": "asset_triggered"}).json()
        return next(iter(runs["dag_runs"]), None)

    annotate = wait_for(lambda: asset_run("mmprm_annotate"), "mmprm_annotate started by the seeds event")
    assert wait_for_run(client, annotate["dag_run_id"]) == "success"
    dataset = wait_for(lambda: asset_run("mmprm_dataset"), "mmprm_dataset started by the trees event")
    assert wait_for_run(client, dataset["dag_run_id"], dag_id="mmprm_dataset") == "success"

    events = {}
    for event in client.get("/api/v2/assets/events", params={"limit": 100}).json()["asset_events"]:
        events.setdefault(event["name"], []).append(event)
    seeds_event = events["mmprm_seeds"][-1]["extra"]
    assert seeds_event["splits"] == {"train": 9, "test": 2}, seeds_event
    assert seeds_event["airflow_dag_id"] == "mmprm_ingest"
    run_id = xcom(client, annotate["dag_run_id"], "shard")["run_id"]
    trees_event = next(e["extra"] for e in events["mmprm_trees"] if e["extra"].get("run_id") == run_id)
    assert trees_event["trees"] == 9 and trees_event["airflow_run_id"] == annotate["dag_run_id"], trees_event
    dataset_event = events["mmprm_prm_dataset"][-1]["extra"]
    assert dataset_event["dataset_id"] == xcom(client, dataset["dag_run_id"], "format_dataset",
                                               dag_id="mmprm_dataset")["dataset_id"]
    assert dataset_event["records"] > 0
    with get_engine(task_settings).connect() as conn:
        linked = conn.execute(sa.text("SELECT airflow_dag_id, airflow_run_id FROM annotation_runs WHERE run_id = :r"),
                              {"r": run_id}).one()
        dataset_runs = conn.execute(sa.text("SELECT run_ids FROM datasets WHERE dataset_id = :d"),
                                    {"d": dataset_event["dataset_id"]}).scalar_one()
    assert tuple(linked) == ("mmprm_annotate", annotate["dag_run_id"])
    # The dataset is made of the runs the trees events named (the first run of a DAG scheduled
    # on an asset gets every earlier event of it: here also the runs of the tests above).
    assert run_id in dataset_runs
    assert set(dataset_runs) == {e["extra"]["run_id"] for e in events["mmprm_trees"]}
