"""A synthetic multimodal math world small enough to learn on one CPU.

A problem shows two or three single digits (1-9) in FIXED slots of a 64x64 image, drawn large
(26 px font), and asks for a short computation on them. Every solution has the same shape::

    The numbers are 3, 5 and 7.      <- reads the image
    3 + 5 = 8.                       <- one or two arithmetic steps
    8 - 7 = 1.
    1                                <- the answer (last element)

so a problem has 3 or 4 steps. Because the reading step names every number and each arithmetic
step shows its operands and result, a wrong step is visible in its own text (an arithmetic slip,
``3 + 5 = 9.``), against the steps before it (an operand that is not what was stated) or against
the image (a misreading), and the generator knows the first error of every solution. Errors
differ from right steps only in their mathematical content: no wording, format or length marks
them.

The problem space (kind x digits, about 3,200 problems) is split once and for all by a stable
hash into a train part (~80%) and a test part (~20%): :func:`generate_seeds` draws the train
split from the first and the test split from the second, and the toy policy is trained on the
train part only, so no test problem, from any seed, was seen in training.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 64
FONT_SIZE = 26
# Draw origins of the three digit slots. A 26 px digit of Pillow's default font inks x in
# [origin+1, origin+14) and y in [origin+8, origin+26), so each glyph lies inside exactly two
# 8-px patch columns ({0,1}, {3,4}, {6,7}; x in [2,15), [26,39), [50,63)) and mostly in patch
# rows 3-4 (y in [24,42)). Keeping a glyph inside whole patch columns matters: with the first
# digit straddling three columns the tiny LM learnt to attend to only one of them and never
# told 3/5/6/7/8 apart in that slot (greedy accuracy stalled near 40%).
SLOT_X = (1, 25, 49)
SLOT_Y = 16
DIGITS = tuple(range(1, 10))
TEST_FRACTION = 0.2

# kind -> (number count, question, operations). An operation (op, lhs) combines the running
# value (lhs "acc") or a number (lhs int index) with the next number.
_KINDS: dict[str, tuple[int, str, tuple[tuple[str, int | str, int], ...]]] = {
    "sum2": (2, "What is the sum of the two numbers in the image?", (("+", 0, 1),)),
    "diff2": (2, "Subtract the second number in the image from the first.", (("-", 0, 1),)),
    "prod2": (2, "What is the product of the two numbers in the image?", (("*", 0, 1),)),
    "sum3": (
        3,
        "What is the sum of the three numbers in the image?",
        (("+", 0, 1), ("+", "acc", 2)),
    ),
    "addsub": (
        3,
        "Add the first two numbers in the image, then subtract the third.",
        (("+", 0, 1), ("-", "acc", 2)),
    ),
    "muladd": (
        3,
        "Multiply the first two numbers in the image, then add the third.",
        (("*", 0, 1), ("+", "acc", 2)),
    ),
    "mulsub": (
        3,
        "Multiply the first two numbers in the image, then subtract the third.",
        (("*", 0, 1), ("-", "acc", 2)),
    ),
}
KINDS = tuple(_KINDS)

# Digits that a careless reader confuses (misreadings keep the rest of the solution consistent).
_CONFUSABLE = {1: (7, 4), 2: (7, 3), 3: (8, 5), 4: (9, 1), 5: (6, 3), 6: (5, 8), 7: (1, 2), 8: (3, 6), 9: (4, 8)}


@dataclass(frozen=True)
class Problem:
    kind: str
    numbers: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"toy-{self.kind}-{''.join(map(str, self.numbers))}"

    @property
    def question(self) -> str:
        return _KINDS[self.kind][1]

    @property
    def split(self) -> str:
        digest = hashlib.sha256(self.id.encode()).digest()
        return "test" if int.from_bytes(digest[:4], "big") / 2**32 < TEST_FRACTION else "train"

    def solution(self) -> list[str]:
        """The ground-truth steps; the last element is the answer."""
        return solve(self, random.Random(0), wrong_step_rate=0.0)

    @property
    def answer(self) -> str:
        return self.solution()[-1]


def _apply(op: str, x: int, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def reading_step(numbers: Sequence[int]) -> str:
    if len(numbers) == 2:
        return f"The numbers are {numbers[0]} and {numbers[1]}."
    return "The numbers are " + ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}."


def _slip(op: str, x: int, y: int, value: int, rng: random.Random) -> int:
    """A plausible wrong result of ``x op y`` (never the right one)."""
    candidates = [value + d for d in (-2, -1, 1, 2)] + [value + 10, value - 10]
    if op == "*":
        candidates += [x * (y + 1), x * (y - 1), (x + 1) * y, (x - 1) * y]
    else:
        candidates += [_apply("+" if op == "-" else "-", x, y)]
    candidates = [c for c in candidates if c != value]
    return rng.choice(candidates)


def _fact_rng(op: str, x: int, y: int) -> random.Random:
    """A random source fixed per arithmetic fact (a solver's habits do not change between tries)."""
    return random.Random(f"fact:{x}{op}{y}")


def fact_difficulty(op: str, x: int, y: int) -> float:
    """How error-prone a solver with habits finds ``x op y``: a factor in [0.2, 2.5], mean about 1.

    Fixed per fact, and larger for products (a 9 x 7 goes wrong more often than a 2 + 3).
    """
    base = {"+": 0.6, "-": 0.8, "*": 1.4}[op]
    return min(2.5, base * (0.25 + 1.5 * _fact_rng(op, x, y).random()))


def habitual_slip(op: str, x: int, y: int) -> int:
    """The wrong result a solver with habits gives for ``x op y`` when it errs (fixed per fact)."""
    value = _apply(op, x, y)
    return _slip(op, x, y, value, _fact_rng(op, x, y))


ERROR_KINDS = ("misreading", "slip", "inconsistency")
ORDINALS = ("first", "second", "third")


def solve(
    problem: Problem, rng: random.Random, wrong_step_rate: float = 0.0, *, habits: bool = False
) -> list[str]:
    """A step-by-step solution with at most one error, each step erring at rate ``wrong_step_rate``.

    Three kinds of error, as a careless solver makes them:

    * **misreading** (the reading step, at a third of the rate): one digit read as a confusable
      one; the rest is computed correctly from what was read;
    * **slip**: an arithmetic step states a wrong result (``3 + 5 = 9.``);
    * **inconsistency** (a third of the arithmetic errors): a step computes correctly but with an
      operand other than the one stated before it (``The numbers are 3, 5 ...`` then
      ``3 + 6 = 9.``, or ``3 + 5 = 8.`` then ``9 - 7 = 2.``).

    Every later step is computed correctly from the (now wrong) values before it, so the wrong
    value always reaches the answer (digits are 1-9 and the operations are +, - and *, so a
    single error never cancels out). With ``habits`` the solver errs like a person with habits:
    each arithmetic fact has its own error rate (``wrong_step_rate * fact_difficulty``) and, half
    of the time, its own habitual wrong result (:func:`habitual_slip`), so that repeated tries at
    one problem tend to repeat the same mistake.
    """
    _, _, ops = _KINDS[problem.kind]
    seen = list(problem.numbers)
    erred = False
    if wrong_step_rate > 0 and rng.random() < wrong_step_rate / 3:
        i = rng.randrange(len(seen))
        seen[i] = rng.choice(_CONFUSABLE[seen[i]])
        erred = True
    steps = [reading_step(seen)]
    acc = 0
    for op, lhs, rhs in ops:
        x = acc if lhs == "acc" else seen[lhs]
        y = seen[rhs]
        value = _apply(op, x, y)
        rate = wrong_step_rate * (fact_difficulty(op, x, y) if habits else 1.0)
        if wrong_step_rate > 0 and not erred and rng.random() < min(rate, 0.95):
            erred = True
            if rng.random() < 1 / 3:
                # Inconsistency: one operand is not what was stated before.
                if rng.random() < 0.5:
                    x = _slip("+", x, 0, x, rng) if lhs == "acc" else rng.choice(_CONFUSABLE[x])
                else:
                    y = rng.choice(_CONFUSABLE[y])
                value = _apply(op, x, y)
            elif habits and rng.random() < 0.5:
                value = habitual_slip(op, x, y)
            else:
                value = _slip(op, x, y, value, rng)
        steps.append(f"{x} {op} {y} = {value}.")
        acc = value
    steps.append(str(acc))
    return steps


def arithmetic_facts(
    problem: Problem, rng: random.Random, wrong_step_rate: float = 0.5
) -> list[tuple[int, str, int]]:
    """The ``(x, op, y)`` computed by the arithmetic steps of one solution of ``problem`` drawn
    with errors, so that the facts a solver meets after a misreading or a slip are covered too."""
    facts = []
    for step in solve(problem, rng, wrong_step_rate)[1:-1]:
        m = _EQUATION.search(step)
        facts.append((int(m.group(1)), m.group(2), int(m.group(3))))
    return facts


@lru_cache(maxsize=1)
def all_problems() -> tuple[Problem, ...]:
    problems = []
    for kind, (count, _, _) in _KINDS.items():
        for numbers in itertools.product(DIGITS, repeat=count):
            problems.append(Problem(kind, numbers))
    return tuple(problems)


def problems_for_split(split: str) -> list[Problem]:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}")
    return [p for p in all_problems() if p.split == split]


def sample_problems(split: str, n: int, seed: int) -> list[Problem]:
    """``n`` distinct problems of a split, drawn deterministically from ``seed``."""
    pool = problems_for_split(split)
    if n > len(pool):
        raise ValueError(f"the toy world has only {len(pool)} {split} problems, asked for {n}")
    # Round-robin over kinds so small draws still cover every kind.
    rng = random.Random(f"{seed}-{split}")
    by_kind = {k: [p for p in pool if p.kind == k] for k in KINDS}
    for ps in by_kind.values():
        rng.shuffle(ps)
    order = list(KINDS)
    rng.shuffle(order)
    chosen: list[Problem] = []
    while len(chosen) < n:
        for k in order:
            if by_kind[k] and len(chosen) < n:
                chosen.append(by_kind[k].pop())
    return chosen


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def render_image(numbers: Sequence[int]) -> Image.Image:
    """The problem image: the digits in fixed slots, black on white, RGB 64x64."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(img)
    for x, d in zip(SLOT_X, numbers):
        draw.text((x, SLOT_Y), str(d), fill="black", font=_font())
    return img


def problem_record(problem: Problem, image_path: str) -> dict:
    steps = problem.solution()
    return {
        "id": problem.id,
        "question": problem.question,
        "correct_answer": steps[-1],
        "image_path": image_path,
        "split": problem.split,
        "gt_steps": steps,
        "kind": problem.kind,
        "numbers": list(problem.numbers),
    }


def generate_seeds(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, Path]:
    """Write ``train.json`` and ``test.json`` (SPEC §1 records) with PNGs under ``images/``.

    ``image_path`` is relative to the JSON file. Each record also carries ``split``,
    ``gt_steps`` (ground-truth steps, answer last), ``kind`` and ``numbers``. Deterministic in
    ``seed``; the splits are disjoint (see the module docstring).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        records = []
        for problem in sample_problems(split, n, seed):
            rel = f"images/{problem.id}.png"
            render_image(problem.numbers).save(out / rel, format="PNG", optimize=False)
            records.append(problem_record(problem, rel))
        path = out / f"{split}.json"
        path.write_text(json.dumps(records, indent=1) + "\n")
        paths[split] = path
    return paths


# ---------------------------------------------------------------- checking candidate rollouts

_EQUATION = re.compile(r"(-?\d+)\s*([-+*×x/])\s*(-?\d+)\s*=\s*(-?\d+)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_TOKEN = re.compile(r"\d+|[-+*×/=]")


def _step_signature(text: str) -> tuple:
    """What a step states, ignoring wording and formatting.

    An equation ``x op y = z`` (operands unordered for + and *); otherwise the sequence of
    numbers and operators it contains.
    """
    text = text.replace("\\times", "*").replace("×", "*")
    m = _EQUATION.search(text)
    if m:
        x, op, y, z = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        op = "*" if op in "x×" else op
        operands = tuple(sorted((x, y))) if op in "+*" else (x, y)
        return ("eq", op, operands, z)
    return ("seq", tuple(_TOKEN.findall(text)))


def _answer_value(text: str) -> float | None:
    numbers = _NUMBER.findall(text.replace("\\boxed", "").replace("$", ""))
    return float(numbers[-1]) if numbers else None


def is_correct_answer(gt_steps: Sequence[str], rollout: Sequence[str]) -> bool:
    """Whether the rollout's final element states the ground-truth answer (the last number)."""
    if not rollout:
        return False
    got = _answer_value(rollout[-1])
    return got is not None and got == _answer_value(gt_steps[-1])


def first_error_index(gt_steps: Sequence[str], rollout: Sequence[str]) -> int | None:
    """Index of the first wrong step of ``rollout`` against the ground truth; None if all right.

    Steps are aligned by position. A reasoning step is right when it states what the ground-truth
    step states (:func:`_step_signature`); the final element is right when it states the right
    answer at the right position. A rollout that stops early is wrong at its answer; one that
    goes on past the last ground-truth step is wrong at the first extra step. An empty rollout
    is wrong at 0.
    """
    if not rollout:
        return 0
    n_gt = len(gt_steps) - 1  # reasoning steps before the answer
    n_r = len(rollout) - 1
    for i in range(n_r):
        if i >= n_gt or _step_signature(rollout[i]) != _step_signature(gt_steps[i]):
            return i
    if n_r != n_gt or not is_correct_answer(gt_steps, rollout):
        return n_r
    return None


def error_kind(gt_steps: Sequence[str], rollout: Sequence[str], index: int) -> str:
    """What went wrong at step ``index`` of ``rollout`` (its first error): ``misreading`` (the
    reading step), ``slip`` (an equation with the right operands and a wrong result),
    ``inconsistency`` (an equation with other operands than the right ones), or ``answer``
    (anything else: a wrong or missing answer, extra or malformed steps)."""
    if index == 0:
        return "misreading"
    if index < len(gt_steps) - 1 and index < len(rollout):
        got, want = _step_signature(rollout[index]), _step_signature(gt_steps[index])
        if got[0] == want[0] == "eq" and got[1] == want[1]:
            return "slip" if got[2] == want[2] else "inconsistency"
    return "answer"


def corpus_texts() -> list[str]:
    """Text the toy tokenizer is trained on: every prompt form and many solutions, in the
    policy's tagged layout and in the PRM's ``Question: ...\nProcess: ...`` layout."""
    from mmprm_tasks.formats import user_text
    from mmprm_tasks.rollouts import build_prompt, format_rollout
    from mmprm_tasks.traverse import render_process

    rng = random.Random(0)
    texts = []
    for problem in all_problems()[::7]:
        steps = solve(problem, rng, wrong_step_rate=0.3)
        texts.append(build_prompt(problem.question, steps[:1]))
        texts.append(format_rollout(steps))
        texts.append(user_text(problem.question, render_process([[s] for s in steps])))
    for kind in KINDS:
        texts.append(build_prompt(_KINDS[kind][1]))
    for ordinal in ORDINALS:
        texts.append(f"Is the {ordinal} number in the image 3? Is 3 + 5 = 8? Yes No")
    texts.append("The final answer is Answer: Yes No")
    return texts
