"""REST, browser and step-index helpers of the distributed-run tests.

Every wait of these tests (a DAG run to finish, an asset event's run to start, a page or a frame
to show something) has one deadline: ``MMPRM_TEST_DEADLINE_S`` seconds (default 900).  It is
generous on purpose: these tests wait for events, and on a busy 2-core box the same run takes
several times longer; a fixed 30 s timeout failed there after the work itself had succeeded
(issue 26).  Raise it for slower machines.  A wait that runs out says what it waited for and, in
the browser, the page's state (URL, frames, text).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmprm_tasks.settings import Settings

# The annotation DAG: seeds -> trees (mmprm_ingest and mmprm_dataset are the stages around it).
DAG_ID = "mmprm_annotate"
DEADLINE_S = float(os.environ.get("MMPRM_TEST_DEADLINE_S", "900"))
# Screenshots of every page the browser tests open.
ARTIFACTS = Path(__file__).resolve().parents[2] / ".mmprm" / "test-artifacts" / "browser"


def ingest_directly(settings: Settings, seeds: dict[str, Any]) -> None:
    """The toy seeds into the step index without mmprm_ingest, so no seeds event starts an
    annotation run of its own (idempotent: a second call changes nothing)."""
    from mmprm_tasks.seeds import ingest_file

    for path in seeds.values():
        ingest_file(path, settings)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE_S, interval: float = 0.5) -> Any:
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


def wait_for_run(client, run_id: str, dag_id: str = DAG_ID, timeout: float = DEADLINE_S) -> str:
    """Poll the run until it finishes; returns its final state."""
    state = wait_for(lambda: (s := dag_run_state(client, run_id, dag_id)) in ("success", "failed") and s,
                     f"dag run {run_id} of {dag_id} to finish", timeout, interval=1.0)
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


# ------------------------------------------------------------------------------------ browser


def page_state(page) -> str:
    """What a page shows now: its URL, title, frames and the start of its text."""
    try:
        text = page.locator("body").inner_text(timeout=5000)[:1500]
    except Exception as exc:  # noqa: BLE001 - the state report must not fail itself
        text = f"(no text: {exc})"
    frames = [f.url for f in page.frames]
    return f"URL {page.url}\ntitle {page.title()!r}\nframes {frames}\ntext:\n{text}"


def new_page(browser, viewport: dict[str, int]):
    """A page in a fresh context whose Playwright waits (navigations, selectors) use the deadline."""
    context = browser.new_context(viewport=viewport)
    context.set_default_timeout(DEADLINE_S * 1000)
    context.set_default_navigation_timeout(DEADLINE_S * 1000)
    return context, context.new_page()


def wait_for_url(page, pattern, what: str) -> None:
    """``page.wait_for_url`` with the deadline; running out reports what it waited for and the page."""
    try:
        page.wait_for_url(pattern)
    except Exception as exc:
        raise AssertionError(f"waited {DEADLINE_S:.0f}s for {what} (a URL matching {getattr(pattern, 'pattern', pattern)!r}):"
                             f" {type(exc).__name__}\n{page_state(page)}") from None


def until(page, predicate: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    """Poll ``predicate`` while Playwright keeps processing the page's events (``time.sleep``
    would freeze them: frames and navigations would never update)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - a frame that is reloading: ask again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f}s for {what}\n{page_state(page)}")
        page.wait_for_timeout(500)
