"""A normal install works: the wheel carries the migrations and the DAGs, and an `mmprm` installed
from it (in a fresh virtual environment, run from outside the source tree) upgrades a database,
names its DAG folder, and Airflow imports the DAGs from there.

The fresh environment sees the dependencies already installed in this one through a ``.pth``
file (reinstalling torch and Airflow from the network would take long, and torch would pull
CUDA); the wheel itself goes in with ``--no-deps``.  This environment's editable install is a
finder hooked in by its own ``.pth`` file, which a path added through a ``.pth`` line does not
run, so the source tree is not importable there: checked through ``mmprm_tasks.__file__``.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAG_IDS = ["mmprm_ingest", "mmprm_annotate", "mmprm_nightly_refresh", "mmprm_dataset", "mmprm_train", "mmprm_evaluate"]
# Build outputs and local state that are not part of the source.
_NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", ".mmprm", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", "node_modules", "seeds", "models")


class Installed:
    def __init__(self, root: Path, wheel: Path):
        self.root, self.wheel = root, wheel
        self.bin = root / "venv" / "bin"
        self.cwd = root / "elsewhere"  # outside the source tree

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("MMPRM_", "AIRFLOW", "PYTHON", "VIRTUAL_ENV"))}
        proc = subprocess.run(args, cwd=self.cwd, env=clean | (env or {}), capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("wheel-install")
    # Built from a copy of the source (links kept), so build/ never lands in the working tree.
    source = root / "src"
    shutil.copytree(REPO, source, symlinks=True, ignore=_NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(root / "wheel")], check=True, capture_output=True, timeout=600)
    (wheel,) = (root / "wheel").glob("mmprm-*.whl")

    venv.create(root / "venv", with_pip=False)
    fresh_site = next((root / "venv" / "lib").glob("python3*/site-packages"))
    (fresh_site / "_dev_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "venv" / "bin" / "python"), "install",
                    "--no-deps", "-q", str(wheel)], check=True, capture_output=True, timeout=600)
    # Dependencies' console scripts live in this environment's bin/; the demo calls `airflow`
    # next to its interpreter, as a normal install of the dependencies would have it.
    airflow = root / "venv" / "bin" / "airflow"
    airflow.write_text(f"#!{root / 'venv' / 'bin' / 'python'}\n" + "".join(
        (Path(sys.executable).parent / "airflow").read_text().splitlines(keepends=True)[1:]))
    airflow.chmod(0o755)
    (root / "elsewhere").mkdir()
    return Installed(root, wheel)


def test_wheel_carries_migrations_and_dags(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    for path in sorted((REPO / "sql").glob("*.sql")):
        assert f"mmprm_tasks/sql/{path.name}" in names
    for path in sorted((REPO / "dags").rglob("*.py")) + [REPO / "dags" / ".airflowignore"]:
        assert f"mmprm_tasks/dags/{path.relative_to(REPO / 'dags').as_posix()}" in names
    assert not any("__pycache__" in name for name in names)
    # The measured curve the demo's report and the browser place a PRM on, once the repository holds it.
    if (REPO / "mmprm_tasks" / "toy" / "scaling_curve.json").is_file():
        assert "mmprm_tasks/toy/scaling_curve.json" in names


def test_installed_wheel_upgrades_a_database_and_serves_its_dags(installed, empty_database_url, tmp_path):
    python, mmprm = str(installed.bin / "python"), str(installed.bin / "mmprm")
    where = installed.run(python, "-c", "import mmprm_tasks, sys; print(mmprm_tasks.__file__)").strip()
    assert Path(where).is_relative_to(installed.root / "venv"), where  # not the source tree

    env = {"MMPRM_DATABASE_URL": empty_database_url, "MMPRM_HOME": str(tmp_path / "home")}
    out = installed.run(mmprm, "db", "upgrade", env=env)
    migrations = sorted(int(p.name[:3]) for p in (REPO / "sql").glob("*.sql"))
    assert f"applied migrations: {migrations}" in out, out
    assert "up to date" in installed.run(mmprm, "db", "upgrade", env=env)
    installed.run(mmprm, "db", "status", env=env)  # exits 1 unless the schema is current

    dags = Path(installed.run(mmprm, "dags-path").strip())
    assert dags.is_relative_to(installed.root / "venv") and (dags / "mmprm_annotate.py").is_file()
    airflow = str(installed.bin / "airflow")
    airflow_env = {"AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                   "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    installed.run(airflow, "db", "migrate", env=airflow_env)
    installed.run(airflow, "dags", "reserialize", env=airflow_env)
    listed = installed.run(airflow, "dags", "list", env=airflow_env)
    for dag_id in DAG_IDS:
        assert dag_id in listed, listed
    assert "No data found" in installed.run(airflow, "dags", "list-import-errors", env=airflow_env)


@pytest.mark.slow
def test_installed_wheel_runs_a_small_demo(installed, tmp_path):
    """`mmprm demo` from the wheel install (its own embedded Postgres, the DAGs from the package)."""
    from test_demo import TINY

    home = tmp_path / "demo"
    out = installed.run(str(installed.bin / "mmprm"), "demo", "--home", str(home), "--train", "8", "--test", "4",
                        env=TINY, timeout=1500)
    assert "MM-PRM embedded run" in out and "Best-of-N" in out
    assert (home / "demo-summary.json").is_file()
