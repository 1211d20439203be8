"""Wiring shared by the DAG files: Assets, Params and TaskFlow tasks (no logic: see mmprm_tasks)."""
