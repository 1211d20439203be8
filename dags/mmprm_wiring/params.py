"""Airflow Params for the trigger form, built from the one table in mmprm_tasks.params."""

from __future__ import annotations

from airflow.sdk import Param

from mmprm_tasks.params import param_defaults, param_schemas


def params(*names: str) -> dict[str, Param]:
    defaults, schemas = param_defaults(), param_schemas()
    return {name: Param(defaults[name], **schemas[name]) for name in names}


ANNOTATION = ("policy_backend", "policy_model", "policy_connection", "judge_connection", "num_rollouts", "max_search_count",
              "rollout_budget", "concurrent_problems", "max_new_tokens", "temperature", "chunk_size")
TRAINING = ("dataset_id", "label_mode", "learning_rate", "num_train_epochs", "max_steps",
            "per_device_train_batch_size")
EVALUATION = ("checkpoint_id", "policy_backend", "policy_model", "policy_connection", "judge_connection", "eval_num_candidates",
              "eval_split", "eval_limit", "max_new_tokens", "temperature")
