"""The annotation browser inside the Airflow UI, driven headless in Debian's chromium (Playwright
with ``executable_path``; no browser is downloaded) against real Airflow services.

Logs in through Airflow's own login page, triggers a small ``mmprm_annotate`` run from the
trigger form, opens the DAG run's Annotation tab (the plugin's view, in the UI's frame), one
problem's tree with its image and first-error step, and the evaluation that the asset chain made
after the run (dataset -> PRM trained for a few steps -> Best-of-N) with its plot.
Anonymous and role-less sessions are refused.  A screenshot of every page is saved under
``.mmprm/test-artifacts/browser/``.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
import sqlalchemy as sa

from af_helpers import (ARTIFACTS, DAG_ID, ingest_directly, new_page, task_log, trigger, unpause, until, wait_for,
                        wait_for_run, wait_for_url)
from mmprm_tasks.db import get_engine

pytestmark = pytest.mark.airflow_services

RUN_ID = "browser-run"
NOBODY = ("nobody", "nobody-pw")  # a user with no role: may read nothing


@pytest.fixture(scope="module")
def toy_seeds(mmprm_home):
    from mmprm_tasks.toy.world import generate_seeds

    # Four train problems in two chunks: small, and (the trees are seeded) with first errors.
    return generate_seeds(mmprm_home / "seeds", n_train=4, n_test=2, seed=0)


@pytest.fixture(scope="module")
def stack(stack_factory):
    return stack_factory(executor="LocalExecutor", extra_users={NOBODY[0]: ("", NOBODY[1])})


def _evaluation_of_run(settings, run_id: str):
    """(evaluation id, dataset id) of an evaluation of a PRM trained on ``run_id``'s trees."""
    with get_engine(settings).connect() as conn:
        return conn.execute(sa.text(
            "SELECT e.evaluation_id, c.dataset_id FROM evaluations e JOIN checkpoints c USING (checkpoint_id)"
            " JOIN datasets d USING (dataset_id) WHERE :r = ANY(d.run_ids) LIMIT 1"), {"r": run_id}).first()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _login(page, api: str, user: str, password: str, start: str) -> None:
    """Open ``start``; Airflow sends the browser to its login page, then back."""
    page.goto(f"{api}{start}")
    wait_for_url(page, re.compile(r".*/auth/login.*"), "Airflow's login page")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    wait_for_url(page, re.compile(re.escape(api + start.split("?")[0]) + ".*"), f"{start} after logging in as {user}")


def _images_loaded(page, selector: str, frame=None) -> None:
    for image in (frame or page).locator(selector).all():
        image.scroll_into_view_if_needed()
        until(page, lambda img=image: img.evaluate("e => e.complete && e.naturalWidth > 0"), f"image {selector} to load")


def _no_raw_json(page) -> None:
    """The page shows its records as tables: none of its visible text is a JSON object."""
    text = page.locator("body").inner_text()
    raw = re.search(r'.{0,60}\{\s*".{0,60}', text)
    assert raw is None, f"raw JSON on {page.url}: {raw.group(0)!r}"


def _check_progress_lines(log: list[dict], prefix: str, unit: str, periodic: bool = True) -> None:
    """A long task's log says how far it is, at INFO, in lines of its own, and draws no
    stderr progress bar (which the log shows at ERROR)."""
    lines = [entry for entry in log if str(entry.get("event", "")).startswith(prefix)]
    assert lines, [entry.get("event") for entry in log]
    assert all(entry.get("level") == "info" for entry in lines), lines
    assert re.search(rf"(\d+)/\1 {unit} \(100%\).*\(done\)$", lines[-1]["event"]), lines[-1]
    if periodic:  # lines before the last one, each with the time left
        assert any("ETA" in entry["event"] for entry in lines[:-1]), lines
    assert not [entry for entry in log if "Loading weights" in str(entry.get("event", ""))]


def test_anonymous_and_roleless_sessions_are_refused(stack, chromium):
    api = stack.api_url
    assert httpx.get(f"{api}/mmprm/").status_code == 401
    assert httpx.get(f"{api}/mmprm/runs/{RUN_ID}/mc-histogram.png").status_code == 401
    redirect = httpx.get(f"{api}/mmprm/runs/{RUN_ID}", headers={"accept": "text/html"})
    assert redirect.status_code == 303 and redirect.headers["location"].startswith("/auth/login")
    with stack.client(*NOBODY) as nobody:
        assert nobody.get("/mmprm/").status_code == 403
        assert nobody.get(f"/mmprm/problems/x/image").status_code == 403
    with stack.client("ops", "ops-pw") as viewer:
        assert viewer.get("/mmprm/").status_code == 200
    plugins = httpx.get(f"{api}/api/v2/plugins", headers={"authorization": f"Bearer {stack.token()}"}).json()
    assert [p["name"] for p in plugins["plugins"]] == ["mmprm_browser"]
    errors = httpx.get(f"{api}/api/v2/plugins/importErrors", headers={"authorization": f"Bearer {stack.token()}"})
    assert errors.json()["total_entries"] == 0, errors.text

    context, page = new_page(chromium, {"width": 1280, "height": 900})
    page.goto(f"{api}/mmprm/")
    wait_for_url(page, re.compile(r".*/auth/login\?next=.*mmprm.*"), "the login page, not the browser")
    page.wait_for_selector("input[name=username]")
    _shot(page, "00-anonymous-sent-to-login")
    assert "Annotation runs" not in page.content()
    page.fill("input[name=username]", NOBODY[0])
    page.fill("input[name=password]", NOBODY[1])
    page.click("button[type=submit]")
    wait_for_url(page, re.compile(r".*/mmprm/$"), "the browser's index after logging in")
    assert page.locator("h1").inner_text() == "403"
    assert "may not read DAG runs" in page.locator("#detail").inner_text()
    _shot(page, "01-roleless-user-refused")
    context.close()


def test_trigger_from_the_form_then_browse(stack, client, chromium, toy_seeds, task_settings):
    api = stack.api_url
    context, page = new_page(chromium, {"width": 1400, "height": 1000})
    _login(page, api, "admin", stack.users["admin"][1], f"/dags/{DAG_ID}")

    # Trigger a small annotation run from the form (its run id; the rest are the form's
    # defaults) on seeds ingested beforehand (mmprm_ingest's event would start a run of its own).
    ingest_directly(task_settings, toy_seeds)
    for dag_id in ("mmprm_dataset", "mmprm_train", "mmprm_evaluate"):  # the chain after the run's trees
        stack.wait_for_dag(client, dag_id)
        unpause(client, dag_id)
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    dialog.locator("input[name=element_annotation_run_id]").fill(RUN_ID)
    _shot(page, "02-trigger-form")
    dialog.get_by_role("button", name="Trigger").last.click()
    wait_for_url(page, re.compile(rf".*/dags/{DAG_ID}/runs/.+"), "the new DAG run's page after triggering")
    dag_run_id = page.url.split("/runs/", 1)[1].split("/")[0]

    # The DAG run page's Annotation tab shows the plugin's view of its annotation run in a frame
    # (once the shard task has created it; until then the view says so and reloads).
    try:
        page.locator("a[href$='/plugin/mmprm-dag-run']").click()
        wait_for_url(page, re.compile(r".*/plugin/mmprm-dag-run$"), "the DAG run's Annotation tab")
        until(page, lambda: any(f.url.endswith(f"/mmprm/runs/{RUN_ID}") for f in page.frames), "the Annotation tab to show the annotation run")
    except Exception:
        _shot(page, "zz-failure-annotation-tab")
        raise
    _shot(page, "03-dag-run-annotation-tab-running")
    assert wait_for_run(client, dag_run_id) == "success"
    _check_progress_lines(task_log(client, dag_run_id, "annotate_chunk", map_index=0),
                          f"annotation of {RUN_ID} chunk 0: ", "problems")

    page.reload()

    def run_frame():
        return next((f for f in page.frames if f.url.endswith(f"/mmprm/runs/{RUN_ID}")), None)

    until(page, lambda: run_frame() is not None, "the Annotation tab to load again")
    frame = run_frame()
    until(page, lambda: frame.locator("#run-status").inner_text() == "succeeded", "the run page to show success")
    with get_engine(task_settings).connect() as conn:
        problems = conn.execute(sa.text("SELECT count(*) FROM chunk_problems WHERE run_id = :r"),
                                {"r": RUN_ID}).scalar_one()
        first_error = conn.execute(sa.text(
            "SELECT t.problem_id, n.node_index, n.prefix_len + n.num_steps - 1 AS step FROM trees t"
            " JOIN step_nodes n USING (tree_id) WHERE t.run_id = :r AND n.is_first_error"
            " ORDER BY t.problem_id, n.node_index LIMIT 1"), {"r": RUN_ID}).first()
    assert problems == 4
    assert frame.locator("#done").inner_text() == "4" and frame.locator("#left").inner_text() == "0"
    _images_loaded(page, "div.charts img", frame)
    _shot(page, "04-dag-run-annotation-tab-done")
    page.goto(f"{api}/mmprm/runs/{RUN_ID}")
    _images_loaded(page, "div.charts img")
    _shot(page, "05-run")

    # run -> problem: the tree with its image and the first-error step marked.
    assert first_error is not None, "the seeded run found no first error to show"
    page.get_by_role("link", name=first_error.problem_id, exact=True).click()
    wait_for_url(page, re.compile(rf".*/mmprm/runs/{RUN_ID}/problems/.+"), "the problem's tree page")
    _images_loaded(page, "#problem-image")
    marked = page.locator(f"#node-{first_error.node_index}")
    assert "first-error" in marked.get_attribute("class")
    assert f"first error at step {first_error.step}" in marked.inner_text()
    _shot(page, "06-problem-tree")
    # ... -> node: the summary links the first-error node's anchor.
    page.locator("#first-error-summary a").first.click()
    assert page.url.endswith(f"#node-{first_error.node_index}")

    # The run's trees event started the rest of the chain on the scheduler (mmprm_dataset ->
    # mmprm_train -> mmprm_evaluate, a PRM trained for a few steps): open what it made.
    # index -> evaluation -> candidate -> problem.
    try:
        evaluation_id, dataset_id = wait_for(lambda: _evaluation_of_run(task_settings, RUN_ID), "the asset chain's evaluation of the run's PRM")
    except TimeoutError:
        for dag_id in ("mmprm_dataset", "mmprm_train", "mmprm_evaluate"):
            print(dag_id, client.get(f"/api/v2/dags/{dag_id}/dagRuns").json())
        raise
    train_run = client.get("/api/v2/dags/mmprm_train/dagRuns").json()["dag_runs"][0]["dag_run_id"]
    _check_progress_lines(task_log(client, train_run, "train_prm", dag_id="mmprm_train"), "PRM training: ", "steps",
                          periodic=False)
    page.goto(f"{api}/mmprm/")
    _shot(page, "07-index")
    page.get_by_role("link", name=evaluation_id).click()
    _images_loaded(page, "#bon-plot")
    assert page.locator("#bon-table tr").count() > 1 and "tied PRM scores" in page.locator("#bon-table").inner_text()
    # The toy world's first-error check of the PRM and of the MC labels, as a table.
    assert [r.locator("th").inner_text() for r in page.locator("#first-error tr").all()[1:]] == ["prm", "mc_labels"]
    _shot(page, "08-evaluation")
    page.locator("#eval-problems a").first.click()
    wait_for_url(page, re.compile(rf".*/mmprm/evaluations/{evaluation_id}/problems/.+"), "an evaluation problem's page")
    _images_loaded(page, "#problem-image")
    assert page.locator(".candidate-step[style*='hsl(']").count() > 0
    _shot(page, "09-evaluation-candidates")
    page.locator("h1 a").first.click()
    wait_for_url(page, re.compile(r".*/mmprm/problems/.+"), "the problem page")
    _shot(page, "10-problem")
    page.goto(f"{api}/mmprm/datasets/{dataset_id}")
    assert page.locator("#balance").is_visible()
    # Counts and parameters as tables a person reads, not JSON.
    assert page.locator("#traversal-counts th", has_text="trees_seen").is_visible()
    assert page.locator("#traversal-params th", has_text="label_granularity").is_visible()
    _no_raw_json(page)
    _shot(page, "11-dataset")
    page.locator("a[href*='/mmprm/checkpoints/']").first.click()
    assert page.locator("#checkpoint-uri").inner_text()
    assert "from_pretrained" in page.locator("#snippet").inner_text()
    assert page.locator("#metrics th", has_text="train_loss").is_visible()
    _images_loaded(page, "#loss-curve")  # the training loss curve, a plot
    _no_raw_json(page)
    _shot(page, "12-checkpoint")

    # The nav's Browse menu opens the browser inside the UI.
    page.goto(f"{api}/")
    page.get_by_role("button", name="Browse").click()
    page.get_by_role("menuitem", name="MM-PRM browser").click()
    wait_for_url(page, re.compile(r".*/plugin/mmprm$"), "the browser in the UI's nav")
    until(page, lambda: any(f.url.endswith("/mmprm/") for f in page.frames), "the browser in the UI's frame")
    _shot(page, "13-nav")
    context.close()


def test_the_trigger_form_refuses_an_out_of_range_value_instead_of_clamping_it(stack, client, chromium):
    """A number typed outside a Param's bounds stays as typed (no silent 300 -> 256) and the
    trigger is refused: no DAG run is created.  The field's description states unit and range."""
    context, page = new_page(chromium, {"width": 1400, "height": 1000})
    _login(page, stack.api_url, "admin", stack.users["admin"][1], f"/dags/{DAG_ID}")
    before = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns").json()["total_entries"]
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    field = dialog.locator("input[name=element_num_rollouts]")
    field.fill("300")
    field.press("Tab")  # the number input clamps on blur when it knows the bounds
    assert field.input_value() == "300"
    assert dialog.get_by_text("Allowed: >= 1 and <= 256; other values are refused.").count() >= 1
    _shot(page, "20-trigger-form-out-of-range")
    dialog.get_by_role("button", name="Trigger").last.click()
    page.wait_for_timeout(3000)
    _shot(page, "21-trigger-form-refused")
    runs = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns").json()
    assert runs["total_entries"] == before, [r["conf"] for r in runs["dag_runs"]]
    context.close()


# One line per DAG in the list (a tooltip on its name): where to start, what each makes, what is next.
DESCRIPTIONS = {
    "mmprm_ingest": "Start here: reads a seed file",
    "mmprm_annotate": "next: mmprm_dataset.",
    "mmprm_dataset": "next: mmprm_train.",
    "mmprm_train": "next: mmprm_evaluate.",
    "mmprm_evaluate": "the last stage.",
    "mmprm_nightly_refresh": "Daily: reads the seed problems",
}


def test_the_dag_list_says_where_to_start_and_the_seed_form_names_the_seed_roots(stack, client, chromium, mmprm_home):
    context, page = new_page(chromium, {"width": 1400, "height": 1000})
    _login(page, stack.api_url, "admin", stack.users["admin"][1], "/dags")
    for dag_id, words in DESCRIPTIONS.items():
        stack.wait_for_dag(client, dag_id)
    page.reload()
    for dag_id, words in DESCRIPTIONS.items():
        page.get_by_role("link", name=dag_id, exact=True).first.hover()
        until(page, lambda w=words: page.get_by_role("tooltip").filter(has_text=w).count() > 0,
              f"the description of {dag_id} in the DAG list")
        if dag_id == "mmprm_ingest":
            _shot(page, "30-dag-list-description")
        page.mouse.move(0, 0)
    page.goto(f"{stack.api_url}/dags/mmprm_ingest")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    roots = f"Seed roots (MMPRM_SEED_ROOTS): {(mmprm_home / 'seeds').resolve()}."
    until(page, lambda: dialog.get_by_text(roots).count() >= 2, "the seed roots under both seed file fields")
    _shot(page, "31-ingest-form-seed-roots")
    context.close()


def test_an_ingest_runs_annotation_tab_shows_what_it_ingested_and_stops_reloading(stack, client, chromium,
                                                                                   toy_seeds, task_settings):
    """Last in the module: mmprm_annotate is paused first, so this run's seeds event starts no
    annotation run beside it."""
    client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": True}).raise_for_status()
    ingest_directly(task_settings, toy_seeds)
    records = json.loads(toy_seeds["train"].read_text())
    mixed = toy_seeds["train"].with_name("mixed.json")  # what is already indexed, and one bad record
    mixed.write_text(json.dumps(records + [{"id": "no-question", "image_path": records[0]["image_path"]}]))
    stack.wait_for_dag(client, "mmprm_ingest")
    unpause(client, "mmprm_ingest")
    dag_run_id = trigger(client, {"seed_source": str(mixed)}, dag_id="mmprm_ingest")["dag_run_id"]
    assert wait_for_run(client, dag_run_id, dag_id="mmprm_ingest") == "success"

    context, page = new_page(chromium, {"width": 1400, "height": 1000})
    _login(page, stack.api_url, "admin", stack.users["admin"][1],
           f"/dags/mmprm_ingest/runs/{dag_run_id}/plugin/mmprm-dag-run")

    def tab():
        return next((f for f in page.frames if "/mmprm/dag-runs/mmprm_ingest/" in f.url), None)

    until(page, lambda: tab() is not None and tab().locator("#seeds").count() == 1, "the ingest run's Annotation tab")
    frame = tab()
    assert frame.locator("#dag-run-state").inner_text() == "State: success."
    assert frame.locator("#seeds-inserted").inner_text() == "0"
    assert frame.locator("#seeds-unchanged").inner_text() == str(len(records))
    assert frame.locator("#seeds-rejected").inner_text() == "1"
    assert "quarantine" in frame.locator("#seeds-quarantine").inner_text()
    assert frame.get_by_role("link", name="the browser's index").count() == 1
    assert "has made no annotation run" not in frame.locator("body").inner_text()
    _shot(page, "32-ingest-run-annotation-tab")
    # A finished run's tab stays put: no reload header, and a mark left in the page survives.
    assert frame.locator("meta[http-equiv=refresh]").count() == 0
    frame.evaluate("window.stayed = true")
    page.wait_for_timeout(7000)
    assert tab() is frame and frame.evaluate("window.stayed === true")
    context.close()
