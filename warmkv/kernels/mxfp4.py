"""MXFP4 weights read straight from their packed bytes (Triton): gpt-oss's experts, a quarter of bf16's size.

A weight row of `depth` values is cut into groups of 32 that share an E8M0 scale byte (2 ** (scale - 127));
each group is 16 bytes of E2M1 codes in ggml's order, which the loader puts them in: byte j holds the
group's value j in its lower nibble and value j + 16 in its upper one (gpt-oss's checkpoints pair values
2j and 2j + 1 instead). So a group's lower nibbles are its first 16 values in order and its upper
nibbles its last 16: a kernel multiplies them by the matching 16-value runs of its input, with no
shuffle of values between threads, and each group's scale multiplies the group's sum once. Each value
is an E2M1 number times a power of two, exact in float32 and bf16: a product over the decoded bytes is
a product over the dequantised weight (summed in its own order).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_mxfp4(block_rows, scale_rows, start, depth, row_ok, DEPTH: tl.constexpr):
    """The bytes [rows, groups, 16] and scales [rows, groups] of values start .. start + DEPTH of each row
    (start a multiple of 32); `block_rows` / `scale_rows` point at each row's first byte / scale, shaped
    [rows, 1], `row_ok` [rows, 1]. Groups past `depth` are 0 (the values 0)."""
    group = start // 32 + tl.arange(0, DEPTH // 32)
    byte = group[:, None] * 16 + tl.arange(0, 16)[None, :]
    ok = row_ok & (group < depth // 32)[None, :]
    packed = tl.load(block_rows[:, :, None] + byte[None, :, :], mask=ok[:, :, None], other=0)
    scales = tl.load(scale_rows + group[None, :], mask=ok, other=0)
    return packed, scales


@triton.jit
def group_runs(start, depth, DEPTH: tl.constexpr):
    """The input positions the lower nibbles of load_mxfp4's bytes multiply, [groups, 16], and whether
    each is within `depth`; the upper nibbles multiply the positions 16 further on."""
    group = start // 32 + tl.arange(0, DEPTH // 32)
    k = group[:, None] * 32 + tl.arange(0, 16)[None, :]
    return k, k < depth


@triton.jit
def mxfp4_row_sums(packed, scales, x_low, x_high):
    """Each row's products with a step of the input (`x_low` / `x_high`: float32 [groups, 16], the values
    at group_runs' positions and 16 further on): [rows] float32."""
    codes = packed.to(tl.int32)
    sums = tl.sum(_e2m1(codes) * x_low[None, :, :] + _e2m1(codes >> 4) * x_high[None, :, :], 2)
    return tl.sum(sums * scale_values(scales), 1)


@triton.jit
def mxfp4_low_high(packed, scales, dtype: tl.constexpr):
    """load_mxfp4's bytes as values in `dtype` (exactly): (the lower nibbles, the upper nibbles), each
    [rows, groups, 16] times its group's scale."""
    codes = packed.to(tl.int32)
    scale = scale_values(scales)[:, :, None]
    return (_e2m1(codes) * scale).to(dtype), (_e2m1(codes >> 4) * scale).to(dtype)


@triton.jit
def scale_values(scales):
    """E8M0 scale bytes as float32 2 ** (scale - 113): 2 ** (scale - 127) times the 2 ** 14 that _e2m1's
    values lack, built from its bits (exact for every scale up to 240)."""
    return ((scales.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1(codes):
    """The low 4 bits of `codes` (sign, 2 exponent bits, 1 mantissa bit) as float32, 2 ** -14 times their
    E2M1 value: the 3 magnitude bits placed above a float16's 10 mantissa bits make that float16, E2M1's
    subnormal 0.5 included."""
    bits = ((codes & 7) << 9) | ((codes & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
