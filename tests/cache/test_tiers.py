"""The tiered prefix cache: exact hits from every tier, persistence, eviction, integrity, degradation."""

from __future__ import annotations

import errno
import logging
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warmkv.cache import admin, background, prefix_cache
from warmkv.cache.config import CacheConfig, DiskWrite, LoadPolicy
from warmkv.cache.kv_pool import KVPool
from warmkv.cache.load_costs import LoadCosts
from warmkv.cache.prefix_cache import IDLE_WRITE_RETRY_S
from warmkv.cache.prefix_index import PrefixIndex
from warmkv.cache.tiers.base import TierName
from warmkv.cache.tiers.codec import BlockLayout
from warmkv.cache.tiers.disk import DiskTier, block_path
from warmkv.cache.tiers.host import HostTier
from warmkv.engine.config import EngineConfig
from warmkv.engine.forward_item import ForwardItem
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams
from warmkv.models.loader import LoadedModel, load_model

from ..conftest import save_tiny_model

PROMPT = list(range(1000, 1057))  # 57 tokens: three full blocks are reusable
FOLLOW_UP = [*PROMPT, *range(2000, 2012)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = save_tiny_model("llama", tmp_path_factory.mktemp("tiers-model"))
    return load_model(str(folder), torch.device("cpu"), torch.float32)


def make_engine(
    model: LoadedModel, kv_dir: Path | None, pool_tokens: int = 4096, **cache: object
) -> LLMEngine:
    cache_config = CacheConfig(disk=kv_dir is not None, kv_dir=kv_dir, load_policy=LoadPolicy.ALWAYS, **cache)
    return LLMEngine(model, EngineConfig(kv_pool_tokens=pool_tokens, cache=cache_config))


def generate(engine: LLMEngine, prompt: list[int], max_tokens: int = 6):
    outputs = list(engine.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    return outputs[-1].sequence


def cold_tokens(model: LoadedModel, prompt: list[int]) -> list[int]:
    engine = LLMEngine(model, EngineConfig(kv_pool_tokens=1024, prefix_cache=False))
    return generate(engine, prompt).output_ids


def assert_hit_logits_exact(engine: LLMEngine, model: LoadedModel, prompt: list[int], tier: TierName) -> None:
    """Logits computed on top of KV loaded from `tier` equal a cold forward of the whole prompt."""
    keys = engine.prefix_cache.chain("", prompt[:-1])
    hit = engine.prefix_cache.lookup(keys)
    assert hit.tokens_by_tier.get(tier, 0) > 0, hit.tokens_by_tier
    start = len(hit.blocks) * engine.pool.block_size
    blocks = hit.blocks + engine.pool.allocate(-(-len(prompt) // engine.pool.block_size) - len(hit.blocks))
    (warm,) = engine.runner.forward([ForwardItem(prompt[start:], start, blocks, all_logits=True)])
    cold_engine = LLMEngine(model, EngineConfig(kv_pool_tokens=1024, prefix_cache=False))
    cold_blocks = cold_engine.pool.allocate(-(-len(prompt) // cold_engine.pool.block_size))
    (cold,) = cold_engine.runner.forward([ForwardItem(prompt, 0, cold_blocks, all_logits=True)])
    torch.testing.assert_close(warm, cold[start:], atol=1e-5, rtol=1e-5)


def evict_everything_live(engine: LLMEngine) -> None:
    engine.prefix_cache.index.evict(len(engine.prefix_cache.index))


def assert_host_hit_exact(model: LoadedModel) -> None:
    """A prompt's blocks demoted to host RAM come back for its follow-up: tokens and logits as if cold."""
    engine = make_engine(model, kv_dir=None)
    generate(engine, PROMPT)
    evict_everything_live(engine)  # demoted to host RAM
    assert engine.prefix_cache.host.stats.blocks >= 3
    seq = generate(engine, FOLLOW_UP)
    # the whole blocks from host RAM, then the prompt frontier's partial block, still live
    assert seq.cache_hit.tokens_by_tier[TierName.HOST] == 48 and seq.num_cached == 57
    assert seq.output_ids == cold_tokens(model, FOLLOW_UP)
    evict_everything_live(engine)
    assert_hit_logits_exact(engine, model, FOLLOW_UP, TierName.HOST)


def test_hit_from_host_tier_is_exact(tiny: LoadedModel) -> None:
    assert_host_hit_exact(tiny)


def test_hit_from_disk_after_restart_is_exact(tiny: LoadedModel, tmp_path: Path) -> None:
    first = make_engine(tiny, tmp_path)
    generate(first, PROMPT)
    first.close()  # the writer's queue is flushed
    restarted = make_engine(tiny, tmp_path)
    seq = generate(restarted, FOLLOW_UP)
    assert seq.cache_hit.tokens_by_tier == {TierName.LIVE: 0, TierName.DISK: 48}
    assert seq.output_ids == cold_tokens(tiny, FOLLOW_UP)
    assert_hit_logits_exact(make_engine(tiny, tmp_path), tiny, FOLLOW_UP, TierName.DISK)


def kv_files(kv_dir: Path) -> list[Path]:
    return sorted(kv_dir.glob("*/*/*.kv"))


def test_write_back_writes_nothing_while_memory_has_room_then_idle_time_and_exit(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    other, third = list(range(3000, 3057)), list(range(4000, 4057))
    engine = make_engine(tiny, tmp_path, disk_write=DiskWrite.BACK)
    generate(engine, PROMPT)
    evict_everything_live(engine)  # PROMPT's blocks demoted to host RAM, which has room
    generate(engine, other)  # other's in the pool
    engine.prefix_cache.flush()
    assert kv_files(tmp_path) == []  # no disk write on the request path
    while engine.write_idle() is not None:  # what the engine thread does while idle
        pass
    engine.prefix_cache.flush()
    assert len(kv_files(tmp_path)) == 6  # PROMPT's from the host tier, other's from the pool
    assert not engine.prefix_cache._unwritten
    generate(engine, third)
    engine.close()
    assert len(kv_files(tmp_path)) == 9  # the pool's new blocks too, at shutdown
    restarted = make_engine(tiny, tmp_path)
    for prompt in (FOLLOW_UP, [*other, *range(2000, 2012)], [*third, *range(2000, 2012)]):
        seq = generate(restarted, prompt)
        assert seq.cache_hit.tokens_by_tier[TierName.DISK] == 48
        assert seq.output_ids == cold_tokens(tiny, prompt)


def test_written_through_the_blocks_a_busy_writer_skipped_reach_the_disk_at_exit(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Write-through skips a step's blocks while its helper is busy (never making the step wait); what memory
    still holds at a clean exit goes to disk then, as written back, so a restart finds the whole prompt."""
    engine = make_engine(tiny, tmp_path, disk_write=DiskWrite.THROUGH)
    monkeypatch.setattr(engine.prefix_cache.write_through, "busy", lambda: True)
    generate(engine, PROMPT)
    engine.prefix_cache.flush()
    assert kv_files(tmp_path) == [] and engine.prefix_cache.disk.stats.skipped_writes == 3
    engine.close()
    assert len(kv_files(tmp_path)) == 3
    seq = generate(make_engine(tiny, tmp_path), FOLLOW_UP)
    assert seq.cache_hit.tokens_by_tier[TierName.DISK] == 48
    assert seq.output_ids == cold_tokens(tiny, FOLLOW_UP)


def test_write_back_under_host_pressure_puts_blocks_on_disk_before_they_are_lost(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    other = list(range(3000, 3057))
    engine = make_engine(tiny, tmp_path, disk_write=DiskWrite.BACK, host_tokens=64)  # 4 host blocks
    generate(engine, PROMPT)
    evict_everything_live(engine)  # 3 of the host tier's 4 slots
    engine.prefix_cache.flush()
    assert kv_files(tmp_path) == []
    generate(engine, other)
    evict_everything_live(engine)  # the host tier is full: other's go to disk as they enter it, and the two
    engine.prefix_cache.flush()  # of PROMPT's it evicts go to the disk's writer from their own slots
    stats = engine.prefix_cache.stats()
    # two evicted for other's three (those of other's that found their slots still being written are on
    # disk alone); once written, every lent slot is back
    assert stats[TierName.HOST].evictions == 2 and stats[TierName.DISK].writes == 5
    assert len(kv_files(tmp_path)) == 5
    assert stats[TierName.HOST].blocks + engine.prefix_cache.host.free_blocks == 4
    seq = generate(engine, FOLLOW_UP)  # the host tier evicted PROMPT's tail first: the disk serves it
    by_tier = seq.cache_hit.tokens_by_tier
    assert (by_tier[TierName.HOST], by_tier[TierName.DISK]) == (16, 32)
    assert seq.output_ids == cold_tokens(tiny, FOLLOW_UP)  # the lent slots were written before reuse
    crashed_and_restarted = make_engine(tiny, tmp_path)  # the first engine never closed
    seq = generate(crashed_and_restarted, [*other, *range(2000, 2012)])
    assert seq.cache_hit.tokens_by_tier[TierName.DISK] == 48
    assert seq.output_ids == cold_tokens(tiny, [*other, *range(2000, 2012)])


def test_write_back_writes_the_pool_in_idle_time_for_a_crash(tiny: LoadedModel, tmp_path: Path) -> None:
    engine = make_engine(tiny, tmp_path, disk_write=DiskWrite.BACK)
    generate(engine, PROMPT)
    assert kv_files(tmp_path) == []  # nothing while the request ran
    waits = []
    while (wait := engine.write_idle()) is not None:  # what the engine thread does while idle
        waits.append(wait)
    engine.prefix_cache.flush()
    assert len(kv_files(tmp_path)) == 3 and waits == []  # 3 blocks: one batch, nothing left after it
    assert engine.write_idle() is None
    crashed_and_restarted = make_engine(tiny, tmp_path)  # the first engine never closed
    seq = generate(crashed_and_restarted, FOLLOW_UP)
    assert seq.cache_hit.tokens_by_tier[TierName.DISK] == 48
    assert seq.output_ids == cold_tokens(tiny, FOLLOW_UP)


def test_idle_time_writes_keep_host_blocks_the_busy_writer_cannot_take_yet(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's blocks fill the writer's queue: the host tier's wait for the next idle call, and reach
    the disk then (they were dropped: counted as skipped, never written)."""
    other = list(range(3000, 3057))
    engine = make_engine(tiny, tmp_path, disk_write=DiskWrite.BACK)
    cache = engine.prefix_cache
    generate(engine, PROMPT)
    evict_everything_live(engine)  # PROMPT's blocks in the host tier, which has room: unwritten
    generate(engine, other)  # other's in the pool: unwritten
    writes, full = cache._disk_writes, [False]
    real_submit = writes.submit

    def submit_then_full(keys: list[bytes], blocks: list[int]) -> None:
        real_submit(keys, blocks)
        full[0] = True  # the writer's queue, as the pool's batch leaves it

    with monkeypatch.context() as patch:
        patch.setattr(writes, "submit", submit_then_full)
        patch.setattr(writes, "busy", lambda: full[0])
        assert cache.write_idle() == IDLE_WRITE_RETRY_S
    while cache.write_idle() is not None:  # the queue drained
        pass
    cache.flush()
    assert len(kv_files(tmp_path)) == 6 and cache.disk.stats.skipped_writes == 0


def test_write_back_writes_blocks_as_they_leave_memory(tiny: LoadedModel, tmp_path: Path) -> None:
    """No host tier: a block evicted from the pool goes to disk then, not at shutdown."""
    engine = make_engine(tiny, tmp_path, disk_write=DiskWrite.BACK, host_tokens=0)
    generate(engine, PROMPT)
    evict_everything_live(engine)
    engine.prefix_cache.flush()
    assert len(kv_files(tmp_path)) == 3
    seq = generate(engine, FOLLOW_UP)
    assert seq.cache_hit.tokens_by_tier[TierName.DISK] == 48
    assert seq.output_ids == cold_tokens(tiny, FOLLOW_UP)


def test_eviction_demotes_least_recently_used_first(tiny: LoadedModel) -> None:
    # 8 pool blocks (one kept by nothing else); a host tier of 4 blocks
    engine = make_engine(tiny, kv_dir=None, pool_tokens=128, host_tokens=64)
    prompts = [list(range(100 * i, 100 * i + 33)) for i in (1, 2, 3)]  # two full blocks each
    chains = [engine.prefix_cache.chain("", p) for p in prompts]
    generate(engine, prompts[0], max_tokens=1)
    generate(engine, prompts[1], max_tokens=1)
    host = engine.prefix_cache.host
    assert not any(host.contains(k) for chain in chains for k in chain)
    # 33 + 60 tokens need 6 blocks; 4 are free, so two unreferenced cached blocks must go
    generate(engine, prompts[2], max_tokens=60)
    assert all(host.contains(k) for k in chains[0])  # the least recently used session, demoted first
    assert not any(host.contains(k) for k in chains[1])
    assert engine.prefix_cache.index.evictions == 2


def test_eviction_takes_unheld_session_tails_before_shared_prefixes() -> None:
    pool = KVPool(1, 4, 16, 1, 2, torch.float32, torch.device("cpu"))
    index = PrefixIndex(pool, "0" * 32)
    demoted: list[list[bytes]] = []
    index.on_evict = lambda victims: demoted.append([key for key, _ in victims])
    keys = [bytes([n]) * 16 for n in range(4)]  # least recently used first
    for key, block in zip(keys, pool.allocate(4), strict=True):
        index.insert(key, block)
        pool.decref(block)  # held by the index alone
    index.keep_longest([keys[0]])  # a shared prefix
    pool.incref(index.match([keys[1]])[0])  # a running sequence holds keys[1]
    assert index.evict(2) == 2 and demoted == [[keys[2], keys[3]]]  # one batch, tails first
    assert index.evict(2) == 1 and demoted[-1] == [keys[0]]  # then the shared prefix; never the held one
    assert index.evict(1) == 0 and pool.num_free == 3


def test_host_overflow_writes_blocks_the_disk_lacks(tiny: LoadedModel, tmp_path: Path) -> None:
    engine = make_engine(tiny, tmp_path, host_tokens=16, disk_write=DiskWrite.THROUGH)  # one host block
    engine.prefix_cache.write_through.submit = lambda keys, blocks: None  # as if its queue were full
    generate(engine, PROMPT)
    evict_everything_live(engine)  # three blocks demoted through a one-block host tier
    engine.prefix_cache.flush()
    disk = engine.prefix_cache.disk
    keys = engine.prefix_cache.chain("", PROMPT)
    # the tails went down first: the prefix stays on the host, its tail reached the disk though the
    # write-through never wrote it
    assert [disk.contains(k) for k in keys] == [False, True, True]
    assert engine.prefix_cache.host.contains(keys[0])
    seq = generate(engine, PROMPT)
    tiers = seq.cache_hit.tokens_by_tier
    assert (tiers[TierName.HOST], tiers[TierName.DISK]) == (16, 32)  # then the live partial tail
    assert seq.output_ids == cold_tokens(tiny, PROMPT)


@pytest.mark.parametrize("damage", ["truncate", "flip", "shape"])
def test_damaged_disk_block_is_detected_deleted_and_not_served(
    tiny: LoadedModel, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(tiny, tmp_path)
    generate(engine, PROMPT)
    engine.close()
    keys = engine.prefix_cache.chain("", PROMPT)
    victim = block_path(engine.prefix_cache.disk.directory, keys[1])
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "shape":  # the header's shape fields (after magic, dtype code, ndim): same element count
        dims = list(struct.unpack_from("<5I", data, 6))
        dims[0], dims[2] = dims[0] * 2, dims[2] // 2
        struct.pack_into("<5I", data, 6, *dims)
    else:
        data[-100] ^= 0x40
    victim.write_bytes(bytes(data))
    restarted = make_engine(tiny, tmp_path)
    with caplog.at_level(logging.WARNING, logger="warmkv.cache"):
        seq = generate(restarted, FOLLOW_UP)
    assert seq.cache_hit.tokens_by_tier[TierName.DISK] == 16  # the block before the damaged one
    assert "block unreadable" in seq.cache_hit.stopped_by
    assert restarted.prefix_cache.disk.stats.corrupt == 1
    assert seq.output_ids == cold_tokens(tiny, FOLLOW_UP)
    assert any("corrupt KV block" in r.getMessage() for r in caplog.records)
    restarted.close()  # the recomputed block was written through in place of the damaged file
    assert victim.read_bytes() != bytes(data) and admin.verify(tmp_path).corrupt == []


def test_another_models_blocks_are_never_read(tiny: LoadedModel, tmp_path: Path) -> None:
    other_folder = save_tiny_model("qwen2", tmp_path / "other-model")
    other = load_model(str(other_folder), torch.device("cpu"), torch.float32)
    mine, theirs = make_engine(tiny, tmp_path / "kv"), make_engine(other, tmp_path / "kv")
    assert mine.prefix_cache.disk.directory != theirs.prefix_cache.disk.directory
    generate(theirs, PROMPT)
    theirs.close()
    # even a file planted under exactly the name this model looks for is refused
    their_key = theirs.prefix_cache.chain("", PROMPT)[0]
    my_key = mine.prefix_cache.chain("", PROMPT)[0]
    planted = block_path(mine.prefix_cache.disk.directory, my_key)
    planted.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(block_path(theirs.prefix_cache.disk.directory, their_key), planted)
    restarted = make_engine(tiny, tmp_path / "kv")
    seq = generate(restarted, FOLLOW_UP)
    assert seq.num_cached == 0 and restarted.prefix_cache.disk.stats.corrupt == 1
    assert seq.output_ids == cold_tokens(tiny, FOLLOW_UP)


def test_unwritable_kv_dir_degrades_to_memory_tiers(tiny: LoadedModel, tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the kv dir should go")
    with caplog.at_level(logging.WARNING, logger="warmkv.cache"):
        engine = make_engine(tiny, blocker / "kv")
        first, second = generate(engine, PROMPT), generate(engine, FOLLOW_UP)
    assert not engine.prefix_cache.disk.enabled
    assert first.output_ids and second.num_cached == 57  # the live tier still serves
    assert sum("disk KV tier disabled" in r.getMessage() for r in caplog.records) == 1


def test_full_disk_degrades_with_one_warning(tiny: LoadedModel, tmp_path: Path, monkeypatch, caplog) -> None:
    def disk_full(self: DiskTier, key: bytes, kv: torch.Tensor) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiskTier, "_write", disk_full)
    engine = make_engine(tiny, tmp_path, disk_write=DiskWrite.THROUGH)  # writes while requests run
    with caplog.at_level(logging.WARNING, logger="warmkv.cache"):
        for offset in range(3):
            assert generate(engine, [t + offset for t in PROMPT]).output_ids
        engine.prefix_cache.flush()
    assert not engine.prefix_cache.disk.enabled
    assert sum("disk KV tier disabled" in r.getMessage() for r in caplog.records) == 1


def test_full_writer_queue_skips_and_counts(tmp_path: Path, monkeypatch) -> None:
    import threading

    release = threading.Event()
    monkeypatch.setattr(DiskTier, "_write", lambda self, key, kv: release.wait(10))
    layout = BlockLayout((2, 1, 4, 1, 2), torch.float32)
    disk = DiskTier(tmp_path, "ab" * 16, layout, capacity_bytes=1 << 30, queue_size=2)
    for i in range(6):
        disk.put(bytes([i]) * 16, torch.zeros(2, 1, 4, 1, 2))
    assert disk.stats.skipped_writes >= 3
    release.set()
    disk.close()


def test_blocks_queued_together_are_written_or_skipped_each_and_every_slot_released_once(
    tmp_path: Path, monkeypatch
) -> None:
    """A demotion hands the disk a step's blocks in one call: those past the queue's room (in blocks, not
    calls) are skipped and counted, one it holds already is not written again, and each block's `done`
    (which gives the host tier its slot back) is called once, the written ones only after their write."""
    import threading

    release, writing = threading.Event(), []
    write = DiskTier._write

    def held_write(self: DiskTier, key: bytes, kv: torch.Tensor) -> None:
        release.wait(10)
        writing.append(key)
        write(self, key, kv)

    monkeypatch.setattr(DiskTier, "_write", held_write)
    layout = BlockLayout((2, 1, 4, 1, 2), torch.float32)
    disk = DiskTier(tmp_path, "ab" * 16, layout, capacity_bytes=1 << 30, queue_size=3)
    done: list[bytes] = []
    blocks = [(bytes([i]) * 16, torch.full((2, 1, 4, 1, 2), float(i))) for i in range(5)]
    disk.put_many([(key, kv, lambda key=key: done.append(key)) for key, kv in blocks])
    assert sorted(done) == [key for key, _ in blocks[3:]] and disk.stats.skipped_writes == 2
    disk.put_many([(blocks[0][0], blocks[0][1], lambda: done.append(b"again"))])  # queued already
    assert done[-1] == b"again" and disk.stats.skipped_writes == 2
    release.set()
    disk.flush()
    assert writing == [key for key, _ in blocks[:3]]
    assert sorted(done) == sorted([b"again", *[key for key, _ in blocks]])
    for key, kv in blocks[:3]:
        assert torch.equal(disk.get(key), kv)
    disk.close()


def test_a_block_failing_to_encode_leaves_the_others_of_its_list_written_and_released(
    tmp_path: Path, monkeypatch
) -> None:
    """One queue item holds a step's blocks: an unexpected error writing one of them (not an OSError, which
    turns the tier off) is that block's alone. The others are written, every `done` runs once (each gives
    a host-tier slot back), and the failed block may be queued again."""
    write, failing = DiskTier._write, {bytes([1]) * 16}

    def flaky_write(self: DiskTier, key: bytes, kv: torch.Tensor) -> None:
        if key in failing:
            raise ValueError("cannot encode")
        write(self, key, kv)

    monkeypatch.setattr(DiskTier, "_write", flaky_write)
    layout = BlockLayout((2, 1, 4, 1, 2), torch.float32)
    disk = DiskTier(tmp_path, "ab" * 16, layout, capacity_bytes=1 << 30)
    blocks = [(bytes([i]) * 16, torch.full((2, 1, 4, 1, 2), float(i))) for i in range(4)]
    done: list[bytes] = []
    disk.put_many([(key, kv, lambda key=key: done.append(key)) for key, kv in blocks])
    disk.flush()
    assert sorted(done) == [key for key, _ in blocks]
    assert [disk.contains(key) for key, _ in blocks] == [True, False, True, True]
    failing.clear()
    disk.put(*blocks[1])
    disk.flush()
    assert torch.equal(disk.get(blocks[1][0]), blocks[1][1])
    disk.close()


def test_a_put_that_waits_waits_for_room_counted_in_blocks(tmp_path: Path, monkeypatch) -> None:
    """Off the request path (write-through, write-back) a put waits for the queue rather than skip a block:
    with `queue_size` blocks queued in one item it waits until the writer has written some."""
    import threading

    release = threading.Event()
    write = DiskTier._write

    def held_write(self: DiskTier, key: bytes, kv: torch.Tensor) -> None:
        release.wait(10)
        write(self, key, kv)

    monkeypatch.setattr(DiskTier, "_write", held_write)
    layout = BlockLayout((2, 1, 4, 1, 2), torch.float32)
    disk = DiskTier(tmp_path, "ab" * 16, layout, capacity_bytes=1 << 30, queue_size=3)
    disk.put_many([(bytes([i]) * 16, torch.zeros(2, 1, 4, 1, 2), None) for i in range(3)])
    waiting = threading.Thread(target=disk.put, args=(bytes([9]) * 16, torch.ones(2, 1, 4, 1, 2), True))
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive()  # three blocks queued: no room until one is written
    release.set()
    waiting.join(10)
    disk.flush()
    assert disk.contains(bytes([9]) * 16) and disk.stats.skipped_writes == 0
    disk.close()


def test_shared_system_prompt_is_stored_once_on_disk(tiny: LoadedModel, tmp_path: Path) -> None:
    engine = make_engine(tiny, tmp_path)
    system = list(range(5000, 5064))  # four full blocks shared by every session
    sessions = [[*system, *range(6000 + 100 * i, 6000 + 100 * i + 20)] for i in range(3)]
    for prompt in sessions:
        generate(engine, prompt, max_tokens=1)
    engine.close()
    files = sorted(engine.prefix_cache.disk.directory.glob("*/*.kv"))
    full_blocks = {k for prompt in sessions for k in engine.prefix_cache.chain("", prompt)}
    assert len(files) == len(full_blocks) == 4 + 3  # the system prompt's blocks once, one tail each
    assert sum(f.stat().st_size for f in files) == len(files) * files[0].stat().st_size


def test_slow_tier_is_recomputed_instead_of_loaded(tiny: LoadedModel, tmp_path: Path) -> None:
    generate(make_engine(tiny, tmp_path, disk_write=DiskWrite.THROUGH), PROMPT)
    engine = make_engine(tiny, tmp_path)
    engine.prefix_cache.disk.flush()
    engine.prefix_cache.config.load_policy = LoadPolicy.AUTO
    engine.prefix_cache.costs = LoadCosts(prefill_tok_s=1e6, bytes_per_s={TierName.DISK: 1.0})
    seq = generate(engine, FOLLOW_UP)
    assert seq.num_cached == 0 and seq.cache_hit.stopped_by == "load from disk slower than recompute"


def test_cache_admin_commands(tiny: LoadedModel, tmp_path: Path) -> None:
    engine = make_engine(tiny, tmp_path)
    generate(engine, PROMPT)
    engine.close()
    assert "3" in admin.stats(tmp_path)[1].split()[1]  # three blocks on disk
    assert len(admin.listing(tmp_path)) == 3
    victim = sorted(engine.prefix_cache.disk.directory.glob("*/*.kv"))[0]
    victim.write_bytes(victim.read_bytes()[:-1])
    report = admin.verify(tmp_path)
    assert (report.checked, [p for p, _ in report.corrupt]) == (3, [victim]) and not victim.exists()
    assert admin.clear(tmp_path).deleted_files == 2 and admin.listing(tmp_path) == []


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["put", "put_many", "get", "evict"]), st.integers(0, 7)), max_size=40)
)
def test_host_tier_stays_consistent_with_what_was_stored(operations: list[tuple[str, int]]) -> None:
    """Single puts, and several blocks at once (copied a run of free slots at a time, with evictions
    freeing slots in any order), always read back as stored."""
    shape = (2, 1, 2, 1, 2)
    host = HostTier(capacity_blocks=5, block_shape=shape, dtype=torch.float32, pin=False)
    stored: dict[bytes, float] = {}
    for op, n in operations:
        key = bytes([n]) * 16
        if op == "put" and host.free_blocks:
            host.put(key, torch.full(shape, float(n)))
            stored.setdefault(key, float(n))  # a block held already is kept as it is
        elif op == "put_many":  # keys n, n + 1, ..., some perhaps held already
            keys = [bytes([(n + i) % 8]) * 16 for i in range(4)]
            values = [float(n * 10 + i) for i in range(4)]
            free = host.free_blocks
            host.put_many(keys, torch.stack([torch.full(shape, v) for v in values]))
            for k, v in zip(keys, values, strict=True):
                if k not in stored and free:
                    stored[k], free = v, free - 1
        elif op == "get":
            kv = host.get(key)
            assert (kv is not None) == (key in stored)
            if kv is not None:
                assert torch.all(kv == stored[key])
        elif op == "evict":
            evicted = host.evict()
            if evicted is not None:
                key, kv, release = evicted
                assert torch.all(kv == stored.pop(key))
                release()
        assert host.stats.blocks == len(stored) <= 5


def test_an_evicted_host_slot_is_reused_only_once_released() -> None:
    """The host tier lends an evicted block's slot to the disk's writer: a put while it is out takes
    another slot, or none, and never overwrites the block being written."""
    shape = (2, 1, 2, 1, 2)
    host = HostTier(capacity_blocks=2, block_shape=shape, dtype=torch.float32, pin=False)
    host.put(b"a" * 16, torch.full(shape, 1.0))
    host.put(b"b" * 16, torch.full(shape, 2.0))
    key, kv, release = host.evict()
    assert key == b"a" * 16 and host.free_blocks == 0
    host.put(b"c" * 16, torch.full(shape, 3.0))  # no slot: not stored
    assert not host.contains(b"c" * 16) and torch.all(kv == 1.0)
    release()
    host.put(b"c" * 16, torch.full(shape, 3.0))
    assert host.contains(b"c" * 16) and torch.all(host.get(b"c" * 16) == 3.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_host_and_disk_hits_on_cuda_are_exact(tiny: LoadedModel, tmp_path: Path) -> None:
    folder = tiny.folder
    model = load_model(str(folder), torch.device("cuda"), torch.float32)
    engine = make_engine(model, tmp_path)
    assert engine.prefix_cache.host._slab.is_pinned()
    expected = generate(engine, FOLLOW_UP).output_ids
    evict_everything_live(engine)
    assert generate(engine, FOLLOW_UP).cache_hit.tokens_by_tier[TierName.HOST] == 64
    engine.close()
    restarted = make_engine(model, tmp_path)
    seq = generate(restarted, FOLLOW_UP)
    assert seq.cache_hit.tokens_by_tier[TierName.DISK] == 64 and seq.output_ids == expected


def cuda_engine_that_has_evicted(tiny: LoadedModel, pool_tokens: int) -> LLMEngine:
    """An engine on CUDA, host tier and no disk, whose pool has evicted once (one block, now on the host
    tier): from then on it stages evictions."""
    engine = make_engine(load_model(str(tiny.folder), torch.device("cuda"), torch.float32), None, pool_tokens)
    generate(engine, list(range(4000, 4100)))
    engine.prefix_cache.index.evict(1)
    return engine


def assert_follow_up_exact_from_host(engine: LLMEngine, tiny: LoadedModel) -> None:
    seq = generate(engine, FOLLOW_UP)
    assert seq.cache_hit.tokens_by_tier[TierName.HOST] == 48
    assert seq.output_ids == cold_tokens(tiny, FOLLOW_UP)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blocks_about_to_be_evicted_are_copied_to_host_while_the_device_computes(
    tiny: LoadedModel,
) -> None:
    """A pool too full for a next step's token budget: finished prompts' blocks reach the host tier while
    still live, during other requests' steps, so evicting them copies nothing, and they come back exact."""
    engine = cuda_engine_that_has_evicted(tiny, pool_tokens=1024)  # 64 blocks, fewer than a step may take
    assert engine.max_batch_tokens // engine.pool.block_size > engine.pool.num_blocks
    generate(engine, PROMPT)
    keys = engine.prefix_cache.chain("", PROMPT)
    assert not any(engine.prefix_cache.host.contains(key) for key in keys)  # not yet: it was running
    generate(engine, list(range(3000, 3020)))  # another request's steps
    index = engine.prefix_cache.index
    assert all(engine.prefix_cache.host.contains(key) and index.block_of(key) is not None for key in keys)
    staged = {index.block_of(key) for key in keys}
    gathered: list[int] = []
    read_blocks = engine.pool.read_blocks
    engine.pool.read_blocks = lambda blocks: gathered.extend(blocks) or read_blocks(blocks)
    evict_everything_live(engine)  # (the other request's blocks, released at its last step, are copied now)
    assert gathered and not staged & set(gathered)
    assert_follow_up_exact_from_host(engine, tiny)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_staged_blocks_are_read_before_the_pool_writes_other_kv_into_them(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staging stream held back (a sleep queued on it before each gather): evicting staged blocks and
    writing another prompt's KV into them at once must wait for the gather, or the host tier would keep
    the other prompt's KV under the first prompt's keys."""
    original = prefix_cache._EvictionStaging.after_written

    def held_back(staging: prefix_cache._EvictionStaging) -> torch.cuda.StreamContext:
        context = original(staging)
        with context:
            torch.cuda._sleep(200_000_000)  # about 0.1 s of the staging stream
        return context

    monkeypatch.setattr(prefix_cache._EvictionStaging, "after_written", held_back)
    engine = cuda_engine_that_has_evicted(tiny, pool_tokens=512)  # the tiny model's whole context
    generate(engine, PROMPT)
    keys = engine.prefix_cache.chain("", PROMPT)
    kv = engine.pool.read_blocks([engine.prefix_cache.index.block_of(key) for key in keys]).cpu()
    generate(engine, list(range(3000, 3020)))  # PROMPT's blocks staged, their gather held back
    evict_everything_live(engine)
    filler = list(range(5000, 5000 + engine.pool.num_free * engine.pool.block_size - 8))
    generate(engine, filler, max_tokens=1)  # every free block, PROMPT's among them, rewritten
    assert torch.equal(torch.stack([engine.prefix_cache.host.peek(key) for key in keys]), kv)
    assert_follow_up_exact_from_host(engine, tiny)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_writers_waiting_out_the_engines_step_work_write_once_it_waits_or_idles(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(background, "LONGEST_PAUSE_WAIT_S", 60.0)  # only a pause lets a writer go on
    model = load_model(str(tiny.folder), torch.device("cuda"), torch.float32)
    engine = make_engine(model, tmp_path, disk_write=DiskWrite.THROUGH)
    generate(engine, PROMPT, max_tokens=20)  # blocks written through while it decodes
    flushed = threading.Thread(target=engine.prefix_cache.flush)
    flushed.start()
    flushed.join(timeout=20)
    assert not flushed.is_alive() and len(kv_files(tmp_path)) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_pool_with_room_for_the_next_step_copies_nothing_to_host(tiny: LoadedModel) -> None:
    model = load_model(str(tiny.folder), torch.device("cuda"), torch.float32)
    cache_config = CacheConfig(disk=False, load_policy=LoadPolicy.ALWAYS)
    engine = LLMEngine(model, EngineConfig(kv_pool_tokens=4096, max_batch_tokens=256, cache=cache_config))
    generate(engine, list(range(4000, 4100)))
    engine.prefix_cache.index.evict(1)  # demoted: the host tier's one block
    generate(engine, PROMPT)
    generate(engine, list(range(3000, 3020)))
    assert engine.prefix_cache.host.stats.blocks == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_pool_that_never_evicted_copies_nothing_to_host(tiny: LoadedModel) -> None:
    """Fewer free blocks than a step may take, but nothing ever evicted (a pool holding every prompt):
    copies ahead of evictions would only cost."""
    model = load_model(str(tiny.folder), torch.device("cuda"), torch.float32)
    engine = make_engine(model, kv_dir=None, pool_tokens=1024)
    assert engine.max_batch_tokens // engine.pool.block_size > engine.pool.num_blocks
    generate(engine, PROMPT)
    generate(engine, list(range(3000, 3020)))
    assert engine.prefix_cache.host.stats.blocks == 0


def test_cache_cli_prints_and_cleans(
    tiny: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from warmkv.cli import main

    engine = make_engine(tiny, tmp_path)
    generate(engine, PROMPT)
    engine.close()
    main(["cache", "stats", "--kv-dir", str(tmp_path)])
    assert engine.prefix_cache.disk.directory.name in capsys.readouterr().out
    main(["cache", "verify", "--kv-dir", str(tmp_path)])
    assert "checked 3 KV blocks" in capsys.readouterr().out
    main(["cache", "clear", "--kv-dir", str(tmp_path)])
    assert "deleted 3 KV blocks" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_demotion_to_pinned_host_does_not_wait_for_the_device() -> None:
    shape = (2, 2, 16, 2, 8)
    host = HostTier(capacity_blocks=2, block_shape=shape, dtype=torch.float32, pin=True)
    block = torch.full(shape, 3.0, device="cuda")
    torch.cuda._sleep(500_000_000)  # the device stays busy for a while
    host.put(b"a" * 16, block)
    assert not torch.cuda.current_stream().query()  # put returned with the device still busy
    key, kv, _ = host.evict()  # a reader on the CPU waits for the copy
    assert key == b"a" * 16 and torch.all(kv == 3.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reading_a_landed_host_block_does_not_wait_for_copies_queued_after_it() -> None:
    """A block demoted earlier is read (or evicted to disk) while a newer demotion still waits behind a
    step the device is computing: the read waits for its own copy, not for that step."""
    shape = (2, 2, 16, 2, 8)
    host = HostTier(capacity_blocks=3, block_shape=shape, dtype=torch.float32, pin=True)
    host.put(b"a" * 16, torch.full(shape, 1.0, device="cuda"))
    host.put(b"b" * 16, torch.full(shape, 2.0, device="cuda"))
    torch.cuda.synchronize()  # these two have landed
    torch.cuda._sleep(2_000_000_000)  # a long step in flight: seconds
    host.put(b"c" * 16, torch.full(shape, 3.0, device="cuda"))  # its copy waits behind the step
    kv = host.get(b"a" * 16)
    key, evicted, _ = host.evict()  # the least recently used: b, landed too
    assert not torch.cuda.current_stream().query()  # neither waited for the step
    assert torch.all(kv == 1.0) and key == b"b" * 16 and torch.all(evicted == 2.0)
    assert torch.all(host.get(b"c" * 16) == 3.0)  # a read of the newest waits for its copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_write_through_gather_does_not_wait_for_the_device() -> None:
    pool = KVPool(2, 8, 16, 2, 8, torch.float32, torch.device("cuda"))
    pool.k[:, 16:32] = 5.0
    torch.cuda._sleep(500_000_000)
    kv = pool.read_blocks([1, 3])
    assert not torch.cuda.current_stream().query()
    assert torch.all(kv[0, 0] == 5.0) and torch.all(kv[1] == 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_block_lists_reach_the_device_intact_through_reused_pinned_buffers() -> None:
    pool = KVPool(1, 64, 16, 1, 8, torch.float32, torch.device("cuda"))
    for block in range(64):
        pool.k[:, block * 16 : (block + 1) * 16] = float(block)
    torch.cuda._sleep(100_000_000)  # the device lags: buffers are refilled while copies are still queued
    lists = [[n, (n * 7) % 64, 63 - n] for n in range(40)]
    gathers = [(blocks, pool.read_blocks(blocks)) for blocks in lists]
    for blocks, kv in gathers:
        assert kv[:, 0, 0, 0, 0, 0].tolist() == [float(b) for b in blocks]
