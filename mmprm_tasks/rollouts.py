"""The policy's text protocol (SPEC §2): the prompt it is given and the tagged steps it answers in.

A rollout is the ordered list of texts inside ``<step>...</step>`` tags followed by the text of
``<answer>...</answer>`` (the last element).  A completion with no tags is an empty rollout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Rollout = list[str]

PROMPT_TEMPLATE = (
    "Your task is to answer the question below. Give complete reasoning steps before you answer, "
    "and when you are ready to answer, use Answer: The final answer is ..\n"
    "Question: {question}"
)

_TAG = re.compile(r"<(step|answer)>(.*?)</\1>", re.DOTALL)
# Special tokens other than the step/answer tags (ChatML markers, <image>, <prm>, eos...).
_SPECIAL = re.compile(r"<\|[^|>]*\|>|<image>|<prm>|</?s>|<pad>|<eos>|<bos>")


def build_prompt(question: str, prefix_steps: Sequence[str] = ()) -> str:
    """The user turn for a rollout from the question alone or from a partial solution."""
    prompt = PROMPT_TEMPLATE.format(question=question)
    if prefix_steps:
        prompt += "\nPrevious Steps:" + "".join(f"<step>{s}</step>" for s in prefix_steps)
    return prompt


def parse_rollout(completion: str) -> Rollout:
    """Texts inside the step and answer tags, in order; the answer (if any) is last.

    Steps after the first answer tag are ignored: the answer ends a solution.
    """
    text = _SPECIAL.sub("", completion)
    steps: Rollout = []
    for kind, body in _TAG.findall(text):
        steps.append(body.strip())
        if kind == "answer":
            break
    return steps


def format_rollout(steps: Sequence[str], *, final_is_answer: bool = True) -> str:
    """The inverse of :func:`parse_rollout` (used to build training targets)."""
    parts = [f"<step>{s}</step>" for s in (steps[:-1] if final_is_answer else steps)]
    if final_is_answer and steps:
        parts.append(f"<answer>{steps[-1]}</answer>")
    return "".join(parts)


def rollout_words(steps: Sequence[str]) -> int:
    """Whitespace-separated words of the steps joined by newlines (the length term of Q)."""
    return len("\n".join(steps).split())
