"""``python -m mmprm_tasks.airflow_launch ARGS``: the ``airflow`` command, with the log servers its
scheduler, triggerer and Celery workers start bound to ``MMPRM_LOG_SERVER_HOST`` (127.0.0.1 by
default) instead of every interface.  Airflow 3 binds them to ``""`` (all interfaces) and has no
setting for it; the local stack runs every service through here, so none listens beyond the host
it was given (issue 25)."""

from __future__ import annotations

import os
import sys
import types

LOG_SERVER_HOST_ENV = "MMPRM_LOG_SERVER_HOST"
_LOG_SERVER_APP = "airflow.utils.serve_logs.log_server:get_app"


def bind_log_servers(host: str) -> None:
    """Make Airflow's log server (``airflow.utils.serve_logs.core``) listen on ``host``: its module
    alone sees a ``uvicorn`` whose ``run`` sets the host; the api-server's uvicorn is untouched.
    Log servers run in forked child processes, which inherit the change."""
    import uvicorn

    from airflow.utils.serve_logs import core

    def run(app, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - uvicorn.run's signature
        if app == _LOG_SERVER_APP:
            kwargs["host"] = host
        return uvicorn.run(app, *args, **kwargs)

    core.uvicorn = types.SimpleNamespace(**{**vars(uvicorn), "run": run})


def main() -> None:
    bind_log_servers(os.environ.get(LOG_SERVER_HOST_ENV) or "127.0.0.1")
    from airflow.__main__ import main as airflow_main

    sys.argv = ["airflow", *sys.argv[1:]]
    airflow_main()


if __name__ == "__main__":
    main()
