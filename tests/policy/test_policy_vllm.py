"""The vllm backend: runs only where vLLM and a CUDA device are present (skipped visibly here)."""

from __future__ import annotations

import pytest

from mmprm_tasks.policy import GenerationRequest, PolicyError
from mmprm_tasks.policy.vllm_engine import vllm_available
from mmprm_tasks.settings import PolicyConfig, SamplingConfig

AVAILABLE, WHY_NOT = vllm_available()


def test_without_vllm_the_backend_says_why():
    if AVAILABLE:
        pytest.skip("vllm is installed here")
    from mmprm_tasks.policy.vllm_engine import VLLMPolicy

    with pytest.raises(PolicyError, match="vLLM"):
        VLLMPolicy("/nonexistent")


@pytest.mark.gpu
@pytest.mark.skipif(not AVAILABLE, reason=WHY_NOT or "vllm unavailable")
def test_vllm_generates_n_rollouts_per_request(policy_dir, images):
    from mmprm_tasks.policy.vllm_engine import VLLMPolicy

    policy = VLLMPolicy(policy_dir, policy=PolicyConfig(backend="vllm", gpu_memory_utilization=0.3),
                        sampling=SamplingConfig(max_new_tokens=64), enforce_eager=True)
    try:
        requests = [GenerationRequest("What is the sum?", images[0], n=3),
                    GenerationRequest("What is it?", images[1], ("Read 5.",), n=2)]
        out = policy.generate(requests, seed=4)
        assert [len(r) for r in out] == [3, 2]
        assert policy.generate(requests, seed=4) == out
    finally:
        policy.close()


@pytest.mark.gpu
@pytest.mark.skipif(not AVAILABLE, reason=WHY_NOT or "vllm unavailable")
def test_vllm_async_engine_takes_requests_one_at_a_time(policy_dir, images):
    """The search's RolloutEngine protocol: each submit is its own engine request, futures
    resolve independently, and a request's own seed fixes its samples whatever else is in flight."""
    from mmprm_tasks.policy.vllm_engine import VLLMPolicy
    from mmprm_tasks.search import is_rollout_engine

    policy = VLLMPolicy(policy_dir, policy=PolicyConfig(backend="vllm", gpu_memory_utilization=0.3),
                        sampling=SamplingConfig(max_new_tokens=64), capacity=32, enforce_eager=True)
    try:
        assert is_rollout_engine(policy) and policy.capacity == 32
        requests = [GenerationRequest(f"What is the sum? ({i})", images[i % 2], n=4, seed=100 + i) for i in range(12)]
        futures = [policy.submit(r) for r in requests]
        together = [f.result(timeout=300) for f in futures]
        assert all(len(r) == 4 for r in together)
        alone = policy.submit(requests[5]).result(timeout=300)
        assert alone == together[5]
    finally:
        policy.close()
