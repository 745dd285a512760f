"""Programmatic dependent launch (Hopper and later) for the kernels of a decode step.

A batch-1 decode step of a mixture-of-experts model is about 550 small kernels in a row (48 layers of
11), and between two of them the GPU idles while the first drains and the second launches, and each
kernel's first loads wait for it: Qwen3-30B-A3B decoded 246 tok/s on an H100 without dependent launch,
260 with it (bench.engine, `2a5ec43` and `9d94b14`). Launched as a dependent,
a kernel's programs are placed while the kernel before it finishes and wait at `wait_for_previous`
(griddepcontrol.wait) until all its writes are visible; each kernel in turn lets its successor launch
once all of its own programs have started, so a long kernel's tail overlaps the next one's launch.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl


def options(device: torch.device) -> tuple[bool, dict[str, Any]]:
    """(the kernels' PDL flag, the launch options) for kernels on `device`."""
    if device.type != "cuda":
        return False, {}
    on = _hopper_or_later(torch.cuda.current_device() if device.index is None else device.index)
    return on, ({"launch_pdl": True} if on else {})


@functools.cache
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Wait until the previous kernel's writes are visible, then let the next kernel launch: before a
    kernel's first read of anything an earlier kernel of the step may still be writing."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
