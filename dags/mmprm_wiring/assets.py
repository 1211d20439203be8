"""The lineage a user reads in the UI: seeds -> trees -> dataset -> checkpoint -> report."""

from airflow.sdk import Asset

SEEDS = Asset(name="mmprm_seeds", uri="mmprm://step-index/seed_problems")
TREES = Asset(name="mmprm_trees", uri="mmprm://step-index/trees")
DATASET = Asset(name="mmprm_prm_dataset", uri="mmprm://step-index/datasets")
CHECKPOINT = Asset(name="mmprm_prm_checkpoint", uri="mmprm://step-index/checkpoints")
REPORT = Asset(name="mmprm_bon_report", uri="mmprm://step-index/evaluations")
