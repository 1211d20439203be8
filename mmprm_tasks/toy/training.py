"""Train the toy models: the foundation and, from it, the policy (issue 11).

The paper does not fine-tune its PRM from the policy: MM-PRM starts from InternVL2.5, a pretrained
model that reads and computes in any layout, and MM-Policy is a different model. The toy world
mirrors that:

* the **foundation** (``assets/toy_foundation``) is a tiny LLaVA trained from scratch on right
  toy text in every layout the platform uses (:mod:`mmprm_tasks.toy.corpus`): the policy's tagged
  steps, the PRM's ``Question: ...\\nProcess: ...`` layout, and yes/no questions about images and
  arithmetic facts. It is the PRM's base (``MMPRM_TRAIN__BASE_MODEL``);
* the **policy** (``assets/toy_policy``) is the foundation fine-tuned on tagged solutions with the
  world's controlled errors (slips, misreadings, inconsistencies, with habits), so that it errs
  at a realistic rate while the foundation still knows better.

Both are trained by :func:`train_toy_model` for a fixed number of optimizer steps (AdamW, linear
warm-up, cosine decay to ``final_lr_ratio`` of the peak), which writes ``save_pretrained`` files
and ``metrics.json`` (greedy test accuracy, and for the foundation its yes/no judgement AUC).

Two choices were measured (issue 11's note has the numbers): a peak learning rate of 5e-4, since
at 2e-3 the model learns to write solutions but never to judge them (judgement AUC stays near
0.6); and a second language-model loss read out after the middle layer (``mid_layer``, deep
supervision as in early-exit LMs), which makes the result of a computation available to the
layers above it: greedy accuracy rose from 0.55 to 0.84 at the same budget.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from mmprm_tasks.rollouts import Rollout, parse_rollout
from mmprm_tasks.toy.corpus import (
    Example,
    arithmetic_question,
    judgement_example,
    judgement_head,
    process_example,
    prompt_text,
    reading_question,
    tagged_example,
)
from mmprm_tasks.toy.model import build_tiny_vlm
from mmprm_tasks.toy.tokenizer import build_tokenizer
from mmprm_tasks.toy.world import (
    Problem,
    arithmetic_facts,
    is_correct_answer,
    problems_for_split,
    render_image,
    sample_problems,
)

EVAL_SEED = 1234


@dataclass(frozen=True)
class ModelSize:
    """The tiny LLaVA's dimensions (used when training from scratch)."""

    text_hidden: int = 192
    text_layers: int = 4
    vision_hidden: int = 96
    vision_layers: int = 2


@dataclass(frozen=True)
class ToyTrainingConfig:
    """One training run of a toy model. ``layouts`` weighs the corpus layouts
    (:mod:`mmprm_tasks.toy.corpus`): ``tagged``, ``process``, ``judgement``."""

    steps: int
    layouts: dict[str, float]
    lr: float = 5e-4
    warmup_steps: int = 50
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    batch_size: int = 32
    seed: int = 0
    wrong_step_rate: float = 0.0
    habits: bool = False
    continuation_rate: float = 0.3
    mid_layer: int = 0  # 0: no deep supervision
    mid_layer_weight: float = 0.5
    size: ModelSize = field(default_factory=ModelSize)
    eval_problems: int = 200
    eval_seed: int = EVAL_SEED
    threads: int | None = 2


FOUNDATION = ToyTrainingConfig(
    steps=2000, layouts={"tagged": 0.33, "process": 0.32, "judgement": 0.35}, mid_layer=2
)
POLICY = ToyTrainingConfig(
    steps=300, layouts={"tagged": 1.0}, lr=2e-4, warmup_steps=20, wrong_step_rate=0.5, habits=True
)


def pixel_values_for(processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    return processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]


class _ExampleSampler:
    """Draws training examples of the configured layouts from the train split."""

    def __init__(self, processor: Any, cfg: ToyTrainingConfig, rng: random.Random) -> None:
        self.processor, self.cfg, self.rng = processor, cfg, rng
        self.problems = problems_for_split("train")
        self.names = list(cfg.layouts)
        self.weights = [cfg.layouts[n] for n in self.names]
        unknown = set(self.names) - {"tagged", "process", "judgement"}
        if unknown:
            raise ValueError(f"unknown corpus layouts {sorted(unknown)}")

    def __call__(self, index: int) -> Example:
        problem = self.problems[index]
        layout = self.rng.choices(self.names, self.weights)[0]
        if layout == "tagged":
            return tagged_example(
                self.processor, problem, self.rng, wrong_step_rate=self.cfg.wrong_step_rate,
                habits=self.cfg.habits, continuation_rate=self.cfg.continuation_rate,
            )
        if layout == "process":
            return process_example(self.processor, problem, self.rng)
        return judgement_example(self.processor, problem, self.rng, self.problems)


def _batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention[row, : len(ids)] = 1
    return input_ids, labels, attention


def _mid_layer_loss(model: Any, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy read out from an intermediate layer through the final norm and
    the (tied) LM head."""
    language_model = model.model.language_model
    logits = model.lm_head(language_model.norm(hidden))[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def train_toy_model(
    out_dir: str | Path,
    cfg: ToyTrainingConfig,
    *,
    init_from: str | Path | None = None,
    command: str | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train for exactly ``cfg.steps`` optimizer steps and save to ``out_dir``; returns the
    metrics also written to ``out_dir/metrics.json``. ``init_from`` continues from a checkpoint
    (its weights, tokenizer and processor) instead of a fresh model of ``cfg.size``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    started = time.time()
    if init_from is not None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(init_from)
        model = AutoModelForImageTextToText.from_pretrained(init_from)
    else:
        model, processor = build_tiny_vlm(
            build_tokenizer(), seed=cfg.seed, text_hidden=cfg.size.text_hidden,
            text_layers=cfg.size.text_layers, vision_hidden=cfg.size.vision_hidden,
            vision_layers=cfg.size.vision_layers,
        )
    pad_id = processor.tokenizer.pad_token_id
    sampler = _ExampleSampler(processor, cfg, rng)
    pixel_cache: dict[int, torch.Tensor] = {}

    def pixels_of(indices: list[int]) -> torch.Tensor:
        missing = sorted({i for i in indices if i not in pixel_cache})
        if missing:
            fresh = pixel_values_for(processor, [render_image(sampler.problems[i].numbers) for i in missing])
            pixel_cache.update(zip(missing, fresh))
        return torch.stack([pixel_cache[i] for i in indices])

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, cfg.steps))))
        return warm * (cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * cosine)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    loss_ema = math.nan
    for step in range(1, cfg.steps + 1):
        model.train()
        indices = [rng.randrange(len(sampler.problems)) for _ in range(cfg.batch_size)]
        input_ids, labels, attention = _batch([sampler(i) for i in indices], pad_id)
        out = model(
            input_ids=input_ids, attention_mask=attention, pixel_values=pixels_of(indices),
            labels=labels, output_hidden_states=bool(cfg.mid_layer),
        )
        loss = out.loss
        if cfg.mid_layer:
            loss = loss + cfg.mid_layer_weight * _mid_layer_loss(model, out.hidden_states[cfg.mid_layer], labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = out.loss.item()
        loss_ema = value if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * value
        if progress:
            progress(step, value)

    test = sample_problems("test", cfg.eval_problems, cfg.eval_seed)
    metrics = {
        **{k: v for k, v in asdict(cfg).items()},
        "init_from": str(init_from) if init_from is not None else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss_ema": round(loss_ema, 4),
        "greedy_test_accuracy": greedy_accuracy(model, processor, test),
        "judgement_auc": judgement_auc(model, processor, test, cfg.eval_seed),
        "wall_s": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
        "command": command,
    }
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_path)
    processor.save_pretrained(out_path)
    (out_path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# ------------------------------------------------------------------------------ measurement


@torch.no_grad()
def generate_rollouts(
    model: Any,
    processor: Any,
    problems: Sequence[Problem],
    *,
    n: int = 1,
    prefixes: Sequence[Sequence[str]] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 0.9,
    repetition_penalty: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    seed: int | None = None,
) -> list[list[Rollout]]:
    """``n`` rollouts per problem (a prefix's steps are not repeated in the rollout)."""
    if seed is not None:
        torch.manual_seed(seed)
    model.eval()
    prefixes = prefixes or [()] * len(problems)
    jobs = [(i, p, pre) for i, (p, pre) in enumerate(zip(problems, prefixes)) for _ in range(n)]
    out: list[list[Rollout]] = [[] for _ in problems]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        texts = [prompt_text(processor, p.question, pre) for _, p, pre in chunk]
        images = [render_image(p.numbers) for _, p, _ in chunk]
        enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        if repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = repetition_penalty
        gen = model.generate(**enc, **kwargs)
        new = gen[:, enc["input_ids"].shape[1] :]
        for (i, _, _), text in zip(chunk, processor.batch_decode(new, skip_special_tokens=True)):
            out[i].append(parse_rollout(text))
    return out


def greedy_accuracy(model: Any, processor: Any, problems: Sequence[Problem], batch_size: int = 64) -> float:
    rollouts = generate_rollouts(model, processor, problems, n=1, batch_size=batch_size)
    hits = [is_correct_answer(p.solution(), rs[0]) for p, rs in zip(problems, rollouts)]
    return sum(hits) / max(1, len(hits))


@torch.no_grad()
def judgement_auc(model: Any, processor: Any, problems: Sequence[Problem], seed: int) -> dict[str, float | None]:
    """ROC AUC of P(Yes) for held-out yes/no questions, half true: one about the image and one
    about an arithmetic fact of each problem (the foundation's judgement, before any PRM)."""
    from mmprm_tasks.evaluate import roc_auc

    rng = random.Random(seed)
    tokenizer = processor.tokenizer
    yes, no = tokenizer.convert_tokens_to_ids("Yes"), tokenizer.convert_tokens_to_ids("No")
    head = judgement_head(processor)
    scores: dict[str, tuple[list[float], list[float]]] = {"image": ([], []), "arithmetic": ([], [])}
    model.eval()
    for problem in problems:
        for kind, (question, true) in (
            ("image", reading_question(problem, rng)),
            ("arithmetic", arithmetic_question(arithmetic_facts(problem, rng), rng)),
        ):
            enc = processor(text=[head + question + " "], images=[render_image(problem.numbers)], return_tensors="pt")
            pair = model(**enc).logits[0, -1, [yes, no]].float()
            scores[kind][0 if true else 1].append(float(pair.softmax(-1)[0]))
    return {kind: roc_auc(*pn) for kind, pn in scores.items()}
