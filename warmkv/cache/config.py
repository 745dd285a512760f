"""Prefix-cache settings: one dataclass, built from CLI flags; defaults live here."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from warmkv.errors import WarmkvError
from warmkv.paths import cache_home


class LoadPolicy(str, enum.Enum):
    AUTO = "auto"  # load from a lower tier only when that is faster than recomputing
    ALWAYS = "always"  # always load


class DiskWrite(str, enum.Enum):
    THROUGH = "through"  # every block is written as it is completed: the disk survives a crash
    # a block is written while the engine is idle, as it enters a nearly full host tier (or leaves the pool,
    # without one), as it leaves the host tier, and at shutdown (write-through cost a tenth of the
    # throughput of 50 agent sessions on an H100); a crash loses what was computed since the engine was
    # last idle and is still in memory
    BACK = "back"


def default_kv_dir() -> Path:
    """WARMKV_KV_DIR, else `kv/` in the user cache directory."""
    return Path(os.environ.get("WARMKV_KV_DIR") or cache_home() / "kv")


@dataclass(slots=True)
class CacheConfig:
    host_gib: float | None = None  # host RAM tier size in GiB ...
    host_tokens: int | None = None  # ... or in tokens; neither: 4 GiB
    disk: bool = True
    kv_dir: Path | None = None  # None: default_kv_dir()
    # KV files hold what prompts computed: the owner's alone unless a shared set-up widens it (0o640, 0o660)
    kv_file_mode: int = 0o600
    disk_gib: float | None = None  # disk tier size in GiB ...
    disk_tokens: int | None = None  # ... or in tokens; neither: 20 GiB
    writer_queue: int = 1024  # blocks waiting for the disk writer before writes are skipped
    disk_write: DiskWrite = DiskWrite.BACK
    load_policy: LoadPolicy = LoadPolicy.AUTO
    recalibrate: bool = False  # measure load-or-recompute costs again instead of reading the saved ones
    redis_url: str | None = None  # the shared tier: redis://, rediss:// or unix:// (Redis or Valkey)
    redis_cluster: bool = False
    redis_ttl_s: int = 24 * 3600  # a block not rewritten for this long expires from the shared tier
    redis_timeout_s: float = 0.5  # slower answers count as the store being down

    def __post_init__(self) -> None:
        if self.kv_file_mode & ~0o666 or self.kv_file_mode & 0o600 != 0o600:
            raise WarmkvError(
                f"--kv-dir-mode {self.kv_file_mode:o}: give a file mode such as 600, 640 or 660 "
                "(the owner reads and writes; nothing executes)"
            )

    def host_blocks(self, block_bytes: int, block_size: int) -> int:
        return _blocks(self.host_gib, self.host_tokens, 4.0, block_bytes, block_size)

    def disk_bytes(self, block_bytes: int, block_size: int) -> int:
        return _blocks(self.disk_gib, self.disk_tokens, 20.0, block_bytes, block_size) * block_bytes


def _blocks(
    gib: float | None, tokens: int | None, default_gib: float, block_bytes: int, block_size: int
) -> int:
    if tokens is not None:
        return tokens // block_size
    return int((default_gib if gib is None else gib) * 2**30) // block_bytes
