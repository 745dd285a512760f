"""Host RAM tier: one preallocated slab of blocks (pinned on CUDA, so copies both ways are asynchronous).

A block demoted from the GPU is copied on a stream of the tier's own, so the copy runs beside the next
forward pass instead of in front of it; nothing waits for it unless a reader comes for a block whose copy
has not landed yet (rare: it was demoted moments ago), which then waits on the CPU.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from functools import partial

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
        self._pinned = pin
        # copies from the device that may not have landed yet, oldest first: each batch's event (recorded
        # after it on the tier's stream) and its slots, and each such slot's event. A reader waits for its
        # slot's batch alone, not for copies queued after it (those wait for the step in flight)
        self._batches: deque[tuple[torch.cuda.Event, list[int]]] = deque()
        self._in_flight: dict[int, torch.cuda.Event] = {}
        self._stream: torch.cuda.Stream | None = None  # the copies' own stream, made on first use

    def contains(self, key: bytes) -> bool:
        return key in self._slots

    def get(self, key: bytes) -> torch.Tensor | None:
        slot = self._slots.get(key)
        if slot is None:
            self.stats.misses += 1
            return None
        self._slots.move_to_end(key)
        self.stats.hits += 1
        self._landed(slot)
        return self._slab[slot]

    def put(self, key: bytes, kv: torch.Tensor) -> None:
        self.put_many([key], kv[None])

    def put_many(self, keys: list[bytes], kv: torch.Tensor) -> None:
        """Store blocks kv [n, ...] while slots are free (the caller demotes what `evict` returns first).
        From the device, the copies are queued on the tier's stream, not waited for."""
        rows = [row for row, key in enumerate(keys) if key not in self._slots][: len(self._free)]
        for key in keys:
            if key in self._slots:
                self._slots.move_to_end(key)
        # popped one at a time (another thread may give slots back meanwhile), then put back in the free
        # list's order, in which slots freed together lie in runs: one copy per run, not per block
        slots = [self._free.pop() for _ in rows][::-1]
        runs = _runs(rows, slots)
        if kv.is_cuda and self._pinned and rows:
            if self._stream is None:
                self._stream = torch.cuda.Stream(kv.device)
            # after what the device has queued so far: the gather of kv, and any earlier read of these slots
            self._stream.wait_stream(torch.cuda.current_stream(kv.device))
            with torch.cuda.stream(self._stream):
                for row, slot, count in runs:
                    self._slab[slot : slot + count].copy_(kv[row : row + count], non_blocking=True)
            kv.record_stream(self._stream)  # not reused before the copies have read it
            copied = torch.cuda.Event()
            copied.record(self._stream)
            self._forget_landed()
            self._batches.append((copied, slots))
            self._in_flight.update(dict.fromkeys(slots, copied))
        else:
            for row, slot, count in runs:
                self._slab[slot : slot + count].copy_(kv[row : row + count])
        for row, slot in zip(rows, slots, strict=True):
            self._slots[keys[row]] = slot
        self.stats.writes += len(rows)
        self._update_size()

    def peek(self, key: bytes) -> torch.Tensor | None:
        """A view of the block's slot, valid until the tier evicts it; neither a hit nor a use."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        self._landed(slot)
        return self._slab[slot]

    def items(self) -> list[tuple[bytes, torch.Tensor]]:
        """Every block held, least recently used first: its key and a view of its slot."""
        if self._batches:  # one wait for the latest copy lands them all
            self._batches[-1][0].synchronize()
            self._batches.clear()
            self._in_flight.clear()
        return [(key, self._slab[slot]) for key, slot in self._slots.items()]

    @property
    def capacity(self) -> int:
        return len(self._slab)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def evict(self) -> tuple[bytes, torch.Tensor, Callable[[], None]] | None:
        """The least recently used block, removed: its key, a view of its slot, and the call that frees the
        slot (from any thread). Until then the slot is not reused, so the view can be written out as it
        is: nothing is copied."""
        if not self._slots:
            return None
        key, slot = self._slots.popitem(last=False)
        self._landed(slot)
        self.stats.evictions += 1
        self._update_size()
        return key, self._slab[slot], partial(self._free.append, slot)  # list.append: one atomic step

    def _landed(self, slot: int) -> None:
        """Wait until the slot's copy from the device has landed (it usually has: then at no cost)."""
        copied = self._in_flight.get(slot)
        if copied is None:
            return
        copied.synchronize()
        while self._batches:  # one stream: every batch up to this one has landed, none after it need have
            event, slots = self._batches.popleft()
            for landed in slots:
                del self._in_flight[landed]
            if event is copied:
                break

    def _forget_landed(self) -> None:
        """Drop the oldest batches whose copies have landed, asking the device without waiting: the slots
        read or evicted later are then known to need no wait."""
        while self._batches and self._batches[0][0].query():
            for landed in self._batches.popleft()[1]:
                del self._in_flight[landed]

    def _update_size(self) -> None:
        self.stats.blocks = len(self._slots)
        self.stats.bytes = self.stats.blocks * self._block_bytes


def _runs(rows: list[int], slots: list[int]) -> list[tuple[int, int, int]]:
    """(first row, first slot, count) of each run of consecutive rows going to consecutive slots."""
    runs: list[tuple[int, int, int]] = []
    for row, slot in zip(rows, slots, strict=True):
        if runs and (row, slot) == (runs[-1][0] + runs[-1][2], runs[-1][1] + runs[-1][2]):
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((row, slot, 1))
    return runs
