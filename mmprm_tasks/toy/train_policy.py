"""Train the tiny toy policy to solve the synthetic world step by step (issue 4).

Prompt/format contract (every policy backend and the PRM use it): the user message is
``[{"type": "image"}, {"type": "text", "text": build_prompt(question, prefix_steps)}]`` and the
assistant message is ``format_rollout(steps)``, both rendered with
``processor.apply_chat_template``; the loss is on the assistant tokens only (up to and including
``<|im_end|>``). A share of the examples are continuations: the prompt carries the first ``k``
steps of a solution as "Previous Steps" and the target is the rest, because the annotator asks
the policy to continue partial solutions. Targets contain wrong steps at a controlled per-step
rate (:func:`mmprm_tasks.toy.world.solve`) with later steps consistent with the wrong value, so
that samples at temperature 1.0 contain realistic first errors while greedy decoding stays right
as often as the model's skill allows.

Training runs a fixed number of steps (constant learning rate after a short warm-up, so the
model after ``n`` steps does not depend on the total), then measures greedy answer accuracy on a
held-out test split and writes ``metrics.json`` beside the ``save_pretrained`` files.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from mmprm_tasks.formats import chat_messages
from mmprm_tasks.rollouts import Rollout, build_prompt, format_rollout, parse_rollout
from mmprm_tasks.toy.model import NUM_IMAGE_TOKENS, build_tiny_vlm
from mmprm_tasks.toy.tokenizer import IMAGE_TOKEN, IM_END, build_tokenizer
from mmprm_tasks.traverse import STEP_JOINER
from mmprm_tasks.toy.world import (
    Problem,
    is_correct_answer,
    problems_for_split,
    render_image,
    sample_problems,
    solve,
)

DEFAULT_STEPS = 1300
DEFAULT_SEED = 0
DEFAULT_WRONG_STEP_RATE = 0.15
EVAL_PROBLEMS = 100
EVAL_SEED = 1234


def user_message(question: str, prefix_steps: Sequence[str] = ()) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": build_prompt(question, prefix_steps)}],
    }


def prompt_text(processor, question: str, prefix_steps: Sequence[str] = ()) -> str:
    return processor.apply_chat_template(
        [user_message(question, prefix_steps)], add_generation_prompt=True, tokenize=False
    )


def _expand_image(text: str) -> str:
    # What LlavaProcessor does: one <image> per vision patch.
    return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * NUM_IMAGE_TOKENS)


def pixel_values_for(processor, images: Sequence[Image.Image]) -> torch.Tensor:
    return processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]


def _encode_example(processor, question: str, prefix: Sequence[str], target: Sequence[str]):
    prompt = prompt_text(processor, question, prefix)
    full = processor.apply_chat_template(
        [user_message(question, prefix), {"role": "assistant", "content": format_rollout(target)}],
        add_generation_prompt=False,
        tokenize=False,
    )
    if not full.startswith(prompt):
        raise RuntimeError("chat template: the prompt is not a prefix of the full conversation")
    return _loss_after(processor.tokenizer, prompt, full)


def _loss_after(tok, context: str, full: str) -> tuple[list[int], list[int]]:
    """Token ids of ``full`` up to its first ``<|im_end|>`` after ``context``, and labels that
    put the loss on the tokens after ``context`` only."""
    context_ids = tok(_expand_image(context), add_special_tokens=False)["input_ids"]
    full_ids = tok(_expand_image(full), add_special_tokens=False)["input_ids"]
    if full_ids[: len(context_ids)] != context_ids:
        raise RuntimeError("tokenization of the context changes inside the full conversation")
    end = full_ids.index(tok.convert_tokens_to_ids(IM_END), len(context_ids)) + 1
    full_ids = full_ids[:end]  # drop the trailing newline after <|im_end|>
    return full_ids, [-100] * len(context_ids) + full_ids[len(context_ids) :]


def _encode_process_example(processor, question: str, steps: Sequence[str]):
    """A solution laid out as the PRM reads it: the user turn ``Question: ...\\nProcess: ...``
    with the steps joined by blank lines (no ``<prm>``, no labels); the loss is on the process.

    This is how a base model "has seen math written out" in more than the policy's own tagged
    layout, so that a PRM fine-tuned from it reads a process with the arithmetic it knows.
    """
    process = STEP_JOINER.join(s.strip() for s in steps)
    messages = chat_messages(question, process)
    full = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    head = full[: full.index(process)].rstrip(" ")  # the space belongs to the first word's token
    return _loss_after(processor.tokenizer, head, full)


def make_example(problem: Problem, rng: random.Random, wrong_step_rate: float, continuation_rate: float):
    """(prefix, target) of one training example."""
    steps = solve(problem, rng, wrong_step_rate)
    if rng.random() < continuation_rate:
        k = rng.randint(1, len(steps) - 1)  # at least the reading step; the answer stays a target
        return steps[:k], steps[k:]
    return [], steps


@torch.no_grad()
def generate_rollouts(
    model,
    processor,
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
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        if repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = repetition_penalty
        gen = model.generate(**enc, **kwargs)
        new = gen[:, enc["input_ids"].shape[1] :]
        for (i, _, _), text in zip(chunk, processor.batch_decode(new, skip_special_tokens=True)):
            out[i].append(parse_rollout(text))
    return out


def greedy_accuracy(model, processor, problems: Sequence[Problem], batch_size: int = 64) -> float:
    rollouts = generate_rollouts(model, processor, problems, n=1, batch_size=batch_size)
    hits = [is_correct_answer(p.solution(), rs[0]) for p, rs in zip(problems, rollouts)]
    return sum(hits) / max(1, len(hits))


def train_policy(
    out_dir: str | Path,
    steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    wrong_step_rate: float = DEFAULT_WRONG_STEP_RATE,
    *,
    batch_size: int = 32,
    lr: float = 2e-3,
    warmup_steps: int = 50,
    weight_decay: float = 0.0,
    continuation_rate: float = 0.3,
    process_layout_rate: float = 0.0,
    eval_problems: int = EVAL_PROBLEMS,
    eval_seed: int = EVAL_SEED,
    eval_every: int = 0,
    threads: int | None = 2,
    save_intermediate: bool = False,
    progress: Callable[[int, float], None] | None = None,
    command: str | None = None,
    init_from: str | Path | None = None,
) -> dict:
    """Train the toy policy for exactly ``steps`` optimizer steps and save it to ``out_dir``.

    Returns the metrics also written to ``out_dir/metrics.json``: steps, seed, greedy answer
    accuracy on ``eval_problems`` test problems (``sample_problems("test", n, eval_seed)``),
    wall time, final loss, the training command and, with ``eval_every``, an accuracy history.
    ``progress(step, loss)`` is called after every step. With ``save_intermediate`` (and
    ``eval_every``) the model at every evaluation is also saved to ``out_dir/step-N``; since the
    learning rate is constant after warm-up and evaluation uses no randomness, that model equals
    the one a run of exactly ``N`` steps would save. ``init_from`` continues from a saved
    checkpoint (its weights, tokenizer and processor) instead of a freshly initialised model.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    t0 = time.time()

    if init_from is not None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(init_from)
        model = AutoModelForImageTextToText.from_pretrained(init_from)
        tokenizer = processor.tokenizer
    else:
        tokenizer = build_tokenizer()
        model, processor = build_tiny_vlm(tokenizer, seed=seed)
    pad_id = tokenizer.pad_token_id

    train = problems_for_split("train")
    pixel_cache: dict[int, torch.Tensor] = {}

    def pixels_of(indices: list[int]) -> torch.Tensor:
        missing = sorted({i for i in indices if i not in pixel_cache})
        if missing:
            fresh = pixel_values_for(processor, [render_image(train[i].numbers) for i in missing])
            pixel_cache.update(zip(missing, fresh))
        return torch.stack([pixel_cache[i] for i in indices])

    test = sample_problems("test", eval_problems, eval_seed)

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))

    def _metrics_base(at_step: int) -> dict:
        return {
            "steps": at_step,
            "seed": seed,
            "wrong_step_rate": wrong_step_rate,
            "continuation_rate": continuation_rate,
            "process_layout_rate": process_layout_rate,
            "batch_size": batch_size,
            "lr": lr,
            "warmup_steps": warmup_steps,
            "eval_problems": eval_problems,
            "eval_seed": eval_seed,
            "final_loss_ema": round(loss_ema, 4),
            "wall_s": round(time.time() - t0, 1),  # setup + training (+ any evaluations)
            "threads": torch.get_num_threads(),
            "init_from": str(init_from) if init_from is not None else None,
            "parameters": sum(p.numel() for p in model.parameters()),
            "command": command
            or f"mmprm toy train-policy --out {out_dir} --steps {at_step} --seed {seed} "
            f"--wrong-step-rate {wrong_step_rate}"
            + (f" --process-layout-rate {process_layout_rate}" if process_layout_rate else "")
            + (f" --init-from {init_from}" if init_from is not None else ""),
        }

    history: list[dict] = []
    loss_ema = math.nan
    for step in range(1, steps + 1):
        model.train()
        idx = [rng.randrange(len(train)) for _ in range(batch_size)]
        seqs = []
        for i in idx:
            if process_layout_rate and rng.random() < process_layout_rate:
                steps_i = solve(train[i], rng, wrong_step_rate)
                seqs.append(_encode_process_example(processor, train[i].question, steps_i))
                continue
            prefix, target = make_example(train[i], rng, wrong_step_rate, continuation_rate)
            seqs.append(_encode_example(processor, train[i].question, prefix, target))
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (ids, lab) in enumerate(seqs):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)
            attention[row, : len(ids)] = 1
        out = model(
            input_ids=input_ids, attention_mask=attention, pixel_values=pixels_of(idx), labels=labels
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = out.loss.item()
        loss_ema = loss if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * loss
        if progress:
            progress(step, loss)
        if eval_every and step % eval_every == 0 and step < steps:
            acc = greedy_accuracy(model, processor, test)
            history.append({"step": step, "loss_ema": round(loss_ema, 4), "greedy_accuracy": acc,
                            "wall_s": round(time.time() - t0, 1)})
            print(json.dumps(history[-1]), file=sys.stderr, flush=True)
            if save_intermediate:
                _save(Path(out_dir) / f"step-{step}", model, processor,
                      {**_metrics_base(step), "greedy_test_accuracy": acc, "history": list(history)})

    accuracy = greedy_accuracy(model, processor, test)
    history.append({"step": steps, "loss_ema": round(loss_ema, 4), "greedy_accuracy": accuracy,
                    "wall_s": round(time.time() - t0, 1)})
    metrics = {**_metrics_base(steps), "greedy_test_accuracy": accuracy, "history": history}
    _save(Path(out_dir), model, processor, metrics)
    return metrics


def _save(out_path: Path, model, processor, metrics: dict) -> None:
    out_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_path)
    processor.save_pretrained(out_path)
    (out_path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
