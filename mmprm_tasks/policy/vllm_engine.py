"""The vllm backend: vLLM's offline ``LLM`` engine on one or more GPUs.

vLLM is the ``gpu`` extra and is imported only when this backend is built.  The prompt is the
checkpoint's own chat template applied by its processor to the same messages the transformers
backend uses (``[{"type": "image"}, {"type": "text", ...}]``), so both backends see identical
text; the image travels as ``multi_modal_data``.  Every request gets its own
``SamplingParams(n=request.n, seed=...)``, all requests go to the engine in one ``generate``
call, and vLLM schedules them together.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmprm_tasks.policy import (
    GenerationRequest,
    PolicyError,
    chat_messages,
    load_image,
    request_seed,
)
from mmprm_tasks.rollouts import Rollout, parse_rollout
from mmprm_tasks.settings import PolicyConfig, SamplingConfig

log = logging.getLogger(__name__)


def vllm_available() -> tuple[bool, str]:
    """Whether vLLM and a CUDA device are usable here, and why not."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken install
        return False, f"vllm is not importable ({type(exc).__name__}: {exc})"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "vllm is installed but no CUDA device is available"
    except Exception as exc:  # noqa: BLE001
        return False, f"torch CUDA check failed: {exc}"
    return True, ""


class VLLMPolicy:
    """Rollouts from a checkpoint directory through ``vllm.LLM``."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        policy: PolicyConfig | None = None,
        sampling: SamplingConfig | None = None,
        **engine_kwargs: Any,
    ) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise PolicyError(
                f"the vllm backend needs vLLM (pip install 'mmprm[gpu]'): {exc}"
            ) from exc
        from transformers import AutoProcessor

        self.policy_cfg = policy or PolicyConfig(backend="vllm", model=str(model_dir))
        self.sampling = sampling or SamplingConfig()
        self.model_dir = str(model_dir)
        self._SamplingParams = SamplingParams
        self.processor = AutoProcessor.from_pretrained(self.model_dir)
        kwargs: dict[str, Any] = {
            "model": self.model_dir,
            "tensor_parallel_size": self.policy_cfg.tensor_parallel_size,
            "gpu_memory_utilization": self.policy_cfg.gpu_memory_utilization,
            "dtype": self.policy_cfg.dtype,
            "limit_mm_per_prompt": {"image": 1},
        }
        kwargs.update(engine_kwargs)
        try:
            self.llm = LLM(**kwargs)
        except Exception as exc:  # noqa: BLE001 - engine start-up failures are infrastructure
            raise PolicyError(f"vLLM could not start on {self.model_dir}: {exc}") from exc

    def render(self, prompt: str) -> str:
        return self.processor.apply_chat_template(
            chat_messages(prompt, self.policy_cfg.prompt_preset), add_generation_prompt=True, tokenize=False
        )

    def sampling_params(self, n: int, seed: int | None) -> Any:
        s = self.sampling
        greedy = s.temperature == 0
        return self._SamplingParams(
            n=n,
            temperature=s.temperature,
            top_k=-1 if greedy or s.top_k <= 0 else s.top_k,
            top_p=1.0 if greedy else s.top_p,
            repetition_penalty=s.repetition_penalty,
            max_tokens=s.max_new_tokens,
            seed=seed,
        )

    def generate(
        self, requests: Sequence[GenerationRequest], *, seed: int | None = None
    ) -> list[list[Rollout]]:
        if self.llm is None:
            raise PolicyError("policy is closed")
        if not requests:
            return []
        prompts = [
            {"prompt": self.render(r.prompt_for(self.policy_cfg.prompt_preset)),
             "multi_modal_data": {"image": load_image(r.image)}}
            for r in requests
        ]
        params = [self.sampling_params(r.n, request_seed(seed, i, r)) for i, r in enumerate(requests)]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001
            raise PolicyError(f"vLLM generation failed: {exc}") from exc
        result: list[list[Rollout]] = []
        for request, output in zip(requests, outputs):
            texts = [o.text for o in sorted(output.outputs, key=lambda o: o.index)]
            if len(texts) != request.n:
                raise PolicyError(f"vLLM returned {len(texts)} samples, asked for {request.n}")
            result.append([parse_rollout(t) for t in texts])
        return result

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - best effort
            pass
