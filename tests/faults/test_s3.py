"""The S3 server (SeaweedFS) goes away, or freezes, while trees are being written and while seeds
are ingested: the stage fails within the time-outs with a one-line first cause, nothing is
indexed without its object, and a rerun completes."""

from __future__ import annotations

import os
from pathlib import Path
import signal
import time

import pytest

from mmprm_tasks.annotate import annotate_chunk
from mmprm_tasks.failures import EXIT_DEPENDENCY, describe
from mmprm_tasks.seeds import ingest_file
from mmprm_tasks.settings import StoreConfig

from fault_helpers import HookedPolicy, assert_consistent, seeded_run, wait_until_store_serves
from test_search import ExactVerifier
from test_seeds import count, make_seed_file


@pytest.fixture
def s3_fault_settings(fault_settings, own_s3):
    s = fault_settings.model_copy(update={"store": StoreConfig(
        kind="s3", endpoint=own_s3.endpoint, bucket="faults", access_key=own_s3.access_key,
        secret_key=own_s3.secret_key)})
    wait_until_store_serves(s)
    return s


def _one_line_s3_outage(exc: BaseException) -> None:
    failure = describe(exc)
    assert failure is not None and failure.exit_code == EXIT_DEPENDENCY, repr(exc)
    assert "\n" not in failure.cause and failure.hint.startswith("the S3 object store"), failure


def test_s3_stopped_mid_search(s3_fault_settings, own_s3, tmp_path):
    s = seeded_run(s3_fault_settings, tmp_path / "data")
    with pytest.raises(Exception) as raised:
        annotate_chunk(s, "run-f", 0, policy=HookedPolicy({3: own_s3.stop}), verifier=ExactVerifier())
    _one_line_s3_outage(raised.value)
    own_s3.start()
    wait_until_store_serves(s)
    assert_consistent(s, "run-f", finished=False)
    annotate_chunk(s, "run-f", 0, policy=HookedPolicy(), verifier=ExactVerifier())
    assert_consistent(s, "run-f", finished=True)


def test_frozen_s3_fails_within_the_time_outs(s3_fault_settings, own_s3, tmp_path):
    s = seeded_run(s3_fault_settings, tmp_path / "data")
    frozen_at: list[float] = []

    def freeze() -> None:
        os.killpg(own_s3.process.pid, signal.SIGSTOP)
        frozen_at.append(time.monotonic())

    with pytest.raises(Exception) as raised:
        annotate_chunk(s, "run-f", 0, policy=HookedPolicy({3: freeze}), verifier=ExactVerifier())
    waited = time.monotonic() - frozen_at[0]
    _one_line_s3_outage(raised.value)
    assert waited < 30, waited  # (minio's default would wait 5 minutes per try)
    os.killpg(own_s3.process.pid, signal.SIGCONT)
    wait_until_store_serves(s)
    assert_consistent(s, "run-f", finished=False)
    annotate_chunk(s, "run-f", 0, policy=HookedPolicy(), verifier=ExactVerifier())
    assert_consistent(s, "run-f", finished=True)


def test_ingest_with_s3_down_lands_no_row_without_its_image(s3_fault_settings, own_s3, tmp_path):
    seeds = make_seed_file(tmp_path / "data", 5)
    own_s3.stop()
    with pytest.raises(Exception) as raised:
        ingest_file(seeds, s3_fault_settings)
    _one_line_s3_outage(raised.value)
    assert count(s3_fault_settings, "seed_problems") == 0
    own_s3.start()
    wait_until_store_serves(s3_fault_settings)
    assert ingest_file(seeds, s3_fault_settings).inserted == 5


def test_cli_ingest_with_s3_down_prints_one_line_and_exits_3(s3_fault_settings, own_s3, tmp_path):
    import subprocess
    import sys

    from mmprm_tasks.failures import EXIT_DEPENDENCY

    seeds = make_seed_file(tmp_path / "data", 3)
    own_s3.stop()
    s = s3_fault_settings
    env = {"PATH": "/usr/bin:/bin", "MMPRM_DATABASE_URL": s.database_url, "MMPRM_HOME": str(s.home),
           "MMPRM_STORE__KIND": "s3", "MMPRM_STORE__ENDPOINT": s.store.endpoint, "MMPRM_STORE__BUCKET": s.store.bucket,
           "MMPRM_STORE__ACCESS_KEY": s.store.access_key,
           "MMPRM_STORE__SECRET_KEY": s.store.secret_key.get_secret_value(), "MMPRM_TIMEOUTS__S3_RETRIES": "1"}
    done = subprocess.run([sys.executable, "-m", "mmprm_tasks", "ingest", str(seeds)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == EXIT_DEPENDENCY, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: ") and "the S3 object store" in lines[1], lines
    assert "Traceback" not in done.stdout + done.stderr


def test_cli_with_refused_s3_credentials_is_a_configuration_error(s3_settings, tmp_path, monkeypatch):
    """Wrong credentials are not an outage to wait out ("rerun", exit 3): exit 1, not retried by
    Airflow either."""
    from minio.error import S3Error

    from mmprm_tasks.failures import EXIT_CONFIGURATION

    from helpers import run_mmprm

    seeds = make_seed_file(tmp_path / "data", 2)
    done = run_mmprm(s3_settings, "ingest", str(seeds), MMPRM_STORE__SECRET_KEY="not-the-secret")
    assert done.returncode == EXIT_CONFIGURATION, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: ") and "refuses these credentials" in lines[1], lines
    assert count(s3_settings, "seed_problems") == 0

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "dags"))
    from airflow.sdk.exceptions import AirflowFailException
    from mmprm_wiring.tasks import fails_at_once_on_configuration_errors

    def denied() -> None:
        raise S3Error(None, "AccessDenied", "Access Denied.", "/b/k", "r", "h")

    with pytest.raises(AirflowFailException, match="not retried"):
        fails_at_once_on_configuration_errors(denied)()
