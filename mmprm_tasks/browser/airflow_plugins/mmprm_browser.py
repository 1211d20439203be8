"""The Airflow plugin that puts the annotation browser into the UI.

Registered through the ``airflow.plugins`` entry point (pyproject.toml), so every Airflow that has
the package installed loads it: the local stack, the compose stack and the in-process demo.  The
api-server mounts the app under ``/mmprm``; the UI shows it in the nav and on every DAG run's
page (which opens what that run made: its annotation run, dataset, checkpoint or evaluation).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from .app import MOUNT_PREFIX, app


class MMPRMBrowserPlugin(AirflowPlugin):
    name = "mmprm_browser"
    fastapi_apps = [{"app": app, "url_prefix": MOUNT_PREFIX, "name": "MM-PRM annotation browser"}]
    external_views = [
        {"name": "MM-PRM browser", "href": f"{MOUNT_PREFIX}/", "destination": "nav", "category": "browse",
         "url_route": "mmprm"},
        {"name": "Annotation", "href": MOUNT_PREFIX + "/dag-runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
         "url_route": "mmprm-dag-run"},
    ]
