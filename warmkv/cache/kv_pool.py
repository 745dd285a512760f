"""The paged KV pool: preallocated K/V slots per device, handed out in fixed-size blocks.

A block's reference count is the number of holders (running sequences, the prefix index) that rely on
its contents; a block returns to the free list only when the count drops to zero, so KV shared by many
sequences is never overwritten while one of them still reads it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from warmkv.errors import PoolExhausted


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        sides: int = 2,
    ) -> None:
        """sides 2: K and V per token; 1: one vector per token in k alone (MLA's compressed latent), and v
        an empty tensor of the same rank."""
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros((*shape[:3], head_dim if sides == 2 else 0), dtype=dtype, device=device)
        self.sides = sides
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._uploads = _PinnedUploads(num_blocks, device) if device.type == "cuda" else None
        # asked to free `count` blocks when too few are free; returns how many it freed (0: nothing left)
        self.reclaim: Callable[[int], int] = lambda count: 0

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, sides: int = 2
    ) -> int:
        return sides * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        while len(self._free) < count:
            if not self.reclaim(count - len(self._free)):  # in one batch: one scan, one gather to demote
                raise PoolExhausted(
                    f"KV pool exhausted: {count} blocks wanted, {len(self._free)} free of {self.num_blocks}"
                )
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self.ref_counts[block] = 1
        return blocks

    def incref(self, block: int) -> None:
        self.incref_many([block])

    def decref(self, block: int) -> None:
        self.decref_many([block])

    def incref_many(self, blocks: list[int]) -> None:
        """incref of each block, in one loop: a long conversation's thousands of blocks cost per call."""
        counts = self.ref_counts
        for block in blocks:
            assert counts[block] > 0, "only a held block can gain holders"
            counts[block] += 1

    def decref_many(self, blocks: list[int]) -> None:
        counts, free = self.ref_counts, self._free
        for block in blocks:
            counts[block] -= 1
            assert counts[block] >= 0
            if not counts[block]:
                free.append(block)

    def slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot indices of token positions [start, end) of a sequence with these blocks, on the host:
        a step moves all its sequences' slots to the device in one copy."""
        size, first = self.block_size, start // self.block_size
        positions = torch.arange(start, end)
        # only the blocks the positions fall in: a short chunk after a long prefix converts a few ids
        blocks = torch.tensor(block_ids[first : -(-end // size)], dtype=torch.long)
        return blocks[positions // size - first] * size + positions % size

    def release(self) -> None:
        """Give the KV memory back now, even while something still references the pool; it serves no more."""
        self.k = self.v = torch.empty(0, dtype=self.k.dtype, device=self.k.device)
        self.num_blocks, self.ref_counts, self._free = 0, [], deque()

    @property
    def _stored(self) -> tuple[torch.Tensor, ...]:
        """What a block holds, in its order: K and V, or k alone."""
        return (self.k, self.v) if self.sides == 2 else (self.k,)

    def copy_block(self, source: int, target: int) -> None:
        size = self.block_size
        for side in self._stored:
            side[:, target * size : (target + 1) * size] = side[:, source * size : (source + 1) * size]

    def read_block(self, block: int) -> torch.Tensor:
        """A copy of one block's K and V: [sides, layers, block_size, kv_heads, head_dim]."""
        rows = slice(block * self.block_size, (block + 1) * self.block_size)
        return torch.stack([side[:, rows] for side in self._stored])

    def read_blocks(self, blocks: list[int]) -> torch.Tensor:
        """A copy of several blocks: [n, sides, layers, block_size, heads, head_dim]. One gather per side,
        straight into its place in the copy (the staged evictions run this on the engine's thread while
        the device computes a step: few operations, no intermediate copies competing with it)."""
        ids = self._block_ids(blocks)
        kv = torch.empty((len(blocks), *self.block_shape), dtype=self.k.dtype, device=self.k.device)
        for side, stored in enumerate(self._stored):
            torch.index_select(self._by_block(stored), 1, ids, out=kv[:, side].transpose(0, 1))
        return kv

    def write_blocks(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Fill blocks from kv [n, sides, layers, block_size, kv_heads, head_dim], on any device: one copy to
        the pool's device, then one scatter per side rather than a small strided copy per block."""
        ids = self._block_ids(blocks)
        kv = kv.to(self.k.device, non_blocking=True)
        for side, stored in enumerate(self._stored):
            self._by_block(stored).index_copy_(1, ids, kv[:, side].transpose(0, 1))

    def _block_ids(self, blocks: list[int]) -> torch.Tensor:
        """The block ids as a tensor on the pool's device."""
        return self._uploads.upload(blocks) if self._uploads else torch.tensor(blocks, dtype=torch.long)

    def _by_block(self, stored: torch.Tensor) -> torch.Tensor:
        """A view of K or V as [layers, blocks, block_size, heads, head_dim]."""
        return stored.unflatten(1, (self.num_blocks, self.block_size))

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.sides, self.k.shape[0], self.block_size, *self.k.shape[2:])

    @property
    def block_bytes(self) -> int:
        return (
            self.k.element_size()
            * self.sides
            * self.k.shape[0]
            * self.block_size
            * self.k.shape[2]
            * self.k.shape[3]
        )


class _PinnedUploads:
    """Block lists copied to the device without waiting for it (a copy from pageable memory waits for every
    step queued before it) and without a pinned allocation per copy (costly on every step): a few pinned
    buffers taken in turn, each refilled only once the copy out of it has run."""

    BUFFERS = 8

    def __init__(self, capacity: int, device: torch.device) -> None:
        self._device = device
        self._buffers = [
            torch.empty(capacity, dtype=torch.long, pin_memory=True) for _ in range(self.BUFFERS)
        ]
        self._copied: list[torch.cuda.Event | None] = [None] * self.BUFFERS
        self._turn = 0

    def upload(self, values: list[int]) -> torch.Tensor:
        turn, self._turn = self._turn, (self._turn + 1) % self.BUFFERS
        copied = self._copied[turn]
        if copied is not None:
            copied.synchronize()  # queued BUFFERS uploads ago: long done, unless the device lags far behind
        staged = self._buffers[turn][: len(values)]
        staged.numpy()[:] = values
        ids = staged.to(self._device, non_blocking=True)
        self._copied[turn] = event = torch.cuda.Event()
        event.record()
        return ids
