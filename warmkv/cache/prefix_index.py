"""Token-keyed prefix index over the KV pool (the live tier).

Each full block is keyed by a hash chained over every token before it, so a key names the whole prefix,
not only the block's own tokens. The index is one more holder of a block's reference: a block the index
keeps stays intact after its sequences finish, and only blocks that no sequence holds are evicted.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from warmkv.cache.kv_pool import KVPool

TOKEN_BYTES = np.dtype("<u4")  # a token id as hashed: 4 bytes, little-endian (keys on disk depend on it)


def block_hash(parent: bytes, block_tokens: bytes) -> bytes:
    """Key of a block: its parent's key and its token ids as TOKEN_BYTES."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(block_tokens)
    return digest.digest()


class PrefixIndex:
    def __init__(self, pool: KVPool, model_fingerprint: str) -> None:
        self._pool = pool
        self._fingerprint = model_fingerprint
        self._blocks: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._shared: set[bytes] = set()  # keys another request has hit: shared prefixes, evicted last
        self.evictions = 0
        self.inserts = 0
        # told of the (key, block) pairs about to be given up, so a lower tier can keep their KV
        self.on_evict: Callable[[list[tuple[bytes, int]]], None] = lambda victims: None
        pool.reclaim = self.evict

    def __len__(self) -> int:
        return len(self._blocks)

    def items(self) -> list[tuple[bytes, int]]:
        """Every (key, block) indexed, least recently used first."""
        return list(self._blocks.items())

    def root(self, namespace: str) -> bytes:
        """Parent of a chain's first block: keys differ between models and between namespaces."""
        # surrogatepass: any str is a namespace (encoded one-to-one), so no tenant's name can fail the step
        seed = f"{self._fingerprint}\0{namespace}".encode("utf-8", "surrogatepass")
        return hashlib.blake2b(seed, digest_size=16).digest()

    def chain(
        self, namespace: str, token_ids: Sequence[int], known: list[bytes] | None = None
    ) -> list[bytes]:
        """Keys of every full block of token_ids; `known` keys of its leading blocks are not hashed again."""
        size = self._pool.block_size
        keys = list(known or [])
        parent = keys[-1] if keys else self.root(namespace)
        first, end = len(keys) * size, len(token_ids) // size * size
        # one conversion for all new blocks: per-token int.to_bytes costs more than the hashing
        data = np.asarray(token_ids[first:end], dtype=TOKEN_BYTES).tobytes()
        step = size * TOKEN_BYTES.itemsize
        for offset in range(0, len(data), step):
            parent = block_hash(parent, data[offset : offset + step])
            keys.append(parent)
        return keys

    def match(self, keys: list[bytes]) -> list[int]:
        """Blocks of the longest run of leading keys present; each gains a reference for the caller."""
        blocks, get = [], self._blocks.get
        for key in keys:
            block = get(key)
            if block is None:
                break
            blocks.append(block)
        self._pool.incref_many(blocks)
        found = keys[: len(blocks)]
        self._shared.update(found)
        self._to_most_recent(found)
        return blocks

    def insert(self, key: bytes, block: int) -> bool:
        """Index a block; False when the key is already indexed (another sequence computed it too)."""
        if key in self._blocks:
            return False
        self._pool.incref(block)
        self._blocks[key] = block
        self.inserts += 1
        return True

    def block_of(self, key: bytes) -> int | None:
        """The pool block holding a key's KV, if indexed; its recency is left as it is."""
        return self._blocks.get(key)

    def keep_longest(self, keys: list[bytes]) -> None:
        """Evict these (still indexed) blocks last, as a prefix other requests share is."""
        self._shared.update(key for key in keys if key in self._blocks)

    def touch(self, keys: list[bytes]) -> None:
        indexed = self._blocks
        self._to_most_recent([key for key in keys if key in indexed])

    def _to_most_recent(self, keys: list[bytes]) -> None:
        """Keys that are all indexed become the most recently used: tail first, so a chain's later blocks
        are evicted before the prefix they depend on."""
        move = self._blocks.move_to_end
        for key in reversed(keys):
            move(key)

    def eviction_order(self, count: int, scan: int | None = None) -> list[tuple[bytes, int]]:
        """The (key, block) pairs `evict(count)` would give up, in its order; nothing changes. Least
        recently used blocks that no sequence holds, sessions' own tails before any prefix that other
        requests shared (a system prompt + tools anchor). One pass over the index, however many blocks:
        running sequences' blocks are skipped once, not per block. `scan`: look at no more index entries
        than this (the order found among them, not beyond)."""
        victims: list[tuple[bytes, int]] = []
        shared: list[tuple[bytes, int]] = []
        for key, block in itertools.islice(self._blocks.items(), scan):
            if self._pool.ref_counts[block] != 1:  # a sequence still reads it
                continue
            if key not in self._shared:
                victims.append((key, block))
                if len(victims) == count:
                    break
            elif len(shared) < count:
                shared.append((key, block))
        return victims + shared[: count - len(victims)]

    def evict(self, count: int) -> int:
        """Evict up to `count` blocks in `eviction_order`; returns how many."""
        victims = self.eviction_order(count)
        if not victims:
            return 0
        self.on_evict(victims)
        for key, block in victims:
            del self._blocks[key]
            self._shared.discard(key)
            self._pool.decref(block)
        self.evictions += len(victims)
        return len(victims)
