"""The policy's text protocol (SPEC §2): the prompt it is given and the tagged steps it answers in.

A rollout is the ordered list of texts inside ``<step>...</step>`` tags followed by the text of
``<answer>...</answer>`` (the last element).  A completion with no tags is an empty rollout.

Prompt presets (setting ``policy.prompt_preset``, env ``MMPRM_POLICY__PROMPT_PRESET``):

* ``platform`` (default; the shipped toy policy is trained on it): SPEC §2's text as one user
  turn, the image sent as a separate image part before it, no system message.
* ``release``: the original release's exact rollout prompt (``data_pipeline/omegaprm.py`` and
  ``llm_utils.py`` of ModalMinds/MM-PRM): InternVL's system message (:data:`INTERNVL_SYSTEM_PROMPT`),
  the user text starting with the image placeholder ``<image>\n`` followed by a space, and a
  blank line before ``Question:``.  For a policy fine-tuned on the release's prompt.

Both continue from a prefix with ``\nPrevious Steps:<step>s1</step>...``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

Rollout = list[str]

PROMPT_TEMPLATE = (
    "Your task is to answer the question below. Give complete reasoning steps before you answer, "
    "and when you are ready to answer, use Answer: The final answer is ..\n"
    "Question: {question}"
)
IMAGE_PLACEHOLDER = "<image>\n"
RELEASE_PROMPT_TEMPLATE = (
    IMAGE_PLACEHOLDER
    + " Your task is to answer the question below. Give complete reasoning steps before you answer, "
    "and when you are ready to answer, use Answer: The final answer is ..\n\n"
    "Question: {question}"
)
# InternVL2.5's own system message, which the release's rollout engine sends with every prompt.
INTERNVL_SYSTEM_PROMPT = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


@dataclass(frozen=True)
class PromptPreset:
    """How a rollout prompt is laid out: the user text (``template`` with ``{question}``), an
    optional system message, and whether the image placeholder is part of the user text
    (``image_in_text``: the text starts with :data:`IMAGE_PLACEHOLDER`, as the release writes it)
    or the image travels as a separate image part before the text."""

    template: str
    system: str | None = None
    image_in_text: bool = False


PROMPT_PRESETS: dict[str, PromptPreset] = {
    "platform": PromptPreset(PROMPT_TEMPLATE),
    "release": PromptPreset(RELEASE_PROMPT_TEMPLATE, INTERNVL_SYSTEM_PROMPT, image_in_text=True),
}


def prompt_preset(name: str) -> PromptPreset:
    if name not in PROMPT_PRESETS:
        raise ValueError(f"unknown prompt preset {name!r}; known: {', '.join(PROMPT_PRESETS)}")
    return PROMPT_PRESETS[name]

_TAG = re.compile(r"<(step|answer)>(.*?)</\1>", re.DOTALL)
# Special tokens other than the step/answer tags (ChatML markers, <image>, <prm>, eos...).
_SPECIAL = re.compile(r"<\|[^|>]*\|>|<image>|<prm>|</?s>|<pad>|<eos>|<bos>")


def build_prompt(question: str, prefix_steps: Sequence[str] = (), preset: str = "platform") -> str:
    """The user text for a rollout from the question alone or from a partial solution."""
    prompt = prompt_preset(preset).template.format(question=question)
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
