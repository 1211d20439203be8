#!/usr/bin/env bash
# The checks that need a GPU, as one script anyone with a CUDA machine can rerun:
#   1. the CUDA-marked tests: the continuous engine on CUDA (fp32 greedy text equals
#      model.generate's; bf16 samples independent of the batch), a bf16 PRM training step and GPU
#      scoring, a DeepSpeed ZeRO-1 training step, vLLM's async engine with the toy policy (each
#      skipped with its reason when its package is missing), and the model-family matrix
#      (tests/test_families.py: every family's tiny twin trained one bf16 step, with flash-attn
#      where installed and the family takes it, scored on the GPU and generating on it);
#   2. the transformers backend's engines on the GPU: the demo's rollout requests replayed on
#      model.generate and on the continuous engine (bench/bench_engine_cpu.py --device cuda);
#   3. with vLLM installed, rollouts per second of the search on vLLM's async engine against the
#      one-problem-at-a-time loop on the same engine (bench/bench_search.py).
# Needs the gpu extra for 1's DeepSpeed/vLLM parts and 3 (pip install -e '.[gpu]').  Results under
# .mmprm/bench/ and the pytest summary.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-.mmprm/bench}
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu-check: no CUDA device")'
"$PY" -c 'import torch; print("gpu-check on", torch.cuda.get_device_name(0))'
mkdir -p "$OUT_DIR"
"$PY" -m pytest -p no:cacheprovider -m gpu -ra -q tests/test_prm.py tests/policy tests/test_families.py
"$PY" bench/bench_engine_cpu.py --device cuda --skip-annotation --problems "${PROBLEMS:-32}" \
  --out "$OUT_DIR/engine-gpu.json"
if "$PY" -c 'from mmprm_tasks.policy.vllm_engine import vllm_available; import sys; sys.exit(0 if vllm_available()[0] else 1)'; then
  "$PY" bench/bench_search.py --backend vllm --device cuda --problems "${PROBLEMS:-64}" \
    --num-rollouts 16 --max-search-count 10 --max-new-tokens 96 --repeats 1 --out "$OUT_DIR/search-vllm.json"
else
  echo "gpu-check: vLLM is not installed; its search benchmark is skipped"
fi
