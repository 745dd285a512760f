"""A daemon thread working through a bounded queue in order: the tiers' writers and the write-through
helper share it, so queueing, flushing and stopping work the same way everywhere."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("warmkv.cache")

Item = TypeVar("Item")


class BackgroundWorker(Generic[Item]):
    def __init__(
        self, name: str, handle: Callable[[list[Item]], None], max_queued: int, batch: int = 1
    ) -> None:
        """`handle` gets the queued items in order, up to `batch` of them at a time."""
        self._handle, self._batch = handle, batch
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
            try:
                self._handle(batch)
            except Exception:  # a failing item must not stop the thread: flush() would wait forever
                log.exception("%s failed on %d queued item(s)", self._thread.name, len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()
        self._queue.task_done()  # the stop marker
