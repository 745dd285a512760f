"""Mixture-of-experts feed-forward as two grouped GEMMs over the selected experts only (Triton).

A token's top-k choices are (token, expert) pairs. The pairs are sorted by expert and each expert's run
is padded to a whole tile of rows (`align_by_expert`), so every tile of the grouped GEMM multiplies rows of
one expert by that expert's weight: a weight is read once per tile however many tokens chose it, and an
expert no token chose is never read. The first GEMM gathers token rows of x straight from the
unsorted input and, for SwiGLU experts, computes each tile's gate and up columns side by side and writes
silu(gate) * up (another activation runs on its own); the second GEMM multiplies by the router weight on
the way out. The k outputs of a token are summed by the caller, or left to the layer's next residual add,
which sums them in its own pass (one kernel less per layer). The router's softmax, top-k and
renormalisation are one kernel too (`route_top_k`): in PyTorch they are half a dozen.

Every shape depends only on the number of tokens (the padding is sized for the worst case, tiles past
the real ones exit at once), and the sorting is one kernel that never waits for the host, so CUDA graphs
capture a decode step through it. (It was a dozen PyTorch ops with a radix sort: a 2048-token prefill of
Qwen3-30B-A3B spent more time launching them than the GPU spent on the whole step.)

Decode has few pairs, mostly of distinct experts (a token's k are always distinct): there the sort is
skipped and each pair is a matrix-vector product of its own (warmkv.kernels.gemv), which reads an
expert chosen twice twice but needs no sort, no padding rows and no tl.dot tiles; where many experts
would be chosen twice (gpt-oss's 32 experts at 8 tokens) the pairs are sorted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from warmkv.kernels.dependent_launch import options, wait_for_previous
from warmkv.kernels.gemv import expert_output, gemv
from warmkv.kernels.mxfp4 import load_mxfp4, mxfp4_low_high

# up to this many pairs, each pair is a product of its own instead of being sorted by expert, although
# experts chosen twice are read twice. On an H100 at Qwen3-30B-A3B's shape, 8 tokens (64 pairs) took
# 175-176 us a product per pair at the sweep's best launches, 177 us sorted at its best tiles (`python -m
# bench.moe --sweep`, `moe-nvidia-h100-80gb-hbm3-per-pair-sweep.json`): no sort kernel, no worse
PAIR_GEMV_MAX = 64
# ... and only while pairs per chosen expert, expected, are at most this many: at that sweep's point
# (Qwen3-30B-A3B, 8 tokens: 64 pairs over 51.6 of 128 experts, 1.24) both ways took the same time, while
# gpt-oss-20b at 8 tokens (32 pairs over 21.0 of 32 experts, 1.52) decoded at 0.61-0.63 of its limit a
# product per pair against 0.73 sorted (bench.engine runs at 568ff4a, 656bb5a and bfd4f0e on an H100)
PAIRS_PER_EXPERT_MAX = 1.25
ALIGN_BLOCK = 1024  # pairs per pass of the alignment kernel
ALIGN_TILES = 64  # tiles per pass when it finds each tile's expert


@dataclass(slots=True, frozen=True)
class Tiles:
    rows: int  # pairs per tile: the M of each tile's GEMM
    cols: int  # output columns per program
    depth: int  # reduction step
    num_warps: int
    num_stages: int = 3


# gpt-oss-20b's experts as MXFP4 on an H100, of 3 to 8 tile shapes each (one-off graph-timed sweeps,
# bench/results/moe-nvidia-h100-80gb-hbm3-mxfp4-one-off-sweeps.json):
# 8 and 32 tokens 296 and 420 us (bf16 weights with their own tiles: 387, 577), 2048 tokens 2666 us (bf16
# 1421: each tile decodes its bytes again, so prefill stays slower than bf16)
_MXFP4_DECODE_TILES = Tiles(rows=16, cols=64, depth=128, num_warps=4)
_MXFP4_PREFILL_TILES = Tiles(rows=128, cols=128, depth=64, num_warps=8)


def tiles_for(pairs: int, mxfp4: bool = False) -> Tiles:
    # decode (few pairs per expert): small row tiles waste little on padding and the weight read dominates;
    # prefill: large tiles reuse each weight tile over many rows
    if mxfp4:  # decoding the bytes costs more than reading them: fewer, taller tiles decode each less often
        return _MXFP4_DECODE_TILES if pairs <= 1024 else _MXFP4_PREFILL_TILES
    if pairs <= 64:
        return Tiles(rows=16, cols=64, depth=128, num_warps=4)
    if pairs <= 1024:
        return Tiles(rows=32, cols=64, depth=64, num_warps=4)
    return Tiles(rows=64, cols=128, depth=64, num_warps=8)


@dataclass(slots=True)
class ExpertAlignment:
    """Pairs sorted by expert, each expert's run padded to a whole tile."""

    sorted_pairs: torch.Tensor  # [padded] int32: pair index (token * top_k + k), `pairs` marking padding
    tile_experts: torch.Tensor  # [tiles]: the expert of each tile; -1 for tiles past the last run


def align_by_expert(expert_ids: torch.Tensor, num_experts: int, tile_rows: int) -> ExpertAlignment:
    """Sort the pairs of expert_ids [tokens, top_k] by expert in one kernel launch, without a host sync
    (graph-capturable)."""
    flat = expert_ids.flatten()
    pairs = flat.numel()
    # worst case: every expert's run ends one row into a tile
    num_tiles = -(-(pairs + num_experts * (tile_rows - 1)) // tile_rows)
    sorted_pairs = torch.empty(num_tiles * tile_rows, dtype=torch.int32, device=flat.device)
    tile_experts = torch.empty(num_tiles, dtype=torch.int32, device=flat.device)
    scratch = torch.empty(num_experts, dtype=torch.int32, device=flat.device)
    _align_kernel[(1,)](
        flat, sorted_pairs, tile_experts, scratch, pairs, num_experts, num_tiles, TILE_ROWS=tile_rows,
        EXPERTS=triton.next_power_of_2(num_experts), BLOCK=ALIGN_BLOCK, TILES=ALIGN_TILES, num_warps=8,
    )  # fmt: skip
    return ExpertAlignment(sorted_pairs, tile_experts)


@triton.jit(do_not_specialize=["pairs", "num_tiles"])
def _align_kernel(
    expert_ids_ptr, sorted_pairs_ptr, tile_experts_ptr, scratch_ptr, pairs, num_experts, num_tiles,
    TILE_ROWS: tl.constexpr, EXPERTS: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr,
):  # fmt: skip
    """One program, a few passes over the pairs: count each expert's pairs, lay the runs out padded to whole
    tiles, then hand each pair the next free row of its expert's run (an atomic cursor per expert in
    `scratch`: the order of pairs within a run varies, and no row's result depends on it)."""
    experts = tl.arange(0, EXPERTS)
    expert_ok = experts < num_experts
    tl.store(scratch_ptr + experts, tl.zeros([EXPERTS], dtype=tl.int32), mask=expert_ok)
    for start in range(0, num_tiles * TILE_ROWS, BLOCK):  # every row padding until a pair takes it
        rows = start + tl.arange(0, BLOCK)
        tl.store(
            sorted_pairs_ptr + rows, tl.full([BLOCK], pairs, tl.int32), mask=rows < num_tiles * TILE_ROWS
        )
    tl.debug_barrier()
    for start in range(0, pairs, BLOCK):
        pair = start + tl.arange(0, BLOCK)
        expert = tl.load(expert_ids_ptr + pair, mask=pair < pairs, other=0)
        tl.atomic_add(scratch_ptr + expert, 1, mask=pair < pairs)
    tl.debug_barrier()
    counts = tl.load(scratch_ptr + experts, mask=expert_ok, other=0)
    lengths = (counts + TILE_ROWS - 1) // TILE_ROWS * TILE_ROWS
    ends = tl.cumsum(lengths, 0)
    tl.debug_barrier()  # every count read before the scratch becomes each run's cursor
    tl.store(scratch_ptr + experts, ends - lengths, mask=expert_ok)
    tl.debug_barrier()
    for start in range(0, pairs, BLOCK):
        pair = start + tl.arange(0, BLOCK)
        expert = tl.load(expert_ids_ptr + pair, mask=pair < pairs, other=0)
        row = tl.atomic_add(scratch_ptr + expert, 1, mask=pair < pairs)
        tl.store(sorted_pairs_ptr + row, pair.to(tl.int32), mask=pair < pairs)
    ends = tl.where(expert_ok, ends, 2**30)  # experts past the real ones end nowhere
    for start in range(0, num_tiles, TILES):  # a tile's expert: how many runs end at or before its first row
        tile = start + tl.arange(0, TILES)
        expert = tl.sum((ends[None, :] <= (tile * TILE_ROWS)[:, None]).to(tl.int32), 1)
        tl.store(tile_experts_ptr + tile, tl.where(expert < num_experts, expert, -1), mask=tile < num_tiles)


def products_per_pair(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether a step of `tokens` multiplies each (token, expert) pair on its own: few pairs, and few
    experts expected to be read more than once (with routing spread evenly, an expert is chosen by none
    of the tokens with probability (1 - top_k / num_experts) ** tokens)."""
    pairs = tokens * top_k
    chosen = num_experts * (1 - (1 - top_k / num_experts) ** tokens)
    return pairs <= PAIR_GEMV_MAX and pairs <= PAIRS_PER_EXPERT_MAX * chosen


def fused_experts(
    x: torch.Tensor,  # [tokens, hidden]
    gate_up_proj: torch.Tensor,  # [experts, 2 * inner, hidden]
    down_proj: torch.Tensor,  # [experts, hidden, inner]
    weights: torch.Tensor,  # [tokens, top_k] router weights in the model dtype
    expert_ids: torch.Tensor,  # [tokens, top_k]
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,  # None: silu(gate) * up, fused
    gate_up_bias: torch.Tensor | None = None,  # [experts, 2 * inner]
    down_bias: torch.Tensor | None = None,  # [experts, hidden]
    summed: bool = True,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # MXFP4: both projections' (bytes above)
) -> torch.Tensor:
    """weights[t, k] * expert[expert_ids[t, k]](x[t]), summed over k: [tokens, hidden]; or (summed=False)
    each of a token's k outputs, [tokens, top_k, hidden]. `activation` maps [n, 2 * inner] to [n, inner].
    With `scales`, the projections are MXFP4 bytes (`warmkv.kernels.mxfp4`), their last dimension half the
    values'."""
    tokens, top_k = expert_ids.shape
    gate_up_scales, down_scales = scales if scales is not None else (None, None)
    if products_per_pair(tokens, top_k, gate_up_proj.shape[0]):
        ids = expert_ids.flatten()
        hidden = gemv(x, gate_up_proj, gate_up_bias, ids, top_k, swiglu=activation is None,
                      scales=gate_up_scales)  # fmt: skip
        hidden = hidden if activation is None else activation(hidden)
        # the ids come from the router's kernel, two launches back: the down weights load early
        down = gemv(hidden, down_proj, down_bias, ids, 1, weights.reshape(-1), ids_settled=True,
                    scales=down_scales)  # fmt: skip
    else:
        down = _sorted_by_expert(x, gate_up_proj, down_proj, weights, expert_ids, activation,
                                 gate_up_bias, down_bias, gate_up_scales, down_scales)  # fmt: skip
    per_choice = down.view(tokens, top_k, -1)
    return per_choice.sum(dim=1) if summed else per_choice


def _sorted_by_expert(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor] | None,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    gate_up_scales: torch.Tensor | None,
    down_scales: torch.Tensor | None,
) -> torch.Tensor:
    """Both projections as grouped GEMMs over the pairs sorted by expert: [pairs, hidden]."""
    tokens, top_k = expert_ids.shape
    pairs = tokens * top_k
    tiles = tiles_for(pairs, mxfp4=gate_up_scales is not None)
    alignment = align_by_expert(expert_ids, gate_up_proj.shape[0], tiles.rows)
    if activation is None:  # the gate and up halves of each tile: half as many output columns per program
        hidden = grouped_gemm(x, gate_up_proj, gate_up_bias, alignment, pairs, top_k,
                              replace(tiles, cols=tiles.cols // 2), None, True, gate_up_scales)  # fmt: skip
    else:
        hidden = activation(grouped_gemm(x, gate_up_proj, gate_up_bias, alignment, pairs, top_k, tiles, None,
                                         b_scales=gate_up_scales))  # fmt: skip
    return grouped_gemm(hidden, down_proj, down_bias, alignment, pairs, 1, tiles, weights.reshape(-1),
                        b_scales=down_scales)  # fmt: skip


def grouped_gemm(
    a: torch.Tensor,  # [rows, depth]: row `pair // pairs_per_row` feeds pair `pair`
    b: torch.Tensor,  # [experts, cols, depth]
    bias: torch.Tensor | None,  # [experts, cols], added to each output row, or None
    alignment: ExpertAlignment,
    pairs: int,
    pairs_per_row: int,
    tiles: Tiles,
    pair_weights: torch.Tensor | None,  # [pairs] multiplied into each output row, or None
    swiglu: bool = False,
    b_scales: torch.Tensor | None = None,  # MXFP4: b is [experts, cols, depth / 2] bytes, these its scales
) -> torch.Tensor:
    """out[pair] = (a[pair // pairs_per_row] @ b[e].T + bias[e]) * pair_weights[pair], e the pair's
    expert: [pairs, cols]. With `swiglu`, b's rows are [gate | up] and out[pair] is silu(gate) * up of
    that product: [pairs, cols / 2]."""
    _, cols, depth = b.shape
    assert b.stride(-1) == 1 and (b_scales is None or b_scales.stride(-1) == 1)
    depth *= 2 if b_scales is not None else 1
    out_cols = cols // 2 if swiglu else cols
    out = torch.empty(pairs, out_cols, dtype=a.dtype, device=a.device)
    grid = (alignment.tile_experts.numel(), triton.cdiv(out_cols, tiles.cols))
    scales = b_scales if b_scales is not None else b
    _grouped_gemm_kernel[grid](
        a, b, scales, out, bias if bias is not None else a, pair_weights if pair_weights is not None else a,
        alignment.sorted_pairs, alignment.tile_experts, pairs, out_cols, depth, a.stride(0), b.stride(0),
        b.stride(1), scales.stride(0), scales.stride(1), bias.stride(0) if bias is not None else 0,
        out.stride(0), PAIRS_PER_ROW=pairs_per_row, BIAS=bias is not None,
        WEIGHTED=pair_weights is not None, SWIGLU=swiglu, MXFP4=b_scales is not None,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        ROWS=tiles.rows, COLS=tiles.cols, DEPTH=tiles.depth, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["pairs"])  # the token count: no compile per new divisibility by 16
def _grouped_gemm_kernel(
    a_ptr, b_ptr, scales_ptr, out_ptr, bias_ptr, weight_ptr, sorted_pairs_ptr, tile_experts_ptr, pairs,
    cols, depth, stride_a, stride_b_expert, stride_b_col, stride_s_expert, stride_s_col, stride_bias,
    stride_out, PAIRS_PER_ROW: tl.constexpr, BIAS: tl.constexpr, WEIGHTED: tl.constexpr,
    SWIGLU: tl.constexpr, MXFP4: tl.constexpr, PRECISION: tl.constexpr, ROWS: tl.constexpr,
    COLS: tl.constexpr, DEPTH: tl.constexpr,
):  # fmt: skip
    # `cols`: the output's; with SWIGLU, b has twice as many rows (gate, then up). With MXFP4, b is its
    # packed bytes (`depth` / 2 a row) and scales_ptr its scales (`depth` / 32 a row)
    tile = tl.program_id(0)
    expert = tl.load(tile_experts_ptr + tile).to(tl.int64)
    if expert < 0:  # past the last expert's run: padding of the worst case
        return
    pair = tl.load(sorted_pairs_ptr + tile * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    real = pair < pairs
    a_rows = a_ptr + (pair // PAIRS_PER_ROW)[:, None] * stride_a
    col = tl.program_id(1) * COLS + tl.arange(0, COLS)
    col_ok = col < cols
    b_expert = b_ptr + expert * stride_b_expert
    s_expert = scales_ptr + expert * stride_s_expert  # MXFP4's
    col_rows = col.to(tl.int64)
    up_rows = col_rows + cols  # SWIGLU: the same columns of the up half
    b_cols = b_expert + col_rows[None, :] * stride_b_col  # 16-bit b's
    b_up_cols = b_expert + up_rows[None, :] * stride_b_col
    acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    acc_up = tl.zeros((ROWS, COLS), dtype=tl.float32)
    for start in range(0, depth, DEPTH):
        if MXFP4:  # a group's lower nibbles: its first 16 values; the upper: its last 16 (each a dot)
            half = tl.arange(0, DEPTH // 2)
            k_low = start + half // 16 * 32 + half % 16
            a_mask = real[:, None] & (k_low < depth)[None, :]
            a_low = tl.load(a_rows + k_low[None, :], mask=a_mask, other=0.0)
            a_high = tl.load(a_rows + k_low[None, :] + 16, mask=a_mask, other=0.0)
            b_low, b_high = _mxfp4_b(b_expert, s_expert, col_rows, col_ok, stride_b_col, stride_s_col, start,
                                     depth, a_low.dtype, COLS, DEPTH)  # fmt: skip
            acc = tl.dot(a_high, b_high, tl.dot(a_low, b_low, acc, input_precision=PRECISION),
                         input_precision=PRECISION)  # fmt: skip
            if SWIGLU:
                b_low, b_high = _mxfp4_b(b_expert, s_expert, up_rows, col_ok, stride_b_col, stride_s_col,
                                         start, depth, a_low.dtype, COLS, DEPTH)  # fmt: skip
                acc_up = tl.dot(a_high, b_high, tl.dot(a_low, b_low, acc_up, input_precision=PRECISION),
                                input_precision=PRECISION)  # fmt: skip
        else:
            k = start + tl.arange(0, DEPTH)
            k_ok = k < depth
            a = tl.load(a_rows + k[None, :], mask=real[:, None] & k_ok[None, :], other=0.0)
            b_mask = k_ok[:, None] & col_ok[None, :]
            b = tl.load(b_cols + k[:, None], mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if SWIGLU:
                b_up = tl.load(b_up_cols + k[:, None], mask=b_mask, other=0.0)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
    bias = 0.0
    up_bias = 0.0
    if BIAS:
        bias_row = bias_ptr + expert * stride_bias
        bias = tl.load(bias_row + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            up_bias = tl.load(bias_row + cols + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    weight = tl.load(weight_ptr + pair, mask=real, other=0.0).to(tl.float32)[:, None] if WEIGHTED else 1.0
    result = expert_output(acc, acc_up, bias, up_bias, weight, out_ptr.dtype.element_ty,
                           BIAS, SWIGLU, WEIGHTED)  # fmt: skip
    out = out_ptr + pair[:, None] * stride_out + col[None, :]
    tl.store(out, result, mask=real[:, None] & col_ok[None, :])


@triton.jit
def _mxfp4_b(b_expert, s_expert, rows, row_ok, stride_row, stride_s_row, start, depth, dtype: tl.constexpr,
             COLS: tl.constexpr, DEPTH: tl.constexpr):  # fmt: skip
    """Values start .. start + DEPTH of an expert's MXFP4 rows `rows` (warmkv.kernels.mxfp4) as two of
    tl.dot's b, [DEPTH / 2, COLS] each in a's dtype (exactly): the lower nibbles (each group's first 16
    values, group after group) and the upper ones (its last 16)."""
    row = rows[:, None]
    packed, scales = load_mxfp4(b_expert + row * stride_row, s_expert + row * stride_s_row, start, depth,
                                row_ok[:, None], DEPTH)  # fmt: skip
    low, high = mxfp4_low_high(packed, scales, dtype)
    return tl.trans(tl.reshape(low, (COLS, DEPTH // 2))), tl.trans(tl.reshape(high, (COLS, DEPTH // 2)))


def route_top_k(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights in the logits' dtype, int64 expert ids), each [tokens, top_k], in one launch: the k largest
    logits, weighted by their softmax over all experts, or over the chosen k when `renormalize` (which
    is also gpt-oss's softmax over the top-k logits). Ties go to the lower expert id."""
    tokens, experts = logits.shape
    weights = torch.empty(tokens, top_k, dtype=logits.dtype, device=logits.device)
    expert_ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    pdl, launch = options(logits.device)
    _route_kernel[(tokens,)](
        logits, weights, expert_ids, logits.stride(0), experts,
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK=triton.next_power_of_2(experts),
        RENORMALIZE=renormalize, PDL=pdl, **launch,
    )  # fmt: skip
    return weights, expert_ids


@triton.jit
def _route_kernel(
    logits_ptr, weights_ptr, ids_ptr, stride_logits, experts,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr, RENORMALIZE: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    logits = tl.load(logits_ptr + row * stride_logits + cols, mask=cols < experts, other=float("-inf"))
    logits = logits.to(tl.float32)
    biggest = tl.max(logits, 0)
    total = tl.sum(tl.exp(logits - biggest), 0)
    slots = tl.arange(0, K_PAD)
    top = tl.full((K_PAD,), float("-inf"), tl.float32)
    ids = tl.zeros((K_PAD,), tl.int64)
    left = logits
    for k in tl.static_range(TOP_K):  # k rounds of arg-max: k is small, the experts fit one block
        best = tl.max(left, 0)
        best_id = tl.min(tl.where(left == best, cols, BLOCK), 0)
        top = tl.where(slots == k, best, top)
        ids = tl.where(slots == k, best_id.to(tl.int64), ids)
        left = tl.where(cols == best_id, float("-inf"), left)
    scores = tl.exp(top - biggest)  # 0 in the padding slots
    weights = scores / (tl.sum(scores, 0) if RENORMALIZE else total)
    chosen = slots < TOP_K
    tl.store(weights_ptr + row * TOP_K + slots, weights.to(weights_ptr.dtype.element_ty), mask=chosen)
    tl.store(ids_ptr + row * TOP_K + slots, ids, mask=chosen)
