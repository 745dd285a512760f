"""MXFP4 weights (OCP microscaling), as gpt-oss's published checkpoints store their experts: a row is cut
into groups of 32 four-bit floats (E2M1, two a byte, the lower nibble first) that share one power-of-two
scale (E8M0: one byte, bias 127). A checkpoint holds a tensor `name` as `name_blocks` [..., groups, 16]
and `name_scales` [..., groups]. They are dequantised once, on load, to the model's dtype: the engine's
kernels multiply 16-bit weights. Every E2M1 value times a power of two is exact in bf16 and float32 (and
in float16 within its range, which is checked)."""

from __future__ import annotations

import math

import torch

from warmkv.errors import ModelLoadError

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCKS, SCALES = "_blocks", "_scales"


def is_packed(name: str) -> bool:
    return name.endswith((BLOCKS, SCALES))


def loaded_numel(name: str, shape: list[int]) -> int:
    """Values a checkpoint tensor of this name and shape becomes on load: a block of 16 bytes 32 values,
    a scale none of its own."""
    numel = math.prod(shape)
    return 2 * numel if name.endswith(BLOCKS) else 0 if name.endswith(SCALES) else numel


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., groups, 16] uint8 blocks, [..., groups] uint8 scales -> [..., groups * 32] in `dtype`, a slice
    of the leading dimension (an expert) at a time: a layer's lookups at once would take several times
    its dequantised size."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ModelLoadError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} do not go with scales "
                             f"{tuple(scales.shape)} {scales.dtype}")  # fmt: skip
    # float16 holds 0.5 * 2**-23 (its smallest, subnormal) to 6 * 2**13: a scale past that would not fit
    if dtype == torch.float16 and (scales.min() < 127 - 23 or scales.max() > 127 + 13):
        raise ModelLoadError("MXFP4 scales past float16's range: load this model in bfloat16 (--dtype)")
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
    alone = [n for n in weights if n.endswith(SCALES)]
    if alone:
        raise ModelLoadError(f"{alone[0]}: MXFP4 scales without their blocks")
