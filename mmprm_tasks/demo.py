"""The embedded end-to-end run: toy seeds -> Airflow DAGs in-process -> Best-of-N table.

Real parts, started locally: an embedded Postgres, a local object store, Airflow running each DAG
with ``dag.test()`` (no scheduler; tasks, retries and Asset events are real), the shipped tiny
policy and foundation.  Settings the user exported win over the demo's small-scale defaults.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .resources import dags_folder

DAGS_DIR = dags_folder()

# Small budgets so the whole run fits in minutes on 2 CPU cores; every one is a normal setting.
DEMO_SETTINGS = {
    "MMPRM_SEARCH__NUM_ROLLOUTS": "8",
    "MMPRM_SEARCH__MAX_SEARCH_COUNT": "12",
    "MMPRM_SEARCH__ROLLOUT_BUDGET": "160",
    "MMPRM_SEARCH__CONCURRENT_PROBLEMS": "32",
    "MMPRM_SAMPLING__MAX_NEW_TOKENS": "96",
    # Chunks of 64: each chunk's search keeps the engine's running batch full for longer (a chunk
    # ends with a tail where only its last trees' rows run).
    "MMPRM_CHUNK_SIZE": "64",
    # Toy steps are a few words each ("3 + 5 = 8."): SPEC's 10-word floor would drop most paths.
    "MMPRM_TRAVERSE__MIN_WORDS": "3",
    # Toy solutions are 3-4 steps: with the release's one <prm> per node, a correct rollout's
    # equations share the answer's label and the PRM learned to score every inner equation ~0
    # (issue 11).  One <prm> per step of a node above the threshold measured better on both
    # demo configurations tried (Best-of-8 39.8% -> 43.0%, PRM first-error F1 0.26 -> 0.31).
    "MMPRM_TRAVERSE__LABEL_GRANULARITY": "step",
    # Consensus filtering (issue 23): a path is kept only where the PRM base's own step likelihood
    # puts the first error where the MC labels do, and a negative path ends at the judged step.
    # bench/bench_toy_scaling.py at 10k paths: Best-of-8 `min` 60.2% -> 73.4% on seed 7.
    "MMPRM_TRAVERSE__CONSENSUS_JUDGE": "base_likelihood",
    "MMPRM_TRAVERSE__CUT_NEGATIVES": "true",
    # The paper's small-learning-rate finding holds here too (issue 11: 1e-3 destroys what the
    # foundation knows, 1e-4 keeps it); bench/bench_toy_ablations.py measures 1e-4, 3e-4, 1e-3.
    "MMPRM_TRAIN__LEARNING_RATE": "1e-4",
    # Two epochs over 4x the paths (issue 22: the continuous engine buys the data in the same
    # minutes; 8 epochs over 796 paths before).
    "MMPRM_TRAIN__NUM_TRAIN_EPOCHS": "2",
    "MMPRM_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": "16",
    "MMPRM_TRAIN__MAX_LENGTH": "512",
    "MMPRM_TRAIN__WARMUP_RATIO": "0.03",
    "MMPRM_EVAL__NUM_CANDIDATES": "8",
    "MMPRM_EVAL__NS": "[1,2,4,8]",
    "MMPRM_ORCHESTRATION__RETRY_DELAY_S": "1",
    # Airflow's per-task INFO lines would bury the demo's own progress; export INFO to see them.
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
    # Likewise transformers' "Loading weights"/"Writing model shards" bars, one per model load.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


@dataclass
class DemoResult:
    home: Path
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # label mode -> BoN report
    outputs: dict[str, str] = field(default_factory=dict)


def _prepare_environment(home: Path, seed: int | None = None) -> None:
    for name, value in DEMO_SETTINGS.items():
        os.environ.setdefault(name, value)
    if seed is not None:
        # One seed for the whole run: the problems drawn, the search, training and evaluation.
        os.environ.setdefault("MMPRM_SEED", str(seed))
    os.environ["MMPRM_HOME"] = str(home)
    airflow_home = home / "airflow"
    airflow_home.mkdir(parents=True, exist_ok=True)
    # Every path Airflow would otherwise write into airflow.cfg once, as the home it was made in,
    # comes from the home of this run: a copied home runs where it is (issue 25).
    os.environ.update({
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(airflow_home / "logs"),
        "AIRFLOW__LOGGING__DAG_PROCESSOR_CHILD_PROCESS_LOG_DIRECTORY": str(airflow_home / "logs" / "dag_processor"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(airflow_home / "plugins"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    })
    from .settings import get_settings

    get_settings.cache_clear()


def _airflow_cli(*args: str) -> None:
    airflow = Path(sys.executable).parent / "airflow"
    subprocess.run([str(airflow), *args], check=True, env=os.environ.copy(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def init_airflow(pool: str, slots: int) -> None:
    """Metadata DB (SQLite in AIRFLOW_HOME for the embedded run) and the GPU pool."""
    _airflow_cli("db", "migrate")
    _airflow_cli("pools", "set", pool, str(slots), "GPU slots for annotation, training and evaluation")


def load_dag(filename: str):
    if str(DAGS_DIR) not in sys.path:
        sys.path.insert(0, str(DAGS_DIR))
    spec = importlib.util.spec_from_file_location(f"mmprm_dag_{Path(filename).stem}", DAGS_DIR / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.dag


def run_dag(filename: str, conf: dict[str, Any]) -> Any:
    dag = load_dag(filename)
    dag_run = dag.test(run_conf=conf)
    state = str(getattr(dag_run, "state", "")).lower()
    if not state.endswith("success"):
        raise RuntimeError(f"DAG {dag.dag_id} ended in state {state!r}; see the task logs above")
    return dag_run


def _xcom(dag_run: Any, task_id: str) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id,
                                                 key="return_value").first()
        return None if row is None else XComModel.deserialize_value(row)


# Train problems the demo annotates by default: what its time budget affords on 2 CPU cores.
# About 7 consensus-kept paths a problem: 1,250 give the ~9k paths where the curve of
# bench/bench_toy_scaling.py has the PRM well past random pick (at ~3k it is still below).
DEMO_TRAIN_PROBLEMS = 1250

# What `make demo` promises at that scale (README; tests/test_demo.py holds it): the soft-label
# PRM's headline (`min`, Best-of-8) at least this far above random pick, and its PRM-weighted vote
# this far above majority vote.  Measured on seed 0: +14.3 and +8.6 points; the bench's seeds 7
# and 1 at 10k paths: +20.9/+23.8 and +10.9/+7.0.
DEMO_PROMISE = {"min_over_random": 0.10, "weighted_vote_over_majority": 0.03}


def promise_kept(report: dict[str, Any]) -> bool:
    """Whether a soft-label Best-of-N report keeps :data:`DEMO_PROMISE` at its largest N."""
    row = report["rows"][-1]
    return (report["headline"]["accuracy"] >= row["random"] + DEMO_PROMISE["min_over_random"]
            and row["weighted_vote"] >= row["majority_vote"] + DEMO_PROMISE["weighted_vote_over_majority"])


def run_demo(home: Path, *, n_train: int = DEMO_TRAIN_PROBLEMS, n_test: int = 128, seed: int = 0,
             label_modes: tuple[str, ...] = ("soft",), log=print) -> DemoResult:
    start = time.perf_counter()
    stage_start = start
    stages: dict[str, float] = {}

    def stage_done(name: str) -> None:
        nonlocal stage_start
        now = time.perf_counter()
        stages[name] = round(now - stage_start, 1)
        stage_start = now

    home = home.resolve()
    _prepare_environment(home, seed)
    # Airflow's DAG-folder scan warns at every parse that pathspec renamed a pattern class; seven
    # copies of it would be most of what the demo prints.  Set after Airflow's configuration is
    # imported: it puts its own "show deprecations in airflow modules" filter first.
    import airflow.configuration  # noqa: F401

    warnings.filterwarnings("ignore", message="GitWildMatchPattern", category=DeprecationWarning)
    from . import db, pipeline
    from .settings import get_settings
    from .toy.world import generate_seeds

    settings = get_settings()
    log(f"[1/6] toy seeds ({n_train} train, {n_test} test) and the step index in {home}")
    seeds = generate_seeds(home / "seeds", n_train=n_train, n_test=n_test, seed=seed)
    db.upgrade(db.get_engine(settings))
    log("[2/6] Airflow metadata DB and GPU pool")
    init_airflow(settings.orchestration.gpu_pool, settings.orchestration.gpu_pool_slots)
    stage_done("set-up")

    # dag.test() runs one DAG and does not follow asset events: each stage's DAG in turn.
    log("[3/6] mmprm_ingest -> mmprm_annotate (shard -> annotate chunks -> index summary) -> mmprm_dataset")
    run_id = f"demo-seed{seed}-{n_train}"
    run_dag("mmprm_ingest.py", {"seed_source": str(seeds["train"]), "eval_seed_source": str(seeds["test"])})
    stage_done("ingest")
    annotate_run = run_dag("mmprm_annotate.py", {"annotation_run_id": run_id, "split": "train"})
    stage_done("annotate")
    dataset_run = run_dag("mmprm_dataset.py", {"annotation_run_id": run_id})
    stage_done("dataset")
    summary = _xcom(annotate_run, "index_summary") or {}
    dataset = _xcom(dataset_run, "traverse") or {}
    result = DemoResult(home=home, seconds=0.0, summary={**summary, "dataset": dataset})

    for label_mode in label_modes:
        log(f"[4/6] mmprm_train ({label_mode} labels) on {dataset.get('dataset_id')}")
        train_run = run_dag("mmprm_training.py", {"dataset_id": dataset["dataset_id"], "label_mode": label_mode})
        checkpoint = _xcom(train_run, "train_prm")
        stage_done(f"train ({label_mode})")
        log(f"[5/6] mmprm_evaluate: Best-of-N with the {label_mode}-label PRM")
        eval_run = run_dag("mmprm_evaluation.py", {"checkpoint_id": checkpoint["checkpoint_id"]})
        stage_done(f"evaluate ({label_mode})")
        evaluation = _xcom(eval_run, "evaluate_best_of_n")
        from .storage import open_uri

        store, key = open_uri(evaluation["report_uri"], settings)
        result.reports[label_mode] = store.get_json(key)
        result.outputs[f"{label_mode} checkpoint"] = checkpoint["uri"]
        result.outputs[f"{label_mode} report"] = evaluation["report_uri"]
        result.outputs[f"{label_mode} plot"] = evaluation["plot_uri"]
    result.outputs["step index"] = db.database_url(settings).split("?")[0] + f" (data in {home / 'pgdata'})"
    result.outputs["objects"] = str(settings.store_root)
    result.seconds = time.perf_counter() - start
    result.summary["stage_seconds"] = stages
    (home / "demo-summary.json").write_text(json.dumps(
        {"summary": result.summary, "reports": result.reports, "outputs": result.outputs,
         "seconds": result.seconds}, indent=2, default=str))
    log("[6/6] done")
    return result
