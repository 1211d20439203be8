#!/usr/bin/env bash
# The checks that need a GPU (issue 12), as one script anyone with a CUDA machine can rerun:
#   1. the CUDA-marked tests: vLLM's async engine with the toy policy, a bf16 PRM training step
#      and GPU scoring, a DeepSpeed ZeRO-1 training step;
#   2. rollouts per second of the search on vLLM's async engine (the toy policy; every tree's
#      request joins the running batch) against the original one-problem-at-a-time loop on the
#      same engine, as a ratio measured in this run (bench/bench_search.py).
# Needs the gpu extra installed (pip install -e '.[gpu]': vllm, deepspeed).  Results:
# .mmprm/bench/search-vllm.json and the pytest summary.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" - <<'PY'
import sys, torch
from mmprm_tasks.policy.vllm_engine import vllm_available
ok, why = vllm_available()  # vLLM importable and a CUDA device visible
if not ok:
    sys.exit(f"gpu-check: {why}")
print("gpu-check on", torch.cuda.get_device_name(0))
PY
mkdir -p .mmprm/bench
"$PY" -m pytest -m gpu -ra -q tests/test_prm.py tests/policy
"$PY" bench/bench_search.py --backend vllm --device cuda --problems "${PROBLEMS:-64}" \
  --num-rollouts 16 --max-search-count 10 --max-new-tokens 96 --repeats 1 \
  --out .mmprm/bench/search-vllm.json
