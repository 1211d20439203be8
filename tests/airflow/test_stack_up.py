"""``mmprm stack up``: the one documented command for a local stack, run as a user runs it.

From nothing (no step-index database, no metadata database) it creates and migrates the step
index, ingests the toy world's train and test seeds, starts the Airflow services with the
platform's DAGs (the nightly refresh paused, the others not) and the users given with ``--user``
(a viewer reads the browser and is refused a trigger, in chromium), and stops every service on
Ctrl-C, saying what it stops.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from mmprm_tasks import db
from mmprm_tasks.airflow_stack import drop_database
from mmprm_tasks.settings import Settings, StoreConfig

from af_helpers import ARTIFACTS, new_page, until, wait_for_url

pytestmark = pytest.mark.airflow_services


def _viewer_reads_but_cannot_trigger(chromium, api_url: str, viewer: tuple[str, str]) -> None:
    """A user made with ``--user NAME:viewer`` logs in, reads the annotation browser in the UI and
    is refused a trigger (the form's submit and the REST API both answer 403)."""
    name, password = viewer
    context, page = new_page(chromium, {"width": 1280, "height": 900})
    page.goto(f"{api_url}/mmprm/")
    wait_for_url(page, re.compile(r".*/auth/login.*"), "Airflow's login page")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    wait_for_url(page, re.compile(r".*/mmprm/$"), "the browser's index after the viewer logged in")
    until(page, lambda: page.locator("h1").inner_text() != "403" and "Annotation runs" in page.content(),
          "the viewer to read the browser's index")
    page.screenshot(path=str(ARTIFACTS / "40-viewer-reads-the-browser.png"), full_page=True)
    token = httpx.post(f"{api_url}/auth/token", json={"username": name, "password": password}).json()["access_token"]
    refused = httpx.post(f"{api_url}/api/v2/dags/mmprm_ingest/dagRuns", json={"logical_date": None, "conf": {}},
                         headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 403, refused.text
    # In the UI: the DAG's page offers a trigger form; its submit is refused the same way.
    page.goto(f"{api_url}/dags/mmprm_ingest")
    until(page, lambda: page.get_by_role("button", name="Trigger").count() > 0, "the DAG page's Trigger button")
    page.get_by_role("button", name="Trigger").first.click()
    with page.expect_response(lambda r: "/dagRuns" in r.url and r.request.method == "POST") as answer:
        page.get_by_role("dialog").get_by_role("button", name="Trigger").last.click()
    assert answer.value.status == 403
    page.screenshot(path=str(ARTIFACTS / "41-viewer-refused-a-trigger.png"), full_page=True)
    context.close()


def test_stack_up_from_nothing(pg_admin_url, tmp_path, chromium):
    name = f"mmprm_stackup_{uuid.uuid4().hex[:8]}"
    step_index_url = make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMPRM_", "AIRFLOW"))}
    env |= {"MMPRM_DATABASE_URL": step_index_url, "MMPRM_HOME": str(home), "MMPRM_STORE__KIND": "local",
            "MMPRM_STORE__ROOT": str(home / "objects")}
    mmprm = str(Path(sys.executable).parent / "mmprm")
    # A viewer with a generated password (printed once) and an operator whose password is in a file.
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"olga": "olga-pw"}))
    proc = subprocess.Popen([mmprm, "stack", "up", "--port", "0", "--password", "pw-stack-up", "--user", "vera:viewer",
                             "--user", "olga:op", "--passwords-file", str(passwords)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        api_url = None
        while time.monotonic() < deadline and api_url is None:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "Airflow is up:" in line:
                api_url = line.split("Airflow is up:", 1)[1].split()[0]
        assert api_url, "".join(lines)

        token = httpx.post(f"{api_url}/auth/token", json={"username": "admin", "password": "pw-stack-up"}
                           ).json()["access_token"]
        with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
            dags: dict[str, bool] = {}
            wait_until = time.monotonic() + 180
            while time.monotonic() < wait_until and len(dags) < 6:
                dags = {d["dag_id"]: d["is_paused"] for d in client.get("/api/v2/dags").json()["dags"]}
                time.sleep(1)
        assert dags == {"mmprm_ingest": False, "mmprm_annotate": False, "mmprm_nightly_refresh": True,
                        "mmprm_dataset": False, "mmprm_train": False, "mmprm_evaluate": False}, dags

        settings = Settings(database_url=step_index_url, home=home, store=StoreConfig(kind="local",
                                                                                     root=home / "objects"))
        engine = db.get_engine(settings)
        assert db.current_version(engine) == len(db.migrations())
        with engine.connect() as conn:
            splits = dict(conn.execute(sa.text("SELECT split, count(*) FROM seed_problems GROUP BY split")).all())
        assert splits == {"train": 24, "test": 16}

        printed = "".join(lines)
        vera_password = re.search(r"^user vera \(viewer\): password (\S+)$", printed, re.M).group(1)
        assert f"user olga (op): password from {passwords}" in printed and "olga-pw" not in printed
        _viewer_reads_but_cannot_trigger(chromium, api_url, ("vera", vera_password))
        olga = httpx.post(f"{api_url}/auth/token", json={"username": "olga", "password": "olga-pw"})
        assert olga.status_code == 201, olga.text

        # Every service listens on loopback only, the log servers of the scheduler and the
        # triggerer included (Airflow binds those to every interface; issue 25).
        import psutil

        listening = {(c.laddr.ip, c.laddr.port) for p in psutil.Process(proc.pid).children(recursive=True)
                     for c in _connections(p) if c.status == psutil.CONN_LISTEN}
        assert len(listening) >= 3 and {ip for ip, _ in listening} == {"127.0.0.1"}, listening

        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        rest = proc.stdout.read()
        lines.append(rest)
        # Ctrl-C says what it stops, then that it stopped.
        assert re.search(r"stopping the Airflow services \(api-server, scheduler, dag-processor, triggerer\)", rest), rest
        assert re.search(r"stopped in \d+ s; the step index, the objects and the Airflow metadata database are kept",
                         rest), rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print("".join(lines))
        db.dispose_engines()
        drop_database(pg_admin_url, name)
        drop_database(pg_admin_url, f"{name}_airflow")


def _connections(process) -> list:
    import psutil

    try:
        return process.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
