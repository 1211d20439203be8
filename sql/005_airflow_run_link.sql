-- MM-PRM step index, version 5: an annotation run remembers the Airflow DAG run that last worked
-- on it (dag id + dag run id), so the UI can link one to the other.  Runs made from the CLI, or
-- before this version, leave both NULL.
ALTER TABLE annotation_runs ADD COLUMN airflow_dag_id TEXT;
ALTER TABLE annotation_runs ADD COLUMN airflow_run_id TEXT;
