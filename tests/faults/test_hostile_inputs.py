"""Hostile files and trigger parameters.  (Per-record hostile seed files — bad fields, non-UTF-8,
deep nesting, links escaping the image roots, s3 paths outside their roots, a seed_source outside
the seed roots, a file that is not seed data — are tested in tests/test_seeds.py; here: what a
large or malformed file does to memory and output, and endpoints chosen at trigger time.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmprm_tasks import seeds
from mmprm_tasks.params import TRIGGER_PARAMS, settings_from_params
from mmprm_tasks.policy import load_policy
from mmprm_tasks.settings import ConfigurationError, Settings
from mmprm_tasks.storage import open_store

from helpers import run_mmprm, write_png
from test_candidates import _release_file
from test_seeds import count, make_seed_file
from test_tree_index import _annotated

DAGS = Path(__file__).resolve().parents[2] / "dags"


def test_many_rejections_are_summarised_and_all_quarantined(cli_settings, tmp_path):
    from mmprm_tasks import cli

    data = tmp_path / "data"
    write_png(data / "images" / "ok.png")
    lines = [json.dumps({"id": "ok", "question": "What is 1 + 1?", "correct_answer": "2", "image_path": "images/ok.png"})]
    lines += [json.dumps({"id": f"bad{i}", "question": "", "correct_answer": "1", "image_path": "images/ok.png"})
              for i in range(300)]
    (data / "seeds.jsonl").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(cli.app, ["ingest", str(data / "seeds.jsonl")])
    assert result.exit_code == 1, result.output
    assert "... and 280 more rejected records (by field: question 300)" in result.output
    assert len(result.output.splitlines()) < 80  # was one table row per rejected record
    assert "quarantine report:" in result.output
    store = open_store(cli_settings)
    [key] = store.list_keys("quarantine/ingest/")
    report = store.get_json(key)
    assert len(report["rejected"]) == 300 and all('"question": ""' in r["raw"] for r in report["rejected"])


def test_a_json_array_broken_at_its_end_lands_nothing(settings, tmp_path):
    good = make_seed_file(tmp_path / "data", 6)
    broken = tmp_path / "data" / "broken.json"
    broken.write_text(good.read_text()[:-1] + ', {"id": "late", ')  # valid records, then a cut
    with pytest.raises(ValueError, match="not a valid JSON array: record 6"):
        seeds.ingest_file(broken, settings)
    assert count(settings, "seed_problems") == 0


def test_streaming_reader_matches_the_whole_file_parse_at_any_block_size(settings, tmp_path, monkeypatch):
    """Records and numbers cut across read blocks, a BOM, non-UTF-8 bytes: the same records as
    json.loads of the whole file; and with a one-byte image bound every record is its own batch."""
    records = [{"id": i, "question": f"Q{i} \u00e9\u4e2d", "correct_answer": 10 ** i + 0.5, "image_path": "x"}
               for i in range(12)]
    path = tmp_path / "array.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode() + b" \n")
    for block in (1, 2, 7, 64, 1 << 20):
        monkeypatch.setattr(seeds, "READ_BLOCK_CHARS", block)
        assert [raw for _, raw in seeds.read_records(path)] == records
        assert seeds.count_records(path) == 12
    bad_bytes = tmp_path / "bad.json"
    bad_bytes.write_bytes(b'[{"id": "a", "question": "caf\xe9"}]')
    assert [raw["question"] for _, raw in seeds.read_records(bad_bytes)] == ["caf\udce9"]  # rejected per record

    monkeypatch.setattr(seeds, "READ_BLOCK_CHARS", 5)
    monkeypatch.setattr(seeds, "BATCH_IMAGE_BYTES", 1)
    landed: list[int] = []
    real_land = seeds._land
    monkeypatch.setattr(seeds, "_land", lambda batch, *a: (landed.append(len(batch)), real_land(batch, *a)))
    report = seeds.ingest_file(make_seed_file(tmp_path / "data", 4), settings)
    assert report.inserted == 4 and landed == [1, 1, 1, 1]


# Records that once cost the whole file (a database error at the insert, a reader that gave up),
# as raw JSON text so NaN, 1e309 and deep nesting reach the reader as a user's file has them.
_ONCE_FATAL = {
    "nul-answer": ("correct_answer", '{"id": "nul-answer", "question": "q1?", "correct_answer": "4\\u0000", '
                                     '"image_path": "images/p0.png"}'),
    "nul-extra": ("note", '{"id": "nul-extra", "question": "q2?", "correct_answer": "4", "note": "a\\u0000b", '
                          '"image_path": "images/p0.png"}'),
    "nan-answer": ("correct_answer", '{"id": "nan-answer", "question": "q3?", "correct_answer": NaN, '
                                     '"image_path": "images/p0.png"}'),
    "inf-answer": ("correct_answer", '{"id": "inf-answer", "question": "q4?", "correct_answer": 1e309, '
                                     '"image_path": "images/p0.png"}'),
    "ansi-question": ("question", '{"id": "ansi-question", "question": "\\u001b[31mred?", "correct_answer": "4", '
                                  '"image_path": "images/p0.png"}'),
    "deep": ("<record>", '{"id": "deep", "notes": ' + "[" * 5000 + "]" * 5000 + "}"),
}


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_cli_ingest_rejects_each_once_fatal_record_alone_and_orphans_no_image(settings, tmp_path, layout):
    """As a separate process: every good record lands, each bad one is named with its field, exit
    1 without a traceback, and every stored image belongs to a landed problem."""
    good = json.loads(make_seed_file(tmp_path / "data", 3).read_text())
    texts = [json.dumps(good[0]), *(text for _, text in _ONCE_FATAL.values()), *map(json.dumps, good[1:])]
    seed = tmp_path / "data" / f"hostile.{layout}"
    seed.write_text("[" + ",\n".join(texts) + "]" if layout == "json" else "\n".join(texts) + "\n")
    done = run_mmprm(settings, "ingest", str(seed))
    assert done.returncode == 1, done.stdout + done.stderr
    assert count(settings, "seed_problems") == 3
    report = seeds.ingest_file(seed, settings)  # again, to read the rejections as data
    assert report.unchanged == 3
    # a record too deep to read has no id to name: it is named by its position (after good[0])
    assert {r.record_id or f"record {r.record_index}": r.field for r in report.rejected} == {
        (rid if rid != "deep" else f"record {1 + list(_ONCE_FATAL).index(rid)}"): field
        for rid, (field, _) in _ONCE_FATAL.items()}
    for rid in _ONCE_FATAL:
        assert rid in done.stdout or rid == "deep"
    store = open_store(settings)
    with seeds.get_engine(settings).connect() as conn:
        image_keys = set(conn.execute(seeds.sa.text("SELECT image_key FROM seed_problems")).scalars())
    assert set(store.list_keys("images/")) == image_keys


def _with_first_step(tree: dict, text: str) -> dict:
    """A copy of ``tree`` whose first child's first step is ``text``."""
    tree = json.loads(json.dumps(tree))
    tree["children"][0]["partial_solution"][0] = text
    return tree


def test_cli_import_trees_rejects_a_hostile_tree_alone_and_orphans_no_object(settings, tmp_path):
    """A NUL in one step once failed the whole batch's COPY after its objects were put: now each
    bad tree is named, the others land, every tree object under the run has its row."""
    trees = _annotated(settings, tmp_path, n=4)
    hostile = {
        "nul-step": json.dumps(_with_first_step(trees[1], "x = 1\x00")),
        "ansi-step": json.dumps(_with_first_step(trees[2], "\x1b[2Jgone")),
        "nan-mc": json.dumps(trees[3]).replace('"mc_value": ' + json.dumps(trees[3]["mc_value"]), '"mc_value": NaN', 1),
        "climbing-id": json.dumps({**trees[3], "id": "../../x"}),
    }
    source = tmp_path / "trees.jsonl"
    source.write_text("\n".join([json.dumps(trees[0]), *hostile.values(), json.dumps(trees[3])]) + "\n")
    done = run_mmprm(settings, "import-trees", str(source), "--run", "imported")
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout.replace("\n", "")
    step = "children[0].partial_solution[0]"
    for line, field in enumerate([step, step, "mc_value", "id"], start=2):
        assert f"{source}:{line}: {field}: " in out, (line, out)
    assert "NUL" in out and "U+001B" in out and "4 record(s) rejected" in out
    with seeds.get_engine(settings).connect() as conn:
        keys = set(conn.execute(seeds.sa.text("SELECT tree_key FROM trees WHERE run_id = 'imported'")).scalars())
    assert keys == {"trees/imported/p0000.json", "trees/imported/p0003.json"}
    assert set(open_store(settings).list_keys("trees/imported/")) == keys


def test_cli_import_trees_of_a_missing_path_is_one_line(settings, tmp_path):
    done = run_mmprm(settings, "import-trees", str(tmp_path / "nowhere"), "--run", "imported")
    assert done.returncode == 1 and "no such file or folder" in done.stderr, done.stdout + done.stderr


def test_cli_score_rejects_each_bad_record_alone_and_scores_the_rest(settings, tmp_path):
    """One record missing solutions_splits once failed the file as "mixing formats", one missing
    image with a FileNotFoundError: now each bad record is named with its field, the good ones
    are scored and written, exit 1 without a traceback."""
    from mmprm_tasks.settings import TOY_POLICY_DIR

    path, records = _release_file(tmp_path)
    (tmp_path / "imgs" / "notes.png").write_text("not an image")
    good = records[0]
    hostile = [
        ("solutions_splits", {k: v for k, v in good.items() if k != "solutions_splits"}),
        ("image", {**good, "id": "no-image", "image_path": "imgs/missing.png"}),
        ("image", {**good, "id": "not-image", "image_path": "imgs/notes.png"}),
        ("solutions_splits[0][0]", {**good, "id": "nul-step", "solutions_splits": [["3 + 4 = 7\x00"], ["7"]],
                                    "labels": [1, 1]}),
        ("question", {**good, "id": "ansi", "question": "\x1b]0;pwned\x07What?"}),
        ("id", {**records[1], "id": "twice"}),
    ]
    path.write_text(json.dumps([{**records[1], "id": "twice"}, *(record for _, record in hostile), good]))
    out = tmp_path / "scored.json"
    done = run_mmprm(settings, "score", str(path), "--checkpoint", str(TOY_POLICY_DIR), "--out", str(out))
    assert done.returncode == 1, done.stdout + done.stderr
    said = done.stdout.replace("\n", "")
    for position, (field, _) in enumerate(hostile, start=1):
        assert f"record {position}" in said and f"field {field!r}" in said, (position, field, said)
    assert "\x1b" not in done.stdout
    assert [len(r["prm_scores"]) for r in json.loads(out.read_text())] == [2, 3]  # the two good ones


@pytest.mark.parametrize("command", [["chunks", "--run"], ["annotate", "--all", "--run"], ["traverse"],
                                     ["import-trees", ".", "--run"]], ids=lambda c: c[0])
def test_cli_refuses_an_id_outside_the_id_rule_before_writing(settings, command):
    """Each id that once exited 0 (and failed later at a write, or made keys that climb); every
    command reads its ids through the one rule, so the others try two of them."""
    bad_ids = ["..", "a\nb", ".", "../../etc", "a/b", "x" * 300, "run\x1b[2J"]
    for bad in bad_ids if command[0] == "chunks" else bad_ids[:2]:
        done = run_mmprm(settings, *command, bad)
        assert done.returncode == 2 and "is not a valid id" in done.stderr, (bad, done.stdout + done.stderr)
        assert "\x1b" not in done.stderr
    assert count(settings, "annotation_runs") == 0


@pytest.fixture
def sharded_home(settings, tmp_path):
    """Two seeds, run r1 sharded into 2 chunks and never annotated, and its dataset (empty, not
    formatted)."""
    from mmprm_tasks.pipeline import traverse_stage
    from mmprm_tasks.runs import shard_run

    seeds.ingest_file(make_seed_file(tmp_path / "data", 2), settings)
    (tmp_path / "broken.json").write_text('[{"id": "a", "question": ')  # cut: not a JSON array
    shard_run(settings, "r1", chunk_size=1)
    return settings, traverse_stage(settings, ["r1"])["dataset_id"]


# command -> (exit code, what the one-line error says); {tmp} and {dataset} are filled in.
_ONE_LINE_FAILURES = {
    "train-unknown": (["train", "ds-nope"], 1, "'ds-nope' is not in the step index"),
    "train-unformatted": (["train", "{dataset}"], 1, "is not formatted yet"),
    "evaluate-unknown": (["evaluate", "ckpt-nope"], 1, "'ckpt-nope' is not in the step index"),
    "score-missing": (["score", "{tmp}/missing.json", "--checkpoint", "x"], 1, "cannot be read"),
    "score-s3-on-local": (["score", "s3://bucket/a.json", "--checkpoint", "x"], 1, "configured store is 'local'"),
    "score-file-uri": (["score", "file://{tmp}/dir/newdir/a.json", "--checkpoint", "x"], 1, "cannot be read"),
    "traverse-unknown": (["traverse", "no-such-run"], 1, "not in the step index: ['no-such-run']"),
    "annotate-huge-chunk": (["annotate", "--run", "r1", "--chunk", "99999999999999999999"], 1, "has no chunk"),
    "annotate-chunk-past-end": (["annotate", "--run", "r1", "--chunk", "2"], 1, "has no chunk 2"),
    "ingest-broken-array": (["ingest", "{tmp}/broken.json"], 1, "not a valid JSON array"),
    "annotate-negative-chunk": (["annotate", "--run", "r1", "--chunk", "-1"], 2, "greater than or equal to 0"),
}


@pytest.mark.parametrize("case", list(_ONE_LINE_FAILURES))
def test_cli_failures_are_one_line_and_never_silent(sharded_home, tmp_path, case):
    """Each once ended in a traceback or exited 0 having done nothing (or an empty dataset); and
    reading a file:// URI never creates a folder."""
    settings, dataset = sharded_home
    args, code, says = _ONE_LINE_FAILURES[case]
    (tmp_path / "dir").mkdir()
    datasets_before = count(settings, "datasets")
    done = run_mmprm(settings, *(a.format(tmp=tmp_path, dataset=dataset) for a in args))
    assert done.returncode == code and says in done.stderr.replace("\n", " "), done.stdout + done.stderr
    if code == 1:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), lines
    assert list((tmp_path / "dir").iterdir()) == []
    assert count(settings, "datasets") == datasets_before


def test_cli_score_rejects_a_10k_step_candidate_without_loading_it(settings, tmp_path):
    """It was tokenised to ~98k tokens and run through the model whole (18.8 GB until the kernel
    killed it): now it is counted, rejected by name, and the rest scored, well under 1 GB."""
    from mmprm_tasks.settings import TOY_POLICY_DIR

    path, records = _release_file(tmp_path)
    runaway = {**records[0], "id": "runaway", "labels": [1],
               "solutions_splits": [[f"step {i}: add {i} to the running total" for i in range(10_000)]]}
    path.write_text(json.dumps([records[0], runaway, records[1]]))
    out = tmp_path / "scored.json"
    done = run_mmprm(settings, "score", str(path), "--checkpoint", str(TOY_POLICY_DIR), "--out", str(out),
                     rss_limit_mb=2048, timeout=600)
    assert done.returncode == 1, (done.peak_rss_mb, done.stdout + done.stderr)
    said = done.stdout.replace("\n", "")
    assert "(id 'runaway'): field 'solutions_splits[0]'" in said and "over the PRM's input limit" in said, said
    assert [len(r["prm_scores"]) for r in json.loads(out.read_text())] == [3, 2]
    assert done.peak_rss_mb < 1024, done.peak_rss_mb


def test_a_trigger_cannot_name_an_endpoint_url():
    assert not [name for name in TRIGGER_PARAMS if "url" in name or "key" in name]
    with pytest.raises(KeyError, match="unknown"):
        settings_from_params({"policy_base_url": "http://attacker.example/v1"}, Settings())


def test_a_trigger_picks_only_allowed_connections_and_their_key_alone(monkeypatch):
    monkeypatch.syspath_prepend(str(DAGS))
    from mmprm_wiring.tasks import airflow_endpoint

    monkeypatch.setenv("AIRFLOW_CONN_POLICY_A", json.dumps({"conn_type": "http", "host": "http://vllm-a:8000/v1",
                                                             "password": "key-a"}))
    monkeypatch.setenv("AIRFLOW_CONN_JUDGE_B", json.dumps({"conn_type": "http", "host": "judge-b", "port": 9000,
                                                            "extra": {"path": "/v1"}}))
    base = Settings(allowed_connections=["policy_a", "judge_b"],
                    policy={"backend": "openai", "model": "m", "api_key": "platform-secret"},
                    verify={"judge_model": "j", "judge_api_key": "platform-judge-secret"})
    with pytest.raises(ConfigurationError, match="not an allowed connection"):
        settings_from_params({"policy_connection": "someone_elses"}, base, connections=airflow_endpoint)
    with pytest.raises(ConfigurationError, match="only in a DAG run"):
        settings_from_params({"policy_connection": "policy_a"}, base)
    s = settings_from_params({"policy_connection": "policy_a", "judge_connection": "judge_b"}, base,
                             connections=airflow_endpoint)
    assert s.policy.base_url == "http://vllm-a:8000/v1" and s.policy.api_key.get_secret_value() == "key-a"
    # A Connection without a password gets no key: the platform's never goes to its URL.
    assert s.verify.judge_base_url == "http://judge-b:9000/v1" and s.verify.judge_api_key is None
    policy = load_policy(s)
    try:
        assert policy._client.headers["authorization"] == "Bearer key-a"
    finally:
        policy.close()


def test_cli_format_of_a_large_dataset_streams(settings, tmp_path):
    """``mmprm format`` held the whole dataset (3.0 GB for 15k trees); it now streams: here 140 MB
    of paths, formatted both ways, in well under 300 MB, every record written."""
    seeds.ingest_file(make_seed_file(tmp_path / "data", 2), settings)
    process = "Looking at the figure, the area is the sum of the two parts. <prm>\n\n" * 30
    records = 60_000
    spool = tmp_path / "paths.jsonl"
    with spool.open("w") as out:
        for i in range(records):
            out.write(json.dumps({"question": f"What is {i} + 1?", "answer": "2", "image_path": "images/p0.png",
                                  "process": process, "labels": [0.5] * 30, "tree_id": f"p000{i % 2}"}) + "\n")
    store = open_store(settings)
    store.put_file("datasets/ds-big/paths.jsonl", spool)
    with seeds.get_engine(settings).begin() as conn:
        conn.execute(seeds.sa.text("INSERT INTO datasets (dataset_id, run_ids, params, counts, paths_key) VALUES"
                                   " ('ds-big', '{}', '{}', '{}', 'datasets/ds-big/paths.jsonl')"))
    done = run_mmprm(settings, "format", "ds-big", rss_limit_mb=1500, timeout=600)
    assert done.returncode == 0, (done.peak_rss_mb, done.stdout + done.stderr)
    assert done.peak_rss_mb < 300, done.peak_rss_mb
    for key in ("datasets/ds-big/chat.jsonl", "datasets/ds-big/internvl/annotation.jsonl"):
        assert sum(1 for _ in store.iter_lines(key)) == records
    assert store.get_json("datasets/ds-big/internvl/meta.json")["ds-big"]["length"] == records
