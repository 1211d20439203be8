"""The S3 server (SeaweedFS) goes away, or freezes, while trees are being written and while seeds
are ingested: the stage fails within the time-outs with a one-line first cause, nothing is
indexed without its object, and a rerun completes."""

from __future__ import annotations

import os
import signal
import time

import pytest

from mmprm_tasks.annotate import annotate_chunk
from mmprm_tasks.failures import EXIT_DEPENDENCY, describe
from mmprm_tasks.seeds import ingest_file
from mmprm_tasks.settings import StoreConfig

from fault_helpers import HookedPolicy, assert_consistent, seeded_run
from test_search import ExactVerifier
from test_seeds import count, make_seed_file


@pytest.fixture
def s3_fault_settings(fault_settings, own_s3):
    return fault_settings.model_copy(update={"store": StoreConfig(
        kind="s3", endpoint=own_s3.endpoint, bucket="faults", access_key=own_s3.access_key,
        secret_key=own_s3.secret_key)})


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
    assert ingest_file(seeds, s3_fault_settings).inserted == 5
