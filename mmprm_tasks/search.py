"""OmegaPRM-style Monte Carlo tree search for step-level labels (SPEC §4).

One tree per problem.  A node holds the steps it adds to its parent's prefix, a Monte Carlo
estimate ``mc_value`` of the chance that continuing from its full prefix ends correct, a visit
count, its distinct correct and incorrect rollouts, and children.  The search:

1. estimates the root from the question alone (``num_rollouts`` samples, each verified against
   the gold answer); every distinct correct rollout becomes a child with ``mc_value = 1.0``;
2. while the stop conditions allow, pops the (state, incorrect rollout) with the highest
   ``Q + U`` from the candidate pool and binary-searches the rollout for its first error,
   creating and estimating one child per probe;
3. after each selection increments the selected state's visit count (maintenance).

Differences from the original release (``data_pipeline/omegaprm.py`` of MM-PRM), all of which
keep its output format and its selection order:

* **Many trees at once, no rounds.**  Each problem's search is a generator that *yields* what
  it needs (an MC estimate of a prefix, or one answer check) and is resumed with the answer.
  The driver (:func:`run_search`) submits each tree's rollout request to the engine the moment
  the tree needs it and resumes the tree when its rollouts are back, so the engine's batches stay
  full (continuous batching; the release searched one problem at a time).  Every request carries
  its own seed (run seed, problem, estimate), so with a policy whose output depends only on the
  request the trees are identical to a one-at-a-time run, whatever the batching (tested).
* **Exact budgets.**  The release checked ``rollout_budget`` only between selections, so a
  binary search could overshoot it.  Here a problem never samples more than ``rollout_budget``
  rollouts (see :meth:`_Tree.estimate`).
* **No whole-tree walks.**  ``N_total`` (the sum of visit counts) equals the number of
  maintenance steps made, so it is a counter; priorities are recomputed lazily (see
  :meth:`_Tree.pop`) in an order identical to the release's full recompute.
* **Failures are errors.**  ``PolicyError`` / ``VerificationError`` propagate out of
  :func:`run_search`; a check that could not be made never becomes an "incorrect" label, and
  a tree that was cut short by an error is never yielded.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from .policy import GenerationRequest, PolicyError
from .rollouts import rollout_words
from .settings import SearchConfig
from .verify import VerificationError

__all__ = [
    "NodeRow",
    "SearchProblem",
    "SearchResult",
    "StopReason",
    "TreeRecordError",
    "flatten_tree",
    "is_rollout_engine",
    "q_value",
    "run_search",
    "u_value",
]

Steps = tuple[str, ...]


class StopReason:
    """Why a tree's search ended (``SearchResult.stats["stop_reason"]``)."""

    MAX_SEARCH_COUNT = "max_search_count"
    ROLLOUT_BUDGET = "rollout_budget"
    POOL_EMPTY = "pool_empty"


@dataclass(frozen=True)
class SearchProblem:
    """One seed problem to search (SPEC §1); ``image`` is what the policy sees."""

    id: str
    question: str
    answer: str
    image: bytes
    image_path: str


@dataclass
class SearchResult:
    """A finished tree.

    ``tree`` is the SPEC §4 record (``json.dumps``-able as is).  ``stats`` has ``rollouts``
    (policy samples spent), ``mc_estimations`` (prefixes estimated, root included),
    ``searches`` (selections made), ``verifications`` (answer checks asked of the verifier),
    ``unverifiable`` (answers the verifier could not judge: left out of every MC value),
    ``nodes`` (nodes in the tree, root included) and ``stop_reason`` (a :class:`StopReason`).
    """

    problem_id: str
    tree: dict[str, Any]
    stats: dict[str, Any]


@dataclass(frozen=True)
class NodeRow:
    """One node of a tree, flattened in pre-order (root = 0)."""

    node_index: int
    parent_index: int | None
    depth: int
    steps: Steps  # the partial_solution added at this node; () for the root
    mc_value: float
    visit_count: int
    num_correct: int  # distinct correct rollouts kept at this node
    num_incorrect: int  # distinct incorrect rollouts kept at this node


class _Policy(Protocol):
    def generate(
        self, requests: Sequence["GenerationRequest"], *, seed: int | None = None
    ) -> list[list[list[str]]]: ...


class _Verifier(Protocol):
    def check_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool | None]: ...


# ---------------------------------------------------------------------------------------------
# Selection score (SPEC §4)


def q_value(mc_value: float, steps: Sequence[str], cfg: SearchConfig) -> float:
    """``alpha ** (1 - mc) * beta ** (words / length_scale)``: favours confidently wrong,
    short rollouts from states that are usually right."""
    return cfg.alpha ** (1.0 - mc_value) * cfg.beta ** (rollout_words(steps) / cfg.length_scale)


def u_value(n_total: int, visit_count: int, cfg: SearchConfig) -> float:
    """``c_puct * sqrt(N_total) / (1 + visit_count)``: exploration bonus of rarely chosen states."""
    return cfg.c_puct * math.sqrt(n_total) / (1 + visit_count)


# ---------------------------------------------------------------------------------------------
# What a search asks the driver for


@dataclass(frozen=True)
class _Estimate:
    """Sample ``n`` continuations of ``prefix``; answered with ``[(rollout, correct), ...]``.
    ``index`` counts the tree's estimates (0 = root): with the problem it seeds the request."""

    prefix: Steps
    n: int
    index: int


@dataclass(frozen=True)
class _Verify:
    """Check one final answer; answered with a bool."""

    candidate: str


_Op = _Estimate | _Verify


# ---------------------------------------------------------------------------------------------
# The tree


@dataclass(eq=False)
class _Node:
    steps: Steps
    parent: "_Node | None"
    order: int  # creation index within the tree (a deterministic tie-break)
    prefix: Steps  # full solution prefix: the parent's prefix + steps (root: ())
    mc_value: float | None = None
    visit_count: int = 0
    correct: list[Steps] = field(default_factory=list)  # distinct, first-seen order
    incorrect: list[Steps] = field(default_factory=list)  # distinct, first-seen order; all kept
    # Candidate pool entries of this node still unselected: (-Q, rollout), sorted ascending,
    # i.e. highest Q first and, among equal Q, the lexicographically smaller rollout first.
    pool: list[tuple[float, Steps]] = field(default_factory=list)
    children: list["_Node"] = field(default_factory=list)


class _Tree:
    """One problem's search state; :meth:`search` is the coroutine the driver steps."""

    def __init__(self, problem: SearchProblem, cfg: SearchConfig) -> None:
        self.problem = problem
        self.cfg = cfg
        self.nodes = 0
        self.root = self._new_node((), None)
        # Nodes with unselected candidates.  A node enters once, when its estimate has mc > 0
        # and at least one incorrect rollout, and leaves when its pool is exhausted.
        self.pool_nodes: list[_Node] = []
        self.n_total = 0  # sum of visit counts over the tree == maintenance steps made
        self.rollouts = 0
        self.mc_estimations = 0
        self.searches = 0
        self.verifications = 0
        self.unverifiable = 0
        self.stop_reason: str | None = None

    def _new_node(self, steps: Steps, parent: _Node | None) -> _Node:
        prefix = parent.prefix + steps if parent is not None else ()
        node = _Node(steps=steps, parent=parent, order=self.nodes, prefix=prefix)
        self.nodes += 1
        if parent is not None:
            parent.children.append(node)
        return node

    # -- the search ----------------------------------------------------------------------------

    def search(self) -> Generator[_Op, Any, None]:
        cfg = self.cfg
        yield from self.estimate(self.root)
        while True:
            # Checked in the release's order, so the reported reason matches it.
            if self.searches >= cfg.max_search_count:
                self.stop_reason = StopReason.MAX_SEARCH_COUNT
                break
            if self.rollouts >= cfg.rollout_budget:
                self.stop_reason = StopReason.ROLLOUT_BUDGET
                break
            selected = self.pop()
            if selected is None:
                self.stop_reason = StopReason.POOL_EMPTY
                break
            state, rollout = selected
            yield from self.binary_search(state, rollout)
            self.maintain(state)
            self.searches += 1

    def estimate(self, node: _Node) -> Generator[_Op, Any, bool]:
        """Monte Carlo estimation of ``node`` from its full prefix; False when no budget is left.

        Normally ``num_rollouts`` samples.  When fewer than that remain of the problem's
        ``rollout_budget``, only the remaining ``k`` are sampled and ``mc_value = correct / k``
        (the same estimator over the samples actually drawn), so the budget is never exceeded.
        A rollout whose answer could not be verified (verdict ``None``) is spent but is neither
        correct nor incorrect: the estimate is over the verified ones, and a node none of whose
        rollouts could be verified is an error, never a label.
        """
        k = min(self.cfg.num_rollouts, self.cfg.rollout_budget - self.rollouts)
        if k <= 0:
            return False
        answered: list[tuple[Steps, bool | None]] = yield _Estimate(node.prefix, k, self.mc_estimations)
        self.rollouts += len(answered)
        self.mc_estimations += 1
        self.verifications += sum(1 for rollout, _ in answered if rollout)
        results = [(rollout, ok) for rollout, ok in answered if ok is not None]
        self.unverifiable += len(answered) - len(results)
        if not results:
            raise VerificationError(
                f"problem {self.problem.id}: none of the {len(answered)} answers sampled from "
                f"prefix {list(node.prefix)!r} could be verified (configure an LLM judge: verify.judge_base_url)"
            )
        n_correct = 0
        seen: set[tuple[Steps, bool]] = set()  # a node is estimated once: its lists start empty
        for rollout, ok in results:
            n_correct += ok
            if (rollout, ok) in seen:
                continue
            seen.add((rollout, ok))
            if ok:
                node.correct.append(rollout)
                child = self._new_node(rollout, node)
                child.mc_value = 1.0
            else:
                node.incorrect.append(rollout)
        # Duplicates count towards the estimate (they are samples) but are kept once.
        node.mc_value = n_correct / len(results)
        if node.mc_value > 0 and node.incorrect:
            node.pool = sorted((-q_value(node.mc_value, r, self.cfg), r) for r in node.incorrect)
            self.pool_nodes.append(node)
        return True

    def binary_search(self, state: _Node, rollout: Steps) -> Generator[_Op, Any, None]:
        """Locate the first error of ``rollout`` (an incorrect continuation of ``state``).

        Probe ``mid = (left + right) // 2``: a child of the current node holding steps
        ``left..mid``.  If its estimate is 0 the error is at or before ``mid``: continue on
        ``left..mid-1`` from the same node (the next probe is another, shorter child of it).
        Otherwise continue on ``mid+1..right`` from the new child.  The final step alone is
        only verified (1.0 / 0.0), costing no rollouts.  An empty rollout has nothing to
        search.  As in the release, probes are never merged with existing children holding the
        same steps: every probe is its own node.
        """
        length = len(rollout)
        left, right = 0, length - 1
        current = state
        while left <= right:
            mid = (left + right) // 2
            if left == right == length - 1:
                self.verifications += 1
                ok: bool | None = yield _Verify(rollout[-1])
                if ok is None:
                    # Unverifiable: no node, so no label; the search goes on elsewhere.
                    self.unverifiable += 1
                    return
                child = self._new_node(rollout[left : mid + 1], current)
                child.mc_value = 1.0 if ok else 0.0
                return
            if self.rollouts >= self.cfg.rollout_budget:
                # SPEC is silent (the release overshoots the budget here).  A probe that cannot
                # be estimated is not created (a node without mc_value would break the
                # record's consumers); the search stops after this selection's maintenance.
                return
            child = self._new_node(rollout[left : mid + 1], current)
            yield from self.estimate(child)
            if child.mc_value == 0.0:
                right = mid - 1
            else:
                current = child
                left = mid + 1

    def pop(self) -> tuple[_Node, Steps] | None:
        """Take the pool entry with the highest ``Q + U`` (None when the pool is empty).

        Equivalent to the release's max heap after a full recompute of every priority:
        ``Q`` of an entry never changes once its node is estimated, and ``U`` is shared by all
        entries of a node and changes only through ``N_total`` and the node's visit count.  So
        each node keeps its entries sorted by ``Q`` (exhausted entries simply leave it) and the
        pop scans the nodes that still have entries, computing each priority afresh as
        ``Q + U`` exactly as a full recompute would.  Ties (equal floating-point priority) go
        to the earlier-created node, then to the lexicographically smaller rollout (the
        release's heap compares rollout tuples for entries of one node; across nodes its
        order is arbitrary).  The popped rollout leaves the pool; it stays in the node's
        ``incorrect_rollouts`` of the record, as the release's serialised list does.
        """
        sqrt_n = math.sqrt(self.n_total)
        best: tuple[float, _Node, int] | None = None
        for node in self.pool_nodes:
            u = self.cfg.c_puct * sqrt_n / (1 + node.visit_count)
            pool = node.pool
            # Entries are in decreasing Q, and fl(q + u) is monotone in q, so the entries
            # reaching this node's best priority form a prefix; take the smallest rollout of it.
            top = -pool[0][0] + u
            pick = 0
            i = 1
            while i < len(pool) and -pool[i][0] + u == top:
                if pool[i][1] < pool[pick][1]:
                    pick = i
                i += 1
            if best is None or top > best[0] or (top == best[0] and node.order < best[1].order):
                best = (top, node, pick)
        if best is None:
            return None
        _, node, pick = best
        _, rollout = node.pool.pop(pick)
        if not node.pool:
            self.pool_nodes.remove(node)
        return node, rollout

    def maintain(self, state: _Node) -> None:
        """Visit the selected state.  Every priority depends on ``N_total`` and visit counts
        only through ``U``, which :meth:`pop` recomputes, so nothing else is stored."""
        state.visit_count += 1
        self.n_total += 1

    # -- output --------------------------------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """The SPEC §4 tree record (the release's format: its root has no partial_solution)."""
        p = self.problem
        root = self.root
        record: dict[str, Any] = {
            "id": p.id,
            "question": p.question,
            "answer": p.answer,
            "image_path": p.image_path,
            "mc_value": root.mc_value,
            "visit_count": root.visit_count,
            "correct_rollouts": [list(r) for r in root.correct],
            "incorrect_rollouts": [list(r) for r in root.incorrect],
            "children": [],
        }
        # Iterative, so deep trees cannot hit the recursion limit.
        stack: list[tuple[_Node, list[dict[str, Any]]]] = [
            (c, record["children"]) for c in reversed(root.children)
        ]
        while stack:
            node, siblings = stack.pop()
            out: dict[str, Any] = {
                "partial_solution": list(node.steps),
                "mc_value": node.mc_value,
                "visit_count": node.visit_count,
                "correct_rollouts": [list(r) for r in node.correct],
                "incorrect_rollouts": [list(r) for r in node.incorrect],
                "children": [],
            }
            siblings.append(out)
            stack.extend((c, out["children"]) for c in reversed(node.children))
        return record

    def stats(self) -> dict[str, Any]:
        return {
            "rollouts": self.rollouts,
            "mc_estimations": self.mc_estimations,
            "searches": self.searches,
            "verifications": self.verifications,
            "unverifiable": self.unverifiable,
            "nodes": self.nodes,
            "stop_reason": self.stop_reason,
        }


# ---------------------------------------------------------------------------------------------
# The driver


def request_seed(seed: int, problem_id: str, estimate_index: int) -> int:
    """The seed of a tree's ``estimate_index``-th rollout request: a stable hash of the run's seed,
    the problem and the estimate (below 2**31 so every backend's RNG accepts it).  It does not
    depend on batching, chunking or work stealing, so neither do the trees."""
    digest = hashlib.blake2b(f"mmprm-search:{seed}:{problem_id}:{estimate_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


class RolloutEngine(Protocol):
    """Where rollout requests go: ``submit`` returns at once with a future of the request's
    ``n`` rollouts; the engine batches what is in flight (vLLM and SGLang servers do it
    themselves; :class:`~mmprm_tasks.policy.batching.BatchingEngine` does it for batch backends).
    ``capacity``: sequences it runs at once.  Optional: ``burst()`` (a lock the driver holds while
    it reacts) and ``wait(futures)`` (block until one is done; a simulated engine advances its
    clock there)."""

    capacity: int

    def submit(self, request: GenerationRequest) -> Future: ...


def is_rollout_engine(policy: Any) -> bool:
    """Whether ``policy`` takes requests one at a time (:class:`RolloutEngine`) rather than in
    batches (``generate``)."""
    return hasattr(policy, "submit")


@dataclass(eq=False)
class _Active:
    tree: _Tree
    coroutine: Generator[_Op, Any, None]
    pending: _Op | None
    submitted: bool = False  # its pending estimate is with the engine


def _checked_rollouts(rollouts: Any, n: int) -> list[Steps]:
    if not isinstance(rollouts, list) or len(rollouts) != n:
        got = len(rollouts) if isinstance(rollouts, list) else type(rollouts).__name__
        raise PolicyError(f"policy returned {got} rollouts where {n} were asked")
    steps = [tuple(r) for r in rollouts]
    if not all(isinstance(s, str) for r in steps for s in r):
        raise PolicyError("policy returned a rollout step that is not a string")
    return steps


def run_search(
    problems: Iterable[SearchProblem],
    policy: _Policy | RolloutEngine,
    verifier: _Verifier,
    cfg: SearchConfig,
    seed: int,
) -> Iterator[SearchResult]:
    """Search every problem; yield each tree as soon as it is finished.

    Trees advance independently: a tree's rollout request is submitted the moment the tree
    needs it, and the tree resumes when that request's rollouts (and their answer checks) are
    back; there are no rounds.  ``policy`` is a :class:`RolloutEngine`, or a batch backend
    (``generate(requests)``), which is put behind a
    :class:`~mmprm_tasks.policy.batching.BatchingEngine` of ``cfg.max_sequences_in_flight``
    sequences.  Problems are read lazily and admitted while fewer than two engine batches of
    sequences are in flight, up to ``cfg.concurrent_problems`` trees.  Every request carries
    :func:`request_seed` (run seed, problem, estimate), so with a policy whose output depends
    only on the request the trees are identical to a one-at-a-time run (tested).  Answer checks
    of everything that came back together go to the verifier in one ``check_many`` call.

    An empty rollout (the policy emitted no tags) is a real, incorrect output: it is counted
    as incorrect without asking the verifier.  ``PolicyError`` and ``VerificationError`` (also
    raised for a malformed answer from either) propagate; searches then in flight are dropped.
    """
    from mmprm_tasks.policy.batching import BatchingEngine

    own_engine = not is_rollout_engine(policy)
    engine: RolloutEngine = BatchingEngine(policy, cfg.max_sequences_in_flight) if own_engine else policy  # type: ignore[arg-type,assignment]
    admit_below = 2 * engine.capacity
    source = iter(problems)
    exhausted = False
    active: list[_Active] = []
    waiting: dict[Future, _Active] = {}
    sequences_in_flight = 0
    finished: list[_Active] = []

    def resume(pairs_for: list[tuple[_Active, Any]]) -> None:
        """Send each search its answer; collect the finished ones."""
        for a, answer in pairs_for:
            try:
                a.pending = a.coroutine.send(answer)
            except StopIteration:
                a.pending = None
                active.remove(a)
                finished.append(a)

    def settle_checks() -> None:
        """Answer every pending final-step check (they need no engine), until none is left."""
        while True:
            checks = [a for a in active if isinstance(a.pending, _Verify)]
            if not checks:
                return
            verdicts = _check(verifier, [(a.pending.candidate, a.tree.problem.answer) for a in checks])
            resume(list(zip(checks, verdicts)))

    def submit_estimates() -> None:
        nonlocal sequences_in_flight
        for a in active:
            op = a.pending
            if isinstance(op, _Estimate) and not a.submitted:
                request = GenerationRequest(question=a.tree.problem.question, image=a.tree.problem.image,
                                            prefix_steps=op.prefix, n=op.n,
                                            seed=request_seed(seed, a.tree.problem.id, op.index))
                waiting[engine.submit(request)] = a
                a.submitted = True
                sequences_in_flight += op.n

    def admit() -> None:
        nonlocal exhausted
        while not exhausted and len(active) < cfg.concurrent_problems and sequences_in_flight < admit_below:
            problem = next(source, None)
            if problem is None:
                exhausted = True
                return
            tree = _Tree(problem, cfg)
            a = _Active(tree, tree.search(), None)
            active.append(a)
            resume([(a, None)])  # runs the search to its first request
            settle_checks()
            submit_estimates()

    def react() -> None:
        """Everything that came back: one check_many for all its answers, resume, refill."""
        nonlocal sequences_in_flight
        arrived: list[tuple[_Active, list[Steps]]] = []
        for future in [f for f in waiting if f.done()]:
            a = waiting.pop(future)
            a.submitted = False
            sequences_in_flight -= a.pending.n
            error = future.exception()
            if error is not None:
                raise error if isinstance(error, PolicyError) else PolicyError(f"policy engine failed: {error}")
            arrived.append((a, _checked_rollouts(future.result(), a.pending.n)))
        pairs = [(r[-1], a.tree.problem.answer) for a, rollouts in arrived for r in rollouts if r]
        verdicts = iter(_check(verifier, pairs))
        resume([(a, [(r, next(verdicts) if r else False) for r in rollouts]) for a, rollouts in arrived])
        settle_checks()
        submit_estimates()
        admit()

    # While the driver reacts, a burst-aware engine holds its results and its next batch, so the
    # submissions of one reaction ride together.
    burst = getattr(engine, "burst", nullcontext)
    wait_any = getattr(engine, "wait", lambda futures: wait(futures, return_when=FIRST_COMPLETED))
    try:
        with burst():
            admit()
        yield from _drain(finished)
        while waiting:
            wait_any(list(waiting))
            with burst():
                react()
            yield from _drain(finished)
    finally:
        for future in waiting:
            future.cancel()
        if own_engine:
            engine.close()


def _drain(finished: list[_Active]) -> Iterator[SearchResult]:
    while finished:
        a = finished.pop(0)
        yield SearchResult(a.tree.problem.id, a.tree.to_record(), a.tree.stats())


def _check(verifier: _Verifier, pairs: list[tuple[str, str]]) -> list[bool | None]:
    if not pairs:
        return []
    verdicts = list(verifier.check_many(pairs))
    if len(verdicts) != len(pairs):
        raise VerificationError(f"verifier returned {len(verdicts)} verdicts for {len(pairs)} checks")
    if any(v is not None and type(v) is not bool for v in verdicts):
        raise VerificationError("verifier returned a verdict that is neither a bool nor None")
    return verdicts


# ---------------------------------------------------------------------------------------------
# Flattening a record


class TreeRecordError(ValueError):
    """A tree record that is not SPEC §4; the message names the field (``children[2].mc_value``)."""


def _where(path: tuple[int, ...]) -> str:
    return ".".join(f"children[{i}]" for i in path)


def _bad(path: tuple[int, ...], name: str, problem: str) -> TreeRecordError:
    where = _where(path)
    return TreeRecordError(f"{where}{'.' if where else ''}{name}: {problem}")


_NODE_FIELDS = (("mc_value", (int, float)), ("visit_count", int), ("correct_rollouts", list),
                ("incorrect_rollouts", list), ("children", list))


def _node_error(node: Any, path: tuple[int, ...], is_root: bool) -> TreeRecordError:
    """What is wrong with a node that failed the fast check (built only on error)."""
    if not isinstance(node, dict):
        return TreeRecordError(f"{_where(path) or 'record'}: expected an object, got {type(node).__name__}")
    for name, kind in _NODE_FIELDS + (() if is_root else (("partial_solution", list),)):
        value = node.get(name)
        if value is None:
            return _bad(path, name, "missing")
        if not isinstance(value, kind) or isinstance(value, bool):
            return _bad(path, name, f"expected {getattr(kind, '__name__', 'a number')}, got {type(value).__name__}")
    mc_value = node["mc_value"]
    if not 0.0 <= mc_value <= 1.0:
        return _bad(path, "mc_value", f"{mc_value} is outside [0, 1]")
    return _bad(path, "partial_solution", "expected a list of strings")


def flatten_tree(tree: dict[str, Any]) -> list[NodeRow]:
    """The nodes of a SPEC §4 record in pre-order (root = 0, children in record order).

    Raises :class:`TreeRecordError` naming the first field that is missing or of the wrong type
    (records come from our search, or from files of the original release's pipeline).
    """
    rows: list[NodeRow] = []
    stack: list[tuple[Any, int | None, int, tuple[int, ...]]] = [(tree, None, 0, ())]
    while stack:
        node, parent, depth, path = stack.pop()
        # The fast path checks types without building messages; _node_error says what failed.
        try:
            mc_value = node["mc_value"]
            visit_count = node["visit_count"]
            correct, incorrect, children = node["correct_rollouts"], node["incorrect_rollouts"], node["children"]
            steps: Steps = () if parent is None else tuple(node["partial_solution"])
            ok = (type(mc_value) in (float, int) and 0.0 <= mc_value <= 1.0 and type(visit_count) is int
                  and type(correct) is list and type(incorrect) is list and type(children) is list
                  and (parent is None or type(node["partial_solution"]) is list)
                  and all(type(step) is str for step in steps))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise _node_error(node, path, parent is None)
        index = len(rows)
        rows.append(NodeRow(index, parent, depth, steps, float(mc_value), visit_count, len(correct), len(incorrect)))
        for i in range(len(children) - 1, -1, -1):
            stack.append((children[i], index, depth + 1, path + (i,)))
    return rows
