"""Host RAM tier: one preallocated slab of blocks (pinned on CUDA, so copies both ways are asynchronous).

A block demoted from the GPU is copied in the device's stream order, not waited for: a later load of it
(on the same stream) is ordered after that copy, and only a reader on the CPU (eviction to the tier
below) waits for copies still in flight.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from warmkv.cache.tiers.base import TierName, TierStats


class HostTier:
    name = TierName.HOST

    def __init__(
        self, capacity_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype, pin: bool
    ) -> None:
        # empty, not zeros: pages are committed only as blocks are stored
        self._slab = torch.empty((capacity_blocks, *block_shape), dtype=dtype, pin_memory=pin)
        self._slots: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._free = list(range(capacity_blocks))
        self._block_bytes = self._slab[0].numel() * self._slab.element_size() if capacity_blocks else 0
        self.stats = TierStats()
        self._in_flight: set[int] = set()  # slots whose copy from the device may not have landed yet
        self._copied = torch.cuda.Event() if pin else None  # recorded after the latest such copy

    def contains(self, key: bytes) -> bool:
        return key in self._slots

    def get(self, key: bytes) -> torch.Tensor | None:
        slot = self._slots.get(key)
        if slot is None:
            self.stats.misses += 1
            return None
        self._slots.move_to_end(key)
        self.stats.hits += 1
        return self._slab[slot]

    def put(self, key: bytes, kv: torch.Tensor) -> None:
        """Store a block; the caller demotes what `evict` returns first when the tier is full."""
        if key in self._slots:
            self._slots.move_to_end(key)
            return
        if not self._free:
            return
        slot = self._free.pop()
        from_device = kv.is_cuda and self._copied is not None
        self._slab[slot].copy_(kv, non_blocking=from_device)
        if from_device:
            self._copied.record()  # type: ignore[union-attr]
            self._in_flight.add(slot)
        self._slots[key] = slot
        self._update_size()

    @property
    def full(self) -> bool:
        return not self._free

    def evict(self) -> tuple[bytes, torch.Tensor] | None:
        if not self._slots:
            return None
        key, slot = self._slots.popitem(last=False)
        if slot in self._in_flight:  # the oldest slot is rarely still in flight: then wait for all
            self._copied.synchronize()  # type: ignore[union-attr]
            self._in_flight.clear()
        self._free.append(slot)
        self.stats.evictions += 1
        self._update_size()
        return key, self._slab[slot].clone()  # the slot is reused at once; the tier below gets a copy

    def _update_size(self) -> None:
        self.stats.blocks = len(self._slots)
        self.stats.bytes = self.stats.blocks * self._block_bytes
