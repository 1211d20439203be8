"""Trigger-time knobs: the names a user sets in the Airflow UI, their bounds, and the settings
fields they override.  Kept free of Airflow so the CLI and the tests read the same table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .settings import Settings, get_settings

# name -> (settings field it overrides, or None for stage arguments; JSON schema of the value)
TRIGGER_PARAMS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "seed_source": (None, {"type": ["string", "null"], "description":
                           "Seed file (JSON array or JSONL, SPEC §1) to ingest first; null: use what is indexed"}),
    "run_id": (None, {"type": ["string", "null"], "pattern": "^[A-Za-z0-9._-]{1,100}$",
                      "description": "Annotation run id; null: derived from the config and the date"}),
    "split": (None, {"type": ["string", "null"],
                     "description": "Only annotate problems of this split (default train: evaluation problems "
                                    "never become training data); null annotates every split"}),
    "policy_backend": ("policy.backend", {"type": "string", "enum": ["transformers", "vllm", "openai"]}),
    "policy_model": ("policy.model", {"type": "string", "minLength": 1,
                                      "description": "Checkpoint path/URI, or served model name (openai)"}),
    "policy_base_url": ("policy.base_url", {"type": ["string", "null"]}),
    "num_rollouts": ("search.num_rollouts", {"type": "integer", "minimum": 1, "maximum": 256}),
    "max_search_count": ("search.max_search_count", {"type": "integer", "minimum": 0, "maximum": 100000}),
    "rollout_budget": ("search.rollout_budget", {"type": "integer", "minimum": 1, "maximum": 1000000}),
    "concurrent_problems": ("search.concurrent_problems", {"type": "integer", "minimum": 1, "maximum": 4096}),
    "max_new_tokens": ("sampling.max_new_tokens", {"type": "integer", "minimum": 1, "maximum": 32768}),
    "temperature": ("sampling.temperature", {"type": "number", "minimum": 0, "maximum": 2}),
    "chunk_size": ("chunk_size", {"type": "integer", "minimum": 1, "maximum": 100000}),
    "label_mode": ("train.label_mode", {"type": "string", "enum": ["soft", "hard"]}),
    "learning_rate": ("train.learning_rate", {"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "num_train_epochs": ("train.num_train_epochs", {"type": "number", "exclusiveMinimum": 0, "maximum": 100}),
    "max_steps": ("train.max_steps", {"type": "integer", "minimum": -1}),
    "per_device_train_batch_size": ("train.per_device_train_batch_size", {"type": "integer", "minimum": 1, "maximum": 1024}),
    "eval_num_candidates": ("eval.num_candidates", {"type": "integer", "minimum": 1, "maximum": 256}),
    "dataset_id": (None, {"type": ["string", "null"], "description": "Dataset version to train on; null: the triggering or latest one"}),
    "checkpoint_id": (None, {"type": ["string", "null"], "description": "PRM checkpoint to evaluate; null: the triggering or latest one"}),
    "eval_split": (None, {"type": "string", "description": "Split of the seed problems used for Best-of-N"}),
    "eval_limit": (None, {"type": ["integer", "null"], "minimum": 1, "description": "At most this many test problems"}),
}

_STAGE_DEFAULTS: dict[str, Any] = {"seed_source": None, "run_id": None, "split": "train", "eval_split": "test",
                                   "eval_limit": None, "dataset_id": None, "checkpoint_id": None}


def _get(settings: Settings, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def param_defaults(settings: Settings | None = None) -> dict[str, Any]:
    """Each knob's default: the current settings' value (so the UI shows what a run would use)."""
    settings = settings or get_settings()
    return {name: (_get(settings, target) if target else _STAGE_DEFAULTS[name])
            for name, (target, _) in TRIGGER_PARAMS.items()}


def settings_from_params(params: Mapping[str, Any], base: Settings | None = None) -> Settings:
    """Settings with the trigger-time knobs applied (unknown names are refused)."""
    unknown = set(params) - set(TRIGGER_PARAMS)
    if unknown:
        raise KeyError(f"unknown parameters {sorted(unknown)}; known: {sorted(TRIGGER_PARAMS)}")
    overrides = {TRIGGER_PARAMS[name][0]: value for name, value in params.items()
                 if TRIGGER_PARAMS[name][0] and value is not None}
    return (base or get_settings()).with_overrides(overrides)
