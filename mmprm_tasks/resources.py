"""Folders the package ships beside its code: the step-index migrations and the Airflow DAGs.

They live at the top of the repository (``sql/``, ``dags/``), where people look for them;
``mmprm_tasks/sql`` and ``mmprm_tasks/dags`` are links to them, so the wheel carries them as
package data (one copy of each file).  Found with :mod:`importlib.resources`, the same call
serves an editable install (the links, resolved to the repository's folders) and a wheel
install (the copies inside the installed package).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def package_folder(name: str) -> Path:
    """The shipped folder ``name`` (``"sql"`` or ``"dags"``) as a real directory path."""
    return Path(str(files("mmprm_tasks") / name)).resolve()


def dags_folder() -> Path:
    """The folder to set as ``AIRFLOW__CORE__DAGS_FOLDER`` (printed by ``mmprm dags-path``)."""
    return package_folder("dags")
