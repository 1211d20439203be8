"""Best-of-N evaluation (SPEC §7): aggregators, baselines and report on hand-made candidates,
first-error metrics, plot and table; sampling with the real verifier and a real tiny model."""

from __future__ import annotations

import io
import math

import pytest

from mmprm_tasks.evaluate import (
    AGGREGATORS,
    EPSILON,
    add_baseline,
    aggregate,
    best_of_n,
    first_error_metrics,
    mc_first_error,
    pass_at_k,
    plot_report,
    prm_first_error,
    render_first_error_table,
    render_table,
    roc_auc,
    sample_candidates,
    score_candidates,
    stratified_auc,
)

# ------------------------------------------------------------------------------ aggregators


def test_aggregators_hand_values():
    s = [0.9, 0.5, 0.8]
    assert aggregate("min", s) == 0.5
    assert aggregate("last", s) == 0.8
    assert aggregate("product", s) == pytest.approx(0.36)
    assert aggregate("average", s) == pytest.approx(2.2 / 3)
    assert aggregate("sum_logprob", s) == pytest.approx(math.log(0.9) + math.log(0.5) + math.log(0.8))
    assert aggregate("max", s) == 0.9
    assert aggregate("sum_logit", s) == pytest.approx(math.log(36.0))  # log 9 + log 1 + log 4
    assert aggregate("mean_odd", s) == pytest.approx(14.0 / 3)  # (9 + 1 + 4) / 3
    assert set(AGGREGATORS) == {
        "min", "last", "product", "average", "sum_logprob", "max", "sum_logit", "mean_odd"
    }


def test_aggregators_guard_zero_and_one():
    assert aggregate("sum_logprob", [0.0, 1.0]) == pytest.approx(math.log(EPSILON))
    assert aggregate("sum_logit", [1.0]) == pytest.approx(math.log((1 - EPSILON) / EPSILON))
    assert aggregate("sum_logit", [0.0]) == pytest.approx(-math.log((1 - EPSILON) / EPSILON))
    assert math.isfinite(aggregate("mean_odd", [1.0, 1.0]))
    # the guard keeps the order of scores inside (eps, 1 - eps)
    assert aggregate("sum_logit", [0.999]) < aggregate("sum_logit", [0.9999])
    for name in AGGREGATORS:
        assert aggregate(name, []) == -math.inf
    with pytest.raises(KeyError):
        aggregate("median", [0.5])


# -------------------------------------------------------------------------------- best-of-N

# (step_scores, correct, final_answer)
P1 = [
    ([0.9, 0.2], False, "7"),
    ([0.6, 0.7], True, "8"),
    ([0.3], False, "7"),
    ([0.95, 0.9], True, "8"),
]
P2 = [
    ([0.4], True, "5"),
    ([0.8], False, "6"),
    ([0.7, 0.1], False, " 6 "),
    ([], False, None),
]


def _row(report, n):
    return next(r for r in report["rows"] if r["n"] == n)


def test_best_of_n_hand_set():
    report = best_of_n([P1, P2], ns=[1, 2, 4], seed=0)
    assert report["num_problems"] == 2 and report["ns"] == [1, 2, 4]

    r1 = _row(report, 1)
    assert all(v == 0.5 for v in r1["accuracy"].values())
    assert r1["random"] == 0.5 and r1["majority_vote"] == 0.5 and r1["oracle"] == 0.5
    assert r1["pass_at_k"] == {}

    r2 = _row(report, 2)
    # P1: min/last/average/product pick candidate 1 (right), max picks candidate 0 (wrong);
    # P2: every aggregator picks the single-step 0.8 candidate (wrong)
    assert r2["accuracy"]["min"] == 0.5 and r2["accuracy"]["last"] == 0.5
    assert r2["accuracy"]["average"] == 0.5 and r2["accuracy"]["product"] == 0.5
    assert r2["accuracy"]["max"] == 0.0
    assert r2["random"] == 0.5
    assert r2["pass_at_k"] == {"2": 1.0}
    # ties ("7" vs "8", "5" vs "6") go to the earliest answer: P1 wrong, P2 right
    assert r2["majority_vote"] == 0.5
    assert r2["oracle"] == 1.0

    r4 = _row(report, 4)
    assert r4["accuracy"]["min"] == 0.5 and r4["accuracy"]["max"] == 0.5
    assert r4["random"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    # pass@2 of 4: P1 (2 right) 1 - C(2,2)/C(4,2) = 5/6; P2 (1 right) 1 - C(3,2)/C(4,2) = 1/2
    assert r4["pass_at_k"]["2"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert r4["pass_at_k"]["4"] == 1.0
    assert "8" not in r4["pass_at_k"]
    # P1: "7" x2 vs "8" x2 -> "7" (first) wrong; P2: "6" x2 (whitespace normalized) wrong
    assert r4["majority_vote"] == 0.0
    assert report["best"]["n"] == 4


def test_headline_is_the_named_aggregator_not_the_best():
    report = best_of_n([P1, P2], ns=[1, 2], seed=0, headline="max")
    # at N=2 max is the worst aggregator (0.0), and it is still the headline
    assert report["headline"] == {"n": 2, "aggregator": "max", "accuracy": 0.0}
    assert report["best"]["accuracy"] == 0.5 and report["best"]["aggregator"] != "max"
    assert best_of_n([P1, P2], ns=[2])["headline"]["aggregator"] == "min"
    with pytest.raises(KeyError, match="headline"):
        best_of_n([P1], ns=[2], aggregators=["min"], headline="max")


def test_baseline_rows_use_the_headline_aggregator():
    report = best_of_n([P1, P2], ns=[1, 2], seed=0)
    # a scorer that prefers exactly the right candidates: perfect where one exists
    oracle_scores = [[([1.0 if c else 0.0], c, a) for _, c, a in P] for P in (P1, P2)]
    add_baseline(report, "base likelihood", oracle_scores, seed=0)
    # one candidate: every scorer picks it
    assert _row(report, 1)["baselines"]["base likelihood"] == _row(report, 1)["random"]
    assert _row(report, 2)["baselines"]["base likelihood"] == _row(report, 2)["oracle"] == 1.0
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(render_table(report))
    text = console.export_text()
    assert "base likelihood (min)" in text and "PRM min (headline)" in text


def test_roc_auc_hand_values():
    assert roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert roc_auc([0.1], [0.9]) == 0.0
    assert roc_auc([0.5, 0.5], [0.5]) == 0.5  # ties count half
    assert roc_auc([0.9, 0.3], [0.5, 0.1]) == 0.75
    assert roc_auc([], [0.1]) is None


def test_stratified_auc_compares_only_within_groups():
    # a scorer that learnt the group (position) alone: every score of group 1 is above group 0's
    groups = {0: ([0.2, 0.1], [0.2, 0.1]), 1: ([0.9, 0.8], [0.9, 0.8])}
    assert stratified_auc(groups) == 0.5
    pooled_pos = groups[0][0] + groups[1][0]
    pooled_neg = [0.1]  # only group 0 has a negative far below
    assert roc_auc(pooled_pos, pooled_neg) > 0.5
    # pairs are weighted by their count: 1 pair in group a (won), 4 in group b (lost)
    assert stratified_auc({"a": ([1.0], [0.0]), "b": ([0.0, 0.0], [1.0, 1.0])}) == pytest.approx(1 / 5)
    assert stratified_auc({"a": ([1.0], [])}) is None


def test_best_of_n_accepts_dicts_and_answer_key():
    dicts = [[{"step_scores": s, "correct": c, "final_answer": a} for s, c, a in P1]]
    assert best_of_n(dicts, ns=[4])["rows"] == best_of_n([P1], ns=[4])["rows"]
    # with an answer key that merges "7" and "8", the first answer's correctness decides
    report = best_of_n([P1], ns=[4], answer_key=lambda a: "same")
    assert _row(report, 4)["majority_vote"] == 0.0


def test_ties_are_broken_at_random_not_by_position():
    problems = [[([0.5], True, "a"), ([0.5], False, "b")] for _ in range(400)]
    report = best_of_n(problems, ns=[2], seed=7)
    row = _row(report, 2)
    assert all(row["prm_ties"][name] == 400 for name in AGGREGATORS)
    assert all(row["prm_ties_decisive"][name] == 400 for name in AGGREGATORS)
    assert 0.4 < row["accuracy"]["min"] < 0.6  # first-index picking would give 1.0
    assert best_of_n(problems, ns=[2], seed=7)["rows"] == report["rows"]  # seeded


def test_decisive_ties_count_only_ties_between_right_and_wrong():
    both_right = [([0.5], True, "7"), ([0.5], True, "7.0"), ([0.1], False, "8")]
    right_wrong = [([0.5], True, "7"), ([0.5], False, "8")]
    no_tie = [([0.9], False, "8"), ([0.5], True, "7")]
    row = _row(best_of_n([both_right, right_wrong, no_tie], ns=[3], aggregators=["min"], ks=()), 3)
    assert row["prm_ties"] == {"min": 2}
    assert row["prm_ties_decisive"] == {"min": 1}


def test_pass_at_k_formula():
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(2, 1, 16) == 1.0  # k capped at n
    assert pass_at_k(0, 0, 2) == 0.0


def test_problem_without_candidates_counts_as_wrong():
    report = best_of_n([P1, []], ns=[4])
    assert report["num_problems"] == 2
    assert _row(report, 4)["random"] == pytest.approx(0.25)


# ------------------------------------------------------------------------ first-error metrics


def test_first_error_metrics_hand_set():
    predicted = [None, 2, 1, 0, None]
    true = [None, 2, 3, None, 1]
    m = first_error_metrics(predicted, true)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 2)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["with_error"] == 3
    perfect = first_error_metrics([None, 1], [None, 1])
    assert perfect["precision"] == perfect["recall"] == perfect["f1"] == 1.0
    with pytest.raises(ValueError):
        first_error_metrics([None], [])


def test_first_error_predictors():
    assert prm_first_error([0.9, 0.4, 0.2]) == 1
    assert prm_first_error([0.9, 0.5]) is None
    assert prm_first_error([0.9, 0.6], threshold=0.7) == 1
    assert mc_first_error([1.0, 0.5, 0.0, 0.0]) == 2
    assert mc_first_error([1.0, 0.25]) is None


# ------------------------------------------------------------------------------ presentation


def test_plot_is_a_png(tmp_path):
    from PIL import Image

    path = plot_report(best_of_n([P1, P2], ns=[1, 2, 4]), tmp_path / "plots" / "bon.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
        assert image.format == "PNG" and image.size == (750, 500)


def test_render_table():
    from rich.console import Console
    from rich.table import Table

    report = best_of_n([P1, P2], ns=[1, 2, 4])
    table = render_table(report)
    assert isinstance(table, Table)
    assert table.row_count == len(AGGREGATORS) + 1 + 3 + 2 + 4  # + the PRM-weighted vote
    console = Console(record=True, width=160)
    console.print(table)
    text = console.export_text()
    assert "problems tied (min)" in text and "tied right/wrong (min)" in text
    assert "PRM-weighted vote (min)" in text
    assert "PRM min" in text and "N=4" in text and "majority vote" in text and "pass@2" in text
    assert "37.50" in text  # random pick at N=4
    assert "label PRM" not in text  # no label mode in this report
    console = Console(record=True, width=160)
    console.print(render_table({**report, "label_mode": "soft"}))
    assert "soft-label PRM" in console.export_text()


def test_render_first_error_table_has_a_row_per_prm_and_one_for_mc_labels():
    from rich.console import Console

    def metrics(p, r, f, n):
        return {"precision": p, "recall": r, "f1": f, "solutions": n}

    mc = metrics(0.6, 0.55, 0.573, 607)
    reports = {
        "soft": {"first_error": {"prm": metrics(0.137, 0.257, 0.179, 256), "mc_labels": mc}},
        "hard": {"first_error": {"prm": metrics(0.414, 0.779, 0.541, 256), "mc_labels": mc}},
    }
    table = render_first_error_table(reports)
    assert table.row_count == 3
    console = Console(record=True, width=160)
    console.print(table)
    text = console.export_text()
    assert "soft-label PRM" in text and "hard-label PRM" in text and "MC labels" in text
    assert "0.179" in text and "0.541" in text and "0.573" in text and "607" in text


# ------------------------------------------------------------------------ sampling, scoring


class ScriptedPolicy:
    """A deterministic policy backend (the PolicyBackend protocol) answering from a table."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def generate(self, requests, *, seed=None):
        self.calls.append((len(requests), seed))
        return [[list(r) for r in self.table[req.question][: req.n]] for req in requests]

    def close(self):
        pass


def test_sample_candidates_with_real_verifier():
    from mmprm_tasks.settings import VerifyConfig
    from mmprm_tasks.verify import AnswerVerifier

    table = {
        "q1": [["3 + 4 = 7", "7"], [], ["3 + 4 = 8", "8"]],
        "q2": [["\\boxed{10}"], ["2 * 5 = 10", "$10$"], ["11"]],
    }
    problems = [
        {"id": "p1", "question": "q1", "image": b"img1", "answer": "7"},
        {"id": "p2", "question": "q2", "image": b"img2", "correct_answer": "10"},
    ]
    policy = ScriptedPolicy(table)
    verifier = AnswerVerifier(VerifyConfig(workers=1))
    try:
        candidates = sample_candidates(problems, policy, verifier, n=3, seed=5, batch_size=1)
    finally:
        verifier.close()
    assert policy.calls == [(1, 5), (1, 6)]
    assert [[c["correct"] for c in cands] for cands in candidates] == [
        [True, False, False],
        [True, True, False],
    ]
    assert candidates[0][1] == {"steps": [], "final_answer": None, "correct": False}
    assert candidates[1][1]["final_answer"] == "$10$"


def test_a_candidate_that_cannot_be_verified_stops_the_evaluation():
    """Gold "seven", answer "7", no judge: correctness is unknown, so no accuracy is computed."""
    from mmprm_tasks.settings import VerifyConfig
    from mmprm_tasks.verify import AnswerVerifier, VerificationError

    problems = [{"id": "p7", "question": "q", "image": b"img", "answer": "seven"}]
    verifier = AnswerVerifier(VerifyConfig(workers=1))
    try:
        with pytest.raises(VerificationError, match="problem p7: candidate answer '7'.*no judge"):
            sample_candidates(problems, ScriptedPolicy({"q": [["7"]]}), verifier, n=1, seed=0)
    finally:
        verifier.close()


def test_score_and_report_with_a_real_tiny_prm(tmp_path):
    """The real pieces end to end: a transformers policy and a PRMScorer on a random tiny LLaVA."""
    from mmprm_tasks.policy.hf import TransformersPolicy
    from mmprm_tasks.prm import PRMScorer
    from mmprm_tasks.settings import PolicyConfig, SamplingConfig, TOY_POLICY_DIR, VerifyConfig
    from mmprm_tasks.toy.model import build_tiny_vlm
    from mmprm_tasks.toy.tokenizer import build_tokenizer
    from mmprm_tasks.verify import AnswerVerifier

    if (TOY_POLICY_DIR / "config.json").exists():
        model_dir = TOY_POLICY_DIR
    else:
        model_dir = tmp_path / "tiny"
        model, processor = build_tiny_vlm(
            build_tokenizer(), vision_hidden=32, vision_layers=1, text_hidden=64, text_layers=2
        )
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)

    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, format="PNG")
    problems = [{"question": "What is 3 + 4?", "image": buf.getvalue(), "answer": "7"}]
    policy = TransformersPolicy(
        model_dir,
        policy=PolicyConfig(model=str(model_dir), device="cpu"),
        sampling=SamplingConfig(max_new_tokens=24),
    )
    verifier = AnswerVerifier(VerifyConfig(workers=1))
    try:
        candidates = sample_candidates(problems, policy, verifier, n=3, seed=0)
    finally:
        verifier.close()
        policy.close()
    assert len(candidates) == 1 and len(candidates[0]) == 3
    # add one known candidate so the scorer is exercised whatever the random model wrote
    candidates[0].append({"steps": ["3 + 4 = 7", "7"], "final_answer": "7", "correct": True})
    scorer = PRMScorer(model_dir)
    scored = score_candidates(scorer, problems, candidates)
    assert [len(c["step_scores"]) for c in scored[0]] == [len(c["steps"]) for c in candidates[0]]
    assert all(0 < p < 1 for c in scored[0] for p in c["step_scores"])
    report = best_of_n(scored, ns=[1, 4], seed=0)
    assert _row(report, 4)["oracle"] == 1.0


def test_prm_weighted_vote_sums_solution_scores_per_answer():
    # "7" is the majority (3 votes) but wrong; the PRM trusts the two "9"s far more.
    problem = [([0.1, 0.2], False, "7"), ([0.05], False, "7"), ([0.9, 0.95], True, "9"),
               ([0.2], False, "7"), ([0.8, 0.7], True, "9"), ([], False, None)]
    report = best_of_n([problem], ns=[6])
    row = _row(report, 6)
    assert row["majority_vote"] == 0.0 and row["weighted_vote"] == 1.0
    assert report["weighted_vote_aggregator"] == "min"
    # min weights: 7 -> 0.1 + 0.05 + 0.2 = 0.35, 9 -> 0.9 + 0.7 = 1.6; under max, 7 -> 0.45 < 9 -> 1.75
    assert _row(best_of_n([problem], ns=[6], headline="max"), 6)["weighted_vote"] == 1.0
    assert best_of_n([problem], ns=[6], headline="sum_logit")["weighted_vote_aggregator"] == "min"
    # Scores that cannot tell the answers apart reduce it to the majority vote.
    flat = [(tuple(0.5 for _ in s), c, a) for s, c, a in problem]
    assert _row(best_of_n([flat], ns=[6]), 6)["weighted_vote"] == 0.0
