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
        self.put_many([key], kv[None])

    def put_many(self, keys: list[bytes], kv: torch.Tensor) -> None:
        """Store blocks kv [n, ...] while slots are free (the caller demotes what `evict` returns first);
        from the device, the copies are queued on its stream, not waited for."""
        from_device = kv.is_cuda and self._copied is not None
        stored = False
        for key, block_kv in zip(keys, kv, strict=True):
            if key in self._slots:
                self._slots.move_to_end(key)
                continue
            if not self._free:
                break
            slot = self._free.pop()
            self._slab[slot].copy_(block_kv, non_blocking=from_device)
            if from_device:
                self._in_flight.add(slot)
            self._slots[key] = slot
            stored = True
        if stored and from_device:
            self._copied.record()  # type: ignore[union-attr]
        self._update_size()

    @property
    def full(self) -> bool:
        return not self._free

    @property
    def capacity(self) -> int:
        return len(self._slab)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def evict(self) -> tuple[bytes, torch.Tensor] | None:
        """The least recently used block, removed: its key and a view of its slot, valid until the next
        put (copy it to keep it)."""
        if not self._slots:
            return None
        key, slot = self._slots.popitem(last=False)
        if slot in self._in_flight:  # the oldest slot is rarely still in flight: then wait for all
            self._copied.synchronize()  # type: ignore[union-attr]
            self._in_flight.clear()
        self._free.append(slot)
        self.stats.evictions += 1
        self._update_size()
        return key, self._slab[slot]

    def _update_size(self) -> None:
        self.stats.blocks = len(self._slots)
        self.stats.bytes = self.stats.blocks * self._block_bytes
