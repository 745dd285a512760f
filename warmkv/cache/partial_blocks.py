"""Sub-block anchors: a turn's frontier usually ends inside a block. The tail of that block (the tokens after
the last whole block, up to the anchor) is kept live, keyed by the whole-block prefix before it, so the next
turn reuses the prompt up to the exact anchor rather than up to the last whole block. A hit copies the tail's
block: the new sequence writes the rest of it."""

from __future__ import annotations

from collections import OrderedDict

from warmkv.cache.kv_pool import KVPool

Tail = tuple[int, ...]


class PartialBlocks:
    def __init__(self, pool: KVPool, capacity: int = 1024) -> None:
        self._pool, self._capacity = pool, capacity
        self._entries: OrderedDict[tuple[bytes, Tail], int] = OrderedDict()  # least recently used first
        self._by_parent: dict[bytes, set[Tail]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, parent: bytes, tail: list[int], block: int) -> None:
        """Hold `block`, whose first len(tail) positions carry the KV of `tail` after the prefix `parent`."""
        entry = (parent, tuple(tail))
        if not tail or entry in self._entries:
            return
        self._pool.incref(block)
        self._entries[entry] = block
        self._by_parent.setdefault(parent, set()).add(entry[1])
        while len(self._entries) > self._capacity:
            self._drop_oldest()

    def longest(self, parent: bytes, tokens: list[int]) -> tuple[int, int] | None:
        """(block, length) of the remembered tail after `parent` sharing the longest prefix with `tokens`
        (a tail may run past them: a re-sent prompt reuses its own frontier up to its last token)."""
        best, length = None, 0
        for tail in self._by_parent.get(parent, ()):
            shared = next((i for i, (a, b) in enumerate(zip(tail, tokens, strict=False)) if a != b),
                          min(len(tail), len(tokens)))  # fmt: skip
            if shared > length:
                best, length = tail, shared
        if best is None:
            return None
        self._entries.move_to_end((parent, best))
        return self._entries[(parent, best)], length

    def evict(self, count: int) -> int:
        """Give up least recently used tails until `count` pool blocks are freed or none is left; returns
        the blocks freed."""
        freed = 0
        while self._entries and freed < count:
            freed += self._drop_oldest()
        return freed

    def _drop_oldest(self) -> bool:
        (parent, tail), block = self._entries.popitem(last=False)
        tails = self._by_parent[parent]
        tails.discard(tail)
        if not tails:
            del self._by_parent[parent]
        self._pool.decref(block)
        return self._pool.ref_counts[block] == 0
