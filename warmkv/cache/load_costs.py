"""Load or recompute: measured once per machine, model, device and disk (saved under the user cache dir, so a
restart does not measure again, and a busy machine at one start does not skew every later one), consulted
for every hit below the live tier."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from warmkv.cache.kv_pool import KVPool
from warmkv.cache.tiers.base import TierName
from warmkv.cache.tiers.codec import BlockLayout, decode_block, encode_block
from warmkv.cache.tiers.disk import read_file
from warmkv.paths import cache_home

log = logging.getLogger("warmkv.cache")

# figures outside these are measurement accidents (a timer hiccup, a machine stalled mid-run): measured again
PLAUSIBLE_PREFILL_TOK_S = (1.0, 1e8)
PLAUSIBLE_BYTES_PER_S = (1e6, 1e13)
ATTEMPTS = 3
PROBE_BLOCKS = 8  # the timed prefill's length, in blocks


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


def calibrated_load_costs(
    pool: KVPool,
    prefill: Callable[[list[int]], None],
    host_pinned: bool | None,
    disk_dir: Path | None,
    model_fingerprint: str,
    recalibrate: bool = False,
) -> LoadCosts:
    """The saved figures of this machine, model, device and set of tiers (the disk tier's file system among
    them: a --kv-dir on another disk, a tmpfs or a network share loads at another speed); measured (and
    saved) when there are none, when they are unreadable or implausible, or when `recalibrate` asks."""
    tiers = ([TierName.HOST] if host_pinned is not None else []) + ([TierName.DISK] if disk_dir else [])
    path = _calibration_file(pool, model_fingerprint, host_pinned, tiers, disk_dir)
    if not recalibrate:
        saved = _read_costs(path, tiers)
        if saved is not None:
            log.info("load-or-recompute costs from %s (--recalibrate measures again): %s",
                     path, saved.describe())  # fmt: skip
            return saved
    log.info("measuring load-or-recompute costs (once for this machine, model and device) ...")
    costs = measure_load_costs(pool, prefill, host_pinned, disk_dir)
    _write_costs(path, costs)
    return costs


def _calibration_file(
    pool: KVPool, fingerprint: str, host_pinned: bool | None, tiers: list[TierName], disk_dir: Path | None
) -> Path:
    device = pool.k.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    machine = (socket.gethostname(), platform.machine(), os.cpu_count(), device.type, device_name)
    disk = _file_system(disk_dir) if disk_dir is not None else None
    # the probe's length too: a shorter probe (a tiny pool's) times launches more than work, and its figures
    # must not stand for a later start's larger pool
    key = json.dumps([machine, fingerprint, host_pinned, [t.value for t in tiers], disk, _probe_blocks(pool)])
    return cache_home() / "calibration" / f"{hashlib.blake2b(key.encode(), digest_size=12).hexdigest()}.json"


def _file_system(folder: Path) -> str:
    """The mount point and type of the file system that holds `folder` (or would: its nearest existing
    parent's). Not the device number: tmpfs, overlay and network file systems get numbers in mount order,
    a container's every start a new one, and a number freed by one may go to another."""
    mount = next((p for p in (folder, *folder.parents) if p.exists()), Path(folder.anchor)).resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return f"{mount} {_mount_types().get(str(mount), '')}"


def _mount_types() -> dict[str, str]:
    """Mount point -> file system type, where the system lists them (Linux); empty elsewhere."""
    types = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3:  # (a mount point with spaces is escaped as \040: it finds no type)
                types[fields[1]] = fields[2]
    return types


def _read_costs(path: Path, tiers: list[TierName]) -> LoadCosts | None:
    """Saved figures, validated like anything read from disk; None when absent or not usable."""
    try:
        raw = json.loads(path.read_text())
        costs = LoadCosts(
            float(raw["prefill_tok_s"]), {TierName(t): float(b) for t, b in raw["bytes_per_s"].items()}
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("ignoring unreadable load-or-recompute costs in %s: %s", path, err)
        return None
    if set(costs.bytes_per_s) != set(tiers) or not _plausible(costs):
        log.warning("ignoring implausible load-or-recompute costs in %s: %s", path, costs.describe())
        return None
    return costs


def _write_costs(path: Path, costs: LoadCosts) -> None:
    bandwidths = {t.value: b for t, b in costs.bytes_per_s.items()}
    raw = {"prefill_tok_s": costs.prefill_tok_s, "bytes_per_s": bandwidths}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps(raw) + "\n")
        temporary.replace(path)  # atomic: a reader never sees half a file
    except OSError as err:
        log.warning("load-or-recompute costs not saved to %s (%s): measured again next start", path, err)


def _plausible(costs: LoadCosts) -> bool:
    return _within(costs.prefill_tok_s, PLAUSIBLE_PREFILL_TOK_S) and all(
        _within(b, PLAUSIBLE_BYTES_PER_S) for b in costs.bytes_per_s.values()
    )


def _within(value: float, bounds: tuple[float, float]) -> bool:
    return math.isfinite(value) and bounds[0] <= value <= bounds[1]


def _clipped(costs: LoadCosts) -> LoadCosts:
    def clip(value: float, bounds: tuple[float, float]) -> float:
        return min(max(value, bounds[0]), bounds[1]) if math.isfinite(value) else bounds[1]

    return LoadCosts(
        clip(costs.prefill_tok_s, PLAUSIBLE_PREFILL_TOK_S),
        {t: clip(b, PLAUSIBLE_BYTES_PER_S) for t, b in costs.bytes_per_s.items()},
    )


def measure_load_costs(
    pool: KVPool, prefill: Callable[[list[int]], None], host_pinned: bool | None, disk_dir: Path | None
) -> LoadCosts:
    """Measured until plausible (a few attempts), then clipped into the plausible range."""
    for attempt in range(1, ATTEMPTS + 1):
        costs = _measure_once(pool, prefill, host_pinned, disk_dir)
        if _plausible(costs):
            log.info("load-or-recompute costs: %s", costs.describe())
            return costs
        log.warning("implausible load-or-recompute costs (attempt %d of %d): %s", attempt, ATTEMPTS,
                    costs.describe())  # fmt: skip
    costs = _clipped(costs)
    log.warning("load-or-recompute costs clipped to the plausible range: %s", costs.describe())
    return costs


def _measure_once(
    pool: KVPool, prefill: Callable[[list[int]], None], host_pinned: bool | None, disk_dir: Path | None
) -> LoadCosts:
    """host_pinned: None when there is no host tier; disk_dir: None when there is no disk tier."""
    tokens = list(range(100, 100 + _probe_blocks(pool) * pool.block_size))
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
    return costs


def _probe_blocks(pool: KVPool) -> int:
    """The timed prompt's length in blocks: PROBE_BLOCKS, leaving one free for the loads timed after it. A
    small pool (--kv-pool-tokens 64) holds fewer, and a probe it cannot hold would stop the server from
    starting."""
    return max(1, min(PROBE_BLOCKS, pool.num_free - 1))


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
