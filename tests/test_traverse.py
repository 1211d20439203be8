"""Trees to training paths (SPEC §5) on hand-built trees."""

from __future__ import annotations

import copy

from mmprm_tasks.settings import TraverseConfig
from mmprm_tasks.traverse import build_paths, process_words, render_process

S1 = "Step one reads the numbers 3 and 4 from the image."
S2_ADD = "Step two adds them: 3 + 4 = 7."
ANS7 = "The answer is 7."
S2_MUL = "Step two multiplies them: 3 * 4 = 12."
S_DIRECT = "Step one reads 3 and 4, then adds them to get 7 directly."


def node(steps, mc, children=()):
    return {
        "partial_solution": list(steps),
        "mc_value": mc,
        "visit_count": 0,
        "correct_rollouts": [],
        "incorrect_rollouts": [],
        "children": list(children),
    }


def tree(tree_id, root_mc, children):
    return {
        "id": tree_id,
        "question": f"What is 3 + 4? ({tree_id})",
        "answer": "7",
        "image_path": f"images/{tree_id}.png",
        "mc_value": root_mc,
        "visit_count": 1,
        "correct_rollouts": [],
        "incorrect_rollouts": [],
        "children": list(children),
    }


def tree_a():
    """2 distinct positives (+1 duplicate), 1 negative, 1 too-short negative."""
    return tree(
        "a",
        0.5,
        [
            node(
                [f"  {S1}  "],
                0.5,
                [
                    node([S2_ADD, ANS7], 1.0),
                    # a negative ends the path: its subtree is never walked
                    node([S2_MUL], 0.0, [node(["Never walked because the parent is wrong."], 1.0)]),
                    node([S2_ADD, ANS7], 1.0),  # duplicate of the first positive
                ],
            ),
            node(["Short."], 0.0),
            node([S_DIRECT, ANS7], 1.0),
        ],
    )


def tree_d():
    """Fewer positives than negatives: every path is kept."""
    return tree(
        "d",
        0.25,
        [
            node([S1], 0.25, [node([S2_MUL, "The answer is 12."], 0.0), node([S2_ADD, ANS7], 1.0)]),
            node(["Step one misreads the numbers as 5 and 4 from the image."], 0.0),
        ],
    )


def test_separators_and_labels_exact():
    result = build_paths([tree_a()], TraverseConfig(), seed=0)
    negatives = [p for p in result.paths if p["polarity"] == "negative"]
    assert len(negatives) == 1
    neg = negatives[0]
    assert neg["process"] == f"{S1}<prm>\n\n{S2_MUL}<prm>"
    assert neg["labels"] == [0.5, 0.0]
    assert neg["mc_values"] == [0.5, 0.0]
    assert neg["question"] == "What is 3 + 4? (a)"
    assert neg["answer"] == "7"
    assert neg["image_path"] == "images/a.png"
    positives = [p for p in result.paths if p["polarity"] == "positive"]
    assert len(positives) == 1  # balanced down to the one negative
    assert positives[0]["process"] in {
        f"{S1}<prm>\n\n{S2_ADD}\n\n{ANS7}<prm>",
        f"{S_DIRECT}\n\n{ANS7}<prm>",
    }
    for p in result.paths:
        assert p["process"].count("<prm>") == len(p["labels"])
        assert "Never walked" not in p["process"]
        assert not p["process"].endswith("\n")


def test_counts():
    result = build_paths([tree_a(), tree_d()], TraverseConfig(), seed=0)
    c = result.counts
    assert c["trees_seen"] == 2 and c["trees_used"] == 2
    assert c["dropped_short"] == 1
    assert c["duplicates"] == 1
    assert c["positives_found"] == 3 + 1
    assert c["negatives_found"] == 1 + 2
    # tree a: 2 distinct positives -> 1 (one negative); tree d: 1 positive, 2 negatives, all kept
    assert c["positives_dropped_by_balance"] == 1
    assert c["negatives"] == 3 and c["positives"] == 2
    assert c["paths"] == len(result.paths) == 5
    assert c["labels"] == sum(len(p["labels"]) for p in result.paths)


def test_root_mc_filter():
    trees = [tree("one", 1.0, tree_a()["children"]), tree("zero", 0.0, tree_a()["children"]), tree_d()]
    result = build_paths(trees, TraverseConfig(), seed=0)
    assert result.counts["trees_seen"] == 3
    assert result.counts["trees_used"] == 1
    assert result.counts["trees_skipped_root_mc"] == 2
    assert {p["tree_id"] for p in result.paths} == {"d"}


def test_min_words_boundary():
    ten = "one two three four five six seven eight nine ten"
    eleven = ten + " eleven"
    t = tree("w", 0.5, [node([ten], 0.0), node([eleven], 0.0)])
    result = build_paths([t], TraverseConfig(min_words=10), seed=0)
    assert [p["process"] for p in result.paths] == [f"{eleven}<prm>"]
    assert result.counts["dropped_short"] == 1
    # separators do not count as words; blank lines separate words
    assert process_words("a<prm>\n\nb c<prm>") == 3
    assert len(build_paths([t], TraverseConfig(min_words=0), seed=0).paths) == 2


def test_balance_off_keeps_all_positives():
    result = build_paths([tree_a()], TraverseConfig(balance=False), seed=0)
    assert result.counts["positives"] == 2
    assert result.counts["positives_dropped_by_balance"] == 0


def test_hard_labels_keep_soft_values():
    result = build_paths([tree_d()], TraverseConfig(label_mode="hard"), seed=0)
    assert result.label_mode == "hard"
    by_process = {p["process"]: p for p in result.paths}
    neg = by_process[f"{S1}<prm>\n\n{S2_MUL}\n\nThe answer is 12.<prm>"]
    assert neg["labels"] == [1.0, 0.0]
    assert neg["mc_values"] == [0.25, 0.0]


def test_threshold_setting():
    result = build_paths([tree_a()], TraverseConfig(mc_threshold=0.5, balance=False), seed=0)
    processes = {p["process"]: p for p in result.paths}
    # the 0.5 node now ends a negative path after one step
    assert processes[f"{S1}<prm>"]["polarity"] == "negative"
    assert processes[f"{S_DIRECT}\n\n{ANS7}<prm>"]["polarity"] == "positive"


def test_sampling_is_seeded_and_order_independent():
    picks = set()
    for seed in range(30):
        first = build_paths([tree_a(), tree_d()], TraverseConfig(), seed=seed)
        again = build_paths([tree_d(), copy.deepcopy(tree_a())], TraverseConfig(), seed=seed)
        key = lambda r: sorted(p["process"] for p in r.paths)  # noqa: E731
        assert key(first) == key(again)
        picks.add(next(p["process"] for p in first.paths if p["tree_id"] == "a" and p["polarity"] == "positive"))
    assert len(picks) == 2  # both positives of tree a get picked under some seed


def test_render_process_layout():
    assert render_process([[" a ", "b"], ["c"]]) == "a\n\nb<prm>\n\nc<prm>"
    assert render_process([]) == ""


def test_step_granularity_labels_each_step_of_a_node_above_the_threshold():
    cfg = TraverseConfig(label_granularity="step", balance=False)
    paths = {p["process"]: p for p in build_paths([tree_d()], cfg, seed=0).paths}
    # A correct rollout's two steps each get a <prm> with the node's value, as the PRM is scored.
    positive = paths[f"{S1}<prm>\n\n{S2_ADD}<prm>\n\n{ANS7}<prm>"]
    assert positive["labels"] == [0.25, 1.0, 1.0] and positive["polarity"] == "positive"
    # A wrong node keeps its steps under one <prm>: the error may be any of them.
    negative = paths[f"{S1}<prm>\n\n{S2_MUL}\n\nThe answer is 12.<prm>"]
    assert negative["labels"] == [0.25, 0.0]
    hard = build_paths([tree_d()], cfg.model_copy(update={"label_mode": "hard"}), seed=0).paths
    assert all(p["process"].count("<prm>") == len(p["labels"]) == len(p["mc_values"]) for p in hard)
    # The default is the release's: one <prm> per node.
    default = {p["process"] for p in build_paths([tree_d()], TraverseConfig(balance=False), seed=0).paths}
    assert f"{S1}<prm>\n\n{S2_ADD}\n\n{ANS7}<prm>" in default


def test_relative_labels_divide_by_the_parents_mc():
    """label_values="relative": a step's label is MC(node) / MC(parent) (the root's before the
    first), capped at 1; mc_values keep the nodes' own values."""
    deep = tree("r", 0.5, [node([S1], 0.25, [node([S2_ADD], 0.2, [node([ANS7], 0.4), node(["Wrong answer 9."], 0.0)])]),
                           node(["Step one misreads the numbers as 5 and 4."], 0.0)])
    paths = {p["process"]: p for p in build_paths([deep], TraverseConfig(label_values="relative", min_words=0),
                                                  seed=0).paths}
    positive = paths[f"{S1}<prm>\n\n{S2_ADD}<prm>\n\n{ANS7}<prm>"]
    assert positive["mc_values"] == [0.25, 0.2, 0.4]
    assert positive["labels"] == [0.5, 0.8, 1.0]  # 0.25/0.5, 0.2/0.25, min(1, 0.4/0.2)
    negative = paths[f"{S1}<prm>\n\n{S2_ADD}<prm>\n\nWrong answer 9.<prm>"]
    assert negative["labels"] == [0.5, 0.8, 0.0]
    assert paths["Step one misreads the numbers as 5 and 4.<prm>"]["labels"] == [0.0]
    hard = build_paths([deep], TraverseConfig(label_values="relative", label_mode="hard", min_words=0), seed=0)
    assert {tuple(p["labels"]) for p in hard.paths} <= {(1.0, 1.0, 1.0), (1.0, 1.0, 0.0), (0.0,)}
    assert build_paths([deep], TraverseConfig(min_words=0), seed=0).paths[0]["labels"] != positive["labels"]
