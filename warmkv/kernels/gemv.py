"""Matrix-vector products for the few token rows of a decode step (Triton): a linear layer at one row,
and a mixture of experts' products for each (token, expert) pair on its own.

With one token a layer's product is a read of its weight and nothing else: two bytes per multiply-add.
What decides its speed is how many bytes are in flight, not tensor cores. cuBLAS's batch-1 kernels read
Qwen3-30B-A3B's q/k/v and o projections at 55-72% of the H100's copy rate (a kernel profile), and the
grouped GEMM with a 16-row tile per pair, one row real, read the experts at 0.72 of it
(`python -m bench.moe --sweep`). Here each program reads a few whole rows of the weight in long
contiguous loads, multiplies them by the token row in float32 and sums: no padding rows, no tile
shapes made for tl.dot, and enough programs to keep every SM loading.

A program owns one output row (a token's row, or a pair's) and `cols` consecutive output columns, so
one kernel serves a dense layer (one weight) and the experts (each pair's expert's weight). The router's
product can also normalise its own input (`norm_and_gemv`): the residual add and RMSNorm before a
mixture of experts run in each of its few programs, which read the whole row anyway, and the norm's
kernel is gone from the decode step's critical path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from warmkv.kernels.dependent_launch import options, wait_for_previous
from warmkv.kernels.fused import added, normalised
from warmkv.kernels.mxfp4 import group_runs, load_mxfp4, mxfp4_row_sums

NORM_DEPTH_MAX = 4096  # norm_and_gemv's one step: two weight rows and the row of 4096 columns in registers


@dataclass(slots=True, frozen=True)
class GemvLaunch:
    cols: int  # output columns (weight rows) per program
    depth: int  # reduction step: weight columns loaded at once per row
    num_warps: int


def gemv_launch(depth: int, rows: int) -> GemvLaunch:
    """4 warps. For one token's rows (a dense layer's, or its k experts'): two weight rows a program in
    steps of up to 1024 columns, the per-pair sweep's fastest at 1 token of 48 launches (`python -m
    bench.moe --sweep`, Qwen3-30B-A3B's experts on an H100) and of nine rules the fastest batch-1 decode
    step (3.90 ms, a one-off run). Past 8 rows: 16 weight rows in steps of 256, as many weights in
    flight a step: decode at 8 tokens 626 tok/s against 581-584 with two rows (one A/B run,
    `bench/results/engine-...-qwen3-30b-a3b-ab-batch8.json`)."""
    if rows > 8:
        return GemvLaunch(cols=16, depth=min(256, triton.next_power_of_2(depth)), num_warps=4)
    return GemvLaunch(cols=2, depth=min(1024, triton.next_power_of_2(depth)), num_warps=4)


def mxfp4_gemv_launch(depth: int, rows: int) -> GemvLaunch:
    """MXFP4 weights, decoded in registers: more rows a program than 16-bit ones. At one token of
    gpt-oss-20b's experts on an H100, 8 rows in steps of 512 took 50.9 us a layer, the fastest of ten
    launches (2 rows in steps of 1024: 61.7 us; bf16 weights 73.6 us; bench/results/moe-nvidia-h100-80gb-
    hbm3-mxfp4-one-off-sweeps.json)."""
    if rows > 8:
        return GemvLaunch(cols=16, depth=min(512, triton.next_power_of_2(depth)), num_warps=4)
    return GemvLaunch(cols=8, depth=min(512, triton.next_power_of_2(depth)), num_warps=4)


def gemv(
    x: torch.Tensor,  # [rows, depth]
    weight: torch.Tensor,  # [cols, depth], or [experts, cols, depth] with expert_ids
    bias: torch.Tensor | None = None,  # [cols] or [experts, cols]
    expert_ids: torch.Tensor | None = None,  # [pairs]: pair p multiplies x[p // pairs_per_row] by its expert
    pairs_per_row: int = 1,
    pair_weights: torch.Tensor | None = None,  # [pairs]: multiplied into each output row
    swiglu: bool = False,  # weight rows are [gate | up]: out is silu(gate) * up, half as many columns
    launch: GemvLaunch | None = None,
    ids_settled: bool = False,  # expert_ids were written before the kernel launched just before this one
    scales: torch.Tensor | None = None,  # MXFP4: `weight` is [..., cols, depth / 2] bytes, these its scales
) -> torch.Tensor:
    """out[p] = (x[p // pairs_per_row] @ W.T + bias) * pair_weights[p]: [pairs, cols] (pairs = rows
    without experts). Experts round as transformers rounds them, each step to x's dtype; a dense layer's
    bias joins the float32 sum, rounded once, as F.linear. The weight (an expert's, once its id is
    `ids_settled`) is read before waiting for the previous kernel to finish (dependent launch): it must
    not be written during the step; only x comes from that kernel. x and the weight are contiguous in
    their last dimension."""
    experts = (
        _Experts(expert_ids, pairs_per_row, pair_weights, ids_settled) if expert_ids is not None else None
    )
    return _launch(x, weight, bias, experts, swiglu, launch, None, scales)[0]


def norm_and_gemv(
    x: torch.Tensor,  # [rows, depth]: the layer's output before the residual add
    residual: torch.Tensor,  # [rows, depth]
    norm_weight: torch.Tensor,  # [depth]
    eps: float,
    weight: torch.Tensor,  # [cols, depth]
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normed @ weight.T + bias, normed, stream) in one launch, where stream = x + residual and normed is
    its RMSNorm: the bits of warmkv.kernels.fused.rms_norm followed by `gemv`. Each program normalises
    the whole row, so this is for a small weight (a router's); a row must fit one reduction step."""
    assert depth_fits(x.shape[1]) and x.is_contiguous() and residual.is_contiguous()  # one row stride for all
    out, norm = _launch(x, weight, bias, None, False, None, (residual, norm_weight, eps))
    assert norm is not None
    return out, *norm


def depth_fits(depth: int) -> bool:
    """Whether norm_and_gemv takes rows of this size: one reduction step of the whole row."""
    return depth <= NORM_DEPTH_MAX


@dataclass(slots=True, frozen=True)
class _Experts:
    """Each pair's expert, its row of x and its router weight: what `gemv` takes for the experts."""

    ids: torch.Tensor
    pairs_per_row: int
    pair_weights: torch.Tensor | None
    ids_settled: bool


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    experts: _Experts | None,
    swiglu: bool,
    launch: GemvLaunch | None,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None,  # residual, norm weight, eps
    scales: torch.Tensor | None = None,  # MXFP4's, [..., cols, depth / 32]
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    assert x.stride(-1) == 1 and weight.stride(-1) == 1 and (scales is None or scales.stride(-1) == 1)
    assert scales is None or norm is None  # MXFP4 steps read x from memory, not a normalised row
    pairs = experts.ids.numel() if experts is not None else x.shape[0]
    cols, depth = weight.shape[-2], weight.shape[-1] * (2 if scales is not None else 1)
    out_cols = cols // 2 if swiglu else cols
    launch = launch or (gemv_launch if scales is None else mxfp4_gemv_launch)(depth, pairs)
    if norm is not None:  # the whole row in one step, two weight rows a program whatever the rows
        launch = GemvLaunch(2, triton.next_power_of_2(depth), 4)
    out = torch.empty(pairs, out_cols, dtype=x.dtype, device=x.device)
    normed, stream = (torch.empty_like(x), torch.empty_like(x)) if norm is not None else (x, x)
    residual, norm_weight, eps = norm if norm is not None else (x, x, 0.0)
    weighted = experts is not None and experts.pair_weights is not None
    pdl, options_ = options(x.device)
    # column blocks on the grid's first axis: a vocabulary's can pass the second's limit of 65535
    _gemv_kernel[(triton.cdiv(out_cols, launch.cols), pairs)](
        x, weight, scales if scales is not None else weight, out, bias if bias is not None else x,
        experts.pair_weights if weighted else x, experts.ids if experts is not None else x,
        residual, norm_weight, normed, stream, out_cols, depth, eps,
        x.stride(0), weight.stride(0) if experts is not None else 0, weight.stride(-2),
        scales.stride(0) if scales is not None and experts is not None else 0,
        scales.stride(-2) if scales is not None else 0,
        bias.stride(0) if bias is not None and experts is not None else 0, out.stride(0),
        PAIRS_PER_ROW=experts.pairs_per_row if experts is not None else 1, EXPERTS=experts is not None,
        BIAS=bias is not None, WEIGHTED=weighted, SWIGLU=swiglu, NORM=norm is not None,
        MXFP4=scales is not None, COLS=launch.cols, DEPTH=launch.depth,
        WEIGHTS_FIRST=experts is None or experts.ids_settled, PDL=pdl, num_warps=launch.num_warps, **options_,
    )  # fmt: skip
    return out, ((normed, stream) if norm is not None else None)


@triton.jit
def expert_output(
    acc, acc_up, bias, up_bias, weight, dtype: tl.constexpr,
    BIAS: tl.constexpr, SWIGLU: tl.constexpr, WEIGHTED: tl.constexpr,
):  # fmt: skip
    """A product's epilogue in transformers' order, each step rounded to `dtype`: + bias, silu(gate) * up
    (as silu_and_mul rounds it), times the router weight. Shared by this kernel and the grouped GEMM."""
    if BIAS:
        acc = acc.to(dtype).to(tl.float32) + bias
        if SWIGLU:
            acc_up = acc_up.to(dtype).to(tl.float32) + up_bias
    if SWIGLU:
        gate = acc.to(dtype).to(tl.float32)
        acc = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
    if WEIGHTED:
        acc = acc.to(dtype).to(tl.float32) * weight
    return acc.to(dtype)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, scales_ptr, out_ptr, bias_ptr, weight_ptr, expert_ids_ptr,
    residual_ptr, norm_weight_ptr, normed_ptr, stream_ptr, cols, depth, eps,
    stride_x, stride_w_expert, stride_w_col, stride_s_expert, stride_s_col, stride_bias, stride_out,
    PAIRS_PER_ROW: tl.constexpr, EXPERTS: tl.constexpr, BIAS: tl.constexpr, WEIGHTED: tl.constexpr,
    SWIGLU: tl.constexpr, NORM: tl.constexpr, MXFP4: tl.constexpr, COLS: tl.constexpr,
    DEPTH: tl.constexpr, WEIGHTS_FIRST: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # WEIGHTS_FIRST: nothing but x comes from the previous kernel, so the first step of the weight is on its
    # way while that kernel finishes; each later step is loaded while the one before it is summed
    if not WEIGHTS_FIRST:
        wait_for_previous(PDL)
    dtype = out_ptr.dtype.element_ty
    # `cols`: the output's; with SWIGLU the weight has twice as many rows (gate, then up). With MXFP4 the
    # weight is its packed bytes (`depth` / 2 a row; warmkv.kernels.mxfp4) and scales_ptr its scales
    pair = tl.program_id(1).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pair, cache_modifier=".cg").to(tl.int64) if EXPERTS else 0
    x_row = x_ptr + (pair // PAIRS_PER_ROW) * stride_x
    col = tl.program_id(0) * COLS + tl.arange(0, COLS)
    col_ok = col < cols
    w_rows = w_ptr + expert * stride_w_expert + col[:, None].to(tl.int64) * stride_w_col
    w_up_rows = w_rows + cols * stride_w_col  # SWIGLU: the same columns of the up half
    if MXFP4:
        s_rows = scales_ptr + expert * stride_s_expert + col[:, None].to(tl.int64) * stride_s_col
        acc, acc_up = _mxfp4_products(x_row, w_rows, w_up_rows, s_rows, s_rows + cols * stride_s_col, col_ok,
                                      depth, SWIGLU, WEIGHTS_FIRST, PDL, COLS, DEPTH)  # fmt: skip
    else:
        acc, acc_up = _products(x_row, w_rows, w_up_rows, col_ok, depth, residual_ptr + pair * stride_x,
                                norm_weight_ptr, normed_ptr + pair * stride_x, stream_ptr + pair * stride_x,
                                eps, SWIGLU, NORM, WEIGHTS_FIRST, PDL, COLS, DEPTH)  # fmt: skip
    bias = 0.0
    up_bias = 0.0
    if BIAS:
        bias_row = bias_ptr + expert * stride_bias
        bias = tl.load(bias_row + col, mask=col_ok, other=0.0).to(tl.float32)
        if SWIGLU:
            up_bias = tl.load(bias_row + cols + col, mask=col_ok, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + pair).to(tl.float32) if WEIGHTED else 1.0
    if BIAS and not EXPERTS:  # a dense layer's bias joins the float32 sum, rounded once (F.linear's order)
        acc += bias
    out = expert_output(acc, acc_up, bias, up_bias, weight, dtype,
                        BIAS and EXPERTS, SWIGLU, WEIGHTED)  # fmt: skip
    tl.store(out_ptr + pair * stride_out + col, out, mask=col_ok)


@triton.jit
def _products(
    x_row, w_rows, w_up_rows, col_ok, depth, residual_row, norm_weight_ptr, normed_row, stream_row, eps,
    SWIGLU: tl.constexpr, NORM: tl.constexpr, WEIGHTS_FIRST: tl.constexpr, PDL: tl.constexpr,
    COLS: tl.constexpr, DEPTH: tl.constexpr,
):  # fmt: skip
    """The rows' float32 products with x (and the up half's): [COLS] each."""
    k = tl.arange(0, DEPTH)
    w_mask = col_ok[:, None] & (k < depth)[None, :]
    w = tl.load(w_rows + k[None, :], mask=w_mask, other=0.0)
    w_up = tl.load(w_up_rows + k[None, :], mask=w_mask, other=0.0) if SWIGLU else w
    if WEIGHTS_FIRST:
        wait_for_previous(PDL)
    if NORM:  # x + residual, normalised, is this product's row: the row fits one step
        row_ok = k < depth
        stream = added(tl.load(x_row + k, mask=row_ok, other=0.0),
                       tl.load(residual_row + k, mask=row_ok, other=0.0))  # fmt: skip
        normed = normalised(stream, tl.load(norm_weight_ptr + k, mask=row_ok, other=0.0).to(tl.float32),
                            eps, depth)  # fmt: skip
        if tl.program_id(0) == 0:  # the layer goes on with both
            tl.store(stream_row + k, stream, mask=row_ok)
            tl.store(normed_row + k, normed, mask=row_ok)
    acc = tl.zeros((COLS,), dtype=tl.float32)
    acc_up = tl.zeros((COLS,), dtype=tl.float32)
    for start in range(0, depth, DEPTH):
        k = start + tl.arange(0, DEPTH)
        if NORM:
            x = normed.to(tl.float32)[None, :]
        else:
            x = tl.load(x_row + k, mask=k < depth, other=0.0).to(tl.float32)[None, :]
        next_mask = col_ok[:, None] & (k + DEPTH < depth)[None, :]  # none past the last step
        w_next = tl.load(w_rows + (k + DEPTH)[None, :], mask=next_mask, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x, 1)
        w = w_next
        if SWIGLU:
            w_up_next = tl.load(w_up_rows + (k + DEPTH)[None, :], mask=next_mask, other=0.0)
            acc_up += tl.sum(w_up.to(tl.float32) * x, 1)
            w_up = w_up_next
    return acc, acc_up


@triton.jit
def _mxfp4_products(
    x_row, w_rows, w_up_rows, s_rows, s_up_rows, col_ok, depth,
    SWIGLU: tl.constexpr, WEIGHTS_FIRST: tl.constexpr, PDL: tl.constexpr, COLS: tl.constexpr,
    DEPTH: tl.constexpr,
):  # fmt: skip
    """_products over MXFP4 rows (warmkv.kernels.mxfp4), each step's bytes loaded while the step before
    is summed."""
    ok = col_ok[:, None]
    w, w_s = load_mxfp4(w_rows, s_rows, 0, depth, ok, DEPTH)
    w_up, w_up_s = w, w_s
    if SWIGLU:
        w_up, w_up_s = load_mxfp4(w_up_rows, s_up_rows, 0, depth, ok, DEPTH)
    if WEIGHTS_FIRST:
        wait_for_previous(PDL)
    acc = tl.zeros((COLS,), dtype=tl.float32)
    acc_up = tl.zeros((COLS,), dtype=tl.float32)
    for start in range(0, depth, DEPTH):
        k, k_ok = group_runs(start, depth, DEPTH)
        x_low = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
        x_high = tl.load(x_row + k + 16, mask=k_ok, other=0.0).to(tl.float32)
        w_next, w_s_next = load_mxfp4(w_rows, s_rows, start + DEPTH, depth, ok, DEPTH)  # none past the end
        acc += mxfp4_row_sums(w, w_s, x_low, x_high)
        w, w_s = w_next, w_s_next
        if SWIGLU:
            w_up_next, w_up_s_next = load_mxfp4(w_up_rows, s_up_rows, start + DEPTH, depth, ok, DEPTH)
            acc_up += mxfp4_row_sums(w_up, w_up_s, x_low, x_high)
            w_up, w_up_s = w_up_next, w_up_s_next
    return acc, acc_up
