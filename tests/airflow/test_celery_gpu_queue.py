"""Distributed run, part 2: CeleryExecutor with two workers, one per queue.

``annotate_chunk`` is declared with ``queue="gpu"`` (and the ``gpu`` pool); a worker started with
``-q gpu`` must run every annotation chunk, and the worker on the ``default`` queue everything else.
Each worker reports its own host name (``[core] hostname_callable``), as two machines would, so the
task instances' ``hostname`` shows where each task ran.
"""

from __future__ import annotations

import socket
import time

import pytest

from af_helpers import ingest_directly, step_index_check, task_instances, trigger, wait_for_run, xcom

pytestmark = pytest.mark.airflow_services

HOST = socket.gethostname()
GPU_WORKER = f"mmprm-gpu@{HOST}"
CPU_WORKER = f"mmprm-cpu@{HOST}"


@pytest.fixture(scope="module")
def stack(stack_factory, redis_url):
    stack = stack_factory(executor="CeleryExecutor", broker_url=redis_url)
    start = time.monotonic()
    workers = [stack.start_celery_worker("worker-default", ["default"], hostname=CPU_WORKER, concurrency=2, wait=False),
               stack.start_celery_worker("worker-gpu", ["gpu"], hostname=GPU_WORKER, concurrency=2, wait=False)]
    for worker in workers:
        stack.wait_for_log(worker, " ready.", timeout=180)
    print(f"Celery workers ready in {time.monotonic() - start:.1f}s (broker {redis_url})")
    return stack


def test_annotation_runs_on_the_gpu_worker_and_the_rest_on_the_default_worker(stack, client, toy_seeds,
                                                                               task_settings):
    start = time.monotonic()
    run_id = "af-celery"
    ingest_directly(task_settings, toy_seeds)
    dag_run = trigger(client, {"annotation_run_id": run_id, "split": "train"})
    airflow_run = dag_run["dag_run_id"]
    state = wait_for_run(client, airflow_run)
    print(f"run {airflow_run} {state} after {time.monotonic() - start:.1f}s")
    assert state == "success"

    tis = task_instances(client, airflow_run)
    annotate = [ti for ti in tis if ti["task_id"] == "annotate_chunk"]
    others = [ti for ti in tis if ti["task_id"] != "annotate_chunk"]
    assert len(annotate) == 3, annotate  # 9 problems in chunks of 3
    assert {ti["task_id"] for ti in others} == {"preflight_annotation", "shard", "chunk_indices", "index_summary"}
    for ti in tis:
        assert ti["state"] == "success" and ti["executor"] in (None, "CeleryExecutor"), ti
    for ti in annotate:
        assert (ti["queue"], ti["pool"], ti["hostname"]) == ("gpu", "gpu", GPU_WORKER), ti
    for ti in others:
        assert (ti["queue"], ti["hostname"]) == ("default", CPU_WORKER), ti

    # The workers' own logs agree: each received its tasks from its queue.
    gpu_log, cpu_log = stack.services["worker-gpu"].tail(2_000_000), stack.services["worker-default"].tail(2_000_000)
    assert "annotate_chunk" in gpu_log and "annotate_chunk" not in cpu_log
    assert "preflight_annotation" in cpu_log and "preflight_annotation" not in gpu_log

    counts = step_index_check(task_settings, run_id)
    assert counts["problems"] == 9
    summary = xcom(client, airflow_run, "index_summary")
    print("index summary:", {k: summary[k] for k in ("status", "problems", "trees", "nodes", "step_annotations")})
    assert summary["status"] == "succeeded" and summary["trees"] == 9
