"""Annotation stage on a real Postgres and object store: persistence, resume, stealing, outages."""

from __future__ import annotations

import re
import time

import pytest
import sqlalchemy as sa

from mmprm_tasks.annotate import TreeWriter, _load_problem, annotate_chunk, persist_trees, run_summary
from mmprm_tasks.db import get_engine
from mmprm_tasks.policy import PolicyError
from mmprm_tasks.runs import attempt_owner, claim_problems, config_hash, run_progress, shard_run
from mmprm_tasks.search import flatten_tree, run_search
from mmprm_tasks.seeds import ingest_file
from mmprm_tasks.storage import open_store
from mmprm_tasks.tree_index import tree_key
from mmprm_tasks.verify import AnswerVerifier, VerificationError

from test_search import ExactVerifier, ScriptedPolicy
from test_seeds import make_seed_file

SMALL = {"search.num_rollouts": 4, "search.max_search_count": 3, "search.rollout_budget": 40,
         "search.concurrent_problems": 3}


def arithmetic_script(question: str, prefix: tuple[str, ...], i: int) -> list[str]:
    """Half the samples are right; the other half slip at the second step, and a continuation
    of a slipped prefix stays wrong."""
    n = int(re.search(r"What is (\d+) \+ 1", question).group(1))
    good = [f"The number is {n}.", f"{n} + 1 = {n + 1}.", str(n + 1)]
    bad = [f"The number is {n}.", f"{n} + 1 = {n + 2}.", str(n + 2)]
    slipped = len(prefix) >= 2 and prefix[1] == bad[1]
    steps = bad if slipped or i % 2 else good
    return steps[len(prefix):]


@pytest.fixture
def annotated_settings(settings, tmp_path):
    ingest_file(make_seed_file(tmp_path / "data", 7), settings)
    s = settings.with_overrides(SMALL)
    shard_run(s, "run-a", chunk_size=3)
    return s


def _trees(settings, run_id):
    with get_engine(settings).connect() as conn:
        return conn.execute(sa.text(
            "SELECT t.problem_id, t.tree_id, t.num_nodes, count(n.*) AS nodes FROM trees t"
            " JOIN step_nodes n USING (tree_id) WHERE t.run_id = :r GROUP BY 1, 2, 3 ORDER BY 1"), {"r": run_id}).all()


def test_chunk_persists_trees_and_nodes_with_the_real_verifier(annotated_settings):
    s = annotated_settings
    with AnswerVerifier(s.verify) as verifier:
        stats = annotate_chunk(s, "run-a", 0, policy=ScriptedPolicy(arithmetic_script), verifier=verifier, steal=False)
    assert stats["trees"] == 3 and stats["stolen"] == 0
    assert stats["engine_calls"] >= 1 and stats["mean_batch_size"] > 1  # three trees batched per call
    rows = _trees(s, "run-a")
    assert len(rows) == 3 and all(r.num_nodes == r.nodes for r in rows)
    store = open_store(s)
    tree = store.get_json(tree_key("run-a", rows[0].problem_id))
    assert set(tree) == {"id", "question", "answer", "image_path", "mc_value", "visit_count",
                         "correct_rollouts", "incorrect_rollouts", "children"}
    assert tree["mc_value"] == 0.5 and len(flatten_tree(tree)) == rows[0].nodes
    with get_engine(s).connect() as conn:
        first_errors = conn.execute(sa.text(
            "SELECT n.steps, n.prefix_len FROM step_nodes n JOIN trees t USING (tree_id)"
            " WHERE t.run_id = 'run-a' AND n.is_first_error")).all()
    # The slip is the second step: the first-error node ends at it.
    assert first_errors and all(re.search(r"\+ 1 = ", steps[-1]) for steps, _ in first_errors)
    assert run_progress(get_engine(s), "run-a") == {"done": 3, "pending": 4}


def test_rerun_skips_finished_work_and_never_duplicates(annotated_settings):
    s = annotated_settings
    policy = ScriptedPolicy(arithmetic_script)
    first = annotate_chunk(s, "run-a", 0, policy=policy, verifier=ExactVerifier())
    assert first["trees"] == 7 and first["stolen"] == 4  # it finished its chunk, then took the rest
    calls = len(policy.calls)
    again = annotate_chunk(s, "run-a", 0, policy=policy, verifier=ExactVerifier())
    assert again["trees"] == 0 and len(policy.calls) == calls
    assert annotate_chunk(s, "run-a", 2, policy=policy, verifier=ExactVerifier())["trees"] == 0
    assert len(_trees(s, "run-a")) == 7
    summary = run_summary(s, "run-a")
    assert summary["status"] == "succeeded" and summary["trees"] == 7 and summary["trees_mixed_root"] == 7
    assert summary["stats"]["rollouts"] == first["rollouts"]
    assert len(open_store(s).list_keys("trees/run-a/")) == 7


def test_a_duplicate_search_does_not_double_the_run_counts(annotated_settings):
    """A lease that lapsed mid-search lets a peer search the same problems again: the trees are
    upserted (one per problem), and the run's counts come from the index, so they stay right."""
    s = annotated_settings
    policy = ScriptedPolicy(arithmetic_script)
    first = annotate_chunk(s, "run-a", 0, policy=policy, verifier=ExactVerifier())
    with get_engine(s).begin() as conn:  # as if every lease had lapsed before its tree landed
        conn.execute(sa.text("UPDATE chunk_problems SET status = 'pending' WHERE run_id = 'run-a'"))
    second = annotate_chunk(s, "run-a", 1, policy=policy, verifier=ExactVerifier())
    assert first["trees"] == second["trees"] == 7
    summary = run_summary(s, "run-a")
    assert summary["trees"] == summary["stats"]["trees"] == 7
    assert summary["stats"]["rollouts"] == first["rollouts"]  # the same seeded searches, counted once
    assert summary["stats"]["engine_rollouts"] == first["engine_rollouts"] + second["engine_rollouts"]


def _dead_pid() -> int:
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_retry_takes_back_only_dead_attempts_leases(annotated_settings):
    import os
    import socket

    s = annotated_settings
    host = socket.gethostname()
    dead = f"run-a/chunk-1@{host}:{_dead_pid()}:aaaa"  # the attempt that was SIGKILLed
    assert len(claim_problems(get_engine(s), "run-a", 1, dead, limit=2, steal=False, lease_seconds=s.lease_seconds)) == 2
    alive = f"run-a/chunk-1@{host}:{os.getppid()}:bbbb"  # a first attempt still running on this host
    assert len(claim_problems(get_engine(s), "run-a", 1, alive, limit=1, steal=False, lease_seconds=s.lease_seconds)) == 1
    remote = "run-a/chunk-2@another-host:1:cccc"  # on another machine: its lease must expire first
    assert len(claim_problems(get_engine(s), "run-a", 2, remote, limit=1, steal=False, lease_seconds=s.lease_seconds)) == 1

    stats = annotate_chunk(s, "run-a", 1, policy=ScriptedPolicy(arithmetic_script), verifier=ExactVerifier(),
                           steal=False)
    assert stats["resumed_leases"] == 2 and stats["trees"] == 2  # the dead attempt's, nothing of the live one
    with get_engine(s).connect() as conn:
        owners = dict(conn.execute(sa.text(
            "SELECT lease_owner, count(*) FROM chunk_problems WHERE run_id = 'run-a' AND status = 'leased'"
            " GROUP BY 1")).all())
    assert owners == {alive: 1, remote: 1}


def test_a_tree_whose_lease_was_taken_is_not_written(annotated_settings):
    s = annotated_settings.with_overrides({"lease_seconds": 0.2})
    slow = attempt_owner("run-a/chunk-0")
    taken, kept = [pid for pid, *_ in claim_problems(get_engine(s), "run-a", 0, slow, limit=2, steal=False, lease_seconds=s.lease_seconds)]
    time.sleep(0.5)  # the slow attempt stalls past its leases (no heartbeat) ...
    peer = attempt_owner("run-a/peer")
    assert claim_problems(get_engine(s), "run-a", 0, peer, limit=1, steal=False, lease_seconds=s.lease_seconds)[0][0] == taken  # ... a peer takes one
    with get_engine(s).begin() as conn:  # the slow attempt still holds the other (nobody claimed it)
        conn.execute(sa.text("UPDATE chunk_problems SET lease_expires_at = now() + interval '1 hour'"
                             " WHERE run_id = 'run-a' AND problem_id = :p"), {"p": kept})
    store = open_store(s)
    with get_engine(s).connect() as conn:
        problems = [_load_problem(conn, store, pid) for pid in (taken, kept)]
    results = {r.problem_id: r for r in run_search(problems, ScriptedPolicy(arithmetic_script), ExactVerifier(),
                                                   s.search, 0)}
    # Written together (one transaction): the held problem's tree lands, the taken one's does not.
    with get_engine(s).connect() as conn:
        written = persist_trees(conn, store, "run-a", config_hash(s), [results[taken], results[kept]], slow)
    assert [r.problem_id for r in written] == [kept]
    assert [t.problem_id for t in _trees(s, "run-a")] == [kept] and not store.exists(tree_key("run-a", taken))
    # Through the writer threads: not an error for the chunk, counted as lost.
    writer = TreeWriter(get_engine(s), store, s, "run-a", config_hash(s), slow)
    writer.submit(results[taken])
    writer.close()
    assert writer.lost == [taken] and writer.written == []
    assert [t.problem_id for t in _trees(s, "run-a")] == [kept]


def test_verification_outage_fails_the_chunk_and_writes_no_label(annotated_settings):
    s = annotated_settings
    # Three problems are searched at once; the outage hits in the middle of their searches.
    with pytest.raises(VerificationError, match="judge unreachable"):
        annotate_chunk(s, "run-a", 0, policy=ScriptedPolicy(arithmetic_script),
                       verifier=ExactVerifier(fail_on_call=2), steal=False)
    assert _trees(s, "run-a") == []
    with get_engine(s).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM step_nodes")).scalar_one() == 0
        errors = conn.execute(sa.text("SELECT status, error FROM chunk_problems WHERE chunk_index = 0")).all()
    assert all(status == "pending" and "judge unreachable" in error for status, error in errors)
    assert open_store(s).list_keys("trees/") == []
    # Once the verifier is back, the same chunk completes.
    assert annotate_chunk(s, "run-a", 0, policy=ScriptedPolicy(arithmetic_script), verifier=ExactVerifier(),
                          steal=False)["trees"] == 3


def test_policy_outage_over_http_is_an_error_not_a_label(annotated_settings):
    from mmprm_tasks.services import free_port

    s = annotated_settings.with_overrides({"policy.backend": "openai", "policy.model": "policy",
                                           "policy.base_url": f"http://127.0.0.1:{free_port()}/v1",
                                           "policy.max_retries": 1, "policy.request_timeout_s": 2})
    shard_run(s, "run-http", chunk_size=3)
    with pytest.raises(PolicyError):
        annotate_chunk(s, "run-http", 0, verifier=ExactVerifier(), steal=False)
    assert _trees(s, "run-http") == []


def test_run_config_must_match(annotated_settings):
    other = annotated_settings.with_overrides({"search.num_rollouts": 8})
    with pytest.raises(ValueError, match="was created with config"):
        annotate_chunk(other, "run-a", 0, policy=ScriptedPolicy(arithmetic_script), verifier=ExactVerifier())
    with pytest.raises(LookupError, match="does not exist"):
        annotate_chunk(annotated_settings, "no-such-run", 0, policy=ScriptedPolicy(arithmetic_script),
                       verifier=ExactVerifier())


def test_cli_annotate_all_leaves_unexpired_leases_of_another_host_to_their_holder(cli_settings, tmp_path):
    """A worker elsewhere may be alive (its heartbeat renews its leases): --all, with nothing left
    to claim, says who holds the rest and exits 0 (issue 25; it used to exit 1)."""
    from typer.testing import CliRunner

    from mmprm_tasks import cli

    ingest_file(make_seed_file(tmp_path / "data", 3), cli_settings)
    shard_run(cli_settings, "run-d", chunk_size=3)
    elsewhere = "run-d/chunk-0@another-host:123:abcd"
    assert len(claim_problems(get_engine(cli_settings), "run-d", 0, elsewhere, limit=3, lease_seconds=cli_settings.lease_seconds)) == 3
    result = CliRunner().invoke(cli.app, ["annotate", "--run", "run-d", "--all"])
    assert result.exit_code == 0, result.output
    assert "3 problem(s) are being annotated by live workers" in result.output and elsewhere in result.output


def test_an_empty_chunk_loads_nothing_and_chunks_share_one_warm_engine(annotated_settings, monkeypatch):
    from mmprm_tasks import annotate

    s = annotated_settings
    loads = []

    def load(settings):
        loads.append(settings.policy.model)
        return ScriptedPolicy(arithmetic_script)

    monkeypatch.setattr(annotate, "load_policy", load)
    monkeypatch.setattr(annotate, "_warm", {})
    verifier = ExactVerifier()
    annotate_chunk(s, "run-a", 0, verifier=verifier, steal=False)
    annotate_chunk(s, "run-a", 1, verifier=verifier, steal=True)  # takes the rest of the run
    assert run_progress(get_engine(s), "run-a") == {"done": 7}
    assert len(loads) == 1  # the second chunk reused the warm engine
    # A chunk with nothing left to claim never touches an engine (here: one that would be a new load).
    empty = annotate_chunk(s.with_overrides({"policy.device": "cuda:7"}), "run-a", 2)
    assert empty["trees"] == 0 and len(loads) == 1
