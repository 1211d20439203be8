"""The search with the shipped toy policy on CPU: the trees do not depend on how requests are
batched (every request samples from its own seed), so annotation is reproducible whatever the
concurrency, chunking or work stealing."""

from __future__ import annotations

import json

from mmprm_tasks.policy.hf import TransformersPolicy
from mmprm_tasks.search import SearchProblem, run_search
from mmprm_tasks.settings import PolicyConfig, SamplingConfig, SearchConfig, VerifyConfig
from mmprm_tasks.toy.world import generate_seeds
from mmprm_tasks.verify import AnswerVerifier


def test_trees_are_identical_whatever_the_batching(policy_dir, tmp_path):
    seeds = generate_seeds(tmp_path, n_train=4, n_test=4, seed=3)
    problems = [SearchProblem(r["id"], r["question"], r["correct_answer"], (tmp_path / r["image_path"]).read_bytes(),
                              r["image_path"]) for r in json.loads(seeds["train"].read_text())]
    policy = TransformersPolicy(policy_dir, policy=PolicyConfig(batch_size=64), sampling=SamplingConfig(max_new_tokens=64))
    cfg = SearchConfig(num_rollouts=4, max_search_count=3, rollout_budget=28)
    with AnswerVerifier(VerifyConfig()) as verifier:
        runs = [{r.problem_id: r.tree for r in run_search(problems, policy, verifier, cfg.model_copy(update=u), seed=7)}
                for u in ({"concurrent_problems": 4}, {"concurrent_problems": 1}, {"concurrent_problems": 2,
                                                                                  "max_sequences_in_flight": 4})]
    assert len(runs[0]) == 4
    assert runs[0] == runs[1] == runs[2]
    assert any(0 < tree["mc_value"] < 1 or tree["children"] for tree in runs[0].values())  # real searches
