"""The annotation browser's app on a real step index (Postgres) and object store (local and S3).

Pages are requested through the app mounted under ``/mmprm``, as Airflow's api-server mounts it.
The caller's identity comes from Airflow's ``get_user`` (a JWT whose revocation is checked in
Airflow's metadata database), so here the page tests are given a viewer through FastAPI's
dependency override; the permission rule is checked with Airflow's real simple auth manager, and
the whole chain (login, anonymous and role-less users refused) against a running api-server in
``tests/airflow/test_browser_ui.py``.
"""

from __future__ import annotations

import html as html_lib
import io
import json
import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest
import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from PIL import Image

from mmprm_tasks.annotate import annotate_chunk
from mmprm_tasks.browser import app as browser_app
from mmprm_tasks.browser.data import from_pretrained_snippet
from mmprm_tasks.db import get_engine
from mmprm_tasks.pipeline import traverse_stage
from mmprm_tasks.runs import shard_run
from mmprm_tasks.settings import TOY_FOUNDATION_DIR
from mmprm_tasks.seeds import ingest_file
from mmprm_tasks.storage import open_store

from browser_data import candidates_from_trees, record_evaluation, register_checkpoint
from test_annotate import SMALL, arithmetic_script
from test_search import ExactVerifier, ScriptedPolicy
from test_seeds import make_seed_file

PREFIX = "/mmprm"


@pytest.fixture(scope="module")
def auth_manager():
    """Airflow's simple auth manager, as the api-server configures it (not initialised: that
    writes a passwords file; the permission checks need none)."""
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    manager = create_auth_manager()
    if not isinstance(manager, SimpleAuthManager):
        pytest.skip(f"Airflow's configured auth manager is {type(manager).__name__}, not the simple one")
    return manager


def _viewer():
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return SimpleAuthManagerUser(username="ops", role="viewer")


def _client(settings, *, as_viewer: bool = True) -> TestClient:
    app = browser_app.create_app(lambda: settings)
    if as_viewer:
        app.dependency_overrides[browser_app.require_run_reader] = _viewer
    root = FastAPI()
    root.mount(PREFIX, app)
    return TestClient(root)


def wordy_script(question: str, prefix: tuple[str, ...], i: int) -> list[str]:
    """``arithmetic_script`` with steps long enough that traversal keeps its paths (SPEC §5
    drops paths of 10 words or fewer)."""
    return [step if step.isdigit() else f"Looking at the image carefully, {step}"
            for step in arithmetic_script(question, tuple(p.removeprefix("Looking at the image carefully, ")
                                                          for p in prefix), i)]


def _annotate(settings, tmp_path, n: int = 5, run_id: str = "run-a") -> None:
    ingest_file(make_seed_file(tmp_path / "data", n), settings)
    s = settings.with_overrides(SMALL)
    shard_run(s, run_id, chunk_size=n)
    annotate_chunk(s, run_id, 0, policy=ScriptedPolicy(wordy_script), verifier=ExactVerifier(), steal=False)


def _stock(s, tmp_path) -> tuple:
    """A run of 5 annotated problems, its dataset, a checkpoint and an evaluation."""
    _annotate(s, tmp_path)
    dataset_id = traverse_stage(s, ["run-a"])["dataset_id"]
    checkpoint_id = register_checkpoint(s, dataset_id)
    evaluation_id = record_evaluation(s, checkpoint_id, candidates_from_trees(s, "run-a"))
    return s, {"dataset": dataset_id, "checkpoint": checkpoint_id, "evaluation": evaluation_id}


@pytest.fixture
def stocked(settings, tmp_path):
    return _stock(settings, tmp_path)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "img" and attrs.get("src"):
            self.images.append(attrs["src"])


def _parse(html: str) -> _Links:
    parser = _Links()
    parser.feed(html)
    return parser


def _png_size(content: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(content)) as image:
        assert image.format == "PNG"
        return image.size


@pytest.mark.parametrize("store", ["local", "s3"])
def test_every_page_and_link_answers(request, store, tmp_path):
    """Crawl from the index: every link and image under /mmprm answers 200; run -> problem ->
    node, evaluation -> candidate -> problem and checkpoint -> dataset -> run are all reached."""
    settings, ids = _stock(request.getfixturevalue("s3_settings" if store == "s3" else "settings"), tmp_path)
    client = _client(settings)
    seen: set[str] = set()
    queue = [f"{PREFIX}/"]
    pages: dict[str, str] = {}
    while queue:
        url = queue.pop()
        if url in seen:
            continue
        seen.add(url)
        response = client.get(url, headers={"accept": "text/html"})
        assert response.status_code == 200, (url, response.text[:500])
        if response.headers["content-type"].startswith("text/html"):
            pages[url] = response.text
            parsed = _parse(response.text)
            for src in parsed.images:
                image = client.get(urljoin(url, src))
                assert image.status_code == 200, src
                assert image.headers["content-type"].startswith("image/")
            for href in parsed.links:
                target = urljoin(url, href)
                path = urlsplit(target).path
                if path.startswith(PREFIX) and not urlsplit(target).fragment:
                    queue.append(path)
    kinds = {re.sub(r"/[^/]+$", "/*", re.sub(r"^/mmprm", "", p)) for p in pages}
    assert {"/", "/runs/*", "/runs/run-a/problems/*", "/problems/*", "/datasets/*", "/checkpoints/*",
            "/evaluations/*", f"/evaluations/{ids['evaluation']}/problems/*"} <= kinds, kinds
    # A tree page links every first-error node to its anchor, and each node is on the page.
    tree_pages = [html for url, html in pages.items() if "/runs/run-a/problems/" in url]
    assert len(tree_pages) == 5
    for html in tree_pages:
        for anchor in re.findall(r'href="#(node-\d+)"', html):
            assert f'id="{anchor}"' in html


def test_run_page_progress_and_charts(stocked):
    settings, _ = stocked
    client = _client(settings)
    html = client.get(f"{PREFIX}/runs/run-a").text
    assert re.search(r'id="done">5<', html) and re.search(r'id="left">0<', html)
    assert re.search(r'id="leased">0<', html)
    assert 'id="run-status">succeeded<' in html
    with get_engine(settings).connect() as conn:
        rollouts = conn.execute(sa.text("SELECT sum(num_rollouts) FROM trees WHERE run_id = 'run-a'")).scalar_one()
        calls = conn.execute(sa.text("SELECT stats ->> 'engine_calls' FROM annotation_runs")).scalar_one()
    assert f"<th>rollouts</th><td class=\"num\">{rollouts}</td>" in html
    assert f'<th>engine batches</th><td class="num">{calls}</td>' in html and "requests (" in html
    for chart in ("mc-histogram.png", "first-errors.png"):
        response = client.get(f"{PREFIX}/runs/run-a/{chart}")
        assert response.status_code == 200
        assert _png_size(response.content) == (600, 320)
    # Each problem row links its tree, and names where its first error is.
    for i in range(5):
        assert f'href="{PREFIX}/runs/run-a/problems/p{i:04d}"' in html
    # Problems come a page at a time.
    later = client.get(f"{PREFIX}/runs/run-a?offset=3").text
    assert [f"p{i:04d}" for i in range(5) if f"problems/p{i:04d}\"" in later] == ["p0003", "p0004"]
    assert 'id="previous-problems" href="?offset=0"' in later
    from mmprm_tasks.browser.data import run_view

    page = run_view(settings, "run-a", offset=1, limit=2)
    assert [r.problem_id for r in page["problems"]] == ["p0001", "p0002"] and page["page"]["more"]


def test_tree_page_shows_nodes_first_error_and_image(stocked):
    settings, _ = stocked
    client = _client(settings)
    with get_engine(settings).connect() as conn:
        tree = conn.execute(sa.text(
            "SELECT t.problem_id, t.tree_id, t.num_nodes, p.image_key FROM trees t JOIN seed_problems p USING (problem_id)"
            " WHERE t.run_id = 'run-a' AND EXISTS (SELECT 1 FROM step_nodes n WHERE n.tree_id = t.tree_id"
            " AND n.is_first_error) ORDER BY t.problem_id LIMIT 1")).one()
        first_error = conn.execute(sa.text(
            "SELECT node_index, prefix_len + num_steps - 1 FROM step_nodes WHERE tree_id = :t AND is_first_error"),
            {"t": tree.tree_id}).first()
    html = client.get(f"{PREFIX}/runs/run-a/problems/{tree.problem_id}").text
    assert html.count('class="node') == tree.num_nodes
    node, step = first_error
    assert re.search(rf'class="node first-error" id="node-{node}"', html)
    assert f"first error at step {step}" in html
    assert "correct rollouts" in html and "incorrect rollouts" in html
    # Each node says what its MC value is computed from, in figures that agree with it.
    with get_engine(settings).connect() as conn:
        estimated = conn.execute(sa.text(
            "SELECT node_index, mc_value FROM step_nodes WHERE tree_id = :t AND num_correct + num_incorrect > 0"
            " ORDER BY node_index"), {"t": tree.tree_id}).all()
        num_rollouts = conn.execute(sa.text(
            "SELECT (config -> 'search' ->> 'num_rollouts')::int FROM annotation_runs WHERE run_id = 'run-a'")).scalar_one()
    bases = re.findall(r'<div class="muted mc-basis">MC: (.*?)</div>', html)
    assert len(bases) == tree.num_nodes
    for index, mc in estimated:
        assert bases[index].startswith(f"{round(mc * num_rollouts)} of {num_rollouts} sampled continuations"), bases[index]
    assert any(b.startswith("not estimated: these steps come from a correct rollout") for b in bases)
    image = client.get(f"{PREFIX}/problems/{tree.problem_id}/image")
    assert image.content == open_store(settings).get_bytes(tree.image_key)


def test_dataset_page_labels_and_balance(stocked):
    settings, ids = stocked
    client = _client(settings)
    html = client.get(f"{PREFIX}/datasets/{ids['dataset']}").text
    with get_engine(settings).connect() as conn:
        key = conn.execute(sa.text("SELECT paths_key FROM datasets")).scalar_one()
    paths = [json.loads(x) for x in open_store(settings).get_bytes(key).decode().splitlines() if x.strip()]
    assert paths
    labels = sum(len(p["labels"]) for p in paths)
    positive = sum(p["labels"][-1] > 0 for p in paths)
    assert f"<th>paths</th><td class=\"num\">{len(paths)}</td>" in html
    assert f"<td class=\"num\">{positive}</td>" in html
    assert html.count("&lt;prm&gt; ") == labels  # one label shown per <prm>


def _no_raw_json(html: str) -> None:
    """A page shows records as tables: no serialized JSON object in its text."""
    text = re.sub(r"<[^>]+>", " ", html_lib.unescape(re.sub(r"<style.*?</style>", "", html, flags=re.S)))
    assert not re.search(r'\{\s*"', text), re.search(r'.{0,80}\{\s*".{0,80}', text).group(0)


def test_dataset_page_shows_its_counts_and_parameters_as_tables(stocked):
    settings, ids = stocked
    html = _client(settings).get(f"{PREFIX}/datasets/{ids['dataset']}").text
    with get_engine(settings).connect() as conn:
        counts, params = conn.execute(sa.text("SELECT counts, params FROM datasets")).one()
    assert counts and params
    for name, value in counts.items():
        assert f"<tr><th>{name}</th><td class=\"num\">{value}</td></tr>" in html, name
    assert '<table id="traversal-params"' in html and "<th>label_granularity</th>" in html
    _no_raw_json(html)


def test_checkpoint_page_shows_metrics_as_a_table_and_the_loss_curve(stocked):
    from browser_data import METRICS

    settings, ids = stocked
    client = _client(settings)
    html = client.get(f"{PREFIX}/checkpoints/{ids['checkpoint']}").text
    assert '<tr><th>train_loss</th><td class="num">0.5</td></tr>' in html
    assert '<tr><th>global_step</th><td class="num">3</td></tr>' in html
    assert "loss_history" not in html  # plotted, not listed
    assert '<table id="training-config"' in html and "<th>label_mode</th><td>soft</td>" in html
    _no_raw_json(html)
    loss = _parse(html).images
    assert loss == [f"{PREFIX}/checkpoints/{ids['checkpoint']}/loss.png"]
    response = client.get(loss[0])
    assert response.status_code == 200 and _png_size(response.content) == (600, 320)
    # The curve's points are the logged losses (the same history drawn again gives the same picture).
    from mmprm_tasks.browser.charts import loss_curve_png

    history = [(e["step"], e["loss"]) for e in METRICS["loss_history"]]
    assert response.content == loss_curve_png(history) != loss_curve_png(history[:2])


def test_checkpoint_snippet_loads_the_checkpoint(stocked):
    settings, ids = stocked
    html = _client(settings).get(f"{PREFIX}/checkpoints/{ids['checkpoint']}").text
    snippet = html_lib.unescape(re.search(r'<pre class="snippet" id="snippet">(.*?)</pre>', html, re.S).group(1))
    assert snippet == from_pretrained_snippet(str(TOY_FOUNDATION_DIR))
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 - the page's own snippet, on the shipped tiny model
    assert namespace["model"].config.model_type and namespace["processor"] is not None


def test_evaluation_table_ties_and_scored_steps(stocked):
    settings, ids = stocked
    client = _client(settings)
    report = open_store(settings).get_json(f"reports/{ids['evaluation']}/report.json")
    html = client.get(f"{PREFIX}/evaluations/{ids['evaluation']}").text
    table = re.search(r'<table id="bon-table">(.*?)</table>', html, re.S).group(1)
    assert table.count("<tr>") == 1 + len(report["rows"])
    assert "PRM-weighted vote (min)" in table
    for row in report["rows"]:
        assert f'{row["prm_ties"]["min"]} / {report["num_problems"]}' in table
        assert f'{100 * row["accuracy"]["min"]:.1f}' in table
        assert f'{100 * row["weighted_vote"]:.1f}' in table
    plot = client.get(f"{PREFIX}/evaluations/{ids['evaluation']}/plot.png")
    assert _png_size(plot.content)[0] > 300
    problem_id = next(iter(candidates_from_trees(settings, "run-a")))
    page = client.get(f"{PREFIX}/evaluations/{ids['evaluation']}/problems/{problem_id}").text
    cands = candidates_from_trees(settings, "run-a")[problem_id]
    assert page.count('class="steps candidate-step"') == sum(len(c["steps"]) for c in cands)
    assert page.count("background: hsl(") == sum(len(c["step_scores"]) for c in cands)
    first = cands[0]["step_scores"][0]
    assert f"hsl({120 * first:.0f}, 75%, 82%)" in page


def test_evaluation_page_shows_where_the_prm_stands_on_the_curve(stocked, tmp_path):
    """The shipped curve (here a test curve at the largest N the stocked evaluation has) with the
    evaluation's PRM at its dataset's paths, and the one line comparing them."""
    from markupsafe import escape

    from mmprm_tasks.scaling_curve import plot_curve_png, where_it_stands
    from test_scaling_curve import CURVE

    settings, ids = stocked
    report = open_store(settings).get_json(f"reports/{ids['evaluation']}/report.json")
    row = report["rows"][-1]
    assert row["n"] < CURVE["n"]
    curve = {**CURVE, "n": row["n"]}
    path = tmp_path / "curve.json"
    path.write_text(json.dumps(curve))
    s = settings.with_overrides({"scaling_curve": str(path)})
    client = _client(s)
    with get_engine(s).connect() as conn:
        paths = conn.execute(sa.text("SELECT (counts ->> 'paths')::int FROM datasets WHERE dataset_id = :d"),
                             {"d": ids["dataset"]}).scalar_one()
    assert paths > 0
    html = client.get(f"{PREFIX}/evaluations/{ids['evaluation']}").text
    line = where_it_stands(curve, paths, row["accuracy"]["min"], row["weighted_vote"])
    assert "judge < 0.2" in line and "judge &lt; 0.2" in html and "judge < 0.2" not in html  # escaped
    assert f'<p id="standing">{escape(line)}</p>' in html
    assert 'id="where-it-stands"' in html and "This PRM (the stars)" in html and 'id="standing-note"' not in html
    image = f"{PREFIX}/evaluations/{ids['evaluation']}/curve.png"
    assert image in _parse(html).images
    response = client.get(image)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert _png_size(response.content) == (750, 500)
    point = {"paths": paths, "min": row["accuracy"]["min"], "weighted_vote": row["weighted_vote"]}
    assert response.content == plot_curve_png(curve, point) != plot_curve_png(curve)

    # A curve at an N the evaluation did not reach: the paths are placed, the PRM's figures are not.
    path.write_text(json.dumps(CURVE))
    html = client.get(f"{PREFIX}/evaluations/{ids['evaluation']}").text
    assert "this PRM: no Best-of-8 in its report" in html and "This PRM (the stars)" not in html
    assert client.get(image).content == plot_curve_png(CURVE)

    # No curve shipped: the section says so, and there is no curve image.
    absent = _client(settings.with_overrides({"scaling_curve": str(tmp_path / "absent.json")}))
    html = absent.get(f"{PREFIX}/evaluations/{ids['evaluation']}").text
    assert 'id="where-it-stands"' in html and "No scaling curve is shipped with this installation" in html
    assert 'id="standing"' not in html and image not in _parse(html).images
    response = absent.get(image)
    assert response.status_code == 404 and "No scaling curve is shipped" in response.json()["detail"]
    assert absent.get(f"{PREFIX}/evaluations/eval-x/curve.png").status_code == 404


def test_run_being_annotated(settings, tmp_path):
    """A sharded run with nothing annotated yet: progress counts its problems as left, charts say so."""
    ingest_file(make_seed_file(tmp_path / "data", 3), settings)
    shard_run(settings, "run-new", chunk_size=2)
    client = _client(settings)
    html = client.get(f"{PREFIX}/runs/run-new").text
    assert re.search(r'id="done">0<', html) and re.search(r'id="left">3<', html)
    assert '<meta http-equiv="refresh"' in html  # reloads while the run is not finished
    for chart in ("mc-histogram.png", "first-errors.png"):
        response = client.get(f"{PREFIX}/runs/run-new/{chart}")
        assert response.status_code == 200 and _png_size(response.content) == (600, 320)


def test_unknown_records_are_404_naming_them(settings):
    client = _client(settings)
    response = client.get(f"{PREFIX}/runs/no-such-run")
    assert response.status_code == 404 and "run 'no-such-run'" in response.json()["detail"]
    response = client.get(f"{PREFIX}/evaluations/eval-x", headers={"accept": "text/html"})
    assert response.status_code == 404 and "evaluation &#39;eval-x&#39;" in response.text


def test_permission_rule_on_airflows_auth_manager(auth_manager):
    """Read access to DAG runs lets a viewer in; a user with no role is refused with 403."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    assert browser_app.require_run_reader(None, _viewer()).get_name() == "ops"
    with pytest.raises(HTTPException) as refused:
        browser_app.require_run_reader(None, SimpleAuthManagerUser(username="nobody", role=""))
    assert refused.value.status_code == 403 and "nobody" in refused.value.detail


def test_no_token_is_refused(settings, auth_manager):
    client = _client(settings, as_viewer=False)
    response = client.get(f"{PREFIX}/runs/run-a")
    assert response.status_code == 401
    page = client.get(f"{PREFIX}/runs/run-a?x=1", headers={"accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == auth_manager.get_url_login(next_url=f"{PREFIX}/runs/run-a?x=1")
    # A token Airflow did not sign is refused before any page is built.
    bad = client.get(f"{PREFIX}/", headers={"authorization": "Bearer not-a-jwt"})
    assert bad.status_code == 403


def test_every_airflow_deployment_loads_the_plugin_folder():
    """The local stack and the compose stack point Airflow's plugins folder at the package's
    (the compose images install the checkout at /opt/mmprm)."""
    from pathlib import Path

    import yaml

    from mmprm_tasks.airflow_stack import AirflowStack
    from mmprm_tasks.browser import PLUGINS_DIR

    assert (PLUGINS_DIR / "mmprm_browser.py").is_file()
    stack = AirflowStack(home=Path("/nonexistent"), metadata_url="postgresql://x@127.0.0.1/x")
    assert stack.environment()["AIRFLOW__CORE__PLUGINS_FOLDER"] == str(PLUGINS_DIR)
    repo = Path(__file__).resolve().parents[2]
    compose = yaml.safe_load((repo / "docker-compose.yml").read_text())
    env = compose["x-airflow-common"]["environment"]
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == f"/opt/mmprm/{PLUGINS_DIR.relative_to(repo)}"


def test_evaluation_candidates_per_scorer_and_before_they_were_rows(stocked):
    """Step scores are shown per scorer (the PRM's by default); an evaluation made before
    candidates were stored as rows shows its sampled candidates without scores."""
    settings, ids = stocked
    candidates = candidates_from_trees(settings, "run-a")
    pid = next(iter(candidates))
    client = _client(settings)
    record_evaluation(settings, ids["checkpoint"], candidates, "eval-two-scorers",
                      scorers=("prm", "base-model likelihood"))
    listing = client.get(f"{PREFIX}/evaluations/eval-two-scorers").text
    assert listing.count("<td>base-model likelihood, prm</td>") == len(candidates)
    page = client.get(f"{PREFIX}/evaluations/eval-two-scorers/problems/{pid}").text
    assert '<b id="scorer">prm</b>' in page
    first = candidates[pid][0]["step_scores"]
    assert f"hsl({120 * first[0]:.0f}, 75%, 82%)" in page
    other = client.get(f"{PREFIX}/evaluations/eval-two-scorers/problems/{pid}",
                       params={"scorer": "base-model likelihood"}).text
    assert '<b id="scorer">base-model likelihood</b>' in other
    assert f"<b>{first[-1]:.3f}</b> {candidates[pid][0]['steps'][0]}" in other  # the reversed scores

    record_evaluation(settings, ids["checkpoint"], candidates, "eval-before-rows", as_rows=False)
    listing = client.get(f"{PREFIX}/evaluations/eval-before-rows").text
    assert listing.count("<td>none</td>") == len(candidates)
    page = client.get(f"{PREFIX}/evaluations/eval-before-rows/problems/{pid}").text
    assert page.count('class="steps candidate-step"') == sum(len(c["steps"]) for c in candidates[pid])
    assert "background: hsl(" not in page and "No step scores were stored" in page


@pytest.mark.parametrize("path, status", [
    ("/runs/%00", 404), ("/problems/%00/image", 404), ("/problems/a%00b", 404), ("/datasets/%2E%2E", 404),
    ("/evaluations/e%1b%5b2J/plot.png", 404), ("/evaluations/e%00/curve.png", 404),
    ("/runs/run-a/problems/%00", 404), ("/dag-runs/d/r%00", 404),
    ("/runs/run-a?offset=9223372036854775808", 400), ("/runs/run-a?offset=-1", 400),
    ("/evaluations/eval-x/problems/p1?scorer=%00", 400),
])
def test_hostile_urls_are_404_or_400_with_the_value_escaped(settings, path, status):
    """A NUL in an id or a huge offset once reached Postgres: HTTP 500 (and a reset connection)."""
    client = _client(settings)
    response = client.get(PREFIX + path)
    assert response.status_code == status, response.text
    assert "\x00" not in response.text and "\x1b" not in response.text
    assert client.get(f"{PREFIX}/runs/no-such-run").status_code == 404  # the next request is served


def test_fuzzed_ids_in_urls_are_never_a_server_error(settings):
    """Hypothesis: any text as any id of any page is 404 (or 400), never 500."""
    from urllib.parse import quote

    from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

    client = _client(settings)
    pages = ["/runs/{}", "/runs/{}/mc-histogram.png", "/problems/{}/image", "/datasets/{}", "/checkpoints/{}",
             "/evaluations/{}/plot.png", "/evaluations/{}/curve.png",
             "/runs/run-a/problems/{}"]  # /dag-runs reads Airflow's own DB

    @hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(pages), st.text(min_size=1, max_size=40), st.integers(min_value=-2**70, max_value=2**70))
    def check(page, ident, offset):
        response = client.get(PREFIX + page.format(quote(ident, safe="")) + f"?offset={offset}")
        assert response.status_code in (400, 404), (page, ident, offset, response.status_code, response.text)

    check()
