"""Airflow's log servers, which Airflow 3 binds to every interface, listen only on the host the
local stack was given (mmprm_tasks.airflow_launch)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from mmprm_tasks.airflow_stack import AirflowStack, free_port

_SERVE = "import sys; from mmprm_tasks.airflow_launch import bind_log_servers; {bind}" \
         "from airflow.utils.serve_logs import serve_logs; serve_logs(port=int(sys.argv[1]))"


def _listening(pid: int, port: int, timeout: float = 60) -> set[str]:
    """The addresses ``pid`` listens on at ``port``, once it does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        if found:
            return found
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.mark.parametrize("bind, expected", [("bind_log_servers('127.0.0.1'); ", {"127.0.0.1"}),
                                            ("", {"::", "0.0.0.0"})], ids=["bound", "airflow-default"])
def test_a_log_server_listens_only_where_it_is_bound(bind, expected):
    """As a separate process; the unbound case shows what the binding changes (and fails once
    Airflow's default changes, so the launcher can go)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", _SERVE.format(bind=bind), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _listening(server.pid, port) & expected
        assert not _listening(server.pid, port) - expected
    finally:
        server.kill()
        server.wait()


def test_every_stack_service_runs_through_the_launcher_with_the_stack_host(tmp_path):
    stack = AirflowStack(home=tmp_path, metadata_url="postgresql://u@127.0.0.1/m", host="127.0.0.1")
    assert stack._airflow_args("triggerer")[1:3] == ["-m", "mmprm_tasks.airflow_launch"]
    assert stack.environment()["MMPRM_LOG_SERVER_HOST"] == "127.0.0.1"
