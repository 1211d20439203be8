"""MC labels scored against the generator's ground truth on hand-made trees."""

from mmprm_tasks.evaluate import first_error_metrics
from mmprm_tasks.toy.labels import mc_first_error_pairs, prefix_first_error, tree_paths

GT = ["The numbers are 3, 5 and 7.", "3 + 5 = 8.", "8 - 7 = 1.", "1"]


def node(steps, mc, children=()):
    return {"partial_solution": steps, "mc_value": mc, "visit_count": 0, "correct_rollouts": [],
            "incorrect_rollouts": [], "children": list(children)}


def test_prefix_first_error():
    assert prefix_first_error(GT, GT) is None
    assert prefix_first_error(GT, GT[:2]) is None  # a right partial solution has no error yet
    assert prefix_first_error(GT, [GT[0], "3 + 5 = 9."]) == 1
    assert prefix_first_error(GT, ["The numbers are 3, 6 and 7."]) == 0
    assert prefix_first_error(GT, GT[:3] + ["2"]) == 3
    assert prefix_first_error(GT, GT + ["extra"]) == 4


def test_mc_labels_against_truth():
    tree = {"mc_value": 0.5, "children": [
        node(GT[:2], 0.75, [
            node([GT[2]], 1.0, [node([GT[3]], 1.0)]),   # right all the way
            node(["8 - 7 = 2."], 0.0),                   # MC puts the error at step 2: right
        ]),
        node([GT[0], "3 + 5 = 9."], 0.0),               # error at 1: right
        node([GT[0]], 0.0),                              # MC says error at 0: wrong (false positive)
    ]}
    paths = list(tree_paths(tree))
    assert [p[1] for p in paths] == [None, 2, 1, 0]
    predicted, truth = mc_first_error_pairs(tree, GT)
    assert truth == [None, 2, 1, None]
    metrics = first_error_metrics(predicted, truth)
    assert metrics["precision"] == 2 / 3 and metrics["recall"] == 1.0
