"""The tiered prefix cache: live pool -> host RAM -> local disk, one token-keyed chain of block hashes.

A block leaves the live pool only when no sequence holds it; it is demoted to host RAM, and from there to
disk. By default every block is also written through to disk in the background as soon as it is
complete, so a restart (or a crash) loses at most what the writer had not reached; with write-back
(`--kv-disk-write back`) a block reaches the disk as it leaves memory, and the rest at shutdown. A lookup
walks the chain through the tiers and copies lower-tier blocks back into the pool, unless recomputing them
would be faster.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from warmkv.cache.background import EngineCpuWork
from warmkv.cache.config import CacheConfig, DiskWrite, LoadPolicy, default_kv_dir
from warmkv.cache.hit_policy import HitEmulation
from warmkv.cache.kv_pool import KVPool
from warmkv.cache.load_costs import LoadCosts, calibrated_load_costs
from warmkv.cache.miss_reasons import LookupStop, Nearest, RecentPrompts
from warmkv.cache.partial_blocks import PartialBlocks
from warmkv.cache.prefix_index import PrefixIndex
from warmkv.cache.tiers.base import Tier, TierName, TierStats
from warmkv.cache.tiers.codec import BlockLayout
from warmkv.cache.tiers.disk import DiskTier
from warmkv.cache.tiers.host import HostTier
from warmkv.cache.tiers.redis import RedisTier
from warmkv.cache.write_through import WriteThrough
from warmkv.errors import PoolExhausted

log = logging.getLogger("warmkv.cache")

WRITE_BACK_BATCH = 256  # live blocks gathered and copied to the host at a time when written back
IDLE_WRITE_BATCH = 64  # live blocks written back per call while the engine is idle: a few ms of work
HOST_WRITE_HEADROOM = 8  # written back: blocks entering a host tier fuller than 7/8 are written to disk
IDLE_WRITE_RETRY_S = 0.05  # the wait for a request while the writers are busy, before trying again
# staged evictions (PrefixCache.stage_evictions): at most this many blocks gathered a step (it bounds the
# gather's device memory and the step's share of the work), copies of live blocks filling at most this
# share of the host tier (a smaller tier would push out each step what the step before staged), and at
# most this many index entries looked at a step to find them
STAGED_PER_STEP = 128
STAGED_SHARE_OF_HOST = 4
STAGING_SCAN = 4096


@dataclass(slots=True)
class PrefixHit:
    blocks: list[int]  # pool blocks holding the hit, each with a reference for the caller
    keys: list[bytes]  # prefix-index keys of the whole blocks (a partial tail block has none)
    tokens_by_tier: dict[TierName, int] = field(default_factory=dict)
    num_tokens: int = 0  # tokens whose KV the blocks hold: the whole blocks, then a partial tail's tokens
    stop: LookupStop | None = None  # why the hit ended early, if it did
    stop_tier: TierName | None = None  # the tier it was reading when it stopped
    load_bytes: int = 0
    load_seconds: float = 0.0
    nearest: Nearest = field(default_factory=lambda: Nearest(None, 0))  # the closest remembered prompt

    def truncate(self, blocks: int, pool: KVPool) -> None:
        """Give back the blocks past the first `blocks`, taking them off the tiers they came from last."""
        surplus = (len(self.blocks) - blocks) * pool.block_size
        pool.decref_many(self.blocks[blocks:])
        del self.blocks[blocks:], self.keys[blocks:]
        for tier in reversed(list(self.tokens_by_tier)):
            taken = min(surplus, self.tokens_by_tier[tier])
            self.tokens_by_tier[tier] -= taken
            surplus -= taken

    @property
    def stopped_by(self) -> str | None:
        """Why the hit ended early, for people: "KV pool full", "load from disk slower than recompute", ..."""
        tier = self.stop_tier.value if self.stop_tier else "a lower tier"
        return {
            None: None,
            LookupStop.POOL_FULL: "KV pool full",
            LookupStop.UNREADABLE: f"{tier} block unreadable (dropped)",
            LookupStop.SLOWER_THAN_RECOMPUTE: f"load from {tier} slower than recompute",
        }[self.stop]

    @property
    def source(self) -> str:
        """Where the cached tokens came from, for the request log: "live:32+disk:64", or "none"."""
        parts = [f"{tier.value}:{n}" for tier, n in self.tokens_by_tier.items() if n]
        return "+".join(parts) or "none"


class PrefixCache:
    def __init__(
        self, pool: KVPool, fingerprint: str, config: CacheConfig, emulation: HitEmulation | None = None,
        engine_work: EngineCpuWork | None = None,
    ) -> None:  # fmt: skip
        """`emulation`: another cache's reuse rules, for benchmarks; None (serving) serves any cached
        prefix. `engine_work`: the engine thread's step work, which the background writers wait out."""
        self.pool = pool
        self.config = config
        self.fingerprint = fingerprint
        self.index = PrefixIndex(pool, fingerprint)
        self.index.on_evict = self._demote
        self.emulation = emulation
        # sub-block anchors only where any prefix may be served (other caches' rules serve no such tails)
        self.partials = PartialBlocks(pool) if emulation is None else None
        pool.reclaim = self._reclaim
        host_blocks = config.host_blocks(pool.block_bytes, pool.block_size)
        on_cuda = pool.k.device.type == "cuda"
        self.host = (
            HostTier(host_blocks, pool.block_shape, pool.k.dtype, pin=on_cuda) if host_blocks else None
        )
        layout = BlockLayout(pool.block_shape, pool.k.dtype)  # every block read from below must match it
        self.disk = (
            DiskTier(
                config.kv_dir or default_kv_dir(),
                fingerprint,
                layout,
                config.disk_bytes(pool.block_bytes, pool.block_size),
                config.writer_queue,
                config.kv_file_mode,
                engine_work=engine_work,
            )
            if config.disk
            else None
        )
        self.remote = None
        if config.redis_url:
            self.remote = RedisTier(config.redis_url, fingerprint, layout, config.redis_ttl_s,
                                    config.redis_timeout_s, config.redis_cluster,
                                    engine_work=engine_work)  # fmt: skip
        # the shared tier is written through whatever the disk's policy: other replicas read it now
        written = (self.disk if config.disk_write is DiskWrite.THROUGH else None, self.remote)
        self.write_through = WriteThrough(pool, [t for t in written if t is not None], engine_work)
        # blocks bound for the disk alone, gathered on the engine's thread and written by a helper: those
        # leaving the pool that the disk lacks, and (written back) those written while the engine is idle
        self._disk_writes = WriteThrough(pool, [self.disk], engine_work) if self.disk is not None else None
        self._writes_back = self.disk is not None and config.disk_write is DiskWrite.BACK
        self._unwritten: OrderedDict[bytes, None] = OrderedDict()  # written back: computed since
        self.costs: LoadCosts | None = None  # None: every hit below the live tier is loaded (see calibrate)
        self.recent = RecentPrompts()  # what miss reasons compare against and new turns chain from
        self._staging = _EvictionStaging(pool.k.device) if self.host is not None and on_cuda else None
        self._releases = 0  # sequences that gave their blocks back: what may be evicted next changed

    @property
    def tiers(self) -> list[Tier]:
        tiers = (self.host, self.disk, self.remote)
        return [t for t in tiers if t is not None and getattr(t, "enabled", True)]

    def stats(self) -> dict[TierName, TierStats]:
        live = TierStats(blocks=len(self.index), bytes=len(self.index) * self.pool.block_bytes,
                         evictions=self.index.evictions, writes=self.index.inserts)  # fmt: skip
        lower = [t for t in (self.host, self.disk, self.remote) if t is not None]  # a tier that is down too
        for tier in lower:
            tier.stats.up = getattr(tier, "enabled", True)  # asking a tier that is off lets it retry
        return {TierName.LIVE: live, **{t.name: t.stats for t in lower}}

    # -- the engine's side: calibrate, acquire, commit, release, finish, swap_out --------------------

    def calibrate(self, prefill: Callable[[list[int]], None]) -> None:
        """Learn whether loading a block from each lower tier beats recomputing it, once the model can run
        (`prefill` runs a prompt through it and keeps nothing). Saved per machine, model and device, so a
        restart reads the figures back. Only `--kv-load auto` weighs the two; without lower tiers there is
        nothing to weigh."""
        if not self.tiers or self.config.load_policy is not LoadPolicy.AUTO:
            return
        disk_dir = self.disk.directory if self.disk is not None and self.disk.enabled else None
        host_pinned = None if self.host is None else self.pool.k.device.type == "cuda"  # as the slab is
        self.costs = calibrated_load_costs(
            self.pool, prefill, host_pinned, disk_dir, self.fingerprint, self.config.recalibrate
        )

    def acquire(self, namespace: str, token_ids: list[int]) -> PrefixHit:
        """The longest cached prefix of `token_ids` short of its last token (whose logits start the reply),
        as pool blocks with a reference for the caller: whole blocks from any tier, then a remembered
        partial tail. The remembered prompt nearest to this one rides along, for miss reasons, and the
        tokens as it compared them, for `finish`."""
        prompt = token_ids[: len(token_ids) - 1]
        nearest = self.recent.nearest(namespace, token_ids)  # once: it chains the keys and explains misses
        known = nearest.known_keys(self.pool.block_size)[: len(prompt) // self.pool.block_size]
        hit = self.lookup(self.index.chain(namespace, prompt, known))
        hit.num_tokens = len(hit.blocks) * self.pool.block_size
        try:
            tail = self.continue_hit(namespace, hit, token_ids[hit.num_tokens : len(token_ids) - 1])
        except BaseException:
            self.pool.decref_many(hit.blocks)
            raise
        if tail is not None:
            hit.blocks.append(tail[0])
            hit.num_tokens += tail[1]
        hit.nearest = nearest
        return hit

    def commit(
        self, namespace: str, token_ids: list[int], keys: list[bytes], blocks: list[int]
    ) -> list[bytes]:
        """A sequence's KV now covers `token_ids`: index its newly completed blocks (and write them through
        in the background). Returns the keys of all its whole blocks; `keys` are those already indexed."""
        if len(token_ids) // self.pool.block_size == len(keys):
            return keys  # most decode steps: no block completed
        known = len(keys)
        keys = self.chain(namespace, token_ids, keys)
        self.insert(keys[known:], blocks[known : len(keys)])
        return keys

    def release(self, namespace: str, token_ids: list[int], keys: list[bytes], blocks: list[int],
                anchors: tuple[int, ...] = ()) -> None:  # fmt: skip
        """A sequence gives its blocks back (finished or preempted). What it computed stays cached: whole
        blocks in the index, and the partial block at each anchor (token offset within `token_ids`)."""
        self.remember_tails(namespace, keys, token_ids, blocks, anchors)
        self.pool.decref_many(blocks)
        self.touch(keys)
        self._releases += 1

    def finish(self, namespace: str, token_ids: list[int], keys: list[bytes], prompt_tokens: int,
               cache_breakpoint: int = 0, hit: PrefixHit | None = None) -> None:  # fmt: skip
        """A request ended: remember its tokens (and the keys of its whole blocks: the next turn chains on
        from them) for miss reasons, and its prompt's blocks for an emulation of other caches' rules. The
        blocks before the client's cache breakpoint (Anthropic's cache_control) are kept longest. `hit`:
        the sequence's first lookup, whose tokens need no conversion again."""
        self.recent.remember(namespace, token_ids, keys, hit.nearest.query if hit is not None else b"")
        self.index.keep_longest(keys[: cache_breakpoint // self.pool.block_size])
        if self.emulation is not None:
            self.emulation.record(keys[: prompt_tokens // self.pool.block_size])

    def swap_out(self, keys: list[bytes], blocks: list[int]) -> int:
        """A preempted sequence's whole blocks that nothing else holds, copied to the host tier now, so that
        it resumes by loading them rather than recomputing them; returns the bytes copied. Nothing when
        there is no host tier or loading from it is slower than recomputing. The blocks stay indexed in
        the pool until their space is needed (a resume before that finds them live)."""
        if self.host is None or not self._worth_loading(TierName.HOST):
            return 0
        # held by this sequence and the index only: other holders keep the block live anyway
        alone = [(k, b) for k, b in zip(keys, blocks, strict=False)
                 if not self.host.contains(k) and self.pool.ref_counts[b] <= 2]  # fmt: skip
        if not alone:
            return 0
        self._keep_on_host([k for k, _ in alone], self.pool.read_blocks([b for _, b in alone]))
        return len(alone) * self.pool.block_bytes

    def chain(self, namespace: str, token_ids: list[int], known: list[bytes] | None = None) -> list[bytes]:
        """Keys of every full block of token_ids. Leading blocks' keys come from `known`, or else from the
        recent prompt of the namespace that shares them: a new turn hashes only what it adds."""
        if known is None:
            known = self.recent.nearest(namespace, token_ids).known_keys(self.pool.block_size)
        return self.index.chain(namespace, token_ids, known)

    def lookup(self, keys: list[bytes]) -> PrefixHit:
        """The longest run of leading keys held by any tier (and served by the emulation, if any), in pool
        blocks."""
        if self.emulation is None:
            return self._lookup(keys)
        hit = self._lookup(keys[: self.emulation.usable(keys)])
        hit.truncate(self.emulation.usable(hit.keys), self.pool)  # a hit cut short still ends where allowed
        return hit

    def remember_tails(self, namespace: str, keys: list[bytes], token_ids: list[int], blocks: list[int],
                       anchors: tuple[int, ...]) -> None:  # fmt: skip
        """Keep the partial block at each anchor (token offset) within `token_ids`, the tokens whose KV the
        sequence computed."""
        size = self.pool.block_size
        for anchor in anchors:
            whole = anchor // size
            if self.partials is None or anchor % size == 0 or anchor > len(token_ids) or whole >= len(blocks):
                continue
            parent = keys[whole - 1] if whole else self.index.root(namespace)
            self.partials.remember(parent, token_ids[whole * size : anchor], blocks[whole])

    def continue_hit(self, namespace: str, hit: PrefixHit, next_tokens: list[int]) -> tuple[int, int] | None:
        """A remembered tail that continues a whole-block hit and that `next_tokens` starts with, copied into
        a new block for the caller: (block, tokens)."""
        if self.partials is None:
            return None
        parent = hit.keys[-1] if hit.keys else self.index.root(namespace)
        found = self.partials.longest(parent, next_tokens)
        if found is None:
            return None
        source, tokens = found
        self.pool.incref(source)  # a reclaim while allocating must not hand out the source itself
        try:
            target = self.pool.allocate(1)[0]
        except PoolExhausted:
            return None
        finally:
            self.pool.decref(source)
        self.pool.copy_block(source, target)
        hit.tokens_by_tier[TierName.LIVE] = hit.tokens_by_tier.get(TierName.LIVE, 0) + tokens
        return target, tokens

    def _reclaim(self, count: int) -> int:
        # tails first: each holds a whole block for fewer than block_size tokens
        freed = self.partials.evict(count) if self.partials is not None else 0
        return freed + self.index.evict(count - freed) if freed < count else freed

    def _lookup(self, keys: list[bytes]) -> PrefixHit:
        blocks = self.index.match(keys)
        hit = PrefixHit(blocks, keys[: len(blocks)], {TierName.LIVE: len(blocks) * self.pool.block_size})
        plan = self._plan_loads(keys[len(blocks) :], hit)
        if not plan:
            return hit
        started = time.perf_counter()
        try:
            # allocation first: evictions it causes may demote into the very tiers read below
            targets = self.pool.allocate(len(plan))
        except PoolExhausted:  # as many as the pool holds (the failed try freed all it could)
            hit.stop = LookupStop.POOL_FULL
            plan = plan[: self.pool.num_free]
            targets = self.pool.allocate(len(plan))
            if not plan:
                return hit
        try:
            # every block goes straight to a device staging buffer (from the pinned slab: asynchronously);
            # the layout change to the pool's happens on the device
            staging = torch.empty(
                (len(plan), *self.pool.block_shape), dtype=self.pool.k.dtype, device=self.pool.k.device
            )
            loaded = self._read_plan(plan, staging, hit)
        except BaseException:  # the failure is the caller's request's: the pool keeps its blocks
            self.pool.decref_many(targets + hit.blocks)
            raise
        for unused in targets[loaded:]:
            self.pool.decref(unused)
        if not loaded:
            return hit
        self.pool.write_blocks(targets[:loaded], staging[:loaded])
        for (key, _), block in zip(plan, targets[:loaded], strict=False):
            self.index.insert(key, block)
            hit.blocks.append(block)
            hit.keys.append(key)
        hit.load_bytes = loaded * self.pool.block_bytes
        if self.pool.k.device.type == "cuda":  # this stream only: background write-through copies go on
            torch.cuda.current_stream(self.pool.k.device).synchronize()
        hit.load_seconds = time.perf_counter() - started
        log.info("loaded %.1f MB of KV into the pool at %.2f GB/s (%s)", hit.load_bytes / 1e6,
                 hit.load_bytes / max(hit.load_seconds, 1e-9) / 1e9, hit.source)  # fmt: skip
        return hit

    def _read_plan(self, plan: list[tuple[bytes, Tier]], staging: torch.Tensor, hit: PrefixHit) -> int:
        """Read the planned blocks into `staging` up to the first unreadable one; how many were read."""
        read = self._read_bulk(plan, staging)
        loaded = 0
        for key, tier in plan:
            readable = read[key] if key in read else self._copy_from(tier, key, staging[loaded])
            if not readable:
                hit.stop, hit.stop_tier = LookupStop.UNREADABLE, tier.name
                break
            loaded += 1
            hit.tokens_by_tier[tier.name] = hit.tokens_by_tier.get(tier.name, 0) + self.pool.block_size
        return loaded

    def _read_bulk(self, plan: list[tuple[bytes, Tier]], staging: torch.Tensor) -> dict[bytes, bool]:
        """Blocks of the disk and shared tiers, read in one batch per tier (threads / one round trip)."""
        read: dict[bytes, bool] = {}
        for tier in (self.disk, self.remote):
            positions = [i for i, (_, t) in enumerate(plan) if t is tier and tier is not None]
            if positions:
                keys = [plan[i][0] for i in positions]
                to_staging = lambda n, kv, at=positions: staging[at[n]].copy_(kv)  # noqa: E731
                done = tier.read_many(keys, to_staging)  # type: ignore[union-attr]
                read.update(zip(keys, done, strict=True))
        return read

    @staticmethod
    def _copy_from(tier: Tier, key: bytes, row: torch.Tensor) -> bool:
        kv = tier.get(key)
        if kv is not None:
            row.copy_(kv, non_blocking=True)  # from the pinned slab: asynchronous
        return kv is not None

    def _plan_loads(self, keys: list[bytes], hit: PrefixHit) -> list[tuple[bytes, Tier]]:
        """The leading keys found below the live tier and worth loading, with the tier each comes from."""
        plan: list[tuple[bytes, Tier]] = []
        remote_has: list[bool] | None = None  # asked once, in one round trip, when first needed
        for i, key in enumerate(keys):
            tier = next((t for t in self.tiers if t is not self.remote and t.contains(key)), None)
            if tier is None and self.remote is not None and self.remote.enabled:
                remote_has = remote_has or [False] * i + self.remote.contains_many(keys[i:])
                tier = self.remote if remote_has[i] else None
            if tier is None:
                break
            if not self._worth_loading(tier.name):
                hit.stop, hit.stop_tier = LookupStop.SLOWER_THAN_RECOMPUTE, tier.name
                break
            plan.append((key, tier))
        return plan

    def insert(self, keys: list[bytes], blocks: list[int]) -> None:
        """Blocks just completed: index them live, and write the new ones through to disk and the shared
        tier in the background."""
        new = [(key, block) for key, block in zip(keys, blocks, strict=True) if self.index.insert(key, block)]
        if new:
            self.write_through.submit([key for key, _ in new], [block for _, block in new])
            if self._writes_back:
                self._unwritten.update((key, None) for key, _ in new)

    def write_idle(self) -> float | None:
        """Written back, while the engine is idle (an agent's tool time): the next blocks computed since
        that the disk lacks go to its writer, from the pool or the host tier, so that a crash loses little.
        Returns how long the engine may wait for a request before calling again: 0 (more to write), a short
        time (the writers are busy), None (nothing left)."""
        if self._disk_writes is None or not self._unwritten or not self.disk.enabled:  # type: ignore[union-attr]
            return None  # (a disk that is down is probed on its own schedule; these wait for it)
        if self._disk_writes.busy():
            return IDLE_WRITE_RETRY_S
        live: list[tuple[bytes, int]] = []
        host: list[tuple[bytes, torch.Tensor]] = []
        while self._unwritten and len(live) + len(host) < IDLE_WRITE_BATCH:
            key, _ = self._unwritten.popitem(last=False)
            if not self.disk.wants(key):  # type: ignore[union-attr]
                continue
            block = self.index.block_of(key)
            if block is not None:
                live.append((key, block))
            elif self.host is not None and (kept := self.host.peek(key)) is not None:
                host.append((key, kept))
            # (in neither: the host tier evicted it to the disk's writer)
        self._disk_writes.submit([key for key, _ in live], [block for _, block in live])
        if host and self._disk_writes.busy():  # the live blocks filled the queue: these wait their turn
            for key, _ in reversed(host):
                self._unwritten[key] = None
                self._unwritten.move_to_end(key, last=False)
            return IDLE_WRITE_RETRY_S
        if host:  # a copy: the host tier lends out its slots as it evicts them
            self._disk_writes.submit_gathered([key for key, _ in host], torch.stack([kv for _, kv in host]))
        return 0.0 if self._unwritten else None

    def touch(self, keys: list[bytes]) -> None:
        self.index.touch(keys)

    def flush(self) -> None:
        self.write_through.flush()
        if self._disk_writes is not None:
            self._disk_writes.flush()
        for tier in (self.disk, self.remote):
            if tier is not None:
                tier.flush()

    def close(self) -> None:
        self.write_through.close()
        if self._disk_writes is not None:
            self._disk_writes.close()
        try:
            self._write_back()
        finally:
            for tier in (self.disk, self.remote):
                if tier is not None:
                    tier.close()
            self.host = None  # its slab (pinned RAM on CUDA) goes back now

    def _write_back(self) -> None:
        """At shutdown: every block the memory tiers hold and the disk lacks goes to disk (the host tier's
        first: they are the older), so a restart finds them. Written back, that is most of them; written
        through, those the writers skipped while they were busy (the tiers slower than prefill)."""
        if self.disk is None or not self.disk.enabled:
            return
        started = time.perf_counter()
        host = [(k, kv) for k, kv in (self.host.items() if self.host else []) if self.disk.wants(k)]
        live = [(k, b) for k, b in self.index.items() if self.disk.wants(k)]
        count = len(host) + len(live)
        if count:
            log.info("writing %d cached blocks to disk before exit ...", count)
        for key, kv in host:
            self.disk.put(key, kv, wait=True)  # a view: nothing writes the slab any more, flushed below
        for start in range(0, len(live), WRITE_BACK_BATCH):
            batch = live[start : start + WRITE_BACK_BATCH]
            kv = self.pool.read_blocks([block for _, block in batch]).to("cpu")
            for (key, _), block_kv in zip(batch, kv, strict=True):
                self.disk.put(key, block_kv, wait=True)
        self.disk.flush()
        if count:
            log.info("wrote %d blocks to disk in %.1f s", count, time.perf_counter() - started)

    # -- policy -----------------------------------------------------------------------------------

    def _worth_loading(self, tier: TierName) -> bool:
        if self.config.load_policy is LoadPolicy.ALWAYS or self.costs is None:
            return True
        return self.costs.load_is_faster(tier, self.pool.block_bytes, self.pool.block_size)

    def _demote(self, victims: list[tuple[bytes, int]]) -> None:
        """Live blocks about to be reused: keep their KV one tier down, gathered off the pool in one pass."""
        if self.host is None:
            # written through, the disk usually has them; written back, this is how they get there
            if self._disk_writes is not None and self.disk.enabled:  # type: ignore[union-attr]
                missing = [(key, block) for key, block in victims if self.disk.wants(key)]  # type: ignore[union-attr]
                self._disk_writes.submit([key for key, _ in missing], [block for _, block in missing])
            for key, _ in victims:  # handed down now: idle time has no more to write of them
                self._unwritten.pop(key, None)
            return
        if self._staging is not None:
            self._staging.before_reuse()  # staged victims: their gather reads them before they are rewritten
        missing = [(key, block) for key, block in victims if not self.host.contains(key)]  # staged? swapped?
        if missing:
            self._keep_on_host([key for key, _ in missing], self.pool.read_blocks([b for _, b in missing]))

    def step_started(self) -> None:
        """Called as a step begins, before it queues any work: what staged evictions may read is what the
        device's stream has written up to here."""
        if self._staging is not None:
            self._staging.step_started()

    def stage_evictions(self, count: int) -> None:
        """The `count` blocks the pool would evict next, copied to the host tier now where it lacks them,
        so that evicting them later copies nothing. Called while the device computes a step, it takes a
        demotion's gather, host copies and bookkeeping out of a later step's allocation (a prefill arriving
        at a full pool), where the device would wait for them. Only once the pool has evicted: in a pool
        holding every prompt the copies would only slow the step (a tau-bench replay's mean TTFT on an H100
        1.11x the GPU tier alone's, against 0.98x). Only on a GPU: on a CPU the step has already
        run, and staging early would only add to it. The blocks stay live; the host tier holds a copy, and
        they reach the disk when they leave memory, as any block does. Optional work: a failure is logged
        and the eviction copies the blocks itself."""
        if self._staging is None or count <= 0 or not self.index.evictions:
            return  # (a pool that has never evicted may hold everything: copies would only cost)
        assert self.host is not None
        state = (self.index.inserts, self.index.evictions, self._releases)
        if state == self._staging.staged_at:  # nothing indexed, evicted or given back since: staged already
            return
        count = min(count, self.host.capacity // STAGED_SHARE_OF_HOST)
        next_out = self.index.eviction_order(count, STAGING_SCAN)
        wanted = [(key, block) for key, block in next_out if not self.host.contains(key)]
        if len(wanted) <= STAGED_PER_STEP:
            self._staging.staged_at = state
        wanted = wanted[:STAGED_PER_STEP]
        if not wanted:
            return
        try:
            with self._staging.after_written():  # beside this step's work, after what earlier steps wrote
                kv = self.pool.read_blocks([block for _, block in wanted])
                self._keep_on_host([key for key, _ in wanted], kv, staged=True)
                self._staging.gathered()
        except Exception as err:
            log.warning("copying blocks to the host tier ahead of their eviction failed: %s", err)

    def _keep_on_host(self, keys: list[bytes], kv: torch.Tensor, staged: bool = False) -> None:
        """Blocks `kv` [n, ...] (a gather on the pool's device) onto the host tier. Written back, they also go
        to the disk's writer once the host tier is nearly full, from this gather, so that under host
        pressure the blocks it evicts later are already on disk; while it has room they wait for idle time.
        What the host tier evicts and the disk still lacks goes to the disk's writer from its own slot, which
        the host tier reuses once it is written: no copy. The oldest blocks that find no free slot (those
        evicted are still being written) go to the disk from the gather instead. Staged blocks (still live)
        go to the disk neither way: they get there when they leave memory."""
        assert self.host is not None
        filling = self.host.free_blocks < len(keys) + self.host.capacity // HOST_WRITE_HEADROOM
        handed = self._writes_back and filling and not staged
        if handed:
            self._to_disk(keys, kv)
            for key in keys:
                self._unwritten.pop(key, None)
        evicted = []
        for _ in range(len(keys) - self.host.free_blocks):  # (slots lent out come back as they are written)
            if (one := self.host.evict()) is None:
                break
            evicted.append(one)
            self._unwritten.pop(one[0], None)
        if self.disk is not None:
            self.disk.put_many(evicted)  # (those the disk has already are released at once)
        else:
            for _, _, release in evicted:
                release()
        unplaced = max(0, len(keys) - self.host.free_blocks)  # the oldest: their tier is the disk
        if unplaced and not handed and not staged:
            self._to_disk(keys[:unplaced], kv[:unplaced])
        self.host.put_many(keys[unplaced:], kv[unplaced:])

    def _to_disk(self, keys: list[bytes], kv: torch.Tensor) -> None:
        """Gathered blocks to the disk's writer, when the disk lacks any of them (it skips those it has)."""
        if self.disk is not None and self.disk.enabled and any(self.disk.wants(key) for key in keys):
            self._disk_writes.submit_gathered(keys, kv)  # type: ignore[union-attr]


class _EvictionStaging:
    """The stream and events of staged evictions (PrefixCache.stage_evictions): their gathers wait for
    what earlier steps wrote (recorded as each step begins) but not for the step in flight, and the
    device's own stream waits for the latest gather before it reuses a block."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._stream = torch.cuda.Stream(device)
        self._written = torch.cuda.Event()
        self._gathered = torch.cuda.Event()
        self._unawaited = False  # a gather the device's stream has not waited for yet
        self.staged_at: tuple[int, int, int] | None = None  # (inserts, evictions, releases) when staged

    def step_started(self) -> None:
        self._written.record()

    def after_written(self) -> torch.cuda.StreamContext:
        """The staging stream, made to wait for what the steps before this one wrote."""
        self._stream.wait_event(self._written)
        return torch.cuda.stream(self._stream)

    def gathered(self) -> None:
        self._gathered.record(self._stream)
        self._unawaited = True

    def before_reuse(self) -> None:
        if self._unawaited:
            torch.cuda.current_stream(self._device).wait_event(self._gathered)
            self._unawaited = False
