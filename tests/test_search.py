"""OmegaPRM search (SPEC §4) against scripted policies whose right answers and first wrong steps
are known, with an exact-match verifier (and once with the real AnswerVerifier)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence

import pytest

from mmprm_tasks.policy import GenerationRequest, PolicyError
from mmprm_tasks.rollouts import rollout_words
from mmprm_tasks.search import (
    NodeRow,
    SearchProblem,
    SearchResult,
    _Tree,
    flatten_tree,
    q_value,
    run_search,
    u_value,
)
from mmprm_tasks.settings import SearchConfig
from mmprm_tasks.verify import VerificationError

GOLD = "42"
IMAGE = b"\x89PNG fake image bytes"

# script(question, prefix_steps, index_of_sample) -> rollout
Script = Callable[[str, tuple[str, ...], int], list[str]]


class ScriptedPolicy:
    """``generate`` answers each request from a script of (question, prefix, sample index)."""

    def __init__(self, script: Script, *, fail_on_call: int | None = None) -> None:
        self.script = script
        self.fail_on_call = fail_on_call
        self.calls: list[list[GenerationRequest]] = []
        self.seeds: list[int | None] = []

    def generate(self, requests, *, seed=None):
        self.calls.append(list(requests))
        self.seeds.append(seed)
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise PolicyError("engine died")
        return [
            [list(self.script(r.question, tuple(r.prefix_steps), i)) for i in range(r.n)]
            for r in requests
        ]

    @property
    def rollouts_asked(self) -> int:
        return sum(r.n for call in self.calls for r in call)


class SeededPolicy(ScriptedPolicy):
    """Like a sampling backend: each request's output depends on its own seed (and nothing else
    in the engine call)."""

    def generate(self, requests, *, seed=None):
        self.calls.append(list(requests))
        out = []
        for r in requests:
            rollouts = []
            for i in range(r.n):
                rng = random.Random(f"{r.seed}|{i}|{'|'.join(r.prefix_steps)}")
                rollouts.append(_random_rollout(rng, r.prefix_steps))
            out.append(rollouts)
        return out


class ExactVerifier:
    def __init__(self, *, fail_on_call: int | None = None, verdict=None) -> None:
        self.calls: list[list[tuple[str, str]]] = []
        self.fail_on_call = fail_on_call
        self.verdict = verdict

    def check_many(self, pairs):
        self.calls.append(list(pairs))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise VerificationError("judge unreachable")
        if self.verdict is not None:
            return [self.verdict for _ in pairs]
        return [c.strip() == g.strip() for c, g in pairs]


def problem(pid: str = "p1", question: str = "What is it?", answer: str = GOLD) -> SearchProblem:
    return SearchProblem(pid, question, answer, IMAGE, f"images/{pid}.png")


def cfg(**kw) -> SearchConfig:
    return SearchConfig(**kw)


def search_one(script: Script, config: SearchConfig, *, seed: int = 0, prob=None):
    policy, verifier = ScriptedPolicy(script), ExactVerifier()
    results = list(run_search([prob or problem()], policy, verifier, config, seed))
    assert len(results) == 1
    return results[0], policy, verifier


def find_node(tree: dict, prefix: Sequence[str]) -> list[dict]:
    """Every node whose full prefix is ``prefix``."""
    found = []
    stack = [(c, ()) for c in tree["children"]]
    while stack:
        node, above = stack.pop()
        full = above + tuple(node["partial_solution"])
        if full == tuple(prefix):
            found.append(node)
        stack.extend((c, full) for c in node["children"])
    return found


# ---------------------------------------------------------------------------------------------
# A solution of 8 steps (7 reasoning steps + answer) whose 5th step is wrong.

RIGHT = [f"c{i}" for i in range(1, 8)] + [GOLD]
WRONG = RIGHT[:4] + ["w5", "w6", "w7", "13"]


def eight_step_script(question: str, prefix: tuple[str, ...], i: int) -> list[str]:
    n = len(prefix)
    if any(s.startswith("w") for s in prefix):  # past the error: always wrong
        return WRONG[n:] if tuple(WRONG[:n]) == prefix else ["13"]
    if n <= 4:  # on the right track, before the error: half right, half the known mistake
        return RIGHT[n:] if i % 2 == 0 else WRONG[n:]
    return RIGHT[n:] if i % 2 == 0 else [f"x{n}", "13"]


def test_binary_search_finds_the_first_wrong_step():
    result, policy, _ = search_one(eight_step_script, cfg(num_rollouts=4, max_search_count=1))
    tree = result.tree
    assert tree["mc_value"] == 0.5
    assert tree["incorrect_rollouts"] == [WRONG]
    up_to_4 = find_node(tree, WRONG[:4])
    ending_at_5 = find_node(tree, WRONG[:5])
    assert len(up_to_4) == 1 and up_to_4[0]["mc_value"] > 0
    assert len(ending_at_5) == 1 and ending_at_5[0]["mc_value"] == 0.0
    # The probes: steps 1..4 from the root, then 5..6 and 5 alone from the node of steps 1..4.
    assert up_to_4[0]["partial_solution"] == WRONG[:4]
    probes = [c["partial_solution"] for c in up_to_4[0]["children"]]
    assert probes[-2:] == [["w5", "w6"], ["w5"]]
    assert find_node(tree, WRONG[:6])[0]["mc_value"] == 0.0
    # Each estimate was made from the node's full prefix (the root from the question alone).
    prefixes = [r.prefix_steps for call in policy.calls for r in call]
    assert prefixes == [(), tuple(WRONG[:4]), tuple(WRONG[:6]), tuple(WRONG[:5])]
    assert all(r.question == "What is it?" and r.image == IMAGE for c in policy.calls for r in c)
    assert result.stats == {
        "rollouts": 16, "mc_estimations": 4, "searches": 1, "verifications": 16, "unverifiable": 0,
        "nodes": len(flatten_tree(tree)), "stop_reason": "max_search_count",
    }


def test_first_error_is_found_at_every_position():
    """Binary search locates the first wrong step wherever it is, in O(log n) estimates."""
    length = 8
    for err in range(length - 1):  # a wrong reasoning step at index err
        right = [f"c{i}" for i in range(length - 1)] + [GOLD]
        wrong = right[:err] + [f"w{j}" for j in range(err, length - 1)] + ["13"]

        def script(q, prefix, i, right=right, wrong=wrong):
            n = len(prefix)
            if any(s.startswith("w") for s in prefix):
                return wrong[n:]
            return right[n:] if i == 0 else wrong[n:]

        result, policy, _ = search_one(script, cfg(num_rollouts=2, max_search_count=1))
        tree = result.tree
        assert find_node(tree, wrong[: err + 1])[0]["mc_value"] == 0.0
        if err > 0:
            assert find_node(tree, wrong[:err])[0]["mc_value"] > 0
        assert len(policy.calls) - 1 <= math.ceil(math.log2(length)) + 1


# ---------------------------------------------------------------------------------------------
# A hand-computed search.

C = ["c1", "c2", GOLD]
W = ["c1", "w2", "13"]


def hand_script(question: str, prefix: tuple[str, ...], i: int) -> list[str]:
    if prefix == ():
        return [C, W, ["7"], W, []][i]
    if prefix == ("c1", "w2"):
        return ["13"]
    if prefix == ("c1",):
        return [["c2", GOLD], ["w2", "13"], ["c2", GOLD], ["c2", GOLD], ["c2", GOLD]][i]
    raise AssertionError(f"unexpected prefix {prefix}")


def test_hand_computed_tree():
    result, policy, verifier = search_one(hand_script, cfg(num_rollouts=5))
    # Root: 1 correct of 5 (W sampled twice counts twice; the empty rollout is incorrect).
    # Pool (N_total = 0, so U = 0): Q([]) > Q(["7"]) > Q(W) (fewer words).  Selections:
    #   1. []    -> nothing to search; root visits 1
    #   2. ["7"] -> final step alone: verified, mc 0.0; root visits 2
    #   3. W     -> probe steps 0..1 (c1, w2): 0/5 -> mc 0; probe step 0 (c1): 4/5 = 0.8;
    #               root visits 3
    #   4. (c1) + ["w2","13"] -> probe (w2) under (c1): mc 0; (c1) visits 1
    # then the pool is empty.
    expected = {
        "id": "p1",
        "question": "What is it?",
        "answer": GOLD,
        "image_path": "images/p1.png",
        "mc_value": 0.2,
        "visit_count": 3,
        "correct_rollouts": [C],
        "incorrect_rollouts": [W, ["7"], []],
        "children": [
            {"partial_solution": C, "mc_value": 1.0, "visit_count": 0,
             "correct_rollouts": [], "incorrect_rollouts": [], "children": []},
            {"partial_solution": ["7"], "mc_value": 0.0, "visit_count": 0,
             "correct_rollouts": [], "incorrect_rollouts": [], "children": []},
            {"partial_solution": ["c1", "w2"], "mc_value": 0.0, "visit_count": 0,
             "correct_rollouts": [], "incorrect_rollouts": [["13"]], "children": []},
            {"partial_solution": ["c1"], "mc_value": 0.8, "visit_count": 1,
             "correct_rollouts": [["c2", GOLD]], "incorrect_rollouts": [["w2", "13"]],
             "children": [
                 {"partial_solution": ["c2", GOLD], "mc_value": 1.0, "visit_count": 0,
                  "correct_rollouts": [], "incorrect_rollouts": [], "children": []},
                 {"partial_solution": ["w2"], "mc_value": 0.0, "visit_count": 0,
                  "correct_rollouts": [], "incorrect_rollouts": [["13"]], "children": []},
             ]},
        ],
    }
    assert result.tree == expected
    assert result.problem_id == "p1"
    assert result.stats == {"rollouts": 20, "mc_estimations": 4, "searches": 4,
                            "verifications": 20, "unverifiable": 0, "nodes": 7, "stop_reason": "pool_empty"}
    # The empty rollout never reaches the verifier; the lone final step does.
    checked = [c for call in verifier.calls for c, _ in call]
    assert "" not in checked and checked.count("7") == 2
    # N_total == sum of visit counts == selections made.
    assert sum(r.visit_count for r in flatten_tree(result.tree)) == result.stats["searches"]


def test_tree_record_matches_spec_field_for_field():
    result, _, _ = search_one(hand_script, cfg(num_rollouts=5))
    tree = json.loads(json.dumps(result.tree))
    assert tree == result.tree
    assert list(tree) == ["id", "question", "answer", "image_path", "mc_value", "visit_count",
                          "correct_rollouts", "incorrect_rollouts", "children"]
    child_keys = ["partial_solution", "mc_value", "visit_count", "correct_rollouts",
                  "incorrect_rollouts", "children"]
    stack = list(tree["children"])
    assert stack
    while stack:
        node = stack.pop()
        assert list(node) == child_keys
        assert isinstance(node["mc_value"], float) and 0.0 <= node["mc_value"] <= 1.0
        assert isinstance(node["visit_count"], int)
        assert all(isinstance(s, str) for s in node["partial_solution"])
        for key in ("correct_rollouts", "incorrect_rollouts"):
            assert all(isinstance(r, list) and all(isinstance(s, str) for s in r)
                       for r in node[key])
        stack.extend(node["children"])
    assert isinstance(tree["mc_value"], float)


def test_flatten_tree():
    result, _, _ = search_one(hand_script, cfg(num_rollouts=5))
    rows = flatten_tree(result.tree)
    assert rows[0] == NodeRow(0, None, 0, (), 0.2, 3, 1, 3)
    assert [(r.node_index, r.parent_index, r.depth, r.steps) for r in rows] == [
        (0, None, 0, ()),
        (1, 0, 1, tuple(C)),
        (2, 0, 1, ("7",)),
        (3, 0, 1, ("c1", "w2")),
        (4, 0, 1, ("c1",)),
        (5, 4, 2, ("c2", GOLD)),
        (6, 4, 2, ("w2",)),
    ]
    assert [r.mc_value for r in rows] == [0.2, 1.0, 0.0, 0.0, 0.8, 1.0, 0.0]
    assert [(r.num_correct, r.num_incorrect) for r in rows] == [
        (1, 3), (0, 0), (0, 0), (0, 1), (1, 1), (0, 0), (0, 1)]
    assert [r.visit_count for r in rows] == [3, 0, 0, 0, 1, 0, 0]
    assert len(rows) == 7
    # Pre-order on a deeper tree: every parent precedes its children, depth = parent's + 1.
    big, _, _ = search_one(random_script, cfg(num_rollouts=6, max_search_count=30))
    rows = flatten_tree(big.tree)
    assert len(rows) == big.stats["nodes"]
    for r in rows[1:]:
        assert r.parent_index < r.node_index
        assert r.depth == rows[r.parent_index].depth + 1


# ---------------------------------------------------------------------------------------------
# Priorities and pop order.


def _feed_estimate(tree: _Tree, node, labelled: list[tuple[tuple[str, ...], bool]]) -> None:
    """Run the tree's own MC estimation of ``node`` with the given (rollout, correct) answers."""
    gen = tree.estimate(node)
    next(gen)
    with pytest.raises(StopIteration):
        gen.send(labelled)


def test_q_and_u_formulas():
    c = cfg(alpha=0.5, beta=0.9, length_scale=2000, c_puct=0.125)
    steps = ["two words", "three more words", "5"]
    assert rollout_words(steps) == 6
    assert q_value(0.25, steps, c) == pytest.approx(0.5 ** 0.75 * 0.9 ** (6 / 2000))
    assert q_value(1.0, [], c) == 1.0
    assert u_value(0, 0, c) == 0.0
    assert u_value(9, 2, c) == pytest.approx(0.125 * 3 / 3)


# Root (mc 0.5, visited 3 times) holds rollouts of 3 and 5 words, a fresh child (mc 0.25) one of 2
# words.  With N_total = 3 the child overtakes the root's best entry exactly when
# Q_child + c*sqrt(3) > Q_root + c*sqrt(3)/4: test just above and just below that c_puct.
_Q_ROOT = 0.5 ** 0.5 * 0.9 ** (3 / 2000)
_Q_CHILD = 0.5 ** 0.75 * 0.9 ** (2 / 2000)
_C_CROSS = (_Q_ROOT - _Q_CHILD) / (math.sqrt(3) * (1 - 1 / 4))


@pytest.mark.parametrize("c_puct, first", [(_C_CROSS * 1.01, "child"), (_C_CROSS * 0.99, "root"),
                                           (0.0, "root"), (0.125, "child")])
def test_exploration_term_decides_the_pop_order(c_puct, first):
    config = cfg(c_puct=c_puct)
    tree = _Tree(problem(), config)
    a, b, d = ("a b", "1"), ("a b c d", "1"), ("x", "1")
    right = (("r", GOLD), True)
    _feed_estimate(tree, tree.root, [(a, False), right, (b, False), right])
    child = tree._new_node(("s",), tree.root)
    _feed_estimate(tree, child, [(d, False), (d, False), (d, False), (("t", GOLD), True)])
    assert tree.root.mc_value == 0.5 and child.mc_value == 0.25
    for _ in range(3):
        tree.maintain(tree.root)
    assert tree.n_total == 3 and tree.root.visit_count == 3
    p_root_a = _Q_ROOT + c_puct * math.sqrt(3) / 4
    p_root_b = 0.5 ** 0.5 * 0.9 ** (5 / 2000) + c_puct * math.sqrt(3) / 4
    p_child = _Q_CHILD + c_puct * math.sqrt(3) / 1
    assert p_root_a > p_root_b
    assert (p_child > p_root_a) == (first == "child")
    order = [tree.pop() for _ in range(3)]
    expected = [(child, d), (tree.root, a), (tree.root, b)]
    if first == "root":
        expected = [(tree.root, a), (tree.root, b), (child, d)]
    assert order == expected
    assert tree.pop() is None


def test_equal_priorities_break_ties_by_node_then_rollout():
    tree = _Tree(problem(), cfg())
    z, y = ("zz", "1"), ("yy", "1")
    _feed_estimate(tree, tree.root, [(z, False), (y, False), (("r", GOLD), True)])
    assert [tree.pop()[1] for _ in range(2)] == [y, z]  # same Q: smaller rollout first
    twin1 = tree._new_node(("s",), tree.root)
    twin2 = tree._new_node(("s",), tree.root)
    _feed_estimate(tree, twin2, [(z, False), (("r", GOLD), True)])
    _feed_estimate(tree, twin1, [(z, False), (("r", GOLD), True)])
    assert tree.pop()[0] is twin1  # same priority: the earlier-created node first


# ---------------------------------------------------------------------------------------------
# The release's algorithm, ported directly (recursive walks, every priority recomputed after
# every selection, max over a full scan), as an oracle for the incremental implementation.

STEP_VOCAB = ["good", "fine step here", "bad", "ok then", "bad move now", "carry on", "z"]


def _random_rollout(rng: random.Random, prefix: Sequence[str]) -> list[str]:
    if rng.random() < 0.08:
        return []
    spoiled = any("bad" in s for s in prefix)
    steps = [rng.choice(STEP_VOCAB) for _ in range(rng.randint(0, 5))]
    spoiled = spoiled or any("bad" in s for s in steps)
    right = rng.random() < (0.1 if spoiled else 0.7)
    return steps + [GOLD if right else rng.choice(["13", "7"])]


def random_script(question: str, prefix: tuple[str, ...], i: int) -> list[str]:
    return _random_rollout(random.Random(f"{question}|{'|'.join(prefix)}|{i}"), prefix)


class _OState:
    def __init__(self, steps, parent, order):
        self.steps, self.parent, self.order = tuple(steps), parent, order
        self.mc_value, self.visit_count = None, 0
        self.correct, self.incorrect, self.remaining, self.children = [], [], [], []

    def prefix(self):
        return () if self.parent is None else self.parent.prefix() + self.steps


class Oracle:
    def __init__(self, prob: SearchProblem, script: Script, config: SearchConfig):
        self.p, self.script, self.c = prob, script, config
        self.count = 0
        self.root = self.new(None, ())
        self.rollouts = self.searches = 0

    def new(self, parent, steps):
        s = _OState(steps, parent, self.count)
        self.count += 1
        if parent is not None:
            parent.children.append(s)
        return s

    def walk(self, s):
        yield s
        for c in s.children:
            yield from self.walk(c)

    def mc(self, s):
        k = min(self.c.num_rollouts, self.c.rollout_budget - self.rollouts)
        rollouts = [tuple(self.script(self.p.question, s.prefix(), i)) for i in range(k)]
        self.rollouts += k
        good = 0
        for r in rollouts:
            if r and r[-1] == self.p.answer:
                good += 1
                if r not in s.correct:
                    s.correct.append(r)
                    self.new(s, r).mc_value = 1.0
            elif r not in s.incorrect:
                s.incorrect.append(r)
                s.remaining.append(r)
        s.mc_value = good / k

    def priority(self, s, r):
        n_total = sum(x.visit_count for x in self.walk(self.root))
        q = self.c.alpha ** (1 - s.mc_value) * self.c.beta ** (
            len("\n".join(r).split()) / self.c.length_scale)
        return q + self.c.c_puct * math.sqrt(n_total) / (1 + s.visit_count)

    def binary(self, s, r, left, right):
        if left > right:
            return
        mid = (left + right) // 2
        if left == right == len(r) - 1:
            self.new(s, r[left:mid + 1]).mc_value = 1.0 if r[-1] == self.p.answer else 0.0
            return
        if self.rollouts >= self.c.rollout_budget:
            return
        b = self.new(s, r[left:mid + 1])
        self.mc(b)
        if b.mc_value == 0.0:
            self.binary(s, r, left, mid - 1)
        else:
            self.binary(b, r, mid + 1, right)

    def run(self) -> dict:
        self.mc(self.root)
        while self.searches < self.c.max_search_count and self.rollouts < self.c.rollout_budget:
            entries = [(-self.priority(s, r), s.order, r, s) for s in self.walk(self.root)
                       if s.mc_value > 0 for r in s.remaining]
            if not entries:
                break
            _, _, r, s = min(entries, key=lambda e: e[:3])
            s.remaining.remove(r)
            self.binary(s, r, 0, len(r) - 1)
            s.visit_count += 1
            self.searches += 1
        return self.record()

    def record(self) -> dict:
        def node(s):
            return {"partial_solution": list(s.steps), "mc_value": s.mc_value,
                    "visit_count": s.visit_count,
                    "correct_rollouts": [list(r) for r in s.correct],
                    "incorrect_rollouts": [list(r) for r in s.incorrect],
                    "children": [node(c) for c in s.children]}

        data = node(self.root)
        del data["partial_solution"]
        return {"id": self.p.id, "question": self.p.question, "answer": self.p.answer,
                "image_path": self.p.image_path, **data}


CONFIGS = [
    cfg(num_rollouts=4, max_search_count=25, rollout_budget=200),
    cfg(num_rollouts=6, max_search_count=200, rollout_budget=45, c_puct=0.5),
    cfg(num_rollouts=3, max_search_count=40, rollout_budget=1000, c_puct=2.0, length_scale=5),
    cfg(num_rollouts=5, max_search_count=8, rollout_budget=31, alpha=0.9, beta=0.2),
    cfg(num_rollouts=4, max_search_count=40, rollout_budget=400, c_puct=0.3, length_scale=20),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_the_full_recompute_oracle(config):
    probs = [problem(f"p{i}", question=f"question {i}") for i in range(12)]
    policy, verifier = ScriptedPolicy(random_script), ExactVerifier()
    results = {r.problem_id: r for r in run_search(probs, policy, verifier, config, seed=3)}
    assert len(results) == len(probs)
    for p in probs:
        oracle = Oracle(p, random_script, config)
        assert results[p.id].tree == oracle.run(), p.id
        assert results[p.id].stats["rollouts"] == oracle.rollouts
        assert results[p.id].stats["searches"] == oracle.searches
    assert sum(r.stats["rollouts"] for r in results.values()) == policy.rollouts_asked


# ---------------------------------------------------------------------------------------------
# Stop conditions.


def always_mixed_script(question: str, prefix: tuple[str, ...], i: int) -> list[str]:
    """One right continuation and the rest wrong, from every prefix: mc > 0 everywhere."""
    n = len(prefix)
    if i == 0:
        return [f"s{j}" for j in range(n, 7)] + [GOLD]
    return [f"w{i}-{j}" for j in range(n, 7)] + ["13"]


def test_stop_at_max_search_count():
    result, _, _ = search_one(always_mixed_script, cfg(num_rollouts=4, max_search_count=3))
    assert result.stats["searches"] == 3
    assert result.stats["stop_reason"] == "max_search_count"
    assert sum(r.visit_count for r in flatten_tree(result.tree)) == 3
    root_only, policy, _ = search_one(always_mixed_script, cfg(num_rollouts=4, max_search_count=0))
    assert root_only.stats == {"rollouts": 4, "mc_estimations": 1, "searches": 0,
                               "verifications": 4, "unverifiable": 0, "nodes": 2, "stop_reason": "max_search_count"}
    assert len(policy.calls) == 1


def test_stop_at_rollout_budget_exactly():
    # Root 4, probe steps 0..3: 4, probe steps 4..5: only 2 remain -> 2 sampled, mc = 1/2;
    # the next probe (step 6) cannot be estimated and is not created.
    result, policy, _ = search_one(always_mixed_script,
                                   cfg(num_rollouts=4, rollout_budget=10, max_search_count=50))
    assert result.stats["rollouts"] == 10 == policy.rollouts_asked
    assert result.stats["stop_reason"] == "rollout_budget"
    assert result.stats["searches"] == 1
    assert [r.n for call in policy.calls for r in call] == [4, 4, 2]
    wrong = always_mixed_script("", (), 1)
    short = find_node(result.tree, wrong[:6])
    assert len(short) == 1 and short[0]["mc_value"] == 0.5
    assert find_node(result.tree, wrong[:7]) == []
    # A budget smaller than one estimate: the root alone, with what the budget allows.
    tiny, policy, _ = search_one(always_mixed_script, cfg(num_rollouts=16, rollout_budget=3))
    assert tiny.stats["rollouts"] == 3 and tiny.tree["mc_value"] == pytest.approx(1 / 3)
    assert tiny.stats["stop_reason"] == "rollout_budget"


@pytest.mark.parametrize("config", CONFIGS)
def test_budget_is_never_exceeded(config):
    probs = [problem(f"b{i}", question=f"budget {i}") for i in range(10)]
    for r in run_search(probs, ScriptedPolicy(random_script), ExactVerifier(), config, seed=0):
        assert r.stats["rollouts"] <= config.rollout_budget
        assert r.stats["searches"] <= config.max_search_count


def test_stop_when_pool_is_empty():
    all_right, _, _ = search_one(lambda q, p, i: ["fine", GOLD], cfg(num_rollouts=4))
    assert all_right.tree["mc_value"] == 1.0
    assert all_right.stats["stop_reason"] == "pool_empty" and all_right.stats["searches"] == 0
    # Identical correct rollouts become one child.
    assert [c["partial_solution"] for c in all_right.tree["children"]] == [["fine", GOLD]]
    all_wrong, _, _ = search_one(lambda q, p, i: [f"try {i}", "13"], cfg(num_rollouts=4))
    assert all_wrong.tree["mc_value"] == 0.0 and all_wrong.tree["children"] == []
    assert len(all_wrong.tree["incorrect_rollouts"]) == 4
    assert all_wrong.stats["stop_reason"] == "pool_empty"
    silent, _, verifier = search_one(lambda q, p, i: [], cfg(num_rollouts=4))
    assert silent.tree["mc_value"] == 0.0 and silent.tree["incorrect_rollouts"] == [[]]
    assert verifier.calls == []


# ---------------------------------------------------------------------------------------------
# Many problems at once; determinism.


def test_concurrent_search_equals_one_at_a_time_with_fewer_calls():
    probs = [problem(f"k{i}", question=f"concurrent {i}") for i in range(7)]
    config = cfg(num_rollouts=4, max_search_count=12, rollout_budget=120)
    seq_policy, seq_verifier = ScriptedPolicy(random_script), ExactVerifier()
    seq = list(run_search(probs, seq_policy, seq_verifier,
                          config.model_copy(update={"concurrent_problems": 1}), seed=5))
    assert [r.problem_id for r in seq] == [p.id for p in probs]  # input order when serial
    con_policy, con_verifier = ScriptedPolicy(random_script), ExactVerifier()
    con = list(run_search(iter(probs), con_policy, con_verifier,
                          config.model_copy(update={"concurrent_problems": 4}), seed=5))
    assert sorted(r.problem_id for r in con) == sorted(p.id for p in probs)
    by_id = {r.problem_id: r for r in con}
    for r in seq:
        assert by_id[r.problem_id].tree == r.tree
        assert by_id[r.problem_id].stats == r.stats
    assert len(con_policy.calls) < len(seq_policy.calls)
    assert max(len(c) for c in con_policy.calls) == 4
    assert max(len(c) for c in seq_policy.calls) == 1
    assert sum(len(c) for c in con_policy.calls) / len(con_policy.calls) > 1
    # Answer checks are batched across trees too (one check_many call per round).
    assert len(con_verifier.calls) < len(seq_verifier.calls)
    assert sum(map(len, con_verifier.calls)) == sum(map(len, seq_verifier.calls))
    assert con_policy.rollouts_asked == seq_policy.rollouts_asked


def test_input_is_read_lazily_and_trees_come_out_as_they_finish():
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield problem(f"l{i}", question=f"lazy {i}")

    config = cfg(num_rollouts=4, max_search_count=6, concurrent_problems=2)
    stream = run_search(source(), ScriptedPolicy(random_script), ExactVerifier(), config, seed=0)
    first = next(stream)
    assert isinstance(first, SearchResult)
    assert len(pulled) <= 3  # two in flight, at most one admitted to replace the first
    rest = list(stream)
    assert len(rest) == 4 and len(pulled) == 5


def test_deterministic_under_seed():
    probs = [problem(f"d{i}", question=f"seeded {i}") for i in range(4)]
    config = cfg(num_rollouts=4, max_search_count=10, concurrent_problems=3)

    def trees(seed):
        policy = SeededPolicy(random_script)
        return {r.problem_id: r.tree
                for r in run_search(probs, policy, ExactVerifier(), config, seed)}

    a, b, c = trees(11), trees(11), trees(12)
    assert a == b
    assert a != c
    p1, p2 = ScriptedPolicy(random_script), ScriptedPolicy(random_script)
    list(run_search(probs, p1, ExactVerifier(), config, seed=11))
    list(run_search(probs, p2, ExactVerifier(), config, seed=11))
    seeds = lambda p: sorted((r.question, r.seed) for call in p.calls for r in call)  # noqa: E731
    assert seeds(p1) == seeds(p2) and len({s for _, s in seeds(p1)}) == len(seeds(p1))  # one per request
    assert all(isinstance(s, int) and 0 <= s < 2**31 for _, s in seeds(p1))


# ---------------------------------------------------------------------------------------------
# Failures propagate and never become labels or partial trees.


def test_policy_error_propagates_without_partial_trees():
    probs = [problem(f"e{i}", question=f"err {i}") for i in range(3)]
    policy = ScriptedPolicy(always_mixed_script, fail_on_call=3)
    got = []
    with pytest.raises(PolicyError):
        for r in run_search(probs, policy, ExactVerifier(), cfg(num_rollouts=4), seed=0):
            got.append(r)
    assert got == []
    # Trees finished before the failure were complete; the one in flight is dropped.
    policy = ScriptedPolicy(always_mixed_script, fail_on_call=6)  # e0 takes 4 calls
    config = cfg(num_rollouts=4, max_search_count=1, concurrent_problems=1)
    got = []
    with pytest.raises(PolicyError):
        for r in run_search(probs, policy, ExactVerifier(), config, seed=0):
            got.append(r)
    assert [r.problem_id for r in got] == ["e0"]
    assert got[0].tree == Oracle(probs[0], always_mixed_script, config).run()


def test_verification_error_propagates_and_is_never_a_label():
    probs = [problem(f"v{i}", question=f"verr {i}") for i in range(2)]
    with pytest.raises(VerificationError):
        list(run_search(probs, ScriptedPolicy(always_mixed_script),
                        ExactVerifier(fail_on_call=2), cfg(num_rollouts=4), seed=0))
    with pytest.raises(VerificationError):  # a verdict that is not a bool is not "incorrect"
        list(run_search(probs, ScriptedPolicy(always_mixed_script),
                        ExactVerifier(verdict=0), cfg(num_rollouts=4), seed=0))


class UnreadableVerifier(ExactVerifier):
    """Answers "?" cannot be read (no judge configured): the verdict is None."""

    def check_many(self, pairs):
        self.calls.append(list(pairs))
        return [None if c == "?" else c.strip() == g.strip() for c, g in pairs]


def test_unverifiable_answers_are_left_out_of_mc_values_and_counted():
    def script(question, prefix, i):
        if prefix:
            return RIGHT[len(prefix):]
        return [RIGHT, WRONG, RIGHT[:-1] + ["?"], RIGHT][i % 4]

    results = list(run_search([problem()], ScriptedPolicy(script), UnreadableVerifier(),
                              cfg(num_rollouts=4, max_search_count=0), seed=0))
    tree = results[0].tree
    # 2 right, 1 wrong, 1 unreadable: the estimate is over the 3 verified answers
    assert tree["mc_value"] == pytest.approx(2 / 3)
    assert tree["incorrect_rollouts"] == [WRONG] and tree["correct_rollouts"] == [RIGHT]
    assert results[0].stats["unverifiable"] == 1 and results[0].stats["rollouts"] == 4

    with pytest.raises(VerificationError, match="none of the 4 answers"):
        list(run_search([problem()], ScriptedPolicy(lambda q, p, i: ["c1", "?"]), UnreadableVerifier(),
                        cfg(num_rollouts=4), seed=0))


def test_malformed_policy_output_is_a_policy_error():
    class Short(ScriptedPolicy):
        def generate(self, requests, *, seed=None):
            return [[["x", GOLD]] for _ in requests]  # one rollout where n were asked

    with pytest.raises(PolicyError):
        list(run_search([problem()], Short(random_script), ExactVerifier(),
                        cfg(num_rollouts=4), seed=0))

    class NotText(ScriptedPolicy):
        def generate(self, requests, *, seed=None):
            return [[["x", None]] * r.n for r in requests]

    with pytest.raises(PolicyError):
        list(run_search([problem()], NotText(random_script), ExactVerifier(),
                        cfg(num_rollouts=4), seed=0))


# ---------------------------------------------------------------------------------------------
# With the real verifier.


def test_with_the_real_answer_verifier():
    from mmprm_tasks.settings import VerifyConfig
    from mmprm_tasks.verify import AnswerVerifier

    def script(q, prefix, i):
        return [["halve it", "0.5"], ["so", "$\\frac{1}{2}$"], ["then", "\\boxed{3}"],
                ["hmm", "1/3"]][i]

    prob = problem("real", question="What is one half?", answer="\\frac{1}{2}")
    with AnswerVerifier(VerifyConfig(workers=1)) as verifier:
        results = list(run_search([prob], ScriptedPolicy(script), verifier,
                                  cfg(num_rollouts=4, max_search_count=0), seed=0))
    tree = results[0].tree
    assert tree["mc_value"] == 0.5
    assert tree["correct_rollouts"] == [["halve it", "0.5"], ["so", "$\\frac{1}{2}$"]]
    assert tree["incorrect_rollouts"] == [["then", "\\boxed{3}"], ["hmm", "1/3"]]
