"""Trigger-time knobs: the names a user sets in the Airflow UI, their bounds, and the settings
fields they override.  Kept free of Airflow so the CLI and the tests read the same table."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from .settings import ConfigurationError, Settings, get_settings
from .validation import ID_PATTERN

def _knob(target: str | None, title: str, description: str, *, unit: str | None = None,
          **schema: Any) -> tuple[str | None, dict[str, Any]]:
    """One trigger knob: its JSON schema with a title, and a description that states the unit and
    the bounds, because Airflow's trigger form shows the description but not the schema's bounds
    (a value outside them is refused at trigger time: the REST API answers 400)."""
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum")
    parts = [description.rstrip(".") + "."]
    if unit:
        parts.append(f"Unit: {unit}.")
    if low is not None or high is not None:
        lower = "" if low is None else (f"> {low}" if "exclusiveMinimum" in schema else f">= {low}")
        upper = "" if high is None else f"<= {high}"
        parts.append(f"Allowed: {' and '.join(b for b in (lower, upper) if b)}; other values are refused.")
    if "enum" in schema:
        parts.append(f"One of: {', '.join(map(str, schema['enum']))}.")
    # Airflow's trigger form passes a top-level minimum/maximum to its number input, which clamps
    # a value typed outside them on blur (0 -> 1, 300 -> 256) and triggers with that.  Under allOf
    # the bounds still hold wherever the Param is validated (the form's submit, the REST API: 400)
    # but the input keeps what was typed, so an out-of-range value is refused, never clamped.
    bounds = {key: schema.pop(key) for key in _BOUNDS if key in schema}
    if bounds:
        schema["allOf"] = [bounds]
    return target, {**schema, "title": title, "description": " ".join(parts)}


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def schema_bounds(schema: dict[str, Any]) -> dict[str, Any]:
    """A knob's bounds (kept under ``allOf``, see :func:`_knob`)."""
    return {key: value for part in schema.get("allOf", []) for key, value in part.items() if key in _BOUNDS}


_TEXT = ["string", "null"]

# name -> (settings field it overrides, or None for stage arguments; JSON schema of the value)
TRIGGER_PARAMS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "seed_source": _knob(None, "Seed file", "Seed file (JSON array or JSONL, SPEC §1) to ingest, inside the "
                         "allowed seed roots; null: ingest nothing", type=_TEXT),
    "eval_seed_source": _knob(None, "Evaluation seed file", "Seed file of the evaluation split (e.g. test) to "
                              "ingest with it, so evaluation has its problems; null: none", type=_TEXT),
    # Not "run_id": Airflow's own trigger form has a "Run ID" field (the DAG run's id).
    "annotation_run_id": _knob(None, "Annotation run id", "Id of the annotation run in the step index (not "
                               "Airflow's Run ID); reusing one resumes it; null: derived from the config and "
                               "the date", type=_TEXT, pattern=ID_PATTERN),
    "split": _knob(None, "Split to annotate", "Only annotate seed problems of this split (default train: "
                   "evaluation problems never become training data); null annotates every split", type=_TEXT),
    "policy_backend": _knob("policy.backend", "Policy backend", "How the policy model is run", type="string",
                            enum=["transformers", "vllm", "openai"]),
    "policy_model": _knob("policy.model", "Policy model", "Checkpoint path/URI, or served model name (openai)",
                          type="string", minLength=1),
    "policy_connection": _knob(None, "Policy connection", "Airflow Connection of an OpenAI-compatible policy "
                               "server (URL and API key), one of the allowed_connections setting; null: the "
                               "deployment's policy endpoint", type=_TEXT),
    "judge_connection": _knob(None, "Judge connection", "Airflow Connection of the LLM judge (URL and API key), "
                              "one of the allowed_connections setting; null: the deployment's judge, if any",
                              type=_TEXT),
    "num_rollouts": _knob("search.num_rollouts", "Rollouts per expansion", "Completions sampled from a node to "
                          "estimate its Monte Carlo value", unit="rollouts", type="integer", minimum=1,
                          maximum=256),
    "max_search_count": _knob("search.max_search_count", "Search iterations", "MCTS iterations per problem; 0 "
                              "stops after the root's rollouts", unit="iterations", type="integer", minimum=0,
                              maximum=100000),
    "rollout_budget": _knob("search.rollout_budget", "Rollout budget", "Most policy completions spent on one "
                            "problem", unit="completions", type="integer", minimum=1, maximum=1000000),
    "concurrent_problems": _knob("search.concurrent_problems", "Concurrent problems", "Problems searched at once "
                                 "by one annotation task", unit="problems", type="integer", minimum=1,
                                 maximum=4096),
    "max_new_tokens": _knob("sampling.max_new_tokens", "Max new tokens", "Longest completion the policy may "
                            "write", unit="tokens", type="integer", minimum=1, maximum=32768),
    "temperature": _knob("sampling.temperature", "Temperature", "Sampling temperature of the policy",
                         type="number", minimum=0, maximum=2),
    "chunk_size": _knob("chunk_size", "Chunk size", "Problems per annotation task (the unit Airflow maps and "
                        "retries)", unit="problems", type="integer", minimum=1, maximum=100000),
    "label_values": _knob("traverse.label_values", "Label values", "mc: each step's Monte Carlo value (SPEC "
                          "section 5); relative: its value divided by its parent's, at most 1", type="string",
                          enum=["mc", "relative"]),
    "consensus_judge": _knob("traverse.consensus_judge", "Consensus judge", "none: keep every path; "
                             "base_likelihood: keep a path only where the PRM base model's step likelihood "
                             "puts its first error where the Monte Carlo labels do", type="string",
                             enum=["none", "base_likelihood"]),
    "label_mode": _knob("train.label_mode", "Label mode", "soft: the Monte Carlo value as the target; hard: "
                        "1 when it is positive", type="string", enum=["soft", "hard"]),
    "learning_rate": _knob("train.learning_rate", "Learning rate", "Peak learning rate of the PRM's "
                           "optimizer", type="number", exclusiveMinimum=0, maximum=1),
    "num_train_epochs": _knob("train.num_train_epochs", "Epochs", "Passes over the dataset (max_steps, if "
                              "set, wins)", unit="epochs", type="number", exclusiveMinimum=0, maximum=100),
    "max_steps": _knob("train.max_steps", "Max optimizer steps", "Stop after this many optimizer steps; -1: "
                       "run the epochs", unit="steps", type="integer", minimum=-1, maximum=10000000),
    "per_device_train_batch_size": _knob("train.per_device_train_batch_size", "Batch size per device",
                                         "Training paths per device and step", unit="paths", type="integer",
                                         minimum=1, maximum=1024),
    "eval_num_candidates": _knob("eval.num_candidates", "Candidates per problem", "Policy solutions sampled "
                                 "per evaluation problem for Best-of-N", unit="solutions", type="integer",
                                 minimum=1, maximum=256),
    "dataset_id": _knob(None, "Dataset id", "Dataset version to train on (ds-...); null: the triggering or "
                        "latest one", type=_TEXT, pattern=ID_PATTERN),
    "checkpoint_id": _knob(None, "Checkpoint id", "PRM checkpoint to evaluate (ckpt-...); null: the triggering "
                           "or latest one", type=_TEXT, pattern=ID_PATTERN),
    "eval_split": _knob(None, "Evaluation split", "Split of the seed problems used for Best-of-N; it must "
                        "share no problem with the PRM's dataset", type="string", minLength=1),
    "eval_limit": _knob(None, "Evaluation problems", "At most this many problems of the split; null: all",
                        unit="problems", type=["integer", "null"], minimum=1),
}

_STAGE_DEFAULTS: dict[str, Any] = {"policy_connection": None, "judge_connection": None, "seed_source": None,
                                   "eval_seed_source": None, "annotation_run_id": None, "split": "train",
                                   "eval_split": "test", "eval_limit": None, "dataset_id": None,
                                   "checkpoint_id": None}


def _get(settings: Settings, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# Knobs naming a seed file: the form says which folders those are (MMPRM_SEED_ROOTS).
_SEED_FILE_PARAMS = ("seed_source", "eval_seed_source")


def param_schemas(settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    """Each knob's JSON schema as the trigger form shows it; a seed file's description names the
    configured seed roots, since a newcomer cannot guess them."""
    settings = settings or get_settings()
    roots = ", ".join(str(root) for root in settings.allowed_seed_roots)
    schemas = {name: dict(schema) for name, (_, schema) in TRIGGER_PARAMS.items()}
    for name in _SEED_FILE_PARAMS:
        schemas[name]["description"] += f" Seed roots (MMPRM_SEED_ROOTS): {roots}."
    return schemas


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
