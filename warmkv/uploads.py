"""Small host tensors (token ids, positions, slot indices) onto the device without waiting for it."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`, queued behind the device's work instead of waiting for it: a copy from pageable
    memory first drains the stream (an eager prefill's last upload held the engine thread for its whole pass).
    A pinned `host` is read when the copy runs, so it must not change afterwards; pageable memory is copied to
    pinned memory first, which the caching allocator reuses only once the copy has read it. (Each step's
    block lists go through the pool's own pinned buffers instead: KVPool._PinnedUploads.)"""
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
