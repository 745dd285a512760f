"""Shared tier on the Redis protocol (Redis, Valkey, Redis Cluster): KV blocks that every replica reads.

Values are the disk tier's block encoding (fingerprint, key, shape, CRC-32), under keys named by the model
fingerprint and the block's chained hash, so the store can be shared by replicas of several models and
tenants. Writes go through a background writer in pipelined batches with a TTL; the store's own memory
limit evicts (a store that refuses writes when full costs skipped writes, never a request). Lookups are
one pipelined round trip for presence and one for the values. A store that is down or slower than the
timeout is skipped for a back-off period, with one warning: requests go on from the local tiers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from warmkv.cache.background import BackgroundWorker, EngineCpuWork
from warmkv.cache.tiers.base import TierName, TierStats
from warmkv.cache.tiers.codec import BlockLayout, decode_block, encode_block
from warmkv.errors import CacheCorruption, WarmkvError

log = logging.getLogger("warmkv.cache")
WRITE_BATCH = 64  # blocks per pipelined write


class RedisTier:
    name = TierName.REMOTE

    def __init__(self, url: str, fingerprint: str, layout: BlockLayout, ttl_s: int, timeout_s: float,
                 cluster: bool = False, queue_size: int = 1024, backoff_s: float = 5.0,
                 engine_work: EngineCpuWork | None = None) -> None:  # fmt: skip
        import redis

        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        try:
            factory = redis.RedisCluster if cluster else redis.Redis
            timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
            self.client: Any = factory.from_url(url, **timeouts)
        except (ValueError, redis.RedisError) as err:
            raise WarmkvError(f"--redis-url {url}: {err}") from err
        self.url, self.fingerprint, self.ttl_s, self.backoff_s = url, fingerprint, ttl_s, backoff_s
        self.layout = layout
        self._timeout_s = timeout_s
        self.prefix = f"warmkv:{fingerprint}:"
        self.stats = TierStats()
        self._down_until = 0.0
        self._writer = BackgroundWorker(
            "warmkv-redis-writer", self._write, queue_size, batch=WRITE_BATCH, engine_work=engine_work
        )

    @property
    def enabled(self) -> bool:
        return time.monotonic() >= self._down_until

    def redis_key(self, key: bytes) -> str:
        return self.prefix + key.hex()

    # -- the engine's side ------------------------------------------------------------------------

    def contains(self, key: bytes) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        if not keys or not self.enabled:
            return [False] * len(keys)
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self.redis_key(key))
            return [bool(n) for n in pipe.execute()]
        except self._errors as err:
            self._went_down(err)
            return [False] * len(keys)

    def get(self, key: bytes) -> torch.Tensor | None:
        found: list[torch.Tensor] = []
        self.read_many([key], lambda _, kv: found.append(kv.clone()))
        return found[0] if found else None

    def read_many(self, keys: list[bytes], consume: Callable[[int, torch.Tensor], object]) -> list[bool]:
        """One pipelined read; each good block goes to consume(index, kv). Returns which were read."""
        if not keys or not self.enabled:
            return [False] * len(keys)
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.get(self.redis_key(key))
            values = pipe.execute()
        except self._errors as err:
            self._went_down(err)
            return [False] * len(keys)
        read = []
        for index, (key, value) in enumerate(zip(keys, values, strict=True)):
            kv = self._decode(key, value)
            if kv is not None:
                consume(index, kv)
            read.append(kv is not None)
        return read

    def _decode(self, key: bytes, value: bytes | None) -> torch.Tensor | None:
        if value is None:  # expired or evicted by the store since the presence check
            self.stats.misses += 1
            return None
        try:
            kv = decode_block(bytearray(value), self.fingerprint, key, self.layout).kv
        except CacheCorruption as err:
            log.warning("dropping corrupt KV block %s from the shared tier: %s", key.hex(), err)
            self.stats.corrupt += 1
            self._delete(key)
            return None
        self.stats.hits += 1
        return kv

    def _delete(self, key: bytes) -> None:
        try:
            self.client.delete(self.redis_key(key))
        except self._errors as err:
            self._went_down(err)

    def put(self, key: bytes, kv: torch.Tensor, wait: bool = False) -> None:
        """Queue a block for the writer; `kv` must not change afterwards (pass a copy)."""
        if self.enabled and not self._writer.put((key, kv), wait, self._timeout_s if wait else None):
            self.stats.skipped_writes += 1

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
        self.client.close()

    # -- the writer thread ------------------------------------------------------------------------

    def _write(self, batch: list[tuple[bytes, torch.Tensor]]) -> None:
        if not self.enabled:
            self.stats.skipped_writes += len(batch)
            return
        pipe = self.client.pipeline(transaction=False)
        sizes = []
        for key, kv in batch:
            data = encode_block(self.fingerprint, key, kv)
            sizes.append(len(data))
            pipe.set(self.redis_key(key), data, ex=self.ttl_s)
        try:
            results = pipe.execute(raise_on_error=False)
        except self._errors as err:
            self._went_down(err)
            self.stats.skipped_writes += len(batch)
            return
        for size, result in zip(sizes, results, strict=True):
            if isinstance(result, Exception):  # e.g. OOM: the store is full and set to refuse writes
                self.stats.skipped_writes += 1
                if self.stats.skipped_writes == 1:
                    log.warning("the shared KV store refused a write (%s); writes are skipped", result)
            else:
                self.stats.blocks += 1
                self.stats.writes += 1
                self.stats.bytes += size

    def _went_down(self, err: Exception) -> None:
        if self.enabled:
            self.stats.unavailable += 1
            log.warning("shared KV tier %s unavailable (%s): local tiers only for %.0f s",
                        self.url, err, self.backoff_s)  # fmt: skip
        self._down_until = time.monotonic() + self.backoff_s
