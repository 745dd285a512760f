"""A daemon thread working through a bounded queue in order: the tiers' writers and the write-through
helper share it, so queueing, flushing and stopping work the same way everywhere. On a GPU, each takes
up its next item only between the engine thread's stretches of step work (EngineCpuWork)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("warmkv.cache")

Item = TypeVar("Item")

# the longest a background item waits for the engine's step work to pause: a stretch never starves a writer
LONGEST_PAUSE_WAIT_S = 0.05
BACKLOG_CHECK_S = 0.005  # how often a waiting item looks at its queue: a backlog goes on at once


class EngineCpuWork:
    """Whether the engine thread is in a stretch of Python work that a step waits on: scheduling and
    launching it, reading its tokens and turning them into outputs. Every torch call there lets go of the
    interpreter lock, and a background thread that takes it meanwhile delays the step until it lets go in
    turn: on an H100, with the disk tier's writers busy, the engine's thread spent 2.5-3.3 ms of a step off
    its CPU (0.4-1.1 once writers waited for these pauses; bench/results/ttft-steps-nvidia-h100-80gb-hbm3-
    staged-evictions.json). Pauses: the engine waits for the device, or is idle."""

    def __init__(self) -> None:
        self._paused = threading.Event()
        self._paused.set()

    def started(self) -> None:
        self._paused.clear()

    def paused(self) -> None:
        self._paused.set()

    def wait_for_pause(self, backlogged: Callable[[], bool]) -> None:
        """Until the engine's step work pauses, the caller's queue is `backlogged`, or LONGEST_PAUSE_WAIT_S
        has passed."""
        deadline = time.monotonic() + LONGEST_PAUSE_WAIT_S
        while not self._paused.wait(BACKLOG_CHECK_S) and not backlogged() and time.monotonic() < deadline:
            pass


class BackgroundWorker(Generic[Item]):
    def __init__(
        self, name: str, handle: Callable[[list[Item]], None], max_queued: int, batch: int = 1,
        engine_work: EngineCpuWork | None = None, backlogged: Callable[[], bool] | None = None,
    ) -> None:  # fmt: skip
        """`handle` gets the queued items in order, up to `batch` of them at a time, each time once the
        engine's step work (if given) pauses (EngineCpuWork.wait_for_pause). `backlogged`: whether the
        work queued is so much that it goes on without waiting (default: the queue half full)."""
        self._handle, self._batch, self._engine_work = handle, batch, engine_work
        self._backlogged = backlogged or self._half_full
        self._queue: queue.Queue[Item | None] = queue.Queue(maxsize=max_queued)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, item: Item, wait: bool = False, timeout: float | None = None) -> bool:
        """Queue an item; False when the queue is full (at once, or still after `timeout` with wait)."""
        try:
            self._queue.put(item, block=wait, timeout=timeout)
        except queue.Full:
            return False
        return True

    def full(self) -> bool:
        return self._queue.full()

    def _half_full(self) -> bool:
        """Waiting for the engine's pauses must not let the queue fill and drop items."""
        return self._queue.qsize() * 2 >= self._queue.maxsize

    def pause_for_engine(self) -> None:
        """On the worker's thread, within an item of several parts: wait for the engine's next pause (as
        before each item), so that a long item does not run into the engine's step work."""
        if self._engine_work is not None:
            self._engine_work.wait_for_pause(self._backlogged)

    def flush(self) -> None:
        """Wait until every queued item is handled."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        stopping = False
        while not stopping and (item := self._queue.get()) is not None:
            batch = [item]
            while len(batch) < self._batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # stop after this batch
                    stopping = True
                    break
                batch.append(more)
            self.pause_for_engine()
            try:
                self._handle(batch)
            except Exception:  # a failing item must not stop the thread: flush() would wait forever
                log.exception("%s failed on %d queued item(s)", self._thread.name, len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()
        self._queue.task_done()  # the stop marker
