"""Postgres goes away, or freezes, while a chunk is being annotated; and a tree's transaction
breaks between its object and its commit."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from mmprm_tasks import annotate as annotate_module
from mmprm_tasks.annotate import annotate_chunk
from mmprm_tasks.db import get_engine
from mmprm_tasks.failures import EXIT_DEPENDENCY, describe
from mmprm_tasks.storage import open_store

from fault_helpers import HookedPolicy, assert_consistent, seeded_run
from test_search import ExactVerifier


def _fails_with_one_line_outage(exc: BaseException) -> None:
    failure = describe(exc)
    assert failure is not None and failure.exit_code == EXIT_DEPENDENCY, repr(exc)
    assert "\n" not in failure.cause and failure.hint.startswith("Postgres is unreachable"), failure


def test_postgres_stopped_mid_search_raises_the_first_cause_and_a_rerun_completes(fault_settings, own_pg, tmp_path,
                                                                                  caplog):
    s = seeded_run(fault_settings, tmp_path / "data")
    # Trees finish at different calls; Postgres dies at the fourth engine call, mid-search.
    with pytest.raises(Exception) as raised:
        annotate_chunk(s, "run-f", 0, policy=HookedPolicy({4: own_pg.stop}), verifier=ExactVerifier())
    _fails_with_one_line_outage(raised.value)
    # Clean-up met the same outage: logged in one line each, never raised over the first cause.
    cleanup = [r for r in caplog.records if "failed too" in r.getMessage()]
    assert cleanup and all("\n" not in r.getMessage() and r.exc_info is None for r in cleanup)
    own_pg.start()
    # The leases it could not release name an attempt that has ended: the retry takes them back at once.
    stats = annotate_chunk(s, "run-f", 0, policy=HookedPolicy(), verifier=ExactVerifier())
    assert stats["resumed_leases"] >= 1
    assert_consistent(s, "run-f", finished=True)


def test_frozen_postgres_fails_the_chunk_within_the_reply_deadline(fault_settings, own_pg, tmp_path):
    s = seeded_run(fault_settings, tmp_path / "data")
    frozen_at: list[float] = []

    def freeze() -> None:
        own_pg.freeze()
        frozen_at.append(time.monotonic())

    with pytest.raises(Exception) as raised:
        annotate_chunk(s, "run-f", 0, policy=HookedPolicy({3: freeze}), verifier=ExactVerifier())
    waited = time.monotonic() - frozen_at[0]
    _fails_with_one_line_outage(raised.value)
    # Without a client-side deadline this waits for as long as the server stays frozen.
    assert waited < 30, waited
    own_pg.thaw()
    annotate_chunk(s, "run-f", 0, policy=HookedPolicy(), verifier=ExactVerifier())
    assert_consistent(s, "run-f", finished=True)


def test_a_frozen_server_ends_a_query_at_the_reply_deadline_and_migrations_have_none(fault_settings, own_pg):
    from mmprm_tasks.db import without_time_limits

    s = fault_settings.with_overrides({"timeouts.db_reply_s": 1.5, "timeouts.db_statement_s": 1})
    engine = get_engine(s)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        own_pg.freeze()
        started = time.monotonic()
        try:
            with pytest.raises(sa.exc.OperationalError, match="sent no reply within 1.5 s"):
                conn.execute(sa.text("SELECT 1"))
        finally:
            own_pg.thaw()
        assert time.monotonic() - started < 10
    with engine.begin() as conn, without_time_limits(conn):  # as a migration runs
        assert conn.execute(sa.text("SHOW statement_timeout")).scalar_one() == "0"
        conn.execute(sa.text("SELECT pg_sleep(2)"))  # longer than both limits
    with engine.connect() as conn, pytest.raises(sa.exc.OperationalError, match="statement timeout"):
        conn.execute(sa.text("SELECT pg_sleep(2)"))


def test_cli_with_postgres_down_prints_one_line_and_a_hint(fault_settings, own_pg, tmp_path):
    s = seeded_run(fault_settings, tmp_path / "data")
    own_pg.stop()
    env = {"PATH": "/usr/bin:/bin", "MMPRM_DATABASE_URL": s.database_url, "MMPRM_HOME": str(s.home),
           "MMPRM_STORE__ROOT": str(s.store_root), "MMPRM_TIMEOUTS__DB_CONNECT_S": "2"}
    done = subprocess.run([sys.executable, "-m", "mmprm_tasks", "annotate", "--run", "run-f", "--all"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == EXIT_DEPENDENCY, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: OperationalError") and lines[1].startswith("hint:"), lines
    assert "Traceback" not in done.stdout + done.stderr


def test_a_commit_that_fails_after_the_object_was_put_leaves_no_orphan(fault_settings, own_pg, tmp_path, monkeypatch):
    """The writer's connection is cut between putting the tree object and committing: the
    transaction rolls back and the object whose row did not land is removed."""
    s = seeded_run(fault_settings, tmp_path / "data")
    store = open_store(s)
    cut = []

    def put_then_lose_the_connection(key, data, content_type="application/octet-stream"):
        uri = store.put_bytes(key, data, content_type)
        if not cut:
            cut.append(key)
            with get_engine(s).connect() as conn:  # the writer waits "idle in transaction" for us
                conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname ="
                                     " current_database() AND state = 'idle in transaction' AND pid <> pg_backend_pid()"))
        return uri

    class CuttingStore:
        def __getattr__(self, name):
            return getattr(store, name)

        put_bytes = staticmethod(put_then_lose_the_connection)

    monkeypatch.setattr(annotate_module, "open_store", lambda settings: CuttingStore())
    with pytest.raises(Exception) as raised:
        annotate_chunk(s, "run-f", 0, policy=HookedPolicy(), verifier=ExactVerifier(), steal=False)
    _fails_with_one_line_outage(raised.value)
    assert cut and not store.exists(cut[0])  # removed: its row never landed
    assert_consistent(s, "run-f", finished=False)
    monkeypatch.undo()
    annotate_chunk(s, "run-f", 0, policy=HookedPolicy(), verifier=ExactVerifier())
    assert_consistent(s, "run-f", finished=True)


def test_postgres_gone_between_object_and_commit_leaves_an_object_the_retry_replaces(fault_settings, own_pg, tmp_path,
                                                                                    monkeypatch):
    """Postgres dies after the object was put: nothing can tell whether the row landed, so the
    object stays; its key is fixed per run and problem, and the retry that finishes the problem
    overwrites it."""
    s = seeded_run(fault_settings, tmp_path / "data")
    store = open_store(s)
    put: list[str] = []

    class DyingStore:
        def __getattr__(self, name):
            return getattr(store, name)

        def put_bytes(self, key, data, content_type="application/octet-stream"):
            uri = store.put_bytes(key, data, content_type)
            if not put:
                put.append(key)
                own_pg.stop()
            return uri

    monkeypatch.setattr(annotate_module, "open_store", lambda settings: DyingStore())
    with pytest.raises(Exception) as raised:
        annotate_chunk(s, "run-f", 0, policy=HookedPolicy(), verifier=ExactVerifier(), steal=False)
    _fails_with_one_line_outage(raised.value)
    own_pg.start()
    with get_engine(s).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM trees")).scalar_one() == 0
    assert store.exists(put[0])  # for a problem that is not done; never read as a tree
    monkeypatch.undo()
    annotate_chunk(s, "run-f", 0, policy=HookedPolicy(), verifier=ExactVerifier())
    assert_consistent(s, "run-f", finished=True)
