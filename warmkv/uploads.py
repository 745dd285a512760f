"""Small host tensors (token ids, positions, slot indices) onto the device without waiting for it."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`, queued behind the work already there rather than waited for: a plain copy from
    pageable memory to a GPU first waits for the device's stream to drain, so an eager prefill whose last
    upload came after its layers held the host until the whole pass had run, and staged evictions and the
    next step's scheduling could not overlap it. Pinned memory's caching allocator keeps the buffer until
    the copy has read it."""
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
