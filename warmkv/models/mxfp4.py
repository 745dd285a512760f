"""MXFP4 weights (OCP microscaling), as gpt-oss's published checkpoints store their experts: a row is cut
into groups of 32 four-bit floats (E2M1, two a byte, the lower nibble first) that share one power-of-two
scale (E8M0: one byte, bias 127). A checkpoint holds a tensor `name` as `name_blocks` [..., groups, 16]
and `name_scales` [..., groups]. On CUDA they stay packed (`load_pairs`): the expert kernels read the
bytes and scales (warmkv.kernels.mxfp4), a quarter of bf16's bytes in memory and per decode step.
Elsewhere they are dequantised once, on load, to the model's dtype. Every E2M1 value times a power of
two is exact in bf16 and float32 (and in float16 within its range, which is checked), so both ways
multiply by the same values."""

from __future__ import annotations

import math

import torch

from warmkv.errors import ModelLoadError

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# the largest scale byte taken: past it the kernels' scale, built from its bits, would overflow (255 is
# E8M0's NaN); checkpoints' scales are near 127
SCALE_MAX = 240
BLOCKS, SCALES = "_blocks", "_scales"


def is_packed(name: str) -> bool:
    return name.endswith((BLOCKS, SCALES))


def loaded_bytes(name: str, shape: list[int], dtype: torch.dtype, packed: bool) -> int:
    """Bytes a checkpoint tensor of this name and shape takes once loaded in `dtype`: MXFP4 blocks and
    scales a byte each when kept `packed`, else a block of 16 bytes 32 values and a scale none."""
    numel = math.prod(shape)
    if is_packed(name):
        return numel if packed else 2 * numel * dtype.itemsize if name.endswith(BLOCKS) else 0
    return numel * dtype.itemsize


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., groups, 16] uint8 blocks, [..., groups] uint8 scales -> [..., groups * 32] in `dtype`, a slice
    of the leading dimension (an expert) at a time: a layer's lookups at once would take several times
    its dequantised size."""
    check_pair(blocks, scales, dtype)
    out = torch.empty(*blocks.shape[:-1], 2 * blocks.shape[-1], dtype=dtype, device=blocks.device)
    for part, block, scale in zip(out, blocks, scales, strict=True):
        codes = torch.stack((block & 0x0F, block >> 4), dim=-1).flatten(-2)  # byte j: values 2j, 2j + 1
        part.copy_(_values(codes, scale, dtype))
    return out.flatten(-2)


def check_pair(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse blocks and scales that do not go together, or whose values `dtype` cannot hold exactly."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ModelLoadError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} do not go with scales "
                             f"{tuple(scales.shape)} {scales.dtype}")  # fmt: skip
    # float16 holds 0.5 * 2**-23 (its smallest, subnormal) to 6 * 2**13: a scale past that would not fit
    if dtype == torch.float16 and (scales.min() < 127 - 23 or scales.max() > 127 + 13):
        raise ModelLoadError("MXFP4 scales past float16's range: load this model in bfloat16 (--dtype)")
    if scales.numel() and scales.max() > SCALE_MAX:
        raise ModelLoadError(f"MXFP4 scale {int(scales.max())} is past {SCALE_MAX} (2 ** {SCALE_MAX - 127})")


def kernel_order(blocks: torch.Tensor) -> torch.Tensor:
    """Checkpoint blocks [..., groups, 16] (byte j: values 2j and 2j + 1) -> bytes [..., groups * 16] in
    the order the kernels read (warmkv.kernels.mxfp4, ggml's: byte j holds values j and j + 16), a slice
    of the leading dimension at a time."""
    out = torch.empty_like(blocks)
    for part, block in zip(out, blocks, strict=True):
        codes = torch.stack((block & 0x0F, block >> 4), dim=-1).flatten(-2)  # [..., groups, 32] in order
        torch.bitwise_or(codes[..., :16], codes[..., 16:] << 4, out=part)
    return out.flatten(-2)


def unpack(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """kernel_order's bytes [rows, depth / 2] and scales [rows, depth / 32] -> [rows, depth] in `dtype`."""
    groups = packed.unflatten(-1, (-1, 16))
    return _values(torch.cat((groups & 0x0F, groups >> 4), dim=-1), scales, dtype).flatten(-2)


def _values(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """E2M1 codes [..., groups, 32] times their group's scale [..., groups], in `dtype`."""
    values = torch.tensor(E2M1, dtype=dtype, device=codes.device)[codes.int()]
    return torch.ldexp(values, scales.int()[..., None] - 127, out=values)


def load_pairs(weights: dict[str, torch.Tensor], dtype: torch.dtype, packed: bool) -> None:
    """Every `name_blocks` / `name_scales` pair of a state dict, in place: kept `packed`, `name` becomes
    the blocks' bytes [..., groups * 16] in kernel_order, which the kernels read, beside `name_scales`;
    otherwise `name` in `dtype`, laid out as the unquantised checkpoint's `name` (gpt-oss's blocks hold
    its experts as [experts, out, in], its bf16 tensors as [experts, in, out])."""
    for name in [n for n in weights if n.endswith(BLOCKS)]:
        base = name.removesuffix(BLOCKS)
        if base + SCALES not in weights:
            raise ModelLoadError(f"{name}: MXFP4 blocks without their scales ({base + SCALES})")
        if packed:
            check_pair(weights[name], weights[base + SCALES], dtype)
            weights[base] = kernel_order(weights.pop(name))
        else:
            weights[base] = dequantize(weights.pop(name), weights.pop(base + SCALES), dtype).transpose(-1, -2)
    alone = [n for n in weights if n.endswith(SCALES) and not (packed and n.removesuffix(SCALES) in weights)]
    if alone:
        raise ModelLoadError(f"{alone[0]}: MXFP4 scales without their blocks")
