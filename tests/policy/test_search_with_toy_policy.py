"""The search with the shipped toy policy on CPU: the trees do not depend on how requests are
batched (every request samples from its own seed), so annotation is reproducible whatever the
concurrency, chunking, work stealing or serving."""

from __future__ import annotations

import json

import pytest

from mmprm_tasks.policy.hf import TransformersPolicy
from mmprm_tasks.policy.hf_engine import ContinuousTransformersPolicy
from mmprm_tasks.policy.openai_compat import OpenAIChatPolicy
from mmprm_tasks.policy.server import start_server
from mmprm_tasks.search import SearchProblem, run_search
from mmprm_tasks.settings import PolicyConfig, SamplingConfig, SearchConfig, VerifyConfig
from mmprm_tasks.toy.world import generate_seeds
from mmprm_tasks.verify import AnswerVerifier


SAMPLING = SamplingConfig(max_new_tokens=64)
CFG = SearchConfig(num_rollouts=4, max_search_count=3, rollout_budget=28)


def _problems(tmp_path) -> list[SearchProblem]:
    seeds = generate_seeds(tmp_path, n_train=4, n_test=4, seed=3)
    return [SearchProblem(r["id"], r["question"], r["correct_answer"], (tmp_path / r["image_path"]).read_bytes(),
                          r["image_path"]) for r in json.loads(seeds["train"].read_text())]


def _trees(problems, policy, cfg) -> dict:
    with AnswerVerifier(VerifyConfig()) as verifier:
        return {r.problem_id: r.tree for r in run_search(problems, policy, verifier, cfg, seed=7)}


ENGINES = {
    # model.generate on fixed batches behind the search's BatchingEngine (the reference path)
    "generate": lambda d: TransformersPolicy(d, policy=PolicyConfig(batch_size=64), sampling=SAMPLING),
    # the continuous engine, a RolloutEngine the search feeds request by request
    "continuous": lambda d: ContinuousTransformersPolicy(d, sampling=SAMPLING, capacity=64),
}


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_trees_are_identical_whatever_the_batching_and_over_http(engine, policy_dir, tmp_path):
    problems = _problems(tmp_path)
    policy = ENGINES[engine](policy_dir)
    runs = [_trees(problems, policy, CFG.model_copy(update=u))
            for u in ({"concurrent_problems": 4}, {"concurrent_problems": 1},
                      {"concurrent_problems": 2, "max_sequences_in_flight": 4})]
    assert len(runs[0]) == 4
    assert runs[0] == runs[1] == runs[2]
    assert any(0 < tree["mc_value"] < 1 or tree["children"] for tree in runs[0].values())  # real searches

    # The same policy behind the OpenAI-compatible server: each request is its own HTTP call (the
    # server batches concurrent ones) and samples from the seed it carries, so the trees match.
    server = start_server(policy, served_model_name="toy")
    try:
        client = OpenAIChatPolicy(server.base_url, "toy", sampling=SAMPLING, capacity=16,
                                  policy=PolicyConfig(backend="openai", model="toy", base_url=server.base_url))
        assert _trees(problems, client, CFG) == runs[0]
        client.close()
    finally:
        server.stop()
        policy.close()
