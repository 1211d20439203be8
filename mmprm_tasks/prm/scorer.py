"""Step scores from a checkpoint: the PRM's P(Yes), or a base model's step likelihood."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch

from mmprm_tasks.formats import PROCESS_MARK
from mmprm_tasks.families import checkpoint_model_type, family, load_checkpoint
from mmprm_tasks.prm.collator import PRMCollator
from mmprm_tasks.prm.config import PRM_CONFIG_FILE, flash_attn_available
from mmprm_tasks.prm.loss import PRMDataError, prm_forward
from mmprm_tasks.prm.tokens import PRM_TOKEN, ensure_prm_tokens, load_image
from mmprm_tasks.traverse import render_process


def _prm_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``prm_config.json`` (empty for a base model that has none)."""
    try:
        return json.loads((Path(model_dir) / PRM_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return {}


class _StepScorer:
    """Loads a checkpoint for step scoring and lays candidates out exactly as the PRM is trained:
    each step its own group, rendered by :func:`mmprm_tasks.traverse.render_process` (a literal
    ``<prm>`` or image token inside a step is removed).  Loads on CUDA in bf16 when available
    (flash-attn when installed and the family takes it), else CPU fp32; ``trust_remote_code=None``:
    as the checkpoint's ``prm_config.json`` records (training's setting).  Subclasses say what a step's score is."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        trust_remote_code: bool | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            cuda_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if cuda_bf16 else torch.float32
        kwargs: dict[str, Any] = {"dtype": dtype}
        takes_flash = family(checkpoint_model_type(model_dir)).flash_attention
        if self.device.type == "cuda" and dtype != torch.float32 and takes_flash and flash_attn_available():
            kwargs["attn_implementation"] = "flash_attention_2"
        if trust_remote_code is None:
            trust_remote_code = bool(_prm_config(model_dir).get("trust_remote_code", False))
        self.processor, self.model, self.family = load_checkpoint(model_dir, trust_remote_code=trust_remote_code,
                                                                  **kwargs)
        self.model.to(self.device).eval()
        # no resize: the model must know <prm>
        self.tokens = ensure_prm_tokens(self.processor, family=self.family)
        if self.tokens.prm_token_id >= self.model.get_input_embeddings().num_embeddings:
            raise ValueError(f"{model_dir}: the model has no embedding for {PRM_TOKEN}")
        self.batch_size = batch_size
        self.collator = PRMCollator(
            self.processor, self.tokens, max_length=max_length, truncation="error",
            image_token_id=getattr(self.model.config, "image_token_id", None),
        )
        # The longest input this scorer takes: ``max_length`` when given, and never more than
        # the model's positions (a longer input would be read past what the model knows).
        config = getattr(self.model.config, "text_config", None) or self.model.config
        limits = [n for n in (max_length, getattr(config, "max_position_embeddings", None)) if n]
        self.max_input_tokens: int | None = min(limits) if limits else None

    def input_length(self, question: str, image: Any, steps: Sequence[str]) -> int:
        """Tokens of one candidate's input, image tokens included, as :meth:`score` lays it out
        (tokenised only: nothing runs through the model)."""
        record = {"question": question, "process": self.process_text(steps), "labels": [0.0] * len(steps)}
        text = self.collator.text(record)
        return int(self.processor(text=[text], images=[load_image(image)], return_tensors="pt")["input_ids"].shape[1])

    def process_text(self, steps: Sequence[str]) -> str:
        """The process of a candidate (literal ``<prm>``/image tokens in a step are removed)."""
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        return render_process(
            [[s.replace(PRM_TOKEN, "").replace(image_token, "")] for s in steps]
        )

    def _inputs(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(records)
        batch.pop("prm_labels")
        batch = {
            k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
        }
        if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        return batch

    def _score_batch(self, records: list[dict[str, Any]]) -> list[list[float]]:
        raise NotImplementedError

    def score_many(self, items: Sequence[tuple[str, Any, Sequence[str]]]) -> list[list[float]]:
        """Scores for ``(question, image, steps)`` items (image: bytes, PIL or path), batched."""
        results: list[list[float] | None] = [None] * len(items)
        pending = []
        for index, (question, image, steps) in enumerate(items):
            if not steps:
                results[index] = []
                continue
            pending.append(
                (
                    index,
                    {
                        "id": index,
                        "question": question,
                        "process": self.process_text(steps),
                        "labels": [0.0] * len(steps),
                        "image": image,
                    },
                )
            )
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            scores = self._score_batch([record for _, record in chunk])
            for (index, record), row in zip(chunk, scores, strict=True):
                if len(row) != len(record["labels"]):
                    raise PRMDataError(
                        f"item {index}: {len(row)} scores for {len(record['labels'])} steps"
                    )
                results[index] = row
        return [r if r is not None else [] for r in results]

    def score(
        self, question: str, image_bytes: Any, steps_batch: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """One list of step scores per candidate in ``steps_batch`` (same question and image)."""
        image = load_image(image_bytes)  # decode once for the whole batch
        return self.score_many([(question, image, steps) for steps in steps_batch])


class PRMScorer(_StepScorer):
    """Step scores of a trained PRM: P(Yes) = ``softmax([yes, no])[0]`` at each ``<prm>``."""

    @torch.no_grad()
    def _score_batch(self, records: list[dict[str, Any]]) -> list[list[float]]:
        batch = self._inputs(records)
        outputs, input_ids, _ = prm_forward(self.model, batch, self.tokens.prm_token_id)
        mask = input_ids == self.tokens.prm_token_id
        pair = outputs.logits[..., [self.tokens.yes_id, self.tokens.no_id]].float()
        probs = pair.softmax(dim=-1)[..., 0]
        return [probs[row][mask[row]].tolist() for row in range(input_ids.shape[0])]


class StepLikelihoodScorer(_StepScorer):
    """A generative verifier: each step's probability under a language model (typically the PRM's
    base), read in the PRM layout. The score of step ``i`` is ``P(tokens of step i | image,
    question, steps before it)``: the product of its tokens' probabilities, so one unlikely token
    (a wrong result, a misread digit) sinks the step. The tokens of step ``i`` are those after the
    ``i``-th ``<prm>`` (after ``Process:`` for the first step) up to and including the next
    ``<prm>``; the separator and blank line are near-certain for a model that has read this layout
    and cost nothing.

    It needs no training and no labels, so it is the honest baseline for a PRM fine-tuned from the
    same base: how much of the PRM's judgement was in the base model already.
    """

    @torch.no_grad()
    def _score_batch(self, records: list[dict[str, Any]]) -> list[list[float]]:
        batch = self._inputs(records)
        input_ids = batch["input_ids"]
        logits = self.model(**batch, use_cache=False).logits.float()
        token_logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(
            -1, input_ids[:, 1:, None]
        )[..., 0]
        prm = input_ids == self.tokens.prm_token_id
        head = self._process_starts(records)
        scores = []
        for row in range(input_ids.shape[0]):
            ends = prm[row].nonzero().squeeze(-1).tolist()
            starts = [head[row]] + [e + 1 for e in ends[:-1]]
            # token t is predicted at position t - 1
            scores.append([
                math.exp(float(token_logp[row, start - 1 : end].sum()))
                for start, end in zip(starts, ends, strict=True)
            ])
        return scores

    def _process_starts(self, records: list[dict[str, Any]]) -> list[int]:
        """Index of the first process token of each record (right padding: counted from 0)."""
        starts = []
        for record in records:
            text = self.collator.text(record)
            head = text[: text.index(PROCESS_MARK) + len(PROCESS_MARK)].rstrip(" ")
            ids = self.processor(
                text=[head], images=[[self.collator._image(record)]], return_tensors="pt"
            )["input_ids"][0]
            starts.append(int(ids.shape[0]))
        return starts
