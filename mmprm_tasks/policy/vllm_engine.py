"""The vllm backend: vLLM's async engine (``AsyncLLMEngine``, ``AsyncLLM`` in vLLM V1) on one or
more GPUs, in this process.

Issue 12: the search must keep the engine full without round barriers.  vLLM's async engine
batches continuously by itself: every request the search submits (:meth:`VLLMPolicy.submit`) is
added to the running engine at once as its own engine request, and its future resolves the moment
that request's ``n`` samples finish, while the rest keep decoding.  The engine runs on an asyncio
event loop in a thread of its own; the search's threads hand requests over with
``run_coroutine_threadsafe``.  ``capacity`` (the search's ``max_sequences_in_flight``) is the
engine's ``max_num_seqs``, so the search keeps exactly what the engine can schedule submitted.

vLLM is the ``gpu`` extra and is imported only when this backend is built.  The prompt is the
checkpoint's own chat template applied by its processor to the same messages the transformers
backend uses (``[{"type": "image"}, {"type": "text", ...}]``), so both backends see identical
text; the image travels as ``multi_modal_data``.  Every request samples with its own seed
(``SamplingParams(n=request.n, seed=...)``).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

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

T = TypeVar("T")


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


class EventLoopThread:
    """An asyncio event loop running in a daemon thread; :meth:`submit` schedules a coroutine on
    it from any thread and returns a ``concurrent.futures.Future`` (cancelling that future cancels
    the coroutine, which for vLLM aborts the engine request)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Awaitable[T]) -> "Future[T]":
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)  # type: ignore[arg-type]

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the loop's thread (objects that start tasks on the running loop
        must be built there) and return its result."""

        async def run() -> T:
            return function()

        return self.submit(run()).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=60)
        if not self._thread.is_alive():
            self.loop.close()


class VLLMPolicy:
    """Rollouts from a checkpoint directory through vLLM's async engine: a
    :class:`~mmprm_tasks.search.RolloutEngine` (``submit``) and a batch backend (``generate``)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        policy: PolicyConfig | None = None,
        sampling: SamplingConfig | None = None,
        capacity: int = 256,
        **engine_kwargs: Any,
    ) -> None:
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
            from vllm.sampling_params import RequestOutputKind
        except ImportError as exc:
            raise PolicyError(
                f"the vllm backend needs vLLM (pip install 'mmprm[gpu]'): {exc}"
            ) from exc
        from transformers import AutoProcessor

        self.policy_cfg = policy or PolicyConfig(backend="vllm", model=str(model_dir))
        self.sampling = sampling or SamplingConfig()
        self.model_dir = str(model_dir)
        self.capacity = capacity
        self._SamplingParams = SamplingParams
        self._final_only = RequestOutputKind.FINAL_ONLY
        self._ids = itertools.count()
        self.processor = AutoProcessor.from_pretrained(self.model_dir)
        kwargs: dict[str, Any] = {
            "model": self.model_dir,
            "tensor_parallel_size": self.policy_cfg.tensor_parallel_size,
            "gpu_memory_utilization": self.policy_cfg.gpu_memory_utilization,
            "dtype": self.policy_cfg.dtype,
            "limit_mm_per_prompt": {"image": 1},
            "max_num_seqs": capacity,
        }
        kwargs.update(engine_kwargs)
        self._loop = EventLoopThread("vllm-async-engine")
        try:
            self.engine = self._loop.call(lambda: AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs)))
        except Exception as exc:  # noqa: BLE001 - engine start-up failures are infrastructure
            self._loop.close()
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
            output_kind=self._final_only,  # one output per request, when all its samples finish
        )

    async def _rollouts(self, request: GenerationRequest, seed: int | None) -> list[Rollout]:
        prompt = {
            "prompt": self.render(request.prompt_for(self.policy_cfg.prompt_preset)),
            "multi_modal_data": {"image": load_image(request.image)},
        }
        final = None
        try:
            async for output in self.engine.generate(prompt, self.sampling_params(request.n, seed),
                                                     f"mmprm-{next(self._ids)}"):
                final = output
        except Exception as exc:  # noqa: BLE001 - an engine failure is infrastructure, never a label
            raise PolicyError(f"vLLM generation failed: {type(exc).__name__}: {exc}") from exc
        if final is None or not final.finished:
            raise PolicyError("vLLM ended a request without its final output")
        texts = [o.text for o in sorted(final.outputs, key=lambda o: o.index)]
        if len(texts) != request.n:
            raise PolicyError(f"vLLM returned {len(texts)} samples, asked for {request.n}")
        return [parse_rollout(t) for t in texts]

    def submit(self, request: GenerationRequest) -> "Future[list[Rollout]]":
        """Add one request to the running engine now; the future holds its ``n`` rollouts."""
        return self._submit(request, request_seed(None, 0, request))

    def _submit(self, request: GenerationRequest, seed: int | None) -> "Future[list[Rollout]]":
        if self.engine is None:
            raise PolicyError("policy is closed")
        return self._loop.submit(self._rollouts(request, seed))

    def generate(
        self, requests: Sequence[GenerationRequest], *, seed: int | None = None
    ) -> list[list[Rollout]]:
        futures = [self._submit(r, request_seed(seed, i, r)) for i, r in enumerate(requests)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is None:
            return
        try:
            shutdown = getattr(engine, "shutdown", None)
            if shutdown is not None:
                self._loop.call(shutdown)
        except Exception as exc:  # noqa: BLE001 - best effort at exit
            log.warning("vLLM engine shutdown: %s", exc)
        self._loop.close()
        del engine
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - best effort
            pass
