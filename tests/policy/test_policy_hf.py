"""The transformers backend on a real tiny LLaVA checkpoint (CPU)."""

from __future__ import annotations

import pytest

from helpers import chat_prompts, policy_requests

from mmprm_tasks.policy import GenerationRequest, PolicyBackend, PolicyError, load_policy
from mmprm_tasks.policy.hf import TransformersPolicy
from mmprm_tasks.policy import load_image, request_seed
from mmprm_tasks.rollouts import parse_rollout
from mmprm_tasks.settings import PolicyConfig, SamplingConfig, Settings

SAMPLING = SamplingConfig(max_new_tokens=24)
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=24)


@pytest.fixture(scope="module")
def policy(policy_dir) -> TransformersPolicy:
    p = TransformersPolicy(policy_dir, policy=PolicyConfig(batch_size=64), sampling=SAMPLING)
    yield p
    p.close()


@pytest.fixture(scope="module")
def random_policy(random_policy_dir) -> TransformersPolicy:
    return TransformersPolicy(random_policy_dir, policy=PolicyConfig(batch_size=64), sampling=SAMPLING)


def test_n_rollouts_per_request_in_order(policy, images):
    assert isinstance(policy, PolicyBackend)
    reqs = policy_requests(images)
    out = policy.generate(reqs, seed=0)
    assert [len(r) for r in out] == [2, 3, 1]
    assert all(isinstance(rollout, list) and all(isinstance(s, str) for s in rollout)
               for per_request in out for rollout in per_request)
    assert policy.generate([], seed=0) == []


def test_same_seed_same_rollouts_other_seed_differs(random_policy, images):
    reqs = policy_requests(images, ns=(3, 3, 3))
    prompts, ns = chat_prompts(reqs), [r.n for r in reqs]
    seeds = lambda call: [request_seed(call, i) for i in range(len(reqs))]  # noqa: E731 - as generate() derives them
    first = [[c.text for c in per] for per in random_policy.complete(prompts, ns, seeds=seeds(7))]
    again = [[c.text for c in per] for per in random_policy.complete(prompts, ns, seeds=seeds(7))]
    other = [[c.text for c in per] for per in random_policy.complete(prompts, ns, seeds=seeds(8))]
    assert first == again
    assert first != other
    # Samples of one request differ from each other (sampling, not n copies of one draw).
    assert len(set(first[0])) > 1
    # generate() is parse_rollout of exactly those completions.
    assert random_policy.generate(reqs, seed=7) == [[parse_rollout(t) for t in per] for per in first]


def test_a_seeded_requests_samples_do_not_depend_on_its_batch(random_policy, images):
    """Each sequence samples from its own generator: a request's samples are the same alone, in a
    batch with others, and at another position (what keeps search trees independent of batching)."""
    reqs = policy_requests(images, ns=(3, 3, 3))
    prompts, ns = chat_prompts(reqs), [r.n for r in reqs]

    def texts(order, seeds):
        out = random_policy.complete([prompts[i] for i in order], [ns[i] for i in order], seeds=seeds)
        return [[c.text for c in per] for per in out]

    together = texts([0, 1, 2], [100, 101, 102])
    assert texts([1], [101]) == [together[1]]
    assert texts([2, 1, 0], [102, 101, 100]) == together[::-1]
    assert texts([1], [999]) != [together[1]]
    assert len(set(together[1])) > 1


def test_seeded_call_leaves_global_rng_alone(random_policy, images):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    random_policy.generate(policy_requests(images, ns=(1, 1, 1)), seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_batches_across_requests_and_keeps_order(random_policy_dir, images):
    """Greedy decoding is independent of batching: batch size 2 (several generate() passes over
    the mixed requests) gives exactly the completions of one pass, each at its request's place."""
    reqs = policy_requests(images, ns=(2, 3, 1))
    prompts, ns = chat_prompts(reqs), [r.n for r in reqs]
    small = TransformersPolicy(random_policy_dir, policy=PolicyConfig(batch_size=2), sampling=GREEDY)
    calls: list[int] = []
    real_generate = small.model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real_generate(*args, **kwargs)

    small.model.generate = counting_generate
    batched = [[c.text for c in per] for per in small.complete(prompts, ns)]
    assert calls == [2, 2, 2]  # 6 sequences from 3 requests, 2 per forward pass
    big = TransformersPolicy(random_policy_dir, policy=PolicyConfig(batch_size=64), sampling=GREEDY)
    together = [[c.text for c in per] for per in big.complete(prompts, ns)]
    alone = [[c.text for c in big.complete([p], [n])[0]] for p, n in zip(prompts, ns)]
    assert batched == together == alone
    assert all(len(set(per)) == 1 for per in together)  # greedy: n identical samples
    # Each completion comes from its own request's prompt (prompt lengths tell them apart).
    lengths = [big.processor(text=[big.render(p)], images=[load_image(p.images[0])],
                             return_tensors="pt")["input_ids"].shape[1] for p in prompts]
    assert len(set(lengths)) == 3
    for policy_ in (small, big):
        got = [[c.prompt_tokens for c in per] for per in policy_.complete(prompts, ns)]
        assert got == [[lengths[0]] * 2, [lengths[1]] * 3, [lengths[2]] * 1]


def test_untagged_completion_is_an_empty_rollout(random_policy, images):
    """A random model writes no <step>/<answer> tags: every rollout is [] (SPEC §2)."""
    reqs = policy_requests(images, ns=(2, 2, 2))
    completions = random_policy.complete(chat_prompts(reqs), [r.n for r in reqs], seeds=[3, 4, 5])
    texts = [c.text for per in completions for c in per]
    assert all(t and "</step>" not in t and "</answer>" not in t for t in texts)
    assert random_policy.generate(reqs, seed=3) == [[[], []], [[], []], [[], []]]


def test_stops_at_eos_and_reports_length(random_policy, images):
    prompt = chat_prompts(policy_requests(images, ns=(4, 1, 1)))[0]
    completions = random_policy.complete([prompt], [4], seeds=[1],
                                         sampling=SamplingConfig(max_new_tokens=5))[0]
    assert all(c.completion_tokens <= 5 for c in completions)
    assert all(c.finish_reason in ("stop", "length") for c in completions)
    assert all(c.finish_reason == "stop" or c.completion_tokens == 5 for c in completions)
    assert all("<|im_end|>" not in c.text and "<|endoftext|>" not in c.text for c in completions)


def test_prompt_follows_the_training_format(policy, images):
    req = GenerationRequest("What is 2+2?", images[0], ("Two and two.",))
    text = policy.render(chat_prompts([req])[0])
    assert text.startswith("<|im_start|>user\n<image>Your task is to answer the question below.")
    assert "Question: What is 2+2?\nPrevious Steps:<step>Two and two.</step>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_trained_policy_writes_tagged_rollouts(policy_dir, images):
    from mmprm_tasks.settings import TOY_POLICY_DIR

    if policy_dir != TOY_POLICY_DIR:
        pytest.skip("the trained toy policy is not shipped yet (assets/toy_policy)")
    p = TransformersPolicy(policy_dir, sampling=SamplingConfig(max_new_tokens=160))
    out = p.generate([GenerationRequest("What is the sum of the numbers?", images[0], n=4)], seed=0)
    assert sum(bool(r) for r in out[0]) >= 2


def test_load_policy_picks_the_backend(policy_dir):
    settings = Settings(policy=PolicyConfig(backend="transformers", model=str(policy_dir)),
                        sampling=SamplingConfig(max_new_tokens=3, top_k=7))
    backend = load_policy(settings)
    assert isinstance(backend, TransformersPolicy)
    assert backend.sampling.top_k == 7 and backend.model_dir == str(policy_dir)
    backend.close()
    with pytest.raises(ValueError, match="base_url"):
        load_policy(Settings(policy=PolicyConfig(backend="openai", model="m")))


def test_bad_inputs(random_policy, tmp_path):
    with pytest.raises(ValueError):
        GenerationRequest("q", b"x", n=0)
    with pytest.raises(ValueError, match="not a decodable image"):
        random_policy.generate([GenerationRequest("q", b"not an image")])
    with pytest.raises(PolicyError, match="cannot load"):
        TransformersPolicy(tmp_path / "missing")
