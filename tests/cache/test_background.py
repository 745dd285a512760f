"""The background worker behind the tiers' writers: order, batches, flush, close, a failing item."""

from __future__ import annotations

import threading

from warmkv.cache.background import BackgroundWorker


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
