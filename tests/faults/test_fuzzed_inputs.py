"""Property-based fuzzing (Hypothesis) of every parser a user or a file reaches: seed files (JSON
array and JSONL), release-format trees for ``import-trees``, candidate files for ``score`` and the
ids the CLI reads.  Invariants: no traceback (nothing raised), each bad record rejected naming a
field, every good record lands, nothing orphaned in the store.  Each test has a fixed example
budget, so the suite's time is bounded; real Postgres and a real store throughout."""

from __future__ import annotations

import itertools
import json
import math

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from typer.testing import CliRunner

from mmprm_tasks import seeds
from mmprm_tasks.candidates import CandidateFileError, read_candidates
from mmprm_tasks.storage import open_store
from mmprm_tasks.tree_index import import_trees
from mmprm_tasks.validation import find_bad_value, id_problem

from helpers import write_png
from test_tree_index import _annotated

# Function-scoped fixtures (a database, a folder) are shared by the examples of one test: each
# example names its records uniquely, so examples never see each other's rows.
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_example = itertools.count()

clean_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")) | st.sampled_from("\n\t"),
                     min_size=1, max_size=30).filter(lambda t: t.strip())
hostile_text = st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=30).filter(
    lambda t: find_bad_value(t) is not None) | st.sampled_from(["\x00", "a\x1b[2J", "\x9b", "\ud800", "\x7f"])
# What one bad record holds: the field it spoils and the value, or a whole-record fault.
spoilers = st.one_of(
    st.tuples(st.sampled_from(["question", "correct_answer", "note"]), hostile_text),
    st.tuples(st.just("correct_answer"), st.sampled_from([math.nan, math.inf, -math.inf])),
    st.tuples(st.just("id"), st.sampled_from(["..", "a/b", "", "x" * 201, "a\nb"])),
    st.tuples(st.just("question"), st.sampled_from([None, 7, "", "   "])),
    st.tuples(st.just("<nested>"), st.integers(5_000, 20_000)),  # past what the JSON reader can recurse
    st.tuples(st.just("<not-object>"), st.just(["a", 1])),
)
seed_files = st.tuples(st.lists(st.one_of(st.tuples(st.just("good"), clean_text), st.tuples(st.just("bad"), spoilers)),
                                min_size=1, max_size=8),
                       st.sampled_from(["json", "jsonl"]))


def _seed_record_text(tag: str, i: int, kind: str, payload) -> str:
    record = {"id": f"{tag}-{i}", "question": f"{tag} {i}: what?", "correct_answer": "4", "image_path": "img.png"}
    if kind == "good":
        record["question"] += payload
        return json.dumps(record)
    field, value = payload
    if field == "<nested>":
        return json.dumps(record)[:-1] + ', "deep": ' + "[" * value + "]" * value + "}"
    if field == "<not-object>":
        return json.dumps(value)
    return json.dumps(record | {field: value})


@hsettings(max_examples=20, **FUZZ)
@given(seed_files)
def test_seed_files_land_every_good_record_and_reject_each_bad_one(settings, tmp_path, case):
    records, layout = case
    tag = f"fz{next(_example)}"
    write_png(tmp_path / "img.png")
    texts = [_seed_record_text(tag, i, kind, payload) for i, (kind, payload) in enumerate(records)]
    path = tmp_path / f"{tag}.{layout}"
    path.write_text("[" + ",\n".join(texts) + "]" if layout == "json" else "\n".join(texts) + "\n")

    report = seeds.ingest_file(path, settings)

    good = {f"{tag}-{i}" for i, (kind, _) in enumerate(records) if kind == "good"}
    assert report.inserted == len(good) and len(report.rejected) == len(records) - len(good)
    assert all(r.field and r.message for r in report.rejected)
    with seeds.get_engine(settings).connect() as conn:
        landed = set(conn.execute(seeds.sa.text("SELECT problem_id FROM seed_problems WHERE problem_id LIKE :t"),
                                  {"t": f"{tag}-%"}).scalars())
        image_keys = set(conn.execute(seeds.sa.text("SELECT image_key FROM seed_problems")).scalars())
    assert landed == good
    assert set(open_store(settings).list_keys("images/")) <= image_keys  # no image without its row


tree_spoilers = st.one_of(
    st.tuples(st.just("step"), hostile_text),
    st.tuples(st.just("question"), hostile_text),
    st.tuples(st.just("mc_value"), st.sampled_from([math.nan, math.inf, 1.5, "0.5", None])),
    st.tuples(st.just("id"), st.sampled_from(["../x", "a/b", "", "not-a-seed"])),
    st.tuples(st.just("<not-json>"), st.just("{not json")),
)


def _spoiled_tree(tree: dict, field: str, value) -> str:
    tree = json.loads(json.dumps(tree))
    if field == "<not-json>":
        return value
    if field == "step":
        tree["children"][0]["partial_solution"][0] = value
    else:
        tree[field] = value
    return json.dumps(tree)


def test_release_trees_land_every_good_tree_and_orphan_no_object(settings, tmp_path):
    trees = _annotated(settings, tmp_path, n=4)

    @hsettings(max_examples=6, **FUZZ)
    @given(st.lists(st.one_of(st.tuples(st.just("good"), st.integers(0, 3)),
                              st.tuples(st.just("bad"), st.tuples(st.integers(0, 3), tree_spoilers))),
                    min_size=1, max_size=6))
    def check(lines):
        run_id = f"fz{next(_example)}"
        texts, good = [], set()
        for kind, payload in lines:
            if kind == "good":
                texts.append(json.dumps(trees[payload]))
                good.add(trees[payload]["id"])
            else:
                index, (field, value) = payload
                texts.append(_spoiled_tree(trees[index], field, value))
        path = tmp_path / f"{run_id}.jsonl"
        path.write_text("\n".join(texts) + "\n")

        report = import_trees(settings, str(path), run_id)

        # a good tree repeated is rejected the second time ("already came earlier")
        assert report.trees == len(good) and len(report.rejected) == len(lines) - len(good)
        with seeds.get_engine(settings).connect() as conn:
            keys = set(conn.execute(seeds.sa.text("SELECT tree_key FROM trees WHERE run_id = :r"),
                                    {"r": run_id}).scalars())
        assert keys == {f"trees/{run_id}/{pid}.json" for pid in good}
        assert set(open_store(settings).list_keys(f"trees/{run_id}/")) == keys

    check()


candidate_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2) | st.floats() | clean_text | hostile_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(clean_text, children, max_size=3),
    max_leaves=8)
release_records = st.fixed_dictionaries(
    {}, optional={"id": clean_text | hostile_text, "question": clean_text | hostile_text | candidate_values,
                  "image_path": clean_text | candidate_values,
                  "solutions_splits": st.lists(st.lists(clean_text | hostile_text, max_size=3), max_size=3) | candidate_values,
                  "labels": st.lists(st.sampled_from([0, 1, 2, True]), max_size=3) | candidate_values,
                  "prm_scores": st.lists(st.lists(st.floats(), max_size=3), max_size=3)})


@hsettings(max_examples=300, deadline=None)
@given(st.lists(release_records | candidate_values, max_size=6), st.sampled_from(["json", "jsonl"]))
def test_candidate_files_judge_each_record_alone(records, layout):
    try:
        text = (json.dumps(records) if layout == "json" else "\n".join(json.dumps(r) for r in records))
    except ValueError:
        return
    try:
        kind, good, rejected = read_candidates(text, jsonl=layout == "jsonl")  # as a file name says
    except CandidateFileError as exc:  # both formats in one file: one line, the whole file
        assert "mixes" in str(exc) and "\n" not in str(exc)
        return
    assert len(good) + len(rejected) == len(records)
    assert len({p.problem_id for p in good}) == len(good)
    for problem in good:
        assert find_bad_value(problem.model_dump()) is None
    assert all(r.field and r.message for r in rejected)


@hsettings(max_examples=40, **FUZZ)
@given(st.text(max_size=30) | st.sampled_from(["..", ".", "a/b", "x" * 201, "ok-run", "a\n"]))
def test_cli_ids_are_the_rule_exactly(cli_settings, run_id):
    from mmprm_tasks import cli

    if run_id.startswith("-") or not run_id:
        return  # an option or nothing to click, not an id
    result = CliRunner().invoke(cli.app, ["chunks", "--run", run_id])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == (2 if id_problem(run_id) else 0), (run_id, result.output)
