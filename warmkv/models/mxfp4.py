"""MXFP4 weights (OCP microscaling), as gpt-oss's published checkpoints store their experts: a row is cut
into groups of 32 four-bit floats (E2M1, two a byte, the lower nibble first) that share one power-of-two
scale (E8M0: one byte, bias 127). A checkpoint holds a tensor `name` as `name_blocks` [..., groups, 16]
and `name_scales` [..., groups]. They are dequantised once, on load, to the model's dtype: the engine's
kernels multiply 16-bit weights. Every E2M1 value times a power of two is exact in bf16 and float32."""

from __future__ import annotations

import torch

from warmkv.errors import ModelLoadError

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCKS, SCALES = "_blocks", "_scales"


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., groups, 16] uint8 blocks, [..., groups] uint8 scales -> [..., groups * 32] in `dtype`, a slice
    of the leading dimension at a time (gpt-oss-120b's experts are 128 per layer: their lookups at once
    would take gigabytes)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ModelLoadError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} do not go with scales "
                             f"{tuple(scales.shape)} {scales.dtype}")  # fmt: skip
    values = torch.tensor(E2M1, dtype=dtype, device=blocks.device)
    out = torch.empty(*blocks.shape[:-1], 2 * blocks.shape[-1], dtype=dtype, device=blocks.device)
    for part, block, scale in zip(out, blocks, scales, strict=True):
        part[..., 0::2] = values[(block & 0x0F).int()]
        part[..., 1::2] = values[(block >> 4).int()]
        torch.ldexp(part, scale.int()[..., None] - 127, out=part)
    return out.flatten(-2)


def dequantize_checkpoint(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Every `name_blocks` / `name_scales` pair of a state dict becomes `name` in `dtype`, in place, laid
    out as the unquantised checkpoint's `name`: gpt-oss's blocks hold its experts as [experts, out, in],
    its bf16 tensors as [experts, in, out]."""
    for name in [n for n in weights if n.endswith(BLOCKS)]:
        base = name.removesuffix(BLOCKS)
        if base + SCALES not in weights:
            raise ModelLoadError(f"{name}: MXFP4 blocks without their scales ({base + SCALES})")
        weights[base] = dequantize(weights.pop(name), weights.pop(base + SCALES), dtype).transpose(-1, -2)
