"""Blocks from the pool to the disk and shared tiers, off the request path: each step's completed blocks
written through, and (written back) those leaving the pool or written in idle time.

The engine thread only queues one device-side gather of the blocks (stream order makes that
copy safe: any later write to those pool blocks is queued behind it). A helper thread copies the gather to
host memory on its own stream and hands the blocks to the tiers, waiting for their writers when they are
busy. When even the helper's short queue is full (the tiers are slower than prefill), the step's blocks
are skipped and counted, never waited for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from warmkv.cache.background import BackgroundWorker, EngineCpuWork
from warmkv.cache.kv_pool import KVPool
from warmkv.cache.tiers.base import Tier

QUEUED_STEPS = 4  # gathers waiting for the helper: each holds a step's new blocks in device memory
STAGING_BLOCKS = 64  # pinned bounce buffer: device-to-host copies into it are truly asynchronous


class WriteThrough:
    def __init__(self, pool: KVPool, tiers: Sequence[Tier], engine_work: EngineCpuWork | None = None) -> None:
        self._pool, self._tiers = pool, list(tiers)
        device = pool.k.device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._staging = (
            torch.empty((STAGING_BLOCKS, *pool.block_shape), dtype=pool.k.dtype, pin_memory=True)
            if self._stream is not None
            else None
        )
        self._worker: BackgroundWorker[tuple[list[bytes], torch.Tensor, torch.cuda.Event | None]] = (
            BackgroundWorker("warmkv-write-through", self._write_steps, QUEUED_STEPS, engine_work=engine_work)
        )

    def submit(self, keys: list[bytes], blocks: list[int]) -> None:
        if self._room_for(keys):
            self._queue(keys, self._pool.read_blocks(blocks))  # a copy: the blocks may be reused once queued

    def submit_gathered(self, keys: list[bytes], kv: torch.Tensor) -> None:
        """Blocks already gathered, [n, ...] on the pool's device (a demotion's copy) or the CPU; kv must not
        change afterwards."""
        if self._room_for(keys):
            self._queue(keys, kv)

    def _room_for(self, keys: list[bytes]) -> bool:
        writers = [t for t in self._tiers if getattr(t, "enabled", True)]
        if not keys or not writers:
            return False
        if self.busy():  # only this thread adds: a queue not full now has room below
            for tier in writers:
                tier.stats.skipped_writes += len(keys)
            return False
        return True

    def _queue(self, keys: list[bytes], kv: torch.Tensor) -> None:
        done = None
        if self._stream is not None:
            done = torch.cuda.Event()
            done.record()
        self._worker.put((keys, kv, done))

    def busy(self) -> bool:
        """Whether a submit now would be skipped: the helper's queue is full."""
        return self._worker.full()

    def flush(self) -> None:
        self._worker.flush()

    def close(self) -> None:
        self._worker.close()

    def _write_steps(self, steps: list[tuple[list[bytes], torch.Tensor, torch.cuda.Event | None]]) -> None:
        for keys, kv, done in steps:
            self._put(keys, self._to_host(kv, done))

    def _to_host(self, kv: torch.Tensor, done: torch.cuda.Event | None) -> torch.Tensor:
        if self._staging is None or not kv.is_cuda:  # a gather on the CPU, or host-tier blocks: host copies
            return kv
        host = torch.empty(kv.shape, dtype=kv.dtype)
        with torch.cuda.stream(self._stream):  # type: ignore[arg-type]
            self._stream.wait_event(done)
            kv.record_stream(self._stream)
            # through the pinned buffer: a copy to pageable memory would stall the engine's stream
            for start in range(0, len(kv), STAGING_BLOCKS):
                part = kv[start : start + STAGING_BLOCKS]
                staged = self._staging[: len(part)]
                staged.copy_(part, non_blocking=True)
                self._stream.synchronize()
                host[start : start + len(part)].copy_(staged)
        return host

    def _put(self, keys: list[bytes], kv: torch.Tensor) -> None:
        for tier in self._tiers:
            if getattr(tier, "enabled", True):
                for key, block_kv in zip(keys, kv, strict=True):
                    tier.put(key, block_kv, wait=True)  # type: ignore[call-arg]
