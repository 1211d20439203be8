"""Judges that are dead, answer 500, answer garbage, answer with NUL bytes or hang, and no judge at
all, behind a real annotation run whose gold answers only a judge can read ("seven" vs "7"): the
chunk fails with a one-line first cause, no tree or label is written for an unchecked answer, the
leases are handed back with the error stored, and a rerun with a working judge completes."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa

from mmprm_tasks.annotate import annotate_chunk
from mmprm_tasks.db import get_engine
from mmprm_tasks.failures import EXIT_DEPENDENCY, describe
from mmprm_tasks.runs import shard_run
from mmprm_tasks.seeds import ingest_file
from mmprm_tasks.services import free_port
from mmprm_tasks.verify import AnswerVerifier

from fault_helpers import HookedPolicy, assert_consistent
from helpers import HTTPPeer, write_png
from test_annotate import SMALL

WORDS = ["three", "four", "five"]


def words_script(question: str, prefix: tuple[str, ...], i: int) -> list[str]:
    """Gold answers are words; rollouts answer in digits, half of them one too many."""
    n = WORDS.index(question.split()[-1].rstrip("?")) + 3
    good = ["Count the dots.", f"There are {n} dots.", str(n)]
    bad = ["Count the dots.", f"There are {n + 1} dots.", str(n + 1)]
    slipped = len(prefix) >= 2 and prefix[1] == bad[1]
    return (bad if slipped or i % 2 else good)[len(prefix):]


def _verdict(content: str) -> tuple[int, dict]:
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def good_judge(path: str, body: dict) -> tuple[int, dict]:
    prompt = body["messages"][0]["content"]
    gold = prompt.split("Ground truth: ")[1].split("\n")[0]
    candidate = prompt.split("Candidate answer: ")[1].split("\n")[0]
    return _verdict("Yes" if candidate.strip() == str(WORDS.index(gold) + 3) else "No")


def hanging_judge(path: str, body: dict) -> tuple[int, dict]:
    time.sleep(3)
    return good_judge(path, body)


BROKEN_JUDGES = {
    "500": lambda path, body: (500, {"error": {"message": "judge overloaded"}}),
    "garbage": lambda path, body: (200, {"result": "<html>proxy error</html>"}),
    "nul": lambda path, body: _verdict("\x00\x00maybe\x00"),
    "hanging": hanging_judge,
}


@pytest.fixture
def judged_run(fault_settings, tmp_path):
    data = tmp_path / "data"
    records = []
    for i, word in enumerate(WORDS):
        write_png(data / "images" / f"w{i}.png", color=(i * 60, 20, 90), text=word)
        records.append({"id": f"w{i}", "question": f"How many dots are there, {word}?", "correct_answer": word,
                        "image_path": f"images/w{i}.png", "split": "train"})
    (data / "seeds.json").write_text(json.dumps(records))
    ingest_file(data / "seeds.json", fault_settings)
    s = fault_settings.with_overrides(SMALL)
    shard_run(s, "run-j", chunk_size=3)
    return s


def _judge_settings(s, base_url: str):
    return s.with_overrides({"verify.judge_base_url": base_url, "verify.judge_model": "judge",
                             "verify.judge_max_tries": 2, "verify.judge_timeout_s": 1, "verify.workers": 1})


def _fails_without_a_label(s, exc: BaseException) -> None:
    failure = describe(exc)
    assert failure is not None and failure.exit_code == EXIT_DEPENDENCY and "\n" not in failure.cause, repr(exc)
    assert failure.cause.startswith("VerificationError"), failure.cause
    assert_consistent(s, "run-j", finished=False)
    with get_engine(s).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM trees")).scalar_one() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM step_nodes")).scalar_one() == 0
        rows = conn.execute(sa.text("SELECT status, error FROM chunk_problems WHERE run_id = 'run-j'")).all()
    # Handed back at once with the cause (NUL bytes stored visibly), for the retry.
    assert {status for status, _ in rows} == {"pending"} and any(error for _, error in rows)


@pytest.mark.parametrize("kind", [*BROKEN_JUDGES, "dead"])
def test_a_broken_judge_fails_the_chunk_and_writes_no_label(judged_run, kind):
    peer = None if kind == "dead" else HTTPPeer(BROKEN_JUDGES[kind])
    base_url = peer.base_url if peer else f"http://127.0.0.1:{free_port()}/v1"
    s = _judge_settings(judged_run, base_url)
    try:
        with AnswerVerifier(s.verify, judge_backoff_s=0.01) as verifier, pytest.raises(Exception) as raised:
            annotate_chunk(s, "run-j", 0, policy=HookedPolicy(script=words_script), verifier=verifier)
    finally:
        if peer:
            peer.close()
    _fails_without_a_label(s, raised.value)
    if kind == "nul":
        with get_engine(s).connect() as conn:
            errors = conn.execute(sa.text("SELECT error FROM chunk_problems WHERE error IS NOT NULL")).scalars().all()
        assert errors and all("\\x00" in e for e in errors)
    # The same run with a working judge completes.
    good = HTTPPeer(good_judge)
    try:
        s = _judge_settings(judged_run, good.base_url)
        with AnswerVerifier(s.verify, judge_backoff_s=0.01) as verifier:
            annotate_chunk(s, "run-j", 0, policy=HookedPolicy(script=words_script), verifier=verifier)
    finally:
        good.close()
    assert_consistent(s, "run-j", finished=True)


def test_no_judge_leaves_unreadable_answers_unlabelled_and_fails(judged_run):
    with AnswerVerifier(judged_run.verify) as verifier, pytest.raises(Exception) as raised:
        annotate_chunk(judged_run, "run-j", 0, policy=HookedPolicy(script=words_script), verifier=verifier)
    _fails_without_a_label(judged_run, raised.value)
    assert "configure an LLM judge" in str(raised.value)
