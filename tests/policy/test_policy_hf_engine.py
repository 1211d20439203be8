"""The continuous-batching engine of the transformers backend (policy/hf_engine.py) on the shipped
tiny LLaVA, against ``model.generate`` (the reference path) on the same weights."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import chat_prompts, policy_requests

from mmprm_tasks.policy import GenerationRequest, PolicyConfigError, load_policy
from mmprm_tasks.policy.hf import TransformersPolicy
from mmprm_tasks.policy.hf_engine import (ContinuousTransformersPolicy, RowSampling, choose_engine, row_uniforms,
                                          sample_rows)
from mmprm_tasks.settings import PolicyConfig, SamplingConfig, Settings

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=48)
SAMPLING = SamplingConfig(max_new_tokens=48)


def as_tuples(completions):
    return [[(c.text, c.finish_reason, c.completion_tokens, c.prompt_tokens) for c in per] for per in completions]


@pytest.fixture(scope="module")
def reference(policy_dir) -> TransformersPolicy:
    policy = TransformersPolicy(policy_dir, policy=PolicyConfig(engine="generate"), sampling=GREEDY)
    yield policy
    policy.close()


@pytest.fixture(scope="module")
def engine(policy_dir) -> ContinuousTransformersPolicy:
    # Capacity 4 < the 6 rows asked below: requests wait, then join a batch that is mid-decode.
    policy = ContinuousTransformersPolicy(policy_dir, policy=PolicyConfig(engine="continuous"), sampling=SAMPLING,
                                          capacity=4)
    yield policy
    policy.close()


def test_greedy_text_equals_model_generate(reference, engine, images):
    prompts = chat_prompts(policy_requests(images))
    expected = as_tuples(reference.complete([p], [n])[0] for p, n in zip(prompts, (2, 3, 1)))
    got = as_tuples(engine.complete(prompts, [2, 3, 1], sampling=GREEDY))
    assert got == expected
    assert any("<step>" in text for per in got for text, *_ in per)  # real rollouts, not empty text
    lengths = {per[0][3] for per in got}
    assert len(lengths) == 3  # three prompt lengths shared one running batch


def test_a_seeded_requests_samples_do_not_depend_on_the_batch_or_capacity(engine, policy_dir, images):
    prompts = chat_prompts(policy_requests(images, ns=(3, 3, 3)))
    together = as_tuples(engine.complete(prompts, [3, 3, 3], seeds=[100, 101, 102]))
    assert as_tuples(engine.complete([prompts[1]], [3], seeds=[101])) == [together[1]]
    assert as_tuples(engine.complete(prompts[::-1], [3, 3, 3], seeds=[102, 101, 100])) == together[::-1]
    wide = ContinuousTransformersPolicy(policy_dir, sampling=SAMPLING, capacity=64)
    try:
        assert as_tuples(wide.complete(prompts, [3, 3, 3], seeds=[100, 101, 102])) == together
    finally:
        wide.close()
    assert as_tuples(engine.complete([prompts[1]], [3], seeds=[999])) != [together[1]]
    assert len({text for text, *_ in together[1]}) > 1  # n samples, not n copies of one draw


def test_finished_rows_leave_the_batch(engine, images):
    """Every decode step computes only rows still running: the token slots computed equal the
    tokens generated after each row's first (which comes from its request's prefill)."""
    before = dict(vars(engine.counters))
    completions = engine.complete(chat_prompts(policy_requests(images, ns=(4, 4, 4))), [4, 4, 4],
                                  sampling=SamplingConfig(max_new_tokens=12), seeds=[1, 2, 3])
    after = vars(engine.counters)
    rows = after["rows"] - before["rows"]
    tokens = after["generated_tokens"] - before["generated_tokens"]
    assert rows == 12 and after["requests"] - before["requests"] == 3  # one prefill per request
    assert tokens == sum(c.completion_tokens for per in completions for c in per)
    assert after["row_steps"] - before["row_steps"] == tokens - rows
    assert all(c.completion_tokens <= 12 for per in completions for c in per)
    assert all(c.finish_reason == "stop" or c.completion_tokens == 12 for per in completions for c in per)


def test_rollout_engine_submit_and_generate_agree(engine, images):
    """The search's entry point (submit one request) and the batch one (generate) sample the same."""
    requests = [GenerationRequest(r.question, r.image, r.prefix_steps, r.n, seed=40 + i)
                for i, r in enumerate(policy_requests(images))]
    submitted = [engine.submit(r).result() for r in requests]
    assert submitted == engine.generate(requests, seed=None)
    assert [len(r) for r in submitted] == [2, 3, 1]


def test_trees_depend_on_the_request_seed_not_on_other_requests_in_flight(engine, images):
    """Requests submitted from several threads at once (as the search and a server do) get the
    same samples as each alone."""
    prompts = chat_prompts(policy_requests(images, ns=(2, 2, 2)))
    alone = [as_tuples(engine.complete([p], [2], seeds=[7 + i]))[0] for i, p in enumerate(prompts)]
    results: dict[int, list] = {}

    def run(i: int) -> None:
        results[i] = as_tuples([engine.submit_prompt(prompts[i], 2, seed=7 + i).result()])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(3)] == alone


def test_cancelled_requests_never_run(policy_dir, images):
    policy = ContinuousTransformersPolicy(policy_dir, sampling=SamplingConfig(max_new_tokens=40), capacity=1)
    try:
        prompt = chat_prompts(policy_requests(images))[0]
        first = policy.submit_prompt(prompt, 1, seed=1)
        queued = [policy.submit_prompt(prompt, 1, seed=2 + i) for i in range(5)]
        assert all(f.cancel() for f in queued[1:])  # still waiting behind the capacity-1 batch
        first.result(), queued[0].result()
        assert policy.counters.requests == 2
    finally:
        policy.close()


def test_bad_image_fails_its_request_only(engine, images):
    bad = engine.submit(GenerationRequest("q", b"not an image", n=1, seed=1))
    good = engine.submit(GenerationRequest("q", images[0], n=1, seed=1))
    with pytest.raises(ValueError, match="not a decodable image"):
        bad.result()
    assert len(good.result()) == 1


def test_load_policy_picks_the_engine(policy_dir):
    settings = Settings(policy=PolicyConfig(model=str(policy_dir)))
    backend = load_policy(settings)
    assert isinstance(backend, ContinuousTransformersPolicy)
    assert backend.capacity == settings.search.max_sequences_in_flight
    backend.close()
    backend = load_policy(Settings(policy=PolicyConfig(model=str(policy_dir), engine="generate")))
    assert type(backend) is TransformersPolicy and not hasattr(backend, "submit")
    backend.close()


def test_choose_engine():
    assert choose_engine(PolicyConfig(), "llava") == "continuous"
    assert choose_engine(PolicyConfig(), "qwen2_vl") == "generate"  # multimodal rotary positions
    assert choose_engine(PolicyConfig(engine="generate"), "llava") == "generate"
    with pytest.raises(PolicyConfigError, match="does not drive model_type 'mllama'"):
        choose_engine(PolicyConfig(engine="continuous"), "mllama")
    with pytest.raises(PolicyConfigError, match="needs the continuous engine"):
        choose_engine(PolicyConfig(engine="generate", quantize="int8"), "llava")


def test_int8_engine_runs_on_cpu(policy_dir, images):
    policy = ContinuousTransformersPolicy(policy_dir, policy=PolicyConfig(quantize="int8"), sampling=GREEDY,
                                          capacity=8)
    try:
        quantized = torch.ao.nn.quantized.dynamic.Linear
        assert any(isinstance(m, quantized) for m in policy.model.modules())
        assert not any(type(m) is torch.nn.Linear for m in policy.model.modules())
        out = policy.generate(policy_requests(images, ns=(1, 1, 1)), seed=0)
        assert sum(bool(r) for per in out for r in per) >= 2  # still writes tagged rollouts
    finally:
        policy.close()


# ------------------------------------------------------------------------------------ sampler


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=8), st.integers(0, 10_000))
def test_row_uniforms_are_in_range_and_depend_on_seed_and_step_only(seeds, step):
    seeds_arr = np.array(seeds, dtype=np.uint64)
    u = row_uniforms(seeds_arr, np.full(len(seeds), step, dtype=np.uint64))
    assert ((u > 0) & (u < 1)).all()
    for i, seed in enumerate(seeds):  # row by row, alone, gives the same draw
        assert row_uniforms(np.array([seed], dtype=np.uint64), np.array([step], dtype=np.uint64))[0] == u[i]
    assert row_uniforms(seeds_arr[:1], np.array([step + 1], dtype=np.uint64))[0] != u[0]


def _params(n, temperature=1.0, top_k=0, top_p=1.0, penalty=1.0) -> RowSampling:
    return RowSampling(torch.full((n,), temperature), torch.full((n,), top_k, dtype=torch.long),
                       torch.full((n,), top_p), torch.full((n,), penalty))


def test_sampler_follows_the_distribution_and_its_filters():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20_000
    logits = probs.log().expand(n, -1)
    unseen = torch.zeros(n, 4, dtype=torch.bool)
    u = torch.from_numpy(row_uniforms(np.arange(n, dtype=np.uint64), np.zeros(n, dtype=np.uint64)))
    counts = torch.bincount(sample_rows(logits, _params(n), unseen, u), minlength=4).double() / n
    assert torch.allclose(counts, probs.double(), atol=0.015)
    top2 = torch.bincount(sample_rows(logits, _params(n, top_k=2), unseen, u), minlength=4).double() / n
    assert top2[2:].sum() == 0 and abs(top2[0] - 0.5 / 0.8) < 0.015
    nucleus = torch.bincount(sample_rows(logits, _params(n, top_p=0.7), unseen, u), minlength=4).double() / n
    assert nucleus[2:].sum() == 0  # 0.5 + 0.3 reach 0.7: the rest is cut
    greedy = sample_rows(logits, _params(n, temperature=0.0), unseen, u)
    assert bool((greedy == 0).all())
    seen = unseen.clone()
    seen[:, 0] = True  # a strong repetition penalty moves greedy off the seen token
    assert bool((sample_rows(logits, _params(n, temperature=0.0, penalty=3.0), seen, u) == 1).all())


def test_shared_prefix_cache_hit_or_miss_gives_the_same_samples(policy_dir, images):
    """Continuation requests of one problem prefill its question and image once (PrefixCache);
    whether a request finds them cached or not, its samples are the same, and greedy text still
    equals model.generate's."""
    policy = ContinuousTransformersPolicy(policy_dir, sampling=SAMPLING, capacity=16)
    uncached = ContinuousTransformersPolicy(policy_dir, policy=PolicyConfig(prefix_cache_entries=0),
                                            sampling=SAMPLING, capacity=16)
    reference = TransformersPolicy(policy_dir, policy=PolicyConfig(engine="generate"), sampling=GREEDY)
    try:
        question = "What is the sum of the numbers?"
        steps = [("The numbers are 3 and 4.",), ("The numbers are 3 and 4.", "3 + 4 = 7."), ("Read 3.",)]
        requests = [GenerationRequest(question, images[0], p, 3, seed=10 + i) for i, p in enumerate(steps)]
        first = [policy.submit(r).result() for r in requests]
        assert policy.counters.prefix_misses == 1 and policy.counters.prefix_hits == 2
        assert [policy.submit(r).result() for r in requests] == first  # all hits now
        assert [uncached.submit(r).result() for r in requests] == first
        assert uncached.counters.prefix_hits == uncached.counters.prefix_misses == 0
        greedy = [GenerationRequest(question, images[0], p, 1, seed=1) for p in steps]
        policy.sampling = GREEDY
        assert [policy.submit(r).result() for r in greedy] == reference.generate(greedy)
    finally:
        for p in (policy, uncached, reference):
            p.close()


@pytest.mark.gpu
def test_gpu_continuous_engine_fp32_equals_generate_and_runs_bf16(policy_dir, images):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    requests = policy_requests(images)
    reference = TransformersPolicy(policy_dir, policy=PolicyConfig(engine="generate", device="cuda", dtype="float32"),
                                   sampling=GREEDY)
    fp32 = ContinuousTransformersPolicy(policy_dir, policy=PolicyConfig(device="cuda", dtype="float32"),
                                        sampling=GREEDY, capacity=4)
    bf16 = ContinuousTransformersPolicy(policy_dir, policy=PolicyConfig(device="cuda", dtype="bfloat16"),
                                        sampling=SAMPLING, capacity=64)
    try:
        prompts = chat_prompts(requests)
        assert as_tuples(fp32.complete(prompts, [2, 3, 1])) == as_tuples(
            reference.complete([p], [n])[0] for p, n in zip(prompts, (2, 3, 1)))
        assert fp32.engine._cache.layers[0].keys.device.type == "cuda"
        seeded = [GenerationRequest(r.question, r.image, r.prefix_steps, 4, seed=5 + i) for i, r in enumerate(requests)]
        together = bf16.generate(seeded)
        assert [bf16.submit(r).result() for r in seeded[::-1]] == together[::-1]
        assert bf16.engine._cache.layers[0].keys.dtype == torch.bfloat16
        assert sum(bool(r) for per in together for r in per) >= 6  # tagged rollouts in bf16 too
    finally:
        for p in (reference, fp32, bf16):
            p.close()


def test_int8_is_refused_on_a_gpu():
    from mmprm_tasks.policy.hf_engine import quantize_int8

    with pytest.raises(PolicyConfigError, match="CPU-only"):
        quantize_int8(torch.nn.Linear(2, 2), "cuda")


def test_run_stats_count_the_engines_decode_steps(engine, images):
    """Annotation records how full the running batch was (rows per decode step)."""
    from mmprm_tasks.annotate import counted

    counting = counted(engine)
    before = engine.counters.decode_steps
    futures = [counting.submit(r) for r in policy_requests(images, ns=(4, 4, 4))]
    [f.result() for f in futures]
    stats = counting.settle()
    assert stats.requests == 3 and stats.rollouts == 12
    assert stats.decode_steps == engine.counters.decode_steps - before > 0
    assert stats.decode_steps <= stats.row_steps <= 4 * stats.decode_steps  # capacity 4
