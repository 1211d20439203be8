"""Trigger-time knobs map onto the one settings object, with the same validation."""

from __future__ import annotations

import pydantic
import pytest

from mmprm_tasks.params import TRIGGER_PARAMS, param_defaults, schema_bounds, settings_from_params
from mmprm_tasks.settings import Settings


def test_params_override_settings_fields():
    base = Settings()
    s = settings_from_params({"num_rollouts": 4, "policy_backend": "openai", "learning_rate": 1e-4,
                              "seed_source": "x.json", "chunk_size": None}, base)
    assert s.search.num_rollouts == 4 and s.policy.backend == "openai" and s.train.learning_rate == 1e-4
    assert s.chunk_size == base.chunk_size  # None keeps the configured value


def test_defaults_mirror_settings():
    defaults = param_defaults(Settings())
    assert defaults["num_rollouts"] == 16 and defaults["max_search_count"] == 200
    assert defaults["rollout_budget"] == 1000 and defaults["seed_source"] is None


def test_unknown_and_invalid_params_are_refused():
    with pytest.raises(KeyError, match="unknown"):
        settings_from_params({"num_rolouts": 3}, Settings())
    with pytest.raises(pydantic.ValidationError):
        settings_from_params({"num_rollouts": 0}, Settings())


def test_every_target_is_a_settings_field():
    s = Settings()
    for name, (target, schema) in TRIGGER_PARAMS.items():
        assert "type" in schema, name
        if target:
            obj = s
            for part in target.split("."):
                obj = getattr(obj, part)


def test_environment_nested_variables(monkeypatch):
    monkeypatch.setenv("MMPRM_SEARCH__NUM_ROLLOUTS", "7")
    monkeypatch.setenv("MMPRM_STORE__KIND", "s3")
    s = Settings()
    assert s.search.num_rollouts == 7 and s.store.kind == "s3"


def test_every_knob_has_a_title_and_a_description_with_its_unit_and_bounds():
    """Airflow's trigger form shows a Param's title and description, not its schema's bounds."""
    for name, (_, schema) in TRIGGER_PARAMS.items():
        assert schema["title"] and schema["description"].endswith("."), name
        # Bounds live under allOf: a top-level minimum/maximum makes the form's number input clamp.
        assert not {"minimum", "maximum", "exclusiveMinimum"} & set(schema), name
        if schema_bounds(schema):
            assert "Allowed:" in schema["description"] and "refused" in schema["description"], name
    assert schema_bounds(TRIGGER_PARAMS["num_rollouts"][1]) == {"minimum": 1, "maximum": 256}
    described = TRIGGER_PARAMS["rollout_budget"][1]["description"]
    assert "Unit: completions." in described and "Allowed: >= 1 and <= 1000000" in described
    assert "Allowed: > 0 and <= 1" in TRIGGER_PARAMS["learning_rate"][1]["description"]
    assert "One of: soft, hard." in TRIGGER_PARAMS["label_mode"][1]["description"]
    assert "run_id" not in TRIGGER_PARAMS and "Airflow's Run ID" in TRIGGER_PARAMS["annotation_run_id"][1]["description"]


def test_the_seed_file_params_name_the_configured_seed_roots(tmp_path):
    from mmprm_tasks.params import param_schemas

    roots = [tmp_path / "a", tmp_path / "b"]
    schemas = param_schemas(Settings(home=tmp_path, seed_roots=roots))
    for name in ("seed_source", "eval_seed_source"):
        assert schemas[name]["description"].endswith(f"Seed roots (MMPRM_SEED_ROOTS): {roots[0]}, {roots[1]}.")
    # None configured: the default under the home.
    assert f"{(tmp_path / 'seeds').resolve()}." in param_schemas(Settings(home=tmp_path))["seed_source"]["description"]
    assert "Seed roots" not in param_schemas(Settings(home=tmp_path))["num_rollouts"]["description"]
