"""The annotation browser inside the Airflow UI: runs, problem trees, datasets, checkpoints and
Best-of-N evaluations (a FastAPI app, :mod:`.app`, registered by the Airflow plugin in :mod:`.plugin`)."""
