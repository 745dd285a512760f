"""What every tier below the live pool offers: whole blocks of KV, keyed by prefix hash."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # names only: `warmkv cache stats` and the metrics read TierName without loading torch
    import torch

SUFFIX = ".kv"  # a disk-tier block file


class TierName(str, enum.Enum):
    LIVE = "live"  # the engine's KV pool (GPU, or CPU memory on a CPU device)
    HOST = "host"  # host RAM, pinned on CUDA
    DISK = "disk"  # local files, kept across restarts
    REMOTE = "remote"  # a Redis / Valkey store shared by replicas


@dataclass(slots=True)
class TierStats:
    blocks: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    writes: int = 0  # blocks stored (a live block: indexed)
    skipped_writes: int = 0  # the writer's queue was full
    corrupt: int = 0  # stored units that failed verification and were deleted
    unavailable: int = 0  # times the tier was found down (the shared store: unreachable or too slow)
    up: bool = True  # serving now (a disk that cannot be written, a store that is down: not)


class Tier(Protocol):
    name: TierName
    stats: TierStats

    def contains(self, key: bytes) -> bool: ...

    def get(self, key: bytes) -> torch.Tensor | None:
        """The block's KV [2, layers, block_size, kv_heads, head_dim] on the CPU, or None."""

    def put(self, key: bytes, kv: torch.Tensor) -> None:
        """Store a copy-safe block (the disk and shared tiers also take wait=True: block while their writer's
        queue is full instead of skipping)."""
