# The two entry points the README promises; both set everything up on a fresh machine.
.PHONY: demo test setup bench lint gpu-check

setup:
	@bash scripts/setup.sh

demo: setup
	AIRFLOW__CORE__LOAD_EXAMPLES=False .venv/bin/mmprm demo

test: setup
	.venv/bin/python -m pytest

bench: setup
	.venv/bin/python bench/bench_search.py --out .mmprm/bench/search.json
	.venv/bin/python bench/bench_engine_cpu.py --out .mmprm/bench/engine-cpu.json
	.venv/bin/python bench/bench_search_engine.py --out .mmprm/bench/search-engine.json
	.venv/bin/python bench/bench_index.py --trees 3000 --out .mmprm/bench/index.json
	.venv/bin/python bench/bench_ingest.py --megabytes 50 --out .mmprm/bench/ingest.json
	.venv/bin/python bench/bench_prm_ceiling.py --out .mmprm/bench/prm-ceiling.json

# GPU machines only (vllm + deepspeed from the gpu extra): CUDA tests + vLLM async engine vs one-at-a-time.
gpu-check: setup
	bash scripts/gpu_check.sh
