"""Local Airflow services on Postgres: api-server, scheduler, dag-processor, triggerer, Celery workers.

Each service is its own process in its own process group, started with an explicit environment
and stopped by PID/process group (``airflow standalone`` orphans its children on SIGTERM, so it is
never used).  The metadata database is a Postgres database named by the caller; ``AIRFLOW_HOME``,
the service logs and the simple-auth-manager passwords file live under ``home``.  Every port is a
free loopback port, so several stacks (tests, users) can run side by side on one machine.

Used by the tests in ``tests/airflow`` and by users who want the platform's DAGs on real Airflow
services without Docker::

    python -m mmprm_tasks.airflow_stack --home /tmp/af \\
        --metadata-url postgresql://postgres@127.0.0.1:5432/airflow_meta --create-db

    python -m mmprm_tasks.airflow_stack --home /tmp/af --metadata-url ... --executor CeleryExecutor \\
        --broker redis://127.0.0.1:6379/0 --worker default --worker gpu

MMPRM settings reach the tasks through the ``MMPRM_*`` variables of the environment (or ``--env``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .airflow_launch import LOG_SERVER_HOST_ENV
from .browser import PLUGINS_DIR as BROWSER_PLUGINS_DIR
from .resources import dags_folder

DAGS_DIR = dags_folder()
CORE_SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
# The health report's names for the services the stack starts.
_HEALTH_KEYS = {"scheduler": "scheduler", "dag-processor": "dag_processor", "triggerer": "triggerer"}
# Set on a Celery worker's processes: what its task instances report as their ``hostname``.
HOSTNAME_ENV = "AIRFLOW_STACK_HOSTNAME"


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the stack's workers: the worker's name, else the FQDN.

    Two workers on one machine then show up as two hosts in the task instances, as they would
    on two machines.
    """
    return os.environ.get(HOSTNAME_ENV) or socket.getfqdn()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def airflow_url(url: str) -> str:
    """A Postgres URL with the psycopg2 driver named (what Airflow's metadata DB uses)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"the Airflow metadata DB of this stack is Postgres, got {parsed.get_backend_name()!r}")
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def create_database(admin_url: str, name: str, *, template: str | None = None) -> str:
    """Create a fresh database next to ``admin_url`` (dropped first if it exists); returns its URL."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    engine = sa.create_engine(airflow_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    finally:
        engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def ensure_database(url: str) -> bool:
    """Create the Postgres database ``url`` names when it does not exist (never drops one);
    True when it was created."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    admin = parsed.set(database="postgres").render_as_string(hide_password=False)
    engine = sa.create_engine(airflow_url(admin), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": parsed.database}).scalar():
                return False
            conn.exec_driver_sql(f'CREATE DATABASE "{parsed.database}"')
            return True
    finally:
        engine.dispose()


def drop_database(admin_url: str, name: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(airflow_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        engine.dispose()


def _live_processes(match: Callable[[int], bool]) -> list[Any]:
    """Live processes (not zombies, not this one) whose PID ``match`` accepts."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and match(proc.pid) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def session_members(sid: int) -> list[Any]:
    """Live processes of the session ``sid`` (a service started with ``start_new_session``).

    Task processes move to process groups of their own (the task supervisor calls ``setpgid``)
    but stay in the session, so the session finds everything a service started.
    """
    return _live_processes(lambda pid: os.getsid(pid) == sid)


def group_members(pgid: int) -> list[Any]:
    """Live processes of the process group ``pgid`` (a service's own group, without the task
    processes that left it)."""
    return _live_processes(lambda pid: os.getpgid(pid) == pgid)


def _signal_all(leader: int, procs: Iterable[Any], sig: int) -> None:
    """Signal a process group and the given processes (descendants, session members)."""
    import psutil

    try:
        os.killpg(leader, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def _live(procs: Iterable[Any]) -> list[Any]:
    """The processes that are still running (zombies wait for a parent to reap them, not for us)."""
    import psutil

    live = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
        except psutil.Error:
            continue
    return live


@dataclass
class Service:
    """One service process, the leader of its own process group, logging to ``log_path``."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    stop_seconds: float | None = None

    def start(self) -> "Service":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def descendants(self) -> list[Any]:
        import psutil

        if not self.alive():
            return []
        try:
            return psutil.Process(self.process.pid).children(recursive=True)  # type: ignore[union-attr]
        except psutil.Error:
            return []

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the service and everything it started; returns the service's exit code.

        SIGTERM to the service alone first (it shuts its own children down in order: a group-wide
        signal makes the scheduler wait for executor workers that are already gone), then SIGTERM
        and, 5 s later, SIGKILL to whatever is left of it: its process group, its descendants and
        its session (task processes have process groups of their own; orphans leave the tree).
        """
        import psutil

        if self.process is None:
            return None
        started = time.monotonic()
        pid = self.process.pid
        procs = {p.pid: p for p in self.descendants() + session_members(pid)}
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        procs.update({p.pid: p for p in session_members(pid)})
        if self.process.poll() is None or _live(procs.values()):
            _signal_all(pid, procs.values(), signal.SIGTERM)
            psutil.wait_procs(_live(procs.values()), timeout=5)
            procs.update({p.pid: p for p in session_members(pid)})
            _signal_all(pid, procs.values(), signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        psutil.wait_procs(_live(procs.values()), timeout=5)
        self.stop_seconds = time.monotonic() - started
        return self.process.returncode

    def kill(self, timeout: float = 20.0) -> float:
        """SIGKILL the service's process group at once, as a crash would: no SIGTERM, nothing
        shut down in order.  Returns the seconds until no process of the group is left running.

        Only the group is signalled: processes that left it (task processes, which the task
        supervisor puts in groups of their own) live on as orphans in the service's session,
        as they would when the service alone crashes; :meth:`stop` ends them.
        """
        if self.process is None:
            raise RuntimeError(f"service {self.name} was never started")
        started = time.monotonic()
        pid = self.process.pid
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=timeout)
        deadline = started + timeout
        while group_members(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes of {self.name}'s group outlived SIGKILL by {timeout}s: "
                                   f"{[p.pid for p in group_members(pid)]}")
            time.sleep(0.01)
        return time.monotonic() - started

    def leftovers(self) -> list[Any]:
        return session_members(self.process.pid) if self.process else []

    def tail(self, max_chars: int = 6000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-max_chars:].decode(errors="replace")


@dataclass
class RedisServer:
    """A private ``redis-server`` on a free loopback port (no persistence), for a Celery broker."""

    data_dir: Path
    port: int = 0
    service: Service | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.data_dir), "--protected-mode", "yes"]
        self.service = Service("redis", args, dict(os.environ), self.data_dir / "redis.log").start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.service.alive():
                raise RuntimeError(f"redis-server exited:\n{self.service.tail()}")
            if redis_reachable(self.url):
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"redis-server not ready in {timeout}s:\n{self.service.tail() if self.service else ''}")

    def stop(self) -> None:
        if self.service:
            self.service.stop(timeout=5)


def redis_reachable(url: str) -> bool:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@dataclass
class AirflowStack:
    """Airflow services of one installation: ``AIRFLOW_HOME`` under ``home``, metadata on Postgres.

    ``start()`` migrates the metadata DB, creates the pools, starts the services and waits for
    ``/api/v2/monitor/health``; ``stop()`` (also on ``with`` exit) stops every process it started.
    """

    home: Path
    metadata_url: str
    executor: str = "LocalExecutor"
    broker_url: str | None = None
    result_backend: str | None = None  # default: db+<metadata DB>
    dags_folder: Path = DAGS_DIR
    # name -> (role, password) for the simple auth manager; passwords are written, not generated.
    users: dict[str, tuple[str, str]] = field(default_factory=lambda: {"admin": ("admin", secrets.token_urlsafe(12))})
    pools: dict[str, int] = field(default_factory=lambda: {"gpu": 4})
    parallelism: int = 4
    paused_at_creation: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    base_env: Mapping[str, str] | None = None  # default: this process's environment
    host: str = "127.0.0.1"
    api_port: int = 0
    services: dict[str, Service] = field(default_factory=dict)
    # Services killed by kill_service (a restart replaces them in ``services``): stop() still
    # ends what they left running.
    crashed: list[Service] = field(default_factory=list)
    _secrets: dict[str, str] = field(default_factory=dict)
    _ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        self.metadata_url = airflow_url(self.metadata_url)
        self.api_port = self.api_port or free_port(self.host)
        from cryptography.fernet import Fernet

        self._secrets = {"jwt": secrets.token_urlsafe(32), "api": secrets.token_urlsafe(32),
                         "fernet": Fernet.generate_key().decode()}

    # ------------------------------------------------------------------ configuration

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def logs_dir(self) -> Path:
        return self.home / "service-logs"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def passwords_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json"

    def environment(self, **overrides: str) -> dict[str, str]:
        """The environment every service (and every task it runs) gets."""
        base = dict(os.environ if self.base_env is None else self.base_env)
        # The stack owns Airflow's configuration: nothing inherited may point it elsewhere.
        for name in list(base):
            if name.startswith("AIRFLOW__") or name in ("AIRFLOW_HOME", "AIRFLOW_CONFIG", HOSTNAME_ENV):
                del base[name]
        env = {
            **base,
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            # The annotation browser (mmprm_tasks/browser) in the api-server and the UI.
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(BROWSER_PLUGINS_DIR),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": str(self.paused_at_creation),
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__FERNET_KEY": self._secrets["fernet"],
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, (r, _) in self.users.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_url,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE": "3",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW": "8",
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__HOST": self.host,
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": self._secrets["api"],
            "AIRFLOW__API_AUTH__JWT_SECRET": self._secrets["jwt"],
            LOG_SERVER_HOST_ENV: self.host,
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self._port("worker_log")),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self._port("trigger_log")),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
        }
        if self.executor == "CeleryExecutor":
            if not self.broker_url:
                raise ValueError("CeleryExecutor needs a broker_url (e.g. redis://127.0.0.1:6379/0)")
            env["AIRFLOW__CELERY__BROKER_URL"] = self.broker_url
            env["AIRFLOW__CELERY__RESULT_BACKEND"] = self.result_backend or f"db+{self.metadata_url}"
            env["AIRFLOW__CELERY__SYNC_PARALLELISM"] = "1"
        env.update(self.extra_env)
        env.update(overrides)
        return env

    def _port(self, name: str) -> int:
        if name not in self._ports:
            self._ports[name] = free_port(self.host)
        return self._ports[name]

    def _airflow_args(self, *args: str) -> list[str]:
        # The airflow command, with its log servers bound to self.host (see airflow_launch).
        return [sys.executable, "-m", "mmprm_tasks.airflow_launch", *args]

    def cli(self, *args: str, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run an ``airflow`` CLI command against this installation."""
        result = subprocess.run(self._airflow_args(*args), env=self.environment(), capture_output=True, text=True,
                                timeout=timeout, start_new_session=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    # ------------------------------------------------------------------ lifecycle

    def prepare(self) -> None:
        """AIRFLOW_HOME, the passwords file and the migrated metadata DB."""
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.passwords_file.unlink(missing_ok=True)
        fd = os.open(self.passwords_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({u: p for u, (_, p) in self.users.items()}, out)
        self.cli("db", "migrate", timeout=600)

    def start_service(self, name: str, args: list[str], **env: str) -> Service:
        if name in self.services and self.services[name].alive():
            raise RuntimeError(f"service {name} is already running (pid {self.services[name].pid})")
        service = Service(name, self._airflow_args(*args), self.environment(**env), self.logs_dir / f"{name}.log")
        self.services[name] = service.start()
        return service

    def start(self, services: Iterable[str] = CORE_SERVICES, *, timeout: float = 180.0) -> "AirflowStack":
        """Migrate, create pools, start the services, and wait until they report healthy."""
        try:
            self.prepare()
            pool_jobs = [subprocess.Popen(
                self._airflow_args("pools", "set", name, str(slots), f"{name} slots (mmprm airflow_stack)"),
                env=self.environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                start_new_session=True) for name, slots in self.pools.items()]
            services = list(services)
            for name in services:
                if name == "api-server":
                    self.start_service(name, ["api-server", "--host", self.host, "--port", str(self.api_port),
                                              "--workers", "1"])
                else:
                    self.start_service(name, [name])
            for job in pool_jobs:
                _, err = job.communicate(timeout=timeout)
                if job.returncode != 0:
                    raise RuntimeError(f"airflow pools set failed: {err[-3000:]}")
            self.wait_healthy([s for s in services if s in _HEALTH_KEYS], timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def kill_service(self, name: str) -> float:
        """SIGKILL service ``name``'s process group (:meth:`Service.kill`): a crash, not a stop,
        for the tests of what survives one.  Returns the seconds until the group was gone.

        The dead service is kept in ``crashed``, so :meth:`stop` still ends what it left running
        (task processes, which have process groups of their own); :meth:`restart_service` starts
        a new one.
        """
        service = self.services[name]
        seconds = service.kill()
        self.crashed.append(service)
        return seconds

    def restart_service(self, name: str, *, timeout: float = 180.0, **env: str) -> Service:
        """Start service ``name`` again, after a crash or a stop, with its arguments and its
        environment (``env``: overrides for this start only); returns the new service.

        A scheduler, dag-processor or triggerer is waited for until it heartbeats itself: the
        health report alone would not do, since a killed scheduler's last heartbeat keeps it
        "healthy" for ``[scheduler] scheduler_health_check_threshold`` (30 s).
        """
        old = self.services[name]
        if old.alive():
            raise RuntimeError(f"service {name} is running (pid {old.pid}): stop or kill it first")
        since = datetime.now(timezone.utc)
        service = Service(name, old.args, {**old.env, **env}, old.log_path)
        self.services[name] = service.start()
        if name in _HEALTH_KEYS:
            self.wait_healthy([name], timeout=timeout, since=since)
        return service

    def start_celery_worker(self, name: str, queues: Iterable[str], *, hostname: str | None = None,
                            concurrency: int = 1, wait: bool = True, timeout: float = 120.0) -> Service:
        """A Celery worker serving ``queues``; its task instances report ``hostname``.

        Each worker gets its own log-server port, so several can run on one machine.  With
        ``wait``, returns once the worker logs that it is ready (see :meth:`wait_for_log`).
        """
        hostname = hostname or f"{name}@{socket.gethostname()}"
        service = self.start_service(
            name, ["celery", "worker", "--queues", ",".join(queues), "--celery-hostname", hostname,
                   "--concurrency", str(concurrency), "--without-gossip", "--without-mingle"],
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(self._port(f"{name}_log")),
            AIRFLOW__CORE__HOSTNAME_CALLABLE=f"{__name__}.worker_hostname",
            **{HOSTNAME_ENV: hostname})
        if wait:
            self.wait_for_log(service, " ready.", timeout=timeout)
        return service

    def wait_for_log(self, service: Service, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not service.alive():
                raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n{service.tail()}")
            if text in service.tail(200_000):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{service.name} did not log {text!r} within {timeout}s:\n{service.tail()}")

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=5).json()

    def wait_healthy(self, components: Iterable[str] = ("scheduler", "dag-processor", "triggerer"),
                     timeout: float = 180.0, since: datetime | None = None) -> dict[str, Any]:
        """Until the health report has the components healthy (with ``since``: each with a
        heartbeat after it, i.e. from a job started since)."""
        import httpx

        wanted = [_HEALTH_KEYS[c] for c in components]

        def beats_since(key: str, report: dict[str, Any]) -> bool:
            beat = report.get(f"latest_{key}_heartbeat")
            return since is None or (beat is not None and datetime.fromisoformat(beat) > since)

        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            dead = [s for s in self.services.values() if not s.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with {dead[0].process.returncode}:\n{dead[0].tail()}")
            try:
                last = self.health()
                if last.get("metadatabase", {}).get("status") == "healthy" and all(
                        (last.get(key) or {}).get("status") == "healthy" and beats_since(key, last[key])
                        for key in wanted):
                    return last
            except (httpx.HTTPError, ValueError) as exc:
                last = repr(exc)
            time.sleep(1.0)
        raise TimeoutError(f"Airflow not healthy within {timeout}s; last health: {last}\n{self.diagnostics()}")

    def stop(self) -> list[int]:
        """Stop every service (scheduler, workers, triggerer, dag-processor, then the api-server).

        Returns the PIDs of processes that outlived their service's stop and had to be killed
        afterwards (normally none).
        """
        from concurrent.futures import ThreadPoolExecutor

        def stop(service: Service) -> None:
            try:
                service.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass

        # Everything that talks to the api-server stops first (in parallel: the triggerer alone
        # takes ~10 s to wind down), the api-server last; what crashed services left running
        # (their task processes) with the first.
        first = [s for s in self.services.values() if s.name != "api-server"] + self.crashed
        if first:
            with ThreadPoolExecutor(len(first)) as pool:
                list(pool.map(stop, first))
        if "api-server" in self.services:
            stop(self.services["api-server"])
        leftovers = [p for service in [*self.services.values(), *self.crashed] for p in service.leftovers()]
        for proc in leftovers:
            try:
                proc.kill()
            except Exception:  # noqa: BLE001
                pass
        return [p.pid for p in leftovers]

    def __enter__(self) -> "AirflowStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ REST

    def token(self, username: str | None = None, password: str | None = None) -> str:
        import httpx

        username = username or next(iter(self.users))
        password = password or self.users[username][1]
        response = httpx.post(f"{self.api_url}/auth/token", json={"username": username, "password": password},
                              timeout=30)
        response.raise_for_status()
        return response.json()["access_token"]

    def client(self, username: str | None = None, password: str | None = None, timeout: float = 30.0):
        """An ``httpx.Client`` on the api-server with a bearer token."""
        import httpx

        return httpx.Client(base_url=self.api_url, timeout=timeout,
                            headers={"Authorization": f"Bearer {self.token(username, password)}"})

    def wait_for_dag(self, client, dag_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Until the dag-processor has registered ``dag_id``; import errors are reported on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = client.get(f"/api/v2/dags/{dag_id}")
            if response.status_code == 200:
                return response.json()
            time.sleep(1.0)
        errors = client.get("/api/v2/importErrors")
        raise TimeoutError(f"DAG {dag_id} not registered within {timeout}s; import errors: {errors.text}\n"
                           f"{self.diagnostics()}")

    # ------------------------------------------------------------------ diagnostics

    def task_logs(self, dag_id: str | None = None) -> list[Path]:
        root = self.airflow_home / "logs"
        pattern = f"dag_id={dag_id}/**/*.log" if dag_id else "dag_id=*/**/*.log"
        return sorted(root.glob(pattern))

    def diagnostics(self, max_chars: int = 4000, dag_id: str | None = None) -> str:
        """The tail of every service log, and of the task logs (for a failing test's report)."""
        parts = []
        for service in self.services.values():
            state = "running" if service.alive() else f"exited {service.process.returncode if service.process else '?'}"
            parts.append(f"===== {service.name} ({state}, {service.log_path}) =====\n{service.tail(max_chars)}")
        for path in self.task_logs(dag_id)[-12:]:
            text = path.read_bytes()[-max_chars:].decode(errors="replace")
            parts.append(f"===== task log {path.relative_to(self.airflow_home)} =====\n{text}")
        return "\n".join(parts)


# The simple auth manager's roles, each with the rights of the one before and more.
ROLES = {
    "viewer": "reads DAGs, DAG runs, task logs, assets and the annotation browser; cannot trigger",
    "user": "a viewer who may also trigger, clear and mark DAG runs and task instances",
    "op": "a user who may also edit connections, pools and variables",
    "admin": "everything, including the configuration",
}


def parse_users(specs: Iterable[str], passwords: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """``NAME:ROLE`` specs -> name -> (role, password): the password from ``passwords`` (a file the
    operator keeps) when it names the user, else a generated one."""
    users: dict[str, tuple[str, str]] = {}
    for spec in specs:
        name, sep, role = spec.partition(":")
        if not sep or not name or role not in ROLES:
            raise ValueError(f"--user {spec!r}: expected NAME:ROLE with ROLE one of {', '.join(ROLES)}")
        if name in users or name == "admin":
            raise ValueError(f"--user {spec!r}: user {name!r} is given twice (admin always exists)")
        users[name] = (role, (passwords or {}).get(name) or secrets.token_urlsafe(12))
    return users


def local_stack(settings: Any, *, home: Path, metadata_url: str, port: int = 0, password: str | None = None,
                toy_seeds: tuple[int, int] | None = (24, 16),
                users: dict[str, tuple[str, str]] | None = None) -> AirflowStack:
    """Everything a local stack needs before its services start (``mmprm stack up``): the step
    index's database (created when missing) at the latest schema, the toy world's train and test
    seeds ingested (``toy_seeds``: how many of each; None: none), and the Airflow metadata
    database (created when missing, never dropped).  Returns the stack, not started; the DAGs
    start unpaused except the nightly refresh, which is paused at creation."""
    from . import db, pipeline

    ensure_database(settings.database_url)
    db.upgrade(db.get_engine(settings))
    if toy_seeds:
        from .toy.world import generate_seeds

        # Under the first allowed seed root, so a trigger's seed_source may name these files too.
        seeds = generate_seeds(settings.allowed_seed_roots[0] / "toy", n_train=toy_seeds[0], n_test=toy_seeds[1])
        pipeline.ingest_stage(settings, str(seeds["train"]), str(seeds["test"]))
    ensure_database(metadata_url)
    return AirflowStack(home=home, metadata_url=metadata_url, api_port=port,
                        users={"admin": ("admin", password or secrets.token_urlsafe(12)), **(users or {})})


def serve(stack: AirflowStack, workers: Iterable[str] = (), out=print) -> int:
    """Start the stack (and Celery workers for these comma-separated queue lists), print where it
    is, and run until SIGTERM/Ctrl-C or until a service dies; every service is stopped on return."""
    stopping = False

    def _stop(signum, frame):  # noqa: ARG001
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        stack.start()
        for i, queues in enumerate(workers):
            stack.start_celery_worker(f"worker-{i}-{queues.replace(',', '-')}", queues.split(","), concurrency=2)
        out(f"Airflow is up: {stack.api_url} (user admin, password in {stack.passwords_file});"
            f" service logs in {stack.logs_dir}")
        out(f"Ctrl-C stops {_services_named(stack)} and their task processes.")
        while not stopping:
            dead = [s for s in stack.services.values() if not s.alive()]
            if dead:
                print(f"{dead[0].name} exited:\n{dead[0].tail()}", file=sys.stderr)
                return 1
            time.sleep(1)
        return 0
    finally:
        # Stopping takes a while (each service shuts its children down in order): say what.
        started = time.monotonic()
        out(f"stopping {_services_named(stack)} and their task processes ...")
        stack.stop()
        out(f"stopped in {time.monotonic() - started:.0f} s; the step index, the objects and the Airflow metadata "
            "database are kept")


def _services_named(stack: AirflowStack) -> str:
    return "the Airflow services (" + ", ".join(stack.services) + ")"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmprm_tasks.airflow_stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="AIRFLOW_HOME and the service logs go here")
    parser.add_argument("--metadata-url", required=True, help="Postgres URL of the Airflow metadata DB")
    parser.add_argument("--create-db", action="store_true", help="(re)create the metadata DB first: DROPS it")
    parser.add_argument("--executor", default="LocalExecutor", choices=["LocalExecutor", "CeleryExecutor"])
    parser.add_argument("--broker", help="Celery broker URL (default: a private redis-server)")
    parser.add_argument("--worker", action="append", default=[], metavar="QUEUES",
                        help="start a Celery worker for these comma-separated queues (repeatable)")
    parser.add_argument("--port", type=int, default=0, help="api-server port (default: a free one)")
    parser.add_argument("--password", default=None, help="password of user admin (default: random, written to the passwords file)")
    parser.add_argument("--parallelism", type=int, default=4)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the services and their tasks (repeatable)")
    args = parser.parse_args(argv)

    if args.create_db:
        from sqlalchemy.engine import make_url

        url = make_url(args.metadata_url)
        create_database(url.set(database="postgres").render_as_string(hide_password=False), url.database)
    redis = None
    broker = args.broker
    if args.executor == "CeleryExecutor" and not broker:
        redis = RedisServer(args.home / "redis").start()
        broker = redis.url
    password = args.password or secrets.token_urlsafe(12)
    stack = AirflowStack(home=args.home, metadata_url=args.metadata_url, executor=args.executor,
                         broker_url=broker, users={"admin": ("admin", password)}, parallelism=args.parallelism,
                         api_port=args.port, extra_env=dict(item.split("=", 1) for item in args.env))
    try:
        return serve(stack, args.worker, out=lambda line: print(line, flush=True))
    finally:
        if redis:
            redis.stop()


if __name__ == "__main__":
    sys.exit(main())
