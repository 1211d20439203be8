"""Policy backends: a vision-language model that writes tagged rollouts (SPEC §2).

Every backend answers the same call: ``generate(requests, seed=...)`` returns, for each
:class:`GenerationRequest`, exactly ``request.n`` rollouts (``parse_rollout`` of a completion; a
completion without tags is an empty rollout), in request order.  One call carries many prompts so
the search can batch the Monte Carlo estimates of many trees into one engine call.

Backends (``settings.policy.backend``):

* ``transformers`` — any ``AutoModelForImageTextToText`` checkpoint on CPU or GPU:
  :class:`~mmprm_tasks.policy.hf_engine.ContinuousTransformersPolicy` (a continuous-batching
  engine of its own; requests join the running batch as they come) or, with
  ``policy.engine = "generate"``, :class:`~mmprm_tasks.policy.hf.TransformersPolicy`
  (``model.generate`` on fixed batches, the reference);
* ``vllm`` — :class:`~mmprm_tasks.policy.vllm_engine.VLLMPolicy`, vLLM's async engine in this process (GPU;
  requests join the running batch as they come);
* ``openai`` — :class:`~mmprm_tasks.policy.openai_compat.OpenAIChatPolicy`, any
  OpenAI-compatible chat-completions server (``vllm serve``, SGLang, or
  :mod:`mmprm_tasks.policy.server`).

Failures of the machinery (a server down, a CUDA error) raise :class:`PolicyError`; they are never
turned into empty or wrong rollouts.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mmprm_tasks.rollouts import IMAGE_PLACEHOLDER, Rollout, build_prompt, prompt_preset
from mmprm_tasks.settings import ConfigurationError

if TYPE_CHECKING:
    from mmprm_tasks.settings import Settings


class PolicyError(RuntimeError):
    """The policy could not produce rollouts (infrastructure failure). Never a label."""


class PolicyConfigError(PolicyError, ConfigurationError):
    """The policy as configured cannot exist (e.g. no checkpoint at the path): not retried."""


@dataclass(frozen=True)
class GenerationRequest:
    """Sample ``n`` continuations of ``prefix_steps`` for ``question`` about ``image``.

    ``image`` holds the encoded image file (PNG/JPEG bytes), not pixels.  ``seed``, when set, is
    the request's own: its rollouts depend only on the request, not on what else shares the
    engine call (the search derives it from the run's seed, the problem and the node), so
    annotation is reproducible whatever the batching, chunking or work stealing.  Without it a
    backend derives one from the call's seed and the request's position.
    """

    question: str
    image: bytes
    prefix_steps: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not isinstance(self.prefix_steps, tuple):
            object.__setattr__(self, "prefix_steps", tuple(self.prefix_steps))

    @property
    def prompt(self) -> str:
        """The user text (SPEC §2 prompt, the ``platform`` preset)."""
        return build_prompt(self.question, self.prefix_steps)

    def prompt_for(self, preset: str) -> str:
        """The user text under a prompt preset (:data:`mmprm_tasks.rollouts.PROMPT_PRESETS`)."""
        return build_prompt(self.question, self.prefix_steps, preset)


@runtime_checkable
class PolicyBackend(Protocol):
    def generate(
        self, requests: Sequence[GenerationRequest], *, seed: int | None = None
    ) -> list[list[Rollout]]:
        """``request.n`` rollouts per request, in request order."""
        ...

    def close(self) -> None: ...


def chat_messages(prompt: str, preset: str = "platform") -> list[dict[str, Any]]:
    """The transformers chat messages of one rollout prompt (the format the policy is trained
    on): the preset's system message if any, then the user turn; the image is an image part
    before the text, unless the preset writes its placeholder into the text (the processor
    expands ``<image>`` there, as the release's engine does)."""
    layout = prompt_preset(preset)
    messages: list[dict[str, Any]] = []
    if layout.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": layout.system}]})
    parts = [] if layout.image_in_text else [{"type": "image"}]
    messages.append({"role": "user", "content": [*parts, {"type": "text", "text": prompt}]})
    return messages


def openai_messages(prompt: str, image: bytes, preset: str = "platform") -> list[dict[str, Any]]:
    """The chat-completions messages of one rollout prompt: the image always travels as an
    ``image_url`` part before the text, where the server's chat template puts its placeholder
    (InternVL's: ``<image>\n``), so a preset's own leading placeholder is left out of the text."""
    layout = prompt_preset(preset)
    if layout.image_in_text and prompt.startswith(IMAGE_PLACEHOLDER):
        prompt = prompt[len(IMAGE_PLACEHOLDER):]
    messages: list[dict[str, Any]] = []
    if layout.system:
        messages.append({"role": "system", "content": layout.system})
    messages.append({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(image)}}, {"type": "text", "text": prompt}]})
    return messages


def image_mime(data: bytes) -> str:
    """MIME type of an encoded image, sniffed from its magic bytes (PNG when unknown)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"GIF8"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM"):
        return "image/bmp"
    return "image/png"


def image_data_url(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def request_seed(seed: int | None, index: int, request: GenerationRequest | None = None) -> int | None:
    """The seed a backend samples ``request`` with: the request's own when it has one, else one
    derived from the call's seed and the request's position (stable, independent across requests)."""
    if request is not None and request.seed is not None:
        return request.seed
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def load_image(data: bytes) -> Any:
    """Decode image bytes to an RGB PIL image (a bad image is the caller's error: ValueError)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a decodable image ({len(data)} bytes): {exc}") from exc
    return image.convert("RGB")


def resolve_model_path(model: str, settings: Settings | None = None) -> str:
    """A local directory for ``model``: a path, ``file://`` URI, or ``s3://bucket/prefix``.

    Object-store checkpoints are copied once into ``<home>/models/<hash>``.
    """
    if model.startswith("file://"):
        return model[len("file://") :]
    if model.startswith("s3://"):
        if settings is None:
            raise ValueError(f"resolving {model} needs settings (object store credentials)")
        from pathlib import Path

        from mmprm_tasks.storage import open_uri

        local = Path(settings.home) / "models" / hashlib.sha256(model.encode()).hexdigest()[:16]
        if not (local / "config.json").exists():
            import os
            import shutil

            store, key = open_uri(model, settings)
            partial = local.with_name(f"{local.name}.part-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            store.get_dir(key, partial)
            try:
                partial.rename(local)  # atomic: a half-downloaded copy is never used
            except OSError:
                if not (local / "config.json").exists():
                    raise
                shutil.rmtree(partial, ignore_errors=True)  # another process won the race
        return str(local)
    return model


def load_policy(settings: Settings) -> PolicyBackend:
    """The backend named by ``settings.policy.backend``, sampling with ``settings.sampling``."""
    cfg = settings.policy
    if cfg.backend == "transformers":
        from mmprm_tasks.policy.hf import load_transformers_policy
        from mmprm_tasks.threads import apply_torch_threads

        apply_torch_threads(settings.torch_threads, "policy")

        return load_transformers_policy(resolve_model_path(cfg.model, settings), policy=cfg,
                                        sampling=settings.sampling, capacity=settings.search.max_sequences_in_flight)
    if cfg.backend == "vllm":
        from mmprm_tasks.policy.vllm_engine import VLLMPolicy

        return VLLMPolicy(
            resolve_model_path(cfg.model, settings), policy=cfg, sampling=settings.sampling,
            capacity=settings.search.max_sequences_in_flight,
        )
    if cfg.backend == "openai":
        from mmprm_tasks.policy.openai_compat import OpenAIChatPolicy

        if not cfg.base_url:
            raise ValueError("policy.backend=openai needs policy.base_url")
        return OpenAIChatPolicy(
            cfg.base_url, cfg.model, policy=cfg, sampling=settings.sampling,
            capacity=settings.search.max_sequences_in_flight,
        )
    raise ValueError(f"unknown policy backend {cfg.backend!r}")


__all__ = [
    "GenerationRequest",
    "PolicyBackend",
    "PolicyError",
    "Rollout",
    "chat_messages",
    "image_data_url",
    "load_policy",
]
