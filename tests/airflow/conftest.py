"""Real Airflow services for the distributed-run tests.

Each test module gets its own installation (``mmprm_tasks.airflow_stack``): a fresh metadata
database on the real Postgres, AIRFLOW_HOME under tmp, the repository's ``dags/``, the services as
separate processes on free loopback ports, stopped by process group at the end whatever happens.
The DAG's tasks write to another fresh database (the step index, cloned from the schema template)
and a local object store under tmp, with small search budgets set through ``MMPRM_*``.

On a failing test the service logs and the task logs are printed.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mmprm_tasks.airflow_stack import AirflowStack, RedisServer, create_database, drop_database, redis_reachable
from mmprm_tasks.settings import TOY_POLICY_DIR, Settings, StoreConfig

from af_helpers import ARTIFACTS, DAG_ID

# Small budgets: every one is a normal setting the tasks read from the environment.
SMALL_BUDGETS = {
    "MMPRM_SEARCH__NUM_ROLLOUTS": "4",
    "MMPRM_SEARCH__MAX_SEARCH_COUNT": "2",
    "MMPRM_SEARCH__ROLLOUT_BUDGET": "24",
    # One problem at a time: a chunk task holds a lease for as long as it annotates (the kill
    # test waits for a task holding leases), and the three chunks share the cores evenly.
    "MMPRM_SEARCH__CONCURRENT_PROBLEMS": "1",
    "MMPRM_SAMPLING__MAX_NEW_TOKENS": "64",
    "MMPRM_CHUNK_SIZE": "3",
    "MMPRM_ORCHESTRATION__RETRY_DELAY_S": "1",
    "MMPRM_ORCHESTRATION__MAX_RETRY_DELAY_S": "5",
    "MMPRM_VERIFY__WORKERS": "1",
    # The asset chain after annotation (dataset -> train -> evaluate) at a size that fits a test.
    "MMPRM_TRAIN__MAX_STEPS": "2",
    "MMPRM_EVAL__NUM_CANDIDATES": "4",
    "MMPRM_EVAL__NS": "[1,2,4]",
    # A progress line a second, so a task's log shows progress before its last line.
    "MMPRM_PROGRESS_LOG_INTERVAL_S": "1",
}
_stacks: list[AirflowStack] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(autouse=True)
def _logs_on_failure(request):
    """Print what the services and tasks logged when a test here fails."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for stack in _stacks:
            print(f"\n######## Airflow stack {stack.home} ########\n{stack.diagnostics(dag_id=DAG_ID)}")


def _db_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def policy_model(tmp_path_factory) -> str:
    """The shipped toy policy; a randomly initialised tiny one of the same shape until it exists
    (the tests check orchestration, not annotation quality)."""
    if (TOY_POLICY_DIR / "config.json").exists():
        return str(TOY_POLICY_DIR)
    from mmprm_tasks.toy.model import build_tiny_vlm
    from mmprm_tasks.toy.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("random_policy")
    model, processor = build_tiny_vlm(build_tokenizer(), seed=0)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def step_index_url(pg_admin_url, pg_template) -> Iterator[str]:
    """A fresh step-index database with the schema (what MMPRM_DATABASE_URL names for the tasks)."""
    name = _db_name("mmprm_af_idx")
    url = create_database(pg_admin_url, name, template=pg_template)
    yield url
    from mmprm_tasks import db

    db.dispose_engines()
    drop_database(pg_admin_url, name)


@pytest.fixture(scope="module")
def metadata_url(pg_admin_url) -> Iterator[str]:
    """A fresh Airflow metadata database (``airflow db migrate`` fills it)."""
    name = _db_name("airflow_meta")
    url = create_database(pg_admin_url, name)
    yield url
    drop_database(pg_admin_url, name)


@pytest.fixture(scope="module")
def toy_seeds(mmprm_home) -> dict[str, Path]:
    from mmprm_tasks.toy.world import generate_seeds

    # Under <MMPRM_HOME>/seeds: the one place a trigger's seed_source may name by default.
    return generate_seeds(mmprm_home / "seeds", n_train=9, n_test=2, seed=0)


@pytest.fixture(scope="module")
def mmprm_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mmprm_home")


@pytest.fixture(scope="module")
def task_settings(step_index_url, mmprm_home) -> Settings:
    """What the tasks see (same database and store), for checking their results from the test."""
    return Settings(home=mmprm_home, database_url=step_index_url,
                    store=StoreConfig(kind="local", root=mmprm_home / "objects"))


def _task_env(step_index_url: str, home: Path, policy_model: str) -> dict[str, str]:
    return {
        "MMPRM_DATABASE_URL": step_index_url,
        "MMPRM_HOME": str(home),
        "MMPRM_STORE__KIND": "local",
        "MMPRM_STORE__ROOT": str(home / "objects"),
        "MMPRM_POLICY__MODEL": policy_model,
        "MMPRM_POLICY__DEVICE": "cpu",
        **SMALL_BUDGETS,
        # Tiny models on shared cores: one intra-op thread each (spinning OpenMP workers starve peers).
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _base_env() -> dict[str, str]:
    # The stack sets Airflow's and the platform's configuration; nothing stray from the shell.
    return {k: v for k, v in os.environ.items() if not k.startswith(("MMPRM_", "AIRFLOW"))}


@pytest.fixture(scope="module")
def stack_factory(tmp_path_factory, metadata_url, step_index_url, mmprm_home, policy_model
                  ) -> Iterator[Callable[..., AirflowStack]]:
    """Builds and starts this module's stack; stops every process it started at the end."""
    made: list[AirflowStack] = []

    def make(**kwargs: Any) -> AirflowStack:
        # Extra users (name -> (role, password)) join the admin and the viewer "ops".
        users = {"admin": ("admin", "admin-" + uuid.uuid4().hex[:8]), "ops": ("viewer", "ops-pw"),
                 **kwargs.pop("extra_users", {})}
        stack = AirflowStack(
            home=tmp_path_factory.mktemp("airflow_stack"), metadata_url=metadata_url, users=users,
            parallelism=4,
            # Only the DAG under test runs: with every DAG unpaused at creation, the daily
            # nightly refresh would start at once and compete for the two cores.
            paused_at_creation=True,
            extra_env=_task_env(step_index_url, mmprm_home, policy_model), base_env=_base_env(), **kwargs)
        made.append(stack)
        _stacks.append(stack)
        start = time.monotonic()
        stack.start(timeout=240)
        print(f"Airflow stack healthy in {time.monotonic() - start:.1f}s at {stack.api_url}")
        return stack

    yield make
    for stack in made:
        start = time.monotonic()
        killed = stack.stop()
        print(f"stack stopped in {time.monotonic() - start:.1f}s:",
              {s.name: round(s.stop_seconds or 0, 1) for s in stack.services.values()})
        _stacks.remove(stack)
        leftovers = [s.name for s in stack.services.values() if s.alive()]
        assert not leftovers, f"services still running after stop: {leftovers}"
        assert not killed, f"processes of the stack outlived their service's process group: {killed}"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A Celery broker of this module alone: a private redis-server on a free port when the
    binary exists, else a random database of the machine's Redis, else a visible skip."""
    if RedisServer.available():
        server = RedisServer(tmp_path_factory.mktemp("redis")).start()
        yield server.url
        server.stop()
        return
    shared = os.environ.get("MMPRM_TEST_REDIS_URL", "redis://127.0.0.1:6379")
    if redis_reachable(shared + "/0"):
        yield f"{shared}/{int(uuid.uuid4().int % 15) + 1}"
        return
    pytest.skip("no Redis: redis-server is not installed and none answers on 127.0.0.1:6379")


@pytest.fixture(scope="module")
def client(stack):
    """A REST client on the module's stack (each test module defines its own ``stack``), with the
    pipeline DAG parsed and unpaused."""
    from af_helpers import DAG_ID, unpause

    with stack.client() as client:
        stack.wait_for_dag(client, DAG_ID)
        unpause(client)
        yield client


@pytest.fixture(scope="module")
def chromium():
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):  # the folder shows this run's pages only
        old.unlink()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()
