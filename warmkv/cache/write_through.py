"""Write-through of completed blocks to the disk and shared tiers, off the request path.

The blocks are gathered on the device in one copy (stream order makes that copy safe: any later write to
those pool blocks is queued behind it), copied to pinned host memory asynchronously, and handed to the tiers
by a helper thread once the copy is done. So an engine step never waits for a device-to-host transfer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

import torch

from warmkv.cache.tiers.base import Tier
from warmkv.engine.kv_pool import KVPool


class WriteThrough:
    def __init__(self, pool: KVPool, tiers: Sequence[Tier]) -> None:
        self._pool, self._tiers = pool, list(tiers)
        self._on_cuda = pool.k.device.type == "cuda"
        self._queue: queue.Queue[tuple[list[bytes], torch.Tensor, torch.cuda.Event] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="warmkv-write-through", daemon=True)
        self._thread.start()

    def submit(self, keys: list[bytes], blocks: list[int]) -> None:
        writers = [t for t in self._tiers if getattr(t, "enabled", True)]
        if not keys or not writers:
            return
        kv = self._pool.read_blocks(blocks)  # a copy: the blocks may be reused once this is queued
        if not self._on_cuda:
            self._put(keys, kv)
            return
        host = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True)
        host.copy_(kv, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._queue.put((keys, host, done))

    def flush(self) -> None:
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            keys, host, done = item
            try:
                done.synchronize()
                self._put(keys, host)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _put(self, keys: list[bytes], kv: torch.Tensor) -> None:
        for tier in self._tiers:
            if getattr(tier, "enabled", True):
                for key, block_kv in zip(keys, kv, strict=True):
                    tier.put(key, block_kv)
