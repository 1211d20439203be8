"""The transformers backend: any ``AutoModelForImageTextToText`` checkpoint, CPU or GPU.

One :meth:`TransformersPolicy.generate` call expands every request ``n`` times and runs the
sequences in batches of ``policy.batch_size`` with left padding.  Sampling follows
:class:`~mmprm_tasks.settings.SamplingConfig`.  Every sequence samples from its own random
generator, seeded from its request's seed and its index among the request's ``n`` (see
:class:`SeededRowSampler`), so a request's rollouts do not depend on which other requests share
its batch; an unseeded request draws its seed from torch's global RNG.

:meth:`TransformersPolicy.complete` is the lower-level entry point (chat messages and images
in, completion texts out) that :mod:`mmprm_tasks.policy.server` serves over HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmprm_tasks.policy import (GenerationRequest, PolicyConfigError, PolicyError, chat_messages, load_image,
                                request_seed)
from mmprm_tasks.families import per_text_images
from mmprm_tasks.rollouts import Rollout, parse_rollout
from mmprm_tasks.settings import PolicyConfig, SamplingConfig

log = logging.getLogger(__name__)

# Tags that must survive decoding even if a checkpoint registered them as special tokens.
KEEP_TOKENS = ("<step>", "</step>", "<answer>", "</answer>")


@dataclass
class ChatPrompt:
    """One conversation to continue: transformers-style messages and the images they reference.

    ``messages`` use content parts ``{"type": "image"}`` / ``{"type": "text", "text": ...}``;
    ``images`` are encoded image files, one per image part, in order.
    """

    messages: list[dict[str, Any]]
    images: list[bytes] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (eos) or "length"
    completion_tokens: int
    prompt_tokens: int


def row_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th sampled sequence of a request seeded with ``seed``."""
    digest = hashlib.blake2b(f"row:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFFFFFFFFFF


class SeededRowSampler:
    """A logits processor that samples each row of the batch with its own ``torch.Generator``
    (temperature, then top-k, then top-p, as transformers' own warpers) and leaves only the
    sampled token finite, so greedy decoding emits it.  transformers samples a whole batch from
    one generator; this keeps a sequence's tokens a function of its own seed and logits."""

    def __init__(self, seeds: Sequence[int], sampling: SamplingConfig, device: Any) -> None:
        import torch

        self.torch = torch
        self.sampling = sampling
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch = self.torch
        cfg = self.sampling
        logits = scores.float() / cfg.temperature
        if cfg.top_k and cfg.top_k < logits.shape[-1]:
            kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=False, dim=-1)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - cfg.top_p)
            drop[..., -1:] = False  # always keep the most likely token
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = logits.softmax(dim=-1)
        chosen = torch.stack([torch.multinomial(probs[row], 1, generator=g)
                              for row, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, chosen, 0.0)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """``auto``: bfloat16 on a GPU that supports it, else float32 (CPU kernels are fp32)."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.startswith("cuda"):
            return torch.float16
        return torch.float32
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


class TransformersPolicy:
    """Rollouts from a transformers vision-language checkpoint directory, with ``model.generate``
    on fixed batches: the reference path (``policy.engine = "generate"``).  The default engine,
    :class:`~mmprm_tasks.policy.hf_engine.ContinuousTransformersPolicy`, shares its loading,
    prompt rendering and decoding."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        policy: PolicyConfig | None = None,
        sampling: SamplingConfig | None = None,
    ) -> None:
        import torch

        from mmprm_tasks.families import UnknownFamilyError, load_checkpoint

        self.policy_cfg = policy or PolicyConfig(model=str(model_dir))
        self.sampling = sampling or SamplingConfig()
        self.model_dir = str(model_dir)
        self.device = resolve_device(self.policy_cfg.device)
        dtype = resolve_dtype(self.policy_cfg.dtype, self.device)
        if not (Path(self.model_dir) / "config.json").is_file():
            # Never a hub id: nothing is downloaded at run time.
            raise PolicyConfigError(f"cannot load policy checkpoint {self.model_dir}: no config.json there")
        try:
            self.processor, self.model, self.family = load_checkpoint(
                self.model_dir, trust_remote_code=self.policy_cfg.trust_remote_code, dtype=dtype)
        except UnknownFamilyError as exc:
            raise PolicyConfigError(f"cannot load policy checkpoint {self.model_dir}: {exc}") from exc
        except OSError as exc:
            raise PolicyError(f"cannot load policy checkpoint {self.model_dir}: {exc}") from exc
        self.model.to(self.device).eval()
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos_token_ids = self._eos_ids()
        self.eos_set = frozenset(self.eos_token_ids)
        keep = {self.tokenizer.convert_tokens_to_ids(t) for t in KEEP_TOKENS}
        self._drop_ids = set(self.tokenizer.all_special_ids) - keep
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.max_positions: int | None = getattr(text_config, "max_position_embeddings", None)
        self.vocab_size: int = self.model.get_output_embeddings().weight.shape[0]
        self._lock = threading.Lock()
        self._torch = torch

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        for value in (configured, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.append(value)
            elif isinstance(value, list | tuple):
                ids.extend(v for v in value if isinstance(v, int))
        # A family's chat template ends an assistant turn with its own token whatever eos says.
        for token in self.family.turn_end_tokens:
            turn_end = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(turn_end, int) and turn_end != self.tokenizer.unk_token_id:
                ids.append(turn_end)
        return list(dict.fromkeys(ids))

    # ---------------------------------------------------------------------------- public API

    def generate(
        self, requests: Sequence[GenerationRequest], *, seed: int | None = None
    ) -> list[list[Rollout]]:
        preset = self.policy_cfg.prompt_preset
        prompts = [ChatPrompt(chat_messages(r.prompt_for(preset), preset), [r.image]) for r in requests]
        seeds = [request_seed(seed, i, r) for i, r in enumerate(requests)]
        completions = self.complete(prompts, [r.n for r in requests], seeds=seeds)
        return [[parse_rollout(c.text) for c in per_request] for per_request in completions]

    def render(self, prompt: ChatPrompt) -> str:
        """The exact text fed to the model for ``prompt`` (chat template + generation prompt)."""
        return self.processor.apply_chat_template(
            prompt.messages, add_generation_prompt=True, tokenize=False
        )

    def complete(
        self,
        prompts: Sequence[ChatPrompt],
        ns: Sequence[int],
        *,
        sampling: SamplingConfig | None = None,
        seeds: Sequence[int | None] | None = None,
    ) -> list[list[Completion]]:
        """``ns[i]`` sampled completions of ``prompts[i]`` (texts keep step/answer tags); the
        ``j``-th sample of prompt ``i`` is drawn with :func:`row_seed` ``(seeds[i], j)``."""
        if len(prompts) != len(ns) or (seeds is not None and len(seeds) != len(prompts)):
            raise ValueError("one n (and one seed) per prompt")
        sampling = sampling or self.sampling
        seeds = [s if s is not None else int(self._torch.randint(0, 2**31 - 1, ()).item())
                 for s in (seeds or [None] * len(prompts))]
        texts = [self.render(p) for p in prompts]
        images = [[load_image(b) for b in p.images] for p in prompts]
        # Every sequence to sample, identical prompts adjacent; longest prompts first so a batch
        # holds prompts of similar length (less padding).
        rows = [i for i, n in enumerate(ns) for _ in range(n)]
        seeds_of_rows = [row_seed(seeds[i], j) for i, n in enumerate(ns) for j in range(n)]
        order = sorted(range(len(rows)), key=lambda r: -len(texts[rows[r]]))
        results: list[Completion | None] = [None] * len(rows)
        with self._lock:
            bs = self.policy_cfg.batch_size
            for start in range(0, len(order), bs):
                batch = order[start : start + bs]
                batch_texts = [texts[rows[r]] for r in batch]
                batch_images = [images[rows[r]] for r in batch]
                generated = self._generate_batch(batch_texts, batch_images, sampling,
                                                 [seeds_of_rows[r] for r in batch])
                for r, completion in zip(batch, generated):
                    results[r] = completion
        out: list[list[Completion]] = [[] for _ in prompts]
        for r, i in enumerate(rows):
            completion = results[r]
            assert completion is not None
            out[i].append(completion)
        return out

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------- internals

    def prepare_inputs(self, texts: list[str], images: list[list[Any]]) -> Any:
        """The processor's tensors for rendered ``texts`` and their decoded images (``images[i]``:
        those of ``texts[i]``), on the model's device (left-padded when several)."""
        inputs = self.processor(text=texts, images=per_text_images(images), padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def decode(self, ids: Sequence[int]) -> str:
        """Completion text of generated ``ids`` (EOS excluded): step/answer tags kept, other
        special tokens dropped."""
        return self.tokenizer.decode([t for t in ids if t not in self._drop_ids], skip_special_tokens=False)

    def _generate_batch(
        self, texts: list[str], images: list[list[Any]], sampling: SamplingConfig, seeds: list[int]
    ) -> list[Completion]:
        torch = self._torch
        if self.model is None:
            raise PolicyError("policy is closed")
        inputs = self.prepare_inputs(texts, images)
        prompt_len = inputs["input_ids"].shape[1]
        max_new = sampling.max_new_tokens
        if self.max_positions:
            room = self.max_positions - prompt_len
            if room <= 0:
                raise PolicyError(
                    f"prompt of {prompt_len} tokens leaves no room in the model's "
                    f"{self.max_positions} positions"
                )
            max_new = min(max_new, room)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
            "repetition_penalty": sampling.repetition_penalty,
        }
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if sampling.temperature > 0:
            kwargs["logits_processor"] = [SeededRowSampler(seeds, sampling, self.device)]
        try:
            with torch.inference_mode():
                sequences = self.model.generate(**inputs, **kwargs)
        except torch.OutOfMemoryError as exc:  # pragma: no cover - GPU only
            raise PolicyError(f"out of memory generating {len(texts)} sequences: {exc}") from exc
        except RuntimeError as exc:
            raise PolicyError(f"generation failed: {exc}") from exc
        attention = inputs["attention_mask"]
        completions = []
        for row, prompt_tokens in zip(sequences[:, prompt_len:].tolist(), attention.sum(1).tolist()):
            ids: list[int] = []
            finish = "length"
            for token in row:
                if token in self.eos_set:
                    finish = "stop"
                    break
                ids.append(token)
            completions.append(Completion(self.decode(ids), finish, len(ids) + (finish == "stop"), int(prompt_tokens)))
        return completions


def load_transformers_policy(model_dir: str | Path, *, policy: PolicyConfig, sampling: SamplingConfig,
                             capacity: int) -> TransformersPolicy:
    """The transformers backend as ``policy.engine`` asks: ``continuous`` (the continuous-batching
    engine), ``generate`` (``model.generate``, the reference) or ``auto`` (continuous where the
    checkpoint's family is one it drives, else generate)."""
    from mmprm_tasks.families import checkpoint_model_type
    from mmprm_tasks.policy.hf_engine import ContinuousTransformersPolicy, choose_engine

    if choose_engine(policy, checkpoint_model_type(model_dir)) == "generate":
        return TransformersPolicy(model_dir, policy=policy, sampling=sampling)
    return ContinuousTransformersPolicy(model_dir, policy=policy, sampling=sampling, capacity=capacity)


