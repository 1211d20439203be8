"""The annotation browser inside the Airflow UI: runs, problem trees, datasets, checkpoints and
Best-of-N evaluations (a FastAPI app, :mod:`.app`, registered by the Airflow plugin in
:data:`PLUGINS_DIR`)."""

from pathlib import Path

# Airflow's plugins folder for the platform (AIRFLOW__CORE__PLUGINS_FOLDER).
PLUGINS_DIR = Path(__file__).resolve().parent / "airflow_plugins"
