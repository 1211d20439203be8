"""Answer verification: math-verify rules in killable worker processes, an LLM judge over real
HTTP as fallback, and never a False for a check that could not be made."""

from __future__ import annotations

import functools
import re
import socket
import time

import pytest

from helpers import HTTPPeer

from mmprm_tasks.settings import VerifyConfig
from mmprm_tasks.verify import AnswerVerifier, VerificationError, rule_check, slow_rule_check


@pytest.fixture(scope="module")
def verifier():
    with AnswerVerifier(VerifyConfig(workers=2, timeout_s=10)) as v:
        yield v


class JudgePeer:
    """A real OpenAI-compatible judge on loopback.  It reads the ground truth and candidate out of
    the prompt and answers Yes/No from a table of semantic matches (``mode`` can break it)."""

    MATCHES = {("seven", "7"), ("a right angle", "90 degrees"), ("the red one", "red")}

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.http = HTTPPeer(lambda path, body: self.answer(body))
        self.base_url = self.http.base_url

    @property
    def requests(self) -> list[dict]:
        return [{"path": path, **body} for path, body in self.http.requests]

    def answer(self, body: dict) -> tuple[int, dict]:
        if self.mode == "down":
            return 500, {"error": {"message": "judge overloaded"}}
        prompt = body["messages"][0]["content"]
        gold = re.search(r"Ground truth: (.*)", prompt).group(1)
        candidate = re.search(r"Candidate answer: (.*)", prompt).group(1)
        verdict = "Yes" if (candidate.lower(), gold.lower()) in self.MATCHES else "No"
        if self.mode == "chatty":
            verdict = "Let me think about it"
        return 200, {"id": "x", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": verdict}}]}

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def judge():
    peer = JudgePeer()
    yield peer
    peer.close()


def judge_cfg(base_url: str, **kw) -> VerifyConfig:
    return VerifyConfig(workers=1, timeout_s=kw.pop("timeout_s", 10), judge_base_url=base_url,
                        judge_model="judge-72b", judge_max_tries=kw.pop("tries", 3), **kw)


@pytest.mark.parametrize(
    ("candidate", "gold", "expected"),
    [
        (r"\boxed{15}", "15", True),
        ("15", r"\boxed{15}", True),
        (r"$\frac{1}{2}$", "0.5", True),
        ("The final answer is 15", "15", True),
        ("The final answer is $\\frac{3}{4}$", "0.75", True),
        ("The final answer is 15.", "15", True),
        ("Answer: The final answer is 1,000", "1000", True),
        ("The final answer is (B)", "B", True),
        ("The final answer is 16", "15", False),
        (r"\boxed{14}", "15", False),
        ("$0.4$", r"\frac{1}{2}", False),
        ("The final answer is A", "B", False),
    ],
)
def test_rule_equivalences(verifier, candidate, gold, expected):
    assert verifier.check(candidate, gold) is expected


def test_check_many_keeps_order_and_unparseable_is_unverifiable_without_judge(verifier):
    """What the rules cannot read, with no judge configured, is no verdict at all (issue 13:
    gold "one" vs rollout "1" used to be labelled incorrect)."""
    before = verifier.stats["unverifiable"]
    pairs = [("15", "15"), ("I do not know", "15"), ("The final answer is 7", "8"), ("red", "Red"),
             ("1", "one")]
    assert verifier.check_many(pairs) == [True, None, False, True, None]
    assert verifier.stats["unverifiable"] == before + 2
    assert verifier.check_many([]) == []
    assert rule_check("I do not know", "15") == "undecided"


def test_cache_hits(verifier):
    before = dict(verifier.stats)
    assert verifier.check_many([("The final answer is 42", "42")] * 3) == [True] * 3
    assert verifier.stats["rule"] - before["rule"] == 1  # one real check for three pairs
    assert verifier.check("  The final  answer is 42 ", "42") is True  # normalised key: a hit
    assert verifier.stats["cache_hits"] - before["cache_hits"] == 3
    assert verifier.stats["rule"] - before["rule"] == 1


def test_hung_check_times_out_and_the_pool_recovers():
    hang = functools.partial(slow_rule_check, delay_s=60, trigger="HANG")
    with AnswerVerifier(VerifyConfig(workers=2, timeout_s=1.0), rule_fn=hang) as v:
        assert v.check_many([("1", "1")]) == [True]  # workers warm
        started = time.monotonic()
        with pytest.raises(VerificationError, match=r"'HANG' vs '5': timed out after 1 s"):
            v.check_many([("5", "5"), ("HANG", "5"), ("6", "5")])
        assert time.monotonic() - started < 8
        assert v._pool.restarts == 1
        assert v.stats["timeouts"] == 1
        # The checks that finished were kept; the pool has two live workers again.
        assert v.check_many([("5", "5"), ("6", "5"), ("2", "2")]) == [True, False, True]
        assert v.stats["rule"] == 4 and v.stats["cache_hits"] == 2
        # A timed-out check is never cached as an answer: it times out again.
        with pytest.raises(VerificationError):
            v.check("HANG", "5")


def test_judge_decides_what_rules_cannot_parse(judge):
    with AnswerVerifier(judge_cfg(judge.base_url)) as v:
        assert v.check_many([("seven", "7"), ("blue", "red"), ("The final answer is 3", "3"),
                             ("a right angle", "90 degrees")]) == [True, False, True, True]
        assert v.stats["judge"] == 3 and v.stats["rule"] == 1
        asked = judge.requests
        assert len(asked) == 3 and all(r["path"] == "/v1/chat/completions" for r in asked)
        assert {r["model"] for r in asked} == {"judge-72b"}
        assert all(r["max_tokens"] == 8 and r["temperature"] == 0.5 for r in asked)
        assert all("Yes or No" in r["messages"][0]["content"] for r in asked)
        # Cached: asking again does not reach the judge.
        assert v.check("seven", "7") is True
        assert len(judge.requests) == 3


def test_timed_out_rule_falls_back_to_the_judge(judge):
    hang = functools.partial(slow_rule_check, delay_s=60, trigger="seven")
    with AnswerVerifier(judge_cfg(judge.base_url, timeout_s=1.0), rule_fn=hang) as v:
        assert v.check("seven", "7") is True
        assert v.stats["timeouts"] == 1 and v.stats["judge"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judge_outage_raises_never_false():
    down = JudgePeer(mode="down")
    try:
        with AnswerVerifier(judge_cfg(down.base_url, tries=3), judge_backoff_s=0.01) as v:
            assert v.check("15", "15") is True  # rules still work without the judge
            with pytest.raises(VerificationError, match=r"after 3 tries.*HTTP 500.*overloaded"):
                v.check("seven", "7")
            assert len(down.requests) == 3
            assert v.cache_size() == 1  # the failed check left no label behind
    finally:
        down.close()
    unreachable = f"http://127.0.0.1:{_free_port()}/v1"
    with AnswerVerifier(judge_cfg(unreachable, tries=2), judge_backoff_s=0.01) as v:
        with pytest.raises(VerificationError, match="ConnectError"):
            v.check_many([("15", "15"), ("seven", "7")])


def test_unusable_judge_verdict_raises():
    chatty = JudgePeer(mode="chatty")
    try:
        with AnswerVerifier(judge_cfg(chatty.base_url, tries=2), judge_backoff_s=0.01) as v:
            with pytest.raises(VerificationError, match="unusable verdict"):
                v.check("seven", "7")
            assert len(chatty.requests) == 2
    finally:
        chatty.close()


def test_half_configured_judge_is_rejected():
    with pytest.raises(ValueError, match="judge"):
        AnswerVerifier(VerifyConfig(judge_base_url="http://127.0.0.1:1/v1"))


def test_a_worker_killed_while_idle_is_replaced(verifier):
    assert verifier.check("The final answer is 99", "99") is True  # workers are up
    victim = verifier._pool._workers[0]
    victim.proc.kill()
    victim.proc.join()
    restarts = verifier._pool.restarts
    pairs = [(str(i), str(i)) for i in range(200, 206)]
    assert verifier.check_many(pairs) == [True] * 6
    assert verifier._pool.restarts == restarts + 1
