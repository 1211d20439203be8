"""Training text of the toy models: every layout the platform reads or writes, as token ids and
language-model labels (``-100`` where no loss is taken).

Three layouts, all true statements about a problem and its image:

* **tagged** (:func:`tagged_example`) — the policy's layout (SPEC §2): the user turn is the
  rollout prompt, possibly with "Previous Steps", the assistant turn the tagged steps; loss on
  the assistant turn. With ``wrong_step_rate > 0`` the steps contain the world's controlled
  errors (the policy's training data); the foundation sees only right solutions.
* **process** (:func:`process_example`) — a solution laid out as the PRM reads it (SPEC §6):
  ``Question: ...\\nProcess: step<prm>\\n\\nstep<prm>...``; loss on the process. A base model
  that has read math in this layout reads a PRM's input with the arithmetic it knows.
* **judgement** (:func:`judgement_example`) — yes/no questions about the image ("Is the second
  number in the image 5?") and about arithmetic facts ("Is 7 * 8 = 54?"), each answered; loss on
  the answers. This is what an instruction-tuned VLM such as InternVL2.5 (the paper's PRM base)
  brings: it can say whether a number it sees or a sum it reads is right. The questions are
  about facts, never about a solution's steps, so the PRM's read-out at ``<prm>`` still has to be
  learnt from the Monte Carlo labels.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from mmprm_tasks.formats import chat_messages
from mmprm_tasks.rollouts import build_prompt, format_rollout
from mmprm_tasks.toy.model import NUM_IMAGE_TOKENS
from mmprm_tasks.toy.tokenizer import IM_END, IMAGE_TOKEN
from mmprm_tasks.toy.world import (
    _CONFUSABLE,
    ORDINALS,
    Problem,
    _apply,
    _slip,
    arithmetic_facts,
    solve,
)
from mmprm_tasks.traverse import render_process

Example = tuple[list[int], list[int]]  # input ids, labels

JUDGEMENT_INSTRUCTION = "Answer each question with Yes or No."
JUDGEMENTS_PER_EXAMPLE = 8
READING_JUDGEMENTS = 2


def user_message(question: str, prefix_steps: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": build_prompt(question, prefix_steps)}],
    }


def prompt_text(processor: Any, question: str, prefix_steps: Sequence[str] = ()) -> str:
    """The rollout prompt as the policy sees it (chat template + generation prompt)."""
    return processor.apply_chat_template(
        [user_message(question, prefix_steps)], add_generation_prompt=True, tokenize=False
    )


def _expand_image(text: str) -> str:
    # What LlavaProcessor does: one <image> per vision patch.
    return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * NUM_IMAGE_TOKENS)


def _loss_after(tokenizer: Any, context: str, full: str) -> Example:
    """Token ids of ``full`` up to its first ``<|im_end|>`` after ``context``, and labels that
    put the loss on the tokens after ``context`` only."""
    context_ids = tokenizer(_expand_image(context), add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(_expand_image(full), add_special_tokens=False)["input_ids"]
    if full_ids[: len(context_ids)] != context_ids:
        raise RuntimeError("tokenization of the context changes inside the full conversation")
    end = full_ids.index(tokenizer.convert_tokens_to_ids(IM_END), len(context_ids)) + 1
    full_ids = full_ids[:end]  # drop the trailing newline after <|im_end|>
    return full_ids, [-100] * len(context_ids) + full_ids[len(context_ids) :]


def tagged_example(
    processor: Any,
    problem: Problem,
    rng: random.Random,
    *,
    wrong_step_rate: float = 0.0,
    habits: bool = False,
    continuation_rate: float = 0.3,
) -> Example:
    """A rollout in the policy's layout. A share of them are continuations (the prompt carries
    the first ``k`` steps as "Previous Steps"), because the annotator asks the policy to continue
    partial solutions."""
    steps = solve(problem, rng, wrong_step_rate, habits=habits)
    prefix: list[str] = []
    if rng.random() < continuation_rate:
        k = rng.randint(1, len(steps) - 1)  # at least the reading step; the answer stays a target
        prefix, steps = steps[:k], steps[k:]
    prompt = prompt_text(processor, problem.question, prefix)
    full = processor.apply_chat_template(
        [user_message(problem.question, prefix), {"role": "assistant", "content": format_rollout(steps)}],
        add_generation_prompt=False,
        tokenize=False,
    )
    if not full.startswith(prompt):
        raise RuntimeError("chat template: the prompt is not a prefix of the full conversation")
    return _loss_after(processor.tokenizer, prompt, full)


def process_example(processor: Any, problem: Problem, rng: random.Random) -> Example:
    """A right solution laid out as the PRM reads it (``<prm>`` after every step, no labels);
    the loss is on the process."""
    process = render_process([[s] for s in solve(problem, rng)])
    full = processor.apply_chat_template(
        chat_messages(problem.question, process), add_generation_prompt=False, tokenize=False
    )
    head = full[: full.index(process)].rstrip(" ")  # the space belongs to the first word's token
    return _loss_after(processor.tokenizer, head, full)


def reading_question(problem: Problem, rng: random.Random) -> tuple[str, bool]:
    """A yes/no question about one number in ``problem``'s image, true half of the time (a false
    one names a digit easily confused with the right one)."""
    slot = rng.randrange(len(problem.numbers))
    digit = problem.numbers[slot]
    if rng.random() < 0.5:
        digit = rng.choice(_CONFUSABLE[digit])
    return f"Is the {ORDINALS[slot]} number in the image {digit}?", digit == problem.numbers[slot]


def arithmetic_question(facts: Sequence[tuple[int, str, int]], rng: random.Random) -> tuple[str, bool]:
    """A yes/no question about one of ``facts``, stating its right result half of the time and a
    plausible slip otherwise."""
    x, op, y = rng.choice(facts)
    value = _apply(op, x, y)
    stated = value if rng.random() < 0.5 else _slip(op, x, y, value, rng)
    return f"Is {x} {op} {y} = {stated}?", stated == value


def judgement_head(processor: Any) -> str:
    """The user turn that opens a judgement example, up to the first question."""
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": JUDGEMENT_INSTRUCTION}]}],
        add_generation_prompt=True,
        tokenize=False,
    )


def judgement_example(
    processor: Any, problem: Problem, rng: random.Random, fact_pool: Sequence[Problem]
) -> Example:
    """Yes/no questions about ``problem``'s image and about arithmetic facts of the world (from
    this and two other problems of ``fact_pool``), half of them true, each answered."""
    questions = [reading_question(problem, rng) for _ in range(READING_JUDGEMENTS)]
    facts = [f for p in (problem, rng.choice(fact_pool), rng.choice(fact_pool)) for f in arithmetic_facts(p, rng)]
    while len(questions) < JUDGEMENTS_PER_EXAMPLE:
        questions.append(arithmetic_question(facts, rng))
    rng.shuffle(questions)
    tokenizer = processor.tokenizer
    ids = tokenizer(_expand_image(judgement_head(processor)), add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    for j, (question, true) in enumerate(questions):
        asked = tokenizer(("\n" if j else "") + question, add_special_tokens=False)["input_ids"]
        answer = tokenizer(" Yes" if true else " No", add_special_tokens=False)["input_ids"]
        ids += asked + answer
        labels += [-100] * len(asked) + answer
    end = tokenizer.convert_tokens_to_ids(IM_END)
    return ids + [end], labels + [end]
