"""A small OpenAI-compatible chat-completions server for any transformers checkpoint.

It serves :class:`~mmprm_tasks.policy.hf.TransformersPolicy` over HTTP: ``POST
/v1/chat/completions`` (images as ``data:`` URLs, ``n`` samples, ``temperature``, ``top_p``,
``top_k``, ``repetition_penalty``, ``max_tokens``, ``seed``), ``GET /v1/models`` and ``GET
/health``.  It is the CPU serving option of the platform (``backend=openai`` pointed at it) and
the peer the openai backend is tested against.

Concurrent requests are batched continuously: on the continuous engine (the default,
:mod:`mmprm_tasks.policy.hf_engine`) each request joins the running batch as it arrives; on
``engine=generate`` a :class:`~mmprm_tasks.policy.batching.ContinuousBatcher` merges waiting
requests with the same sampling parameters into the next ``generate`` pass.  Each request samples from its own ``seed`` (or a random one), so a
seeded request's samples depend on the seed alone, whatever it was batched with.

Run: ``python -m mmprm_tasks.policy.server --model DIR --host 127.0.0.1 --port 8000``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import logging
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from mmprm_tasks.policy import PolicyError, load_image
from mmprm_tasks.policy.batching import ContinuousBatcher
from mmprm_tasks.policy.hf import ChatPrompt, Completion, TransformersPolicy, load_transformers_policy
from mmprm_tasks.settings import PolicyConfig, SamplingConfig

log = logging.getLogger(__name__)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]]
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    stream: bool = False


class BadRequest(ValueError):
    pass


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "code": status}}
    )


def decode_data_url(url: str) -> bytes:
    if not url.startswith("data:"):
        raise BadRequest("only data: URLs are accepted for images (this server fetches nothing)")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise BadRequest("image data URLs must be base64 encoded")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"bad base64 image: {exc}") from exc


def to_chat_prompt(messages: Sequence[dict[str, Any]]) -> ChatPrompt:
    """OpenAI chat messages -> transformers messages (``{"type": "image"}`` parts) + images."""
    out: list[dict[str, Any]] = []
    images: list[bytes] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role not in ("system", "user", "assistant"):
            raise BadRequest(f"unsupported role {role!r}")
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise BadRequest("message content must be a string or a list of parts")
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str):
                    raise BadRequest("image_url part without a url")
                images.append(decode_data_url(url))
                parts.append({"type": "image"})
            else:
                raise BadRequest(f"unsupported content part type {kind!r}")
        out.append({"role": role, "content": parts})
    if not out:
        raise BadRequest("messages is empty")
    return ChatPrompt(out, images)


@dataclass(frozen=True)
class _Job:
    prompt: ChatPrompt
    n: int
    sampling: SamplingConfig
    seed: int | None


def _batcher(policy: TransformersPolicy, max_sequences: int) -> ContinuousBatcher[_Job]:
    def run(jobs: list[_Job]) -> list[list[Completion]]:
        return policy.complete([j.prompt for j in jobs], [j.n for j in jobs], sampling=jobs[0].sampling,
                               seeds=[j.seed for j in jobs])

    return ContinuousBatcher(run, max_sequences, name="policy-server")


def _submitter(policy: TransformersPolicy, max_sequences: int) -> Any:
    """How a request reaches the model: straight into the continuous engine (its running batch
    takes requests of any sampling parameters as they come), or through a batcher in front of
    ``generate`` (batches of requests with equal sampling parameters)."""
    submit_prompt = getattr(policy, "submit_prompt", None)
    if submit_prompt is not None:
        return None, lambda job: submit_prompt(job.prompt, job.n, sampling=job.sampling, seed=job.seed)
    batcher = _batcher(policy, max_sequences)
    return batcher, lambda job: batcher.submit(job, sequences=job.n, key=job.sampling.model_dump_json())


def create_app(
    policy: TransformersPolicy,
    *,
    served_model_name: str | None = None,
    max_batch_sequences: int | None = None,
    max_n: int = 256,
) -> FastAPI:
    """The FastAPI app serving ``policy`` under ``served_model_name`` (default: its model dir)."""
    name = served_model_name or policy.model_dir
    # Clients may name the model by its served name or by the checkpoint path (relative or not).
    aliases = {name, policy.model_dir, str(Path(policy.model_dir).resolve())}
    batcher, submit = _submitter(policy, max_batch_sequences or max(policy.policy_cfg.batch_size, 1))
    defaults = policy.sampling
    app = FastAPI(title="mmprm policy server")
    app.state.batcher = batcher
    app.state.served_model_name = name

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, str(exc.errors()))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "mmprm"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        if body.model not in aliases:
            return _error(404, f"The model `{body.model}` does not exist.", "NotFoundError")
        if body.stream:
            return _error(400, "streaming is not supported by this server")
        if not 1 <= body.n <= max_n:
            return _error(400, f"n must be between 1 and {max_n}")
        max_tokens = body.max_completion_tokens or body.max_tokens or defaults.max_new_tokens
        top_k = body.top_k if body.top_k is not None else 0
        try:
            sampling = SamplingConfig(
                temperature=body.temperature if body.temperature is not None else 1.0,
                top_p=body.top_p if body.top_p is not None else 1.0,
                top_k=0 if top_k < 0 else top_k,
                repetition_penalty=(
                    body.repetition_penalty if body.repetition_penalty is not None else 1.0
                ),
                max_new_tokens=max_tokens,
            )
            prompt = to_chat_prompt(body.messages)
            for image in prompt.images:
                load_image(image)  # a bad image is the client's fault: 400, not 500
        except (BadRequest, ValueError) as exc:
            return _error(400, str(exc))
        try:
            future = submit(_Job(prompt, body.n, sampling, body.seed))
            completions: list[Completion] = await asyncio.wrap_future(future)
        except PolicyError as exc:
            return _error(500, str(exc), "InternalServerError")
        except ValueError as exc:
            return _error(400, str(exc))
        except Exception as exc:  # noqa: BLE001
            log.exception("generation failed")
            return _error(500, f"{type(exc).__name__}: {exc}", "InternalServerError")
        prompt_tokens = completions[0].prompt_tokens if completions else 0
        completion_tokens = sum(c.completion_tokens for c in completions)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(completions)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    return app


class RunningServer:
    """A server running in a background thread of this process (tests, embedded runs)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host = host
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What OpenAI clients take as ``base_url`` (``.../v1``)."""
        return self.url + "/v1"

    def start(self, timeout_s: float = 30.0) -> "RunningServer":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"policy server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        batcher = getattr(self.app.state, "batcher", None)
        if batcher is not None:
            batcher.close()
        self._sock.close()

    def __enter__(self) -> "RunningServer":
        return self.start() if not self._thread.is_alive() else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    model: str | Path | TransformersPolicy,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    served_model_name: str | None = None,
    policy_cfg: PolicyConfig | None = None,
    sampling: SamplingConfig | None = None,
) -> RunningServer:
    """Serve ``model`` (a checkpoint dir or a loaded policy) in a thread; ``port=0`` picks one."""
    policy = model if isinstance(model, TransformersPolicy) else _load(model, policy_cfg, sampling)
    app = create_app(policy, served_model_name=served_model_name)
    return RunningServer(app, host, port).start()


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    served_model_name: str | None = None,
    policy_cfg: PolicyConfig | None = None,
    sampling: SamplingConfig | None = None,
) -> None:
    """Serve ``model_dir`` until interrupted (blocking; uvicorn handles SIGINT/SIGTERM)."""
    import uvicorn

    policy = _load(model_dir, policy_cfg, sampling)
    app = create_app(policy, served_model_name=served_model_name)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", lifespan="off")
    finally:
        if app.state.batcher is not None:
            app.state.batcher.close()
        policy.close()


def _load(model_dir: str | Path, policy_cfg: PolicyConfig | None, sampling: SamplingConfig | None) -> TransformersPolicy:
    cfg = policy_cfg or PolicyConfig(model=str(model_dir))
    return load_transformers_policy(model_dir, policy=cfg, sampling=sampling or SamplingConfig(),
                                    capacity=cfg.batch_size)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=64, help="rows decoded at once")
    parser.add_argument("--engine", default="auto", choices=["auto", "continuous", "generate"])
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the modelling code shipped inside the checkpoint folder (auto_map)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    serve(
        args.model,
        args.host,
        args.port,
        served_model_name=args.served_model_name,
        policy_cfg=PolicyConfig(
            model=args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size, engine=args.engine,
            trust_remote_code=args.trust_remote_code,
        ),
    )


if __name__ == "__main__":
    main()
