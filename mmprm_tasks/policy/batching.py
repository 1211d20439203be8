"""Continuous batching in front of an engine that runs one batch at a time.

Callers submit work at any moment and get a future; one worker thread keeps the engine busy: as
soon as a batch finishes it takes every waiting job that is compatible with the oldest one (same
``key``), up to ``max_sequences`` sequences, and runs them together.  Nobody waits for a round
to fill: a job submitted while the engine is busy rides in the next batch.

Used by the OpenAI-compatible CPU server (:mod:`mmprm_tasks.policy.server`, jobs are chat
prompts) and by the search's engine for batch backends (:class:`BatchingEngine`, jobs are
:class:`~mmprm_tasks.policy.GenerationRequest`).  Since every request samples from its own seed,
batching changes speed, never results.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mmprm_tasks.policy import GenerationRequest, PolicyBackend, PolicyError
from mmprm_tasks.rollouts import Rollout

Job = TypeVar("Job")


@dataclass
class _Pending(Generic[Job]):
    job: Job
    sequences: int
    key: Hashable
    future: Future = field(default_factory=Future)


class ContinuousBatcher(Generic[Job]):
    """``run(jobs) -> results`` (one result per job, in order) on a worker thread, batching the
    jobs that wait while it runs.  ``batches`` and ``sequences_run`` count what it did.

    A caller that reacts to finished work with a burst of new submissions can hold :meth:`burst`
    while it does: the worker neither takes jobs nor hands out results during a burst, so the
    burst's submissions ride together and the caller sees a batch's results all at once (with an
    instant engine, batches then do not depend on thread timing)."""

    def __init__(self, run: Callable[[list[Job]], Sequence[Any]], max_sequences: int, *, name: str = "batcher") -> None:
        if max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
        self._run = run
        self.max_sequences = max_sequences
        self._pending: deque[_Pending[Job]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._burst = threading.RLock()
        self.batches = 0
        self.sequences_run = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job, *, sequences: int = 1, key: Hashable = None) -> Future:
        pending = _Pending(job, sequences, key)
        with self._cond:
            if self._closed:
                raise PolicyError("the engine is shut down")
            self._pending.append(pending)
            self._cond.notify()
        return pending.future

    def burst(self) -> threading.RLock:
        return self._burst

    def _take(self) -> list[_Pending[Job]] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
        with self._burst, self._cond:
            if self._closed:
                return None
            first = self._pending.popleft()
            batch, total = [first], first.sequences
            for pending in list(self._pending):
                if total + pending.sequences > self.max_sequences:
                    break
                if pending.key == first.key:
                    self._pending.remove(pending)
                    batch.append(pending)
                    total += pending.sequences
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = self._run([p.job for p in batch])
                if len(results) != len(batch):
                    raise PolicyError(f"engine returned {len(results)} results for {len(batch)} jobs")
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                with self._burst:
                    for p in batch:
                        p.future.set_exception(exc)
                continue
            self.batches += 1
            self.sequences_run += sum(p.sequences for p in batch)
            with self._burst:
                for p, result in zip(batch, results):
                    p.future.set_result(result)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for p in pending:
            p.future.cancel()
        self._thread.join(timeout=60)


class BatchingEngine:
    """A policy backend behind a :class:`ContinuousBatcher`: ``submit(request)`` returns a future
    of the request's ``n`` rollouts.  ``capacity`` is the most sequences one engine call carries."""

    def __init__(self, policy: PolicyBackend, capacity: int) -> None:
        self.policy = policy
        self.capacity = capacity
        self._batcher: ContinuousBatcher[GenerationRequest] = ContinuousBatcher(
            lambda requests: self.policy.generate(requests), capacity, name="policy-engine")

    @property
    def calls(self) -> int:
        return self._batcher.batches

    def burst(self) -> threading.RLock:
        return self._batcher.burst()

    def submit(self, request: GenerationRequest) -> "Future[list[Rollout]]":
        return self._batcher.submit(request, sequences=request.n)

    def close(self) -> None:
        self._batcher.close()
