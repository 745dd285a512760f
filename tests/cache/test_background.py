"""The background worker behind the tiers' writers: order, batches, flush, close, a failing item, pauses
of the engine's step work."""

from __future__ import annotations

import threading
import time

import pytest

from warmkv.cache import background
from warmkv.cache.background import BackgroundWorker, EngineCpuWork


def test_items_are_handled_in_order_in_batches_and_flush_waits_for_them() -> None:
    gate = threading.Event()
    seen: list[list[int]] = []

    def handle(batch: list[int]) -> None:
        gate.wait(5)
        seen.append(batch)

    worker = BackgroundWorker("test-worker", handle, max_queued=10, batch=4)
    assert all(worker.put(i) for i in range(7))
    gate.set()
    worker.flush()
    assert [i for batch in seen for i in batch] == list(range(7))
    assert max(len(b) for b in seen) <= 4 and len(seen) >= 2
    worker.close()


def test_full_queue_refuses_at_once_and_a_failing_item_does_not_stop_the_worker() -> None:
    gate = threading.Event()
    handled: list[int] = []

    def handle(batch: list[int]) -> None:
        gate.wait(5)
        if batch == [0]:
            raise RuntimeError("boom")
        handled.extend(batch)

    worker = BackgroundWorker("test-worker", handle, max_queued=2)
    assert worker.put(0)
    while not worker._queue.empty():  # until the thread holds item 0
        pass
    assert worker.put(1) and worker.put(2)
    assert not worker.put(3)
    assert not worker.put(3, wait=True, timeout=0.05)
    gate.set()
    worker.flush()  # returns although item 0 raised
    assert handled == [1, 2]
    worker.close()
    assert not worker._thread.is_alive()


def waiting_worker(
    monkeypatch: pytest.MonkeyPatch, longest_wait_s: float
) -> tuple[EngineCpuWork, list[int], BackgroundWorker[int]]:
    """A worker whose items wait out an engine's step work, now started, at most `longest_wait_s`."""
    monkeypatch.setattr(background, "LONGEST_PAUSE_WAIT_S", longest_wait_s)
    engine_work = EngineCpuWork()
    handled: list[int] = []
    worker = BackgroundWorker("test-worker", handled.extend, max_queued=4, engine_work=engine_work)
    engine_work.started()
    return engine_work, handled, worker


def until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_items_wait_for_the_engines_step_work_to_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    engine_work, handled, worker = waiting_worker(monkeypatch, 30.0)
    worker.put(1)
    time.sleep(0.2)
    assert handled == []  # the engine thread is in its step's work
    engine_work.paused()  # it waits for the device
    worker.flush()
    assert handled == [1]
    worker.close()


def test_step_work_that_never_pauses_delays_an_item_only_so_long(monkeypatch: pytest.MonkeyPatch) -> None:
    _, handled, worker = waiting_worker(monkeypatch, 0.05)
    worker.put(1)
    worker.put(2)
    assert until(lambda: handled == [1, 2])
    worker.close()


def test_a_half_full_queue_goes_on_without_waiting_for_a_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    engine_work, handled, worker = waiting_worker(monkeypatch, 30.0)
    worker.put(1)
    time.sleep(0.1)
    assert handled == []  # waiting for a pause
    worker.put(2)
    worker.put(3)  # two queued behind the one waiting: half of the queue
    assert until(lambda: handled[:1] == [1], 5.0)
    engine_work.paused()
    worker.flush()
    assert handled == [1, 2, 3]
    worker.close()
