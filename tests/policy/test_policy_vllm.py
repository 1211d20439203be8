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
