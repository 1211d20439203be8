"""The asyncio bridge the vllm backend runs its async engine on (CPU: plain coroutines)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mmprm_tasks.policy.vllm_engine import EventLoopThread


def test_coroutines_run_concurrently_on_the_loop_thread():
    bridge = EventLoopThread("test-loop")
    started = asyncio.Event()
    seen_threads: set[str] = set()

    async def job(i: int) -> int:
        seen_threads.add(threading.current_thread().name)
        if i == 0:
            await started.wait()  # finishes only after a later job ran: no serialisation
        else:
            started.set()
        return i * i

    try:
        futures = [bridge.submit(job(i)) for i in range(8)]
        assert [f.result(timeout=10) for f in futures] == [i * i for i in range(8)]
        assert seen_threads == {"test-loop"}
        assert bridge.call(lambda: threading.current_thread().name) == "test-loop"
    finally:
        bridge.close()
    assert bridge.loop.is_closed()


def test_cancelling_the_future_cancels_the_coroutine():
    bridge = EventLoopThread("test-loop")
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    try:
        future = bridge.submit(forever())
        bridge.call(lambda: None)  # the coroutine has started
        future.cancel()
        assert cancelled.wait(10)
    finally:
        bridge.close()


def test_errors_reach_the_caller():
    bridge = EventLoopThread("test-loop")

    async def broken() -> None:
        raise ValueError("engine said no")

    try:
        with pytest.raises(ValueError, match="engine said no"):
            bridge.submit(broken()).result(timeout=10)
    finally:
        bridge.close()
