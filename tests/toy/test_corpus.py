"""Training text of the toy models: what each layout puts the loss on."""

from __future__ import annotations

import random
import re

import pytest

from mmprm_tasks.toy.corpus import judgement_example, process_example, tagged_example
from mmprm_tasks.toy.model import build_tiny_vlm
from mmprm_tasks.toy.tokenizer import build_tokenizer
from mmprm_tasks.toy.world import Problem, problems_for_split


@pytest.fixture(scope="module")
def processor():
    return build_tiny_vlm(build_tokenizer())[1]


def _target(processor, ids, labels):
    assert len(ids) == len(labels)
    # targets are the inputs themselves (next-token labels are shifted inside the model)
    assert all(lab == i for i, lab in zip(ids, labels) if lab != -100)
    return processor.tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100])


def test_process_layout_puts_the_loss_on_the_process_only(processor):
    problem = Problem("prod2", (2, 5))
    ids, labels = process_example(processor, problem, random.Random(0))
    assert _target(processor, ids, labels) == " The numbers are 2 and 5.<prm>\n\n2 * 5 = 10.<prm>\n\n10<prm><|im_end|>"
    context = processor.tokenizer.decode([i for i, lab in zip(ids, labels) if lab == -100])
    assert context.endswith("Question: What is the product of the two numbers in the image?\nProcess:")


def test_tagged_layout_targets_the_assistant_turn(processor):
    rng = random.Random(1)
    problem = Problem("sum3", (3, 5, 7))
    seen_prefix = seen_whole = False
    for _ in range(30):
        ids, labels = tagged_example(processor, problem, rng, continuation_rate=0.5)
        target = _target(processor, ids, labels)
        assert target.endswith("<answer>15</answer><|im_end|>")
        context = processor.tokenizer.decode([i for i, lab in zip(ids, labels) if lab == -100])
        assert context.rstrip().endswith("assistant")
        if "Previous Steps:" in context:
            seen_prefix = True
            assert "The numbers are" not in target
        else:
            seen_whole = True
            assert target.startswith("<step>The numbers are 3, 5 and 7.</step>")
    assert seen_prefix and seen_whole


def test_judgements_are_true_statements_about_the_image_and_arithmetic(processor):
    rng = random.Random(2)
    pool = problems_for_split("train")
    answers = {"Yes": 0, "No": 0}
    for problem in pool[:20]:
        ids, labels = judgement_example(processor, problem, rng, pool)
        text = processor.tokenizer.decode(ids)
        # the loss is on the answers alone
        expected = "".join(f" {a}" for a in re.findall(r"\? (Yes|No)", text)) + "<|im_end|>"
        assert _target(processor, ids, labels) == expected
        for question, answer in re.findall(r"(Is [^?]*\?) (Yes|No)", text):
            answers[answer] += 1
            reading = re.fullmatch(r"Is the (first|second|third) number in the image (\d)\?", question)
            if reading:
                slot = ("first", "second", "third").index(reading.group(1))
                assert (int(reading.group(2)) == problem.numbers[slot]) == (answer == "Yes")
                continue
            x, op, y, z = re.fullmatch(r"Is (-?\d+) ([-+*]) (-?\d+) = (-?\d+)\?", question).groups()
            value = eval(f"{x} {op} {y}")  # noqa: S307 - digits and one operator, from the regex
            assert (value == int(z)) == (answer == "Yes")
    assert min(answers.values()) > 0.3 * sum(answers.values())
