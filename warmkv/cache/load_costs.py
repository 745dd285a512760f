"""Load or recompute: measured once at start-up, consulted for every hit below the live tier."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from warmkv.cache.tiers.base import TierName
from warmkv.cache.tiers.codec import BlockLayout, decode_block, encode_block
from warmkv.cache.tiers.disk import read_file
from warmkv.engine.kv_pool import KVPool

log = logging.getLogger("warmkv.cache")


@dataclass(slots=True)
class LoadCosts:
    prefill_tok_s: float
    bytes_per_s: dict[TierName, float] = field(default_factory=dict)  # from the tier into the pool

    def load_is_faster(self, tier: TierName, block_bytes: int, block_tokens: int) -> bool:
        bandwidth = self.bytes_per_s.get(tier)
        return bandwidth is None or block_bytes / bandwidth < block_tokens / self.prefill_tok_s

    def describe(self) -> str:
        tiers = ", ".join(f"{t.value} {b / 1e9:.2f} GB/s" for t, b in self.bytes_per_s.items())
        return f"prefill {self.prefill_tok_s:,.0f} tok/s; loads: {tiers}"


def measure_load_costs(
    pool: KVPool, prefill: Callable[[list[int]], None], host_pinned: bool | None, disk_dir: Path | None
) -> LoadCosts:
    """host_pinned: None when there is no host tier; disk_dir: None when there is no disk tier."""
    tokens = list(range(100, 100 + 8 * pool.block_size))
    prefill(tokens)  # warm-up
    costs = LoadCosts(len(tokens) / _seconds(lambda: prefill(tokens), pool))
    block = pool.allocate(1)[0]
    try:
        source = torch.randn(pool.block_shape).to(pool.k.dtype)
        if host_pinned is not None:
            pinned = source.pin_memory() if host_pinned else source
            costs.bytes_per_s[TierName.HOST] = pool.block_bytes / _seconds(
                lambda: pool.write_blocks([block], pinned[None]), pool
            )
        if disk_dir is not None:
            try:
                seconds = _disk_seconds(pool, block, source, disk_dir)
                costs.bytes_per_s[TierName.DISK] = pool.block_bytes / seconds
            except OSError as err:  # full or read-only: the disk tier turns itself off on its first write
                log.warning("disk load speed not measured (%s); disk hits will be loaded", err)
    finally:
        pool.decref(block)
    log.info("load-or-recompute costs: %s", costs.describe())
    return costs


def _disk_seconds(pool: KVPool, block: int, source: torch.Tensor, disk_dir: Path) -> float:
    disk_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=disk_dir) as scratch:
        path = Path(scratch) / "probe.kv"
        path.write_bytes(encode_block("00" * 16, b"\0" * 16, source))

        layout = BlockLayout(pool.block_shape, pool.k.dtype)

        def load() -> None:
            pool.write_blocks([block], decode_block(read_file(path), "00" * 16, layout=layout).kv[None])

        return _seconds(load, pool)


def _seconds(run: Callable[[], None], pool: KVPool, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if pool.k.device.type == "cuda":
            torch.cuda.synchronize(pool.k.device)
        times.append(time.perf_counter() - start)
    return max(sorted(times)[repeats // 2], 1e-9)
