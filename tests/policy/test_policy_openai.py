"""The openai backend end to end against the real policy server on loopback, and its failures
against real HTTP peers that answer 500/503/400."""

from __future__ import annotations

import base64
import socket
import threading
import time

import httpx
import pytest

from helpers import PolicyServerProcess
from mmprm_tasks.policy import GenerationRequest, PolicyError, chat_messages, load_policy
from mmprm_tasks.policy.hf import ChatPrompt, TransformersPolicy
from mmprm_tasks.policy.openai_compat import OpenAIChatPolicy
from mmprm_tasks.policy.server import start_server
from mmprm_tasks.rollouts import parse_rollout
from mmprm_tasks.settings import PolicyConfig, SamplingConfig, Settings

SAMPLING = SamplingConfig(max_new_tokens=16)
NAME = "toy-policy"


@pytest.fixture(scope="module")
def served(random_policy_dir):
    """The real server on a free loopback port, serving a real tiny LLaVA."""
    policy = TransformersPolicy(random_policy_dir, policy=PolicyConfig(batch_size=64), sampling=SAMPLING)
    server = start_server(policy, served_model_name=NAME)
    yield server, policy
    server.stop()


def client(base_url: str, sampling: SamplingConfig = SAMPLING, **kw) -> OpenAIChatPolicy:
    cfg = PolicyConfig(backend="openai", model=NAME, base_url=base_url,
                       max_retries=kw.pop("max_retries", 2), request_timeout_s=60)
    return OpenAIChatPolicy(base_url, NAME, policy=cfg, sampling=sampling, backoff_s=0.01, **kw)


def reqs(images) -> list[GenerationRequest]:
    return [GenerationRequest("What is the sum?", images[0], (), 3),
            GenerationRequest("What is the product?", images[1], ("Read 5, 1, 2.",), 2),
            GenerationRequest("Is it odd?", images[2], (), 1)]


def test_health_and_models(served):
    server, _ = served
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = httpx.get(server.base_url + "/models").json()
    assert [m["id"] for m in models["data"]] == [NAME]


def test_generate_over_http(served, images):
    server, _ = served
    with client(server.base_url) as backend:
        out = backend.generate(reqs(images), seed=11)
        assert [len(r) for r in out] == [3, 2, 1]
        assert backend.generate(reqs(images), seed=11) == out
        assert backend.generate([], seed=1) == []


def test_server_rebuilds_the_exact_prompt(served, images):
    """Seeded samples over HTTP (base64 PNG in a data URL, chat messages) equal the in-process
    samples of the same messages with the same seed: the server rebuilds the same prompt text and
    the same pixels.  (The same seed on another image gives other samples, so this is not luck.)"""
    server, policy = served
    backend = client(server.base_url)

    def over_http(request, seed):
        body = backend.body(request, seed=seed)
        response = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    def in_process(request, seed):
        prompt = ChatPrompt(chat_messages(request.prompt), [request.image])
        return policy.complete([prompt], [request.n], sampling=SAMPLING, seeds=[seed])[0]

    for request in reqs(images):
        body = backend.body(request, seed=21)
        url = body["messages"][0]["content"][0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1]) == request.image
        assert body["messages"][0]["content"][1] == {"type": "text", "text": request.prompt}
        payload = over_http(request, 21)
        local = in_process(request, 21)
        assert [c["message"]["content"] for c in payload["choices"]] == [c.text for c in local]
        assert [c["index"] for c in payload["choices"]] == list(range(request.n))
        assert payload["usage"]["prompt_tokens"] == local[0].prompt_tokens
    request = reqs(images)[0]
    other_image = GenerationRequest(request.question, images[1], request.prefix_steps, request.n)
    assert [c.text for c in in_process(other_image, 21)] != [c.text for c in in_process(request, 21)]
    greedy = backend.body(request)
    greedy.update(temperature=0.0, top_k=-1)
    assert httpx.post(server.base_url + "/chat/completions", json=greedy, timeout=60).status_code == 200
    backend.close()


def test_seeded_requests_over_http_are_reproducible(served, images):
    server, _ = served
    backend = client(server.base_url)
    body = backend.body(reqs(images)[0], seed=5)
    first = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60).json()
    again = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60).json()
    other = httpx.post(server.base_url + "/chat/completions",
                       json={**body, "seed": 6}, timeout=60).json()
    texts = lambda p: [c["message"]["content"] for c in p["choices"]]  # noqa: E731
    assert texts(first) == texts(again) != texts(other)
    backend.close()


def test_concurrent_requests_are_batched_by_the_server(served, images):
    server, _ = served
    batcher = server.app.state.batcher
    before = batcher.batches
    many = [GenerationRequest(f"Question {i}?", images[i % 3], n=2) for i in range(8)]
    with client(server.base_url, max_concurrency=8) as backend:
        out = backend.generate(many)  # unseeded: the server may merge them
    assert [len(r) for r in out] == [2] * 8
    assert batcher.batches - before < len(many)


def test_server_rejects_bad_requests(served, images):
    server, _ = served
    body = client(server.base_url).body(reqs(images)[0])
    post = lambda b: httpx.post(server.base_url + "/chat/completions", json=b, timeout=60)  # noqa: E731
    assert post({**body, "model": "other"}).status_code == 404
    bad_image = {**body, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
        {"type": "text", "text": "hi"}]}]}
    response = post(bad_image)
    assert response.status_code == 400 and "image" in response.json()["error"]["message"]
    remote = {**body, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}]}
    assert post(remote).status_code == 400
    assert post({**body, "n": 0}).status_code == 400
    assert post({"messages": []}).status_code == 400


def test_wrong_model_name_is_not_retried(served, images):
    server, _ = served
    backend = OpenAIChatPolicy(server.base_url, "no-such-model", sampling=SAMPLING, backoff_s=0.01)
    with pytest.raises(PolicyError, match="HTTP 404"):
        backend.generate(reqs(images)[:1])
    backend.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_raises_policy_error_after_retries(images):
    backend = client(f"http://127.0.0.1:{_free_port()}/v1", max_retries=2)
    started = time.monotonic()
    with pytest.raises(PolicyError) as info:
        backend.generate(reqs(images)[1:2])
    message = str(info.value)
    assert "policy request 0" in message and "'What is the product?'" in message
    assert "after 3 tries" in message and "ConnectError" in message
    assert time.monotonic() - started < 10
    backend.close()


def test_500_endpoint_raises_policy_error_after_retries(http_peer, images):
    peer = http_peer(lambda path, body: (500, {"error": {"message": "engine died"}}))
    backend = client(peer.base_url, max_retries=3)
    with pytest.raises(PolicyError, match=r"after 4 tries.*HTTP 500.*engine died"):
        backend.generate(reqs(images)[:1])
    assert len(peer.requests) == 4
    assert all(path == "/v1/chat/completions" for path, _ in peer.requests)
    backend.close()


def test_transient_503_is_retried_then_succeeds(http_peer, images):
    lock = threading.Lock()
    hits = {"n": 0}

    def flaky(path, body):
        with lock:
            hits["n"] += 1
            first = hits["n"] == 1
        if first:
            return 503, {"error": {"message": "warming up"}}
        text = "<step>Read the numbers.</step><answer>The final answer is 7</answer><|im_end|>"
        return 200, {"choices": [{"index": i, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"} for i in range(body["n"])]}

    peer = http_peer(flaky)
    backend = client(peer.base_url, max_retries=2)
    out = backend.generate(reqs(images)[:1], seed=3)
    assert out == [[["Read the numbers.", "The final answer is 7"]] * 3]
    assert len(peer.requests) == 2
    sent = peer.requests[-1][1]
    assert sent["n"] == 3 and sent["seed"] == peer.requests[0][1]["seed"]
    assert sent["top_k"] == SAMPLING.top_k and sent["repetition_penalty"] == SAMPLING.repetition_penalty
    assert sent["max_tokens"] == SAMPLING.max_new_tokens and sent["model"] == NAME
    backend.close()


def test_short_or_malformed_answers_are_errors(http_peer, images):
    peer = http_peer(lambda path, body: (200, {"choices": [
        {"index": 0, "message": {"role": "assistant", "content": "<answer>1</answer>"}}]}))
    backend = client(peer.base_url)
    with pytest.raises(PolicyError, match="asked for n=3, got 1"):
        backend.generate(reqs(images)[:1])
    backend.close()
    peer = http_peer(lambda path, body: (400, {"error": {"message": "max_tokens too large"}}))
    backend = client(peer.base_url, max_retries=3)
    with pytest.raises(PolicyError, match="HTTP 400.*max_tokens too large"):
        backend.generate(reqs(images)[:1])
    assert len(peer.requests) == 1  # a rejected request is not retried
    backend.close()


def test_load_policy_openai(served, images):
    server, _ = served
    settings = Settings(policy=PolicyConfig(backend="openai", model=NAME, base_url=server.base_url),
                        sampling=SAMPLING)
    backend = load_policy(settings)
    assert isinstance(backend, OpenAIChatPolicy)
    out = backend.generate([GenerationRequest("q?", images[0], n=2)], seed=0)
    assert len(out) == 1 and len(out[0]) == 2
    assert all(r == parse_rollout("") or isinstance(r, list) for r in out[0])
    backend.close()


def test_serve_cli_in_a_subprocess(random_policy_dir, images):
    """``python -m mmprm_tasks.policy.server`` serves until SIGTERM; the model may be named by
    its path."""
    import signal

    with PolicyServerProcess(random_policy_dir, "--batch-size", "8") as server:
        backend = OpenAIChatPolicy(server.base_url + "/v1", str(random_policy_dir), sampling=SAMPLING)
        out = backend.generate([GenerationRequest("q?", images[0], n=2)], seed=1)
        assert len(out[0]) == 2
        backend.close()
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit -15).
    assert server.returncode in (0, -signal.SIGTERM), server.output
    assert "Finished server process" in server.output, server.output
