"""Trigger-time knobs: the names a user sets in the Airflow UI, their bounds, and the settings
fields they override.  Kept free of Airflow so the CLI and the tests read the same table."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from .settings import ConfigurationError, Settings, get_settings

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
    "policy_connection": (None, {"type": ["string", "null"], "description":
                                 "Airflow Connection of an OpenAI-compatible policy server (URL and API key), one of "
                                 "the allowed_connections setting; null: the deployment's policy endpoint"}),
    "judge_connection": (None, {"type": ["string", "null"], "description":
                                "Airflow Connection of the LLM judge (URL and API key), one of the "
                                "allowed_connections setting; null: the deployment's judge, if any"}),
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

_STAGE_DEFAULTS: dict[str, Any] = {"policy_connection": None, "judge_connection": None, "seed_source": None, "run_id": None, "split": "train", "eval_split": "test",
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


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible endpoint as an Airflow Connection describes it."""

    base_url: str
    api_key: str | None


def endpoint_from_connection(conn_id: str, host: str | None, schema: str | None, port: int | None,
                             password: str | None, extra: Mapping[str, Any]) -> Endpoint:
    """The endpoint of a Connection: ``extra.base_url``, or a host holding the whole URL
    (``http://vllm:8000/v1``), or ``schema://host:port`` plus ``extra.path``; the API key is the
    Connection's password."""
    url = extra.get("base_url") or ""
    if not url and host and "://" in host:
        url = host
    elif not url and host:
        url = f"{schema or 'http'}://{host}{f':{port}' if port else ''}{extra.get('path', '')}"
    if not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"connection {conn_id!r} names no http(s) endpoint (set its host to the base "
                                 "URL, e.g. http://vllm:8000/v1, or extra.base_url)")
    return Endpoint(url, password or None)


# Trigger Param -> the settings group and fields its Connection's URL and key fill.
_CONNECTION_PARAMS = {"policy_connection": ("policy", "base_url", "api_key"),
                      "judge_connection": ("verify", "judge_base_url", "judge_api_key")}


def settings_from_params(params: Mapping[str, Any], base: Settings | None = None,
                         connections: Callable[[str], Endpoint] | None = None) -> Settings:
    """Settings with the trigger-time knobs applied (unknown names are refused).

    ``policy_connection`` / ``judge_connection`` must be ids in ``allowed_connections``; they are
    resolved by ``connections`` (in a DAG run: Airflow's Connections), so a trigger never carries
    an endpoint URL or a key, and cannot send the platform's key or images to a URL of its own."""
    unknown = set(params) - set(TRIGGER_PARAMS)
    if unknown:
        raise KeyError(f"unknown parameters {sorted(unknown)}; known: {sorted(TRIGGER_PARAMS)}")
    settings = base or get_settings()
    overrides = {TRIGGER_PARAMS[name][0]: value for name, value in params.items()
                 if TRIGGER_PARAMS[name][0] and value is not None}
    settings = settings.with_overrides(overrides)
    for name, (group, url_field, key_field) in _CONNECTION_PARAMS.items():
        conn_id = params.get(name)
        if conn_id is None:
            continue
        if conn_id not in settings.allowed_connections:
            raise ConfigurationError(f"{name}={conn_id!r} is not an allowed connection (setting "
                                     f"allowed_connections: {settings.allowed_connections})")
        if connections is None:
            raise ConfigurationError(f"{name}={conn_id!r}: connections are resolved only in a DAG run")
        endpoint = connections(conn_id)
        # The Connection's key or none: the deployment's key never goes to the Connection's URL.
        key = SecretStr(endpoint.api_key) if endpoint.api_key else None
        updated = getattr(settings, group).model_copy(update={url_field: endpoint.base_url, key_field: key})
        settings = settings.model_copy(update={group: updated})
    return settings
