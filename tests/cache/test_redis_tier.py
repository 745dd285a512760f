"""The shared tier on a real redis-server: replicas reuse each other's KV; a sick store costs no request."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from warmkv.bench.redis_process import RedisProcess
from warmkv.cache.config import CacheConfig, LoadPolicy
from warmkv.cache.tiers.base import TierName
from warmkv.cache.tiers.codec import encode_block
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams
from warmkv.models.loader import LoadedModel

PROMPT = list(range(1000, 1057))  # 57 tokens: three full blocks are reusable
FOLLOW_UP = [*PROMPT, *range(2000, 2012)]


def replica(model: LoadedModel, redis: RedisProcess, ttl: int = 3600) -> LLMEngine:
    """A replica with no disk tier of its own: whatever it did not compute comes from the shared tier."""
    cache = CacheConfig(disk=False, host_tokens=0, redis_url=redis.url, redis_ttl_s=ttl,
                        load_policy=LoadPolicy.ALWAYS)  # fmt: skip
    return LLMEngine(model, EngineConfig(kv_pool_tokens=4096, cache=cache))


def generate(engine: LLMEngine, prompt: list[int]):
    outputs = list(engine.generate(prompt, SamplingParams(max_tokens=6, ignore_eos=True)))
    return outputs[-1].sequence


def cold_tokens(model: LoadedModel, prompt: list[int]) -> list[int]:
    engine = LLMEngine(model, EngineConfig(kv_pool_tokens=4096, prefix_cache=False))
    return generate(engine, prompt).output_ids


def test_a_replica_reuses_what_another_computed(tiny_llama: LoadedModel, redis_server: RedisProcess) -> None:
    first, second = replica(tiny_llama, redis_server), replica(tiny_llama, redis_server)
    generate(first, PROMPT)
    first.prefix_cache.flush()
    seq = generate(second, FOLLOW_UP)
    assert seq.cache_hit.tokens_by_tier == {TierName.LIVE: 0, TierName.REMOTE: 48}
    assert seq.output_ids == cold_tokens(tiny_llama, FOLLOW_UP)
    keys = redis_server.client.keys(f"warmkv:{first.prefix_cache.index._fingerprint}:*")
    assert len(keys) >= 3  # the prompt's blocks (and the generated ones) under this model's fingerprint
    assert 0 < redis_server.client.ttl(keys[0]) <= 3600


def test_corrupt_shared_block_is_dropped_and_recomputed(
    tiny_llama: LoadedModel, redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = replica(tiny_llama, redis_server), replica(tiny_llama, redis_server)
    generate(first, PROMPT)
    first.prefix_cache.flush()
    victim = first.prefix_cache.remote.redis_key(first.prefix_cache.chain("", PROMPT)[1])
    data = bytearray(redis_server.client.get(victim))
    data[-100] ^= 0x40
    redis_server.client.set(victim, bytes(data))
    with caplog.at_level(logging.WARNING, logger="warmkv.cache"):
        seq = generate(second, FOLLOW_UP)
    assert seq.cache_hit.tokens_by_tier[TierName.REMOTE] == 16  # the block before the damaged one
    assert second.prefix_cache.remote.stats.corrupt == 1
    assert "checksum mismatch" in caplog.text
    assert seq.output_ids == cold_tokens(tiny_llama, FOLLOW_UP)


def test_shared_block_of_another_layout_is_dropped_and_recomputed(
    tiny_llama: LoadedModel, redis_server: RedisProcess
) -> None:
    # a replica with a bug (or a hand-made value) stores a well-formed block, valid checksum, wrong shape
    first, second = replica(tiny_llama, redis_server), replica(tiny_llama, redis_server)
    generate(first, PROMPT)
    first.prefix_cache.flush()
    key = first.prefix_cache.chain("", PROMPT)[1]
    victim = first.prefix_cache.remote.redis_key(key)
    kv = first.prefix_cache.remote.get(key)
    forged = encode_block(first.prefix_cache.remote.fingerprint, key, kv.reshape(kv.shape[0] * 2, -1))
    redis_server.client.set(victim, forged)
    seq = generate(second, FOLLOW_UP)
    assert seq.cache_hit.tokens_by_tier[TierName.REMOTE] == 16  # the block before the forged one
    assert second.prefix_cache.remote.stats.corrupt == 1 and redis_server.client.get(victim) != forged
    assert seq.output_ids == cold_tokens(tiny_llama, FOLLOW_UP)


def test_a_dead_store_costs_no_request(
    tiny_llama: LoadedModel, redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    engine = replica(tiny_llama, redis_server)
    generate(engine, PROMPT)
    engine.prefix_cache.flush()
    redis_server.stop()
    other = replica(tiny_llama, redis_server)
    with caplog.at_level(logging.WARNING, logger="warmkv.cache"):
        for _ in range(3):
            seq = generate(other, FOLLOW_UP[:-1])
            assert seq.output_ids == cold_tokens(tiny_llama, FOLLOW_UP[:-1])
        other.prefix_cache.flush()
    assert other.prefix_cache.remote.stats.unavailable == 1  # one warning for the outage, not one per call
    assert caplog.text.count("unavailable") == 1
    other.close()  # closing with a dead store does not hang or raise


def test_a_full_store_refuses_writes_without_failing(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    store = RedisProcess("--maxmemory-policy", "noeviction")
    try:
        store.client.set("ballast", b"x" * 2_000_000)
        store.client.config_set("maxmemory", "1mb")  # now over the limit: every write is refused
        engine = replica(tiny_llama, store)
        seq = generate(engine, PROMPT)
        engine.prefix_cache.flush()
        assert seq.output_ids == cold_tokens(tiny_llama, PROMPT)
        assert engine.prefix_cache.remote.stats.skipped_writes >= 3
        assert engine.prefix_cache.remote.stats.unavailable == 0
    finally:
        store.stop()
