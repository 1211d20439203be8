"""The Airflow plugin that puts the annotation browser into the UI.

This folder is Airflow's plugins folder (``AIRFLOW__CORE__PLUGINS_FOLDER``, set by
:mod:`mmprm_tasks.airflow_stack` and the compose stack; ``mmprm_tasks.browser.PLUGINS_DIR``).
A folder rather than a package entry point: an editable install leaves a second copy of the
package metadata in the source tree, and Airflow would find the plugin twice from there.

The api-server mounts the app under ``/mmprm``; the UI shows it in the nav and on every DAG run's
page (which opens what that run made: its annotation run, dataset, checkpoint or evaluation).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from mmprm_tasks.browser.app import MOUNT_PREFIX, app


class MMPRMBrowserPlugin(AirflowPlugin):
    name = "mmprm_browser"
    fastapi_apps = [{"app": app, "url_prefix": MOUNT_PREFIX, "name": "MM-PRM annotation browser"}]
    external_views = [
        {"name": "MM-PRM browser", "href": f"{MOUNT_PREFIX}/", "destination": "nav", "category": "browse",
         "url_route": "mmprm"},
        {"name": "Annotation", "href": MOUNT_PREFIX + "/dag-runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
         "url_route": "mmprm-dag-run"},
    ]
