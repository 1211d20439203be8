"""How many threads torch computes with in each worker process (``settings.torch_threads``).

torch's default is one intra-op thread per core.  That is right on a box doing nothing else, but
on a shared box every process runs that many spinning threads and they fight: measured on 2
cores with other work running (issue 26), generation ran 6-9x and PRM training 10-17x slower in
wall time than with one thread per process.  So the thread count is chosen on purpose: the
setting when given (``MMPRM_TORCH_THREADS``), else :func:`default_torch_threads`.  The policy,
the trainer and the scorer apply it when they start; the verifier pool's processes use one
thread (:func:`use_one_thread`), their work is short rule checks.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# The variables native thread pools read when they start (OpenMP, MKL, OpenBLAS, numexpr).
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def cores_available() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity
        return os.cpu_count() or 1


def idle_cores(sample_s: float = 0.3) -> float:
    """Cores of this process's affinity that had nothing to run over ``sample_s`` seconds (from
    ``/proc/stat``): what the box leaves free as a stage starts.  Without ``/proc/stat``, none
    are counted idle (the shared-box default)."""
    import time

    cpus = {f"cpu{n}" for n in (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ())}

    def times() -> tuple[int, int]:
        idle = total = 0
        with open("/proc/stat", encoding="ascii") as stat:
            for line in stat:
                name, *values = line.split()
                if name in cpus:
                    ticks = [int(v) for v in values[:8]]
                    idle += ticks[3] + ticks[4]  # idle + iowait
                    total += sum(ticks)
        return idle, total

    try:
        idle0, total0 = times()
        time.sleep(sample_s)
        idle1, total1 = times()
    except OSError:
        return 0.0
    if total1 <= total0:
        return 0.0
    return len(cpus) * (idle1 - idle0) / (total1 - total0)


def default_torch_threads(processes: int = 1, cores: int | None = None, idle: float | None = None) -> int:
    """Threads per torch process when ``torch_threads`` is not set.

    A box that is idle as the stage starts (less than half a core busy: ``idle``, measured by
    :func:`idle_cores` when not given) gets every core, torch's own default: on a quiet 2-core box
    PRM training ran 1.56x faster with 2 threads than with 1, and generation as fast (issue 26,
    ``bench/bench_threads.py``).  Otherwise one core is left to what the stage does beside its
    torch work (the verifier pool, the index writers, Postgres, the Airflow task runner) and to
    the box's other work.  Either way the cores are shared by the ``processes`` torch processes
    the stage runs side by side (training's ranks on this host).
    """
    cores = cores_available() if cores is None else cores
    idle = idle_cores() if idle is None else idle
    usable = cores if idle >= cores - 0.5 else cores - 1
    return max(1, usable // max(1, processes))


def torch_threads(configured: int | None, processes: int = 1) -> int:
    return configured or default_torch_threads(processes)


def apply_torch_threads(configured: int | None, what: str, processes: int = 1) -> int:
    """Set this process's torch intra-op threads for ``what`` (policy, trainer, scorer); returns
    the count.  Process-wide: the stage that runs next sets its own."""
    import torch

    threads = torch_threads(configured, processes)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.info("%s: %d torch thread(s) (%s; %d core(s))", what, threads,
             "torch_threads setting" if configured else
             "default: every core on an idle box, else cores - 1, over the stage's processes",
             cores_available())
    return threads


def use_one_thread() -> None:
    """Make this (helper) process compute with one thread: for the native libraries it imports
    later (environment) and torch when it is already imported."""
    for name in _THREAD_ENV:
        os.environ[name] = "1"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def local_processes() -> int:
    """Torch processes a distributed launcher (torchrun, accelerate, deepspeed) runs on this host."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
