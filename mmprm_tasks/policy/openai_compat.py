"""The openai backend: any OpenAI-compatible chat-completions server.

``vllm serve``, SGLang, or :mod:`mmprm_tasks.policy.server`.  Each request becomes one ``POST
{base_url}/chat/completions`` with the image as a base64 ``data:`` URL and ``n`` samples;
requests of one :meth:`OpenAIChatPolicy.generate` call run concurrently (a thread pool over one
pooled ``httpx.Client``), so the server can batch them.  ``top_k`` and ``repetition_penalty``
travel as extra body fields, as vLLM and SGLang accept them.

Connection errors, timeouts, 429 and 5xx are retried with exponential back-off
(``policy.max_retries`` times); then :class:`~mmprm_tasks.policy.PolicyError` names the request.
Other 4xx answers are not retried (the request itself is wrong).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx

from mmprm_tasks.policy import (
    GenerationRequest,
    PolicyError,
    openai_messages,
    request_seed,
)
from mmprm_tasks.rollouts import Rollout, parse_rollout
from mmprm_tasks.settings import PolicyConfig, SamplingConfig

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429} | set(range(500, 600))


class OpenAIChatPolicy:
    """Rollouts from ``{base_url}/chat/completions`` serving ``model``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        policy: PolicyConfig | None = None,
        sampling: SamplingConfig | None = None,
        max_concurrency: int = 64,
        capacity: int = 256,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.capacity = capacity  # sequences the search keeps in flight (the server batches them)
        self.model = model
        self.policy_cfg = policy or PolicyConfig(backend="openai", model=model, base_url=base_url)
        self.sampling = sampling or SamplingConfig()
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        headers = {}
        if self.policy_cfg.api_key is not None:
            headers["Authorization"] = f"Bearer {self.policy_cfg.api_key.get_secret_value()}"
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.policy_cfg.request_timeout_s, connect=10.0),
            headers=headers,
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="openai-policy")
        self._closed = threading.Event()

    def body(self, request: GenerationRequest, seed: int | None = None) -> dict[str, Any]:
        """The chat-completions body for one request."""
        s = self.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "messages": openai_messages(request.prompt_for(self.policy_cfg.prompt_preset), request.image,
                                        self.policy_cfg.prompt_preset),
            "n": request.n,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_new_tokens,
            # Extra sampling fields (vLLM / SGLang): -1 disables top-k there.
            "top_k": s.top_k if s.top_k > 0 else -1,
            "repetition_penalty": s.repetition_penalty,
        }
        if seed is not None:
            body["seed"] = seed
        return body

    def generate(
        self, requests: Sequence[GenerationRequest], *, seed: int | None = None
    ) -> list[list[Rollout]]:
        if self._closed.is_set():
            raise PolicyError("policy client is closed")
        futures = [
            self._executor.submit(self._complete, i, r, request_seed(seed, i, r))
            for i, r in enumerate(requests)
        ]
        out: list[list[Rollout]] = []
        try:
            for future in futures:
                out.append([parse_rollout(text) for text in future.result()])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return out

    def submit(self, request: GenerationRequest) -> Future:
        """Send one request now; the future holds its ``n`` rollouts.  Concurrent requests are
        batched by the server itself (vLLM / SGLang continuous batching): the search's
        :class:`~mmprm_tasks.search.RolloutEngine`."""
        if self._closed.is_set():
            raise PolicyError("policy client is closed")
        seed = request_seed(None, 0, request)
        return self._executor.submit(lambda: [parse_rollout(t) for t in self._complete(0, request, seed)])

    def _complete(self, index: int, request: GenerationRequest, seed: int | None) -> list[str]:
        body = self.body(request, seed)
        url = f"{self.base_url}/chat/completions"
        tries = self.policy_cfg.max_retries + 1
        last = ""
        for attempt in range(tries):
            if attempt:
                delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
                if self._closed.wait(delay):
                    break
            try:
                response = self._client.post(url, json=body)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                log.warning("policy request %d attempt %d: %s", index, attempt + 1, last)
                continue
            if response.status_code in RETRY_STATUS:
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                log.warning("policy request %d attempt %d: %s", index, attempt + 1, last)
                continue
            if response.status_code != 200:
                raise PolicyError(
                    f"{self._describe(index, request)} rejected by {url}: "
                    f"HTTP {response.status_code}: {response.text[:500]}"
                )
            return self._texts(index, request, response)
        raise PolicyError(
            f"{self._describe(index, request)} failed after {tries} tries at {url}: {last}"
        )

    def _texts(self, index: int, request: GenerationRequest, response: httpx.Response) -> list[str]:
        try:
            choices = response.json()["choices"]
            ordered = sorted(choices, key=lambda c: c.get("index", 0))
            texts = [(c.get("message") or {}).get("content") or "" for c in ordered]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PolicyError(
                f"{self._describe(index, request)}: malformed response {response.text[:300]!r}"
            ) from exc
        if len(texts) != request.n:
            raise PolicyError(
                f"{self._describe(index, request)}: asked for n={request.n}, got {len(texts)} choices"
            )
        return texts

    @staticmethod
    def _describe(index: int, request: GenerationRequest) -> str:
        question = request.question if len(request.question) <= 60 else request.question[:57] + "..."
        return (
            f"policy request {index} (question {question!r}, {len(request.prefix_steps)} prefix "
            f"steps, n={request.n})"
        )

    def close(self) -> None:
        self._closed.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def __enter__(self) -> "OpenAIChatPolicy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
