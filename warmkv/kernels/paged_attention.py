"""Attention that reads K/V straight from the paged pool through each sequence's block table (Triton).

One kernel serves decode, chunked prefill and prefill on top of cached blocks: a program owns a tile of
one sequence's query tokens times the query heads that share one KV head (GQA), walks that sequence's
keys a block of keys at a time and keeps an online softmax, so no context is ever copied out of the pool.
A long context with few query tiles (decode, or a short turn after a long cached prefix) is split across
programs along the keys and the partial results are merged by a second small kernel, so a single
sequence still fills the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from warmkv.kernels.dependent_launch import options, wait_for_previous
from warmkv.uploads import to_device


@dataclass(slots=True, frozen=True)
class Launch:
    block_keys: int  # keys per inner step, gathered slot by slot: any pool block size works
    num_warps: int
    num_stages: int


# tuned on an H100 with Qwen2.5-7B's heads (`python -m bench.attention --sweep`, then the one-off sweep of
# attention-nvidia-h100-80gb-hbm3-unmasked-prefetch.json): 128 x 64 tiles in 8 warps reach about 400
# TFLOP/s for an 8k chunk over a 24k cached prefix; decode of 32 x 32k contexts reads 2.9 TB/s
BLOCK_KEYS = 64  # the smallest step of keys a split gets
ROWS_PER_TILE = 128  # query rows (tokens x heads of a group) per program in prefill
MIN_ROWS = 16  # tl.dot's smallest M
# key splits, where the query tiles alone leave SMs idle: a decode step's programs (16 rows each, many to an
# SM) aim at DECODE_PROGRAMS_PER_SM programs per SM. A turn's programs (128 query rows each) take a whole SM
# each, so they run in waves of one per SM and a wave barely begun costs a whole one: their splits fill whole
# waves, the fewest waves that keep TURN_WAVE_FILL of the SMs busy. On an H100, Qwen2.5-7B's heads, kernel +
# merge in graph replays (attention-nvidia-h100-80gb-hbm3-turn-waves.json): 111 new over 5.7k cached, 7
# tiles, 38.9 us a layer with 4 splits (112 programs) against 52.5 with 5 (140) and 61.4 with the 19 that 4
# programs per SM gave; 77 over 32k, 5 tiles: 101 us with 6 against 175 with 7 and 124 with 27
DECODE_PROGRAMS_PER_SM = 2
TURN_WAVE_FILL = 0.75
MAX_SPLITS = 256  # a power of two
# a chunk of 2048 new tokens over 16k cached: 1308 us in 8 warps and 3 stages against 1475 in 4 and 2
PREFILL_LAUNCH = Launch(BLOCK_KEYS, num_warps=8, num_stages=3)
# float32 models: three stages of float32 tiles need 230 KB of shared memory, more than an A100 has
FLOAT32_PREFILL_LAUNCH = Launch(BLOCK_KEYS, num_warps=4, num_stages=2)
MERGE_FIRST_MAX = 64  # a decode merge of many splits: 64 partial outputs of 128 in 115 registers, 8 warps
# a short turn over a long cached prefix (few tiles, split along the keys), 16-bit models: 77 new tokens
# over 32k cached took 120 us a layer this way against 137 us with PREFILL_LAUNCH
SPLIT_PREFILL_LAUNCH = Launch(128, num_warps=8, num_stages=3)
DECODE_LAUNCH = Launch(BLOCK_KEYS, num_warps=4, num_stages=2)


@dataclass(slots=True)
class PagedBatch:
    """Per-step description of the sequences in a forward pass, shared by every layer."""

    block_table: torch.Tensor  # [seqs, max blocks] int32
    context_lens: torch.Tensor  # [seqs] int32: tokens attended to, this step's included
    query_starts: torch.Tensor  # [seqs + 1] int32: each sequence's first row in the flattened batch
    tile_seqs: torch.Tensor  # [tiles] int32: the sequence of each query tile
    tile_starts: torch.Tensor  # [tiles] int32: the tile's first query token within its sequence
    block_size: int  # tokens per pool block
    tokens_per_tile: int
    num_splits: int  # programs sharing one tile's keys


def group_size(num_heads: int, num_kv_heads: int) -> int:
    """Rows one query token takes in a tile: its heads of one KV group, padded to a power of two."""
    return triton.next_power_of_2(num_heads // num_kv_heads)


def tokens_per_tile(max_query_len: int, group: int) -> int:
    rows = ROWS_PER_TILE if max_query_len > 1 else MIN_ROWS
    return max(1, max(rows, group) // group)


def num_splits(tiles: int, num_kv_heads: int, max_context: int, device: torch.device, decode: bool) -> int:
    """Enough programs to occupy every SM, but no split shorter than one step of keys."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = tiles * num_kv_heads
    if programs >= DECODE_PROGRAMS_PER_SM * sms:
        return 1  # the tiles fill the GPU: a chunk of 2048 tokens took 2268 us split in two, 1728 whole
    wanted = -(-DECODE_PROGRAMS_PER_SM * sms // programs) if decode else _whole_waves(programs, sms)
    return max(1, min(wanted, -(-max_context // BLOCK_KEYS), MAX_SPLITS))


def _whole_waves(programs: int, sms: int) -> int:
    """Splits of a turn's tiles that fill whole waves of one program per SM (see TURN_WAVE_FILL). The fill
    of w waves nears 1 as w grows, so some w reaches it (at most 4 for fewer programs than 2 waves)."""
    waves = 1
    while True:
        splits = waves * sms // programs
        if splits and programs * splits >= TURN_WAVE_FILL * waves * sms:
            return splits
        waves += 1


def aligned(count: int) -> int:
    """count int32s rounded up to 16 bytes. Triton compiles a kernel once per alignment of its pointer
    arguments: int32 inputs packed at offsets that vary from step to step would cost a compile (about a
    second of a stalled step) for each new combination."""
    return -(-count // 4) * 4


def split_aligned(buffer: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Consecutive parts of an int32 buffer of these sizes, each starting 16-byte aligned: the buffer holds
    sum(aligned(size)) values."""
    padded = buffer.split([aligned(size) for size in sizes])
    return [part[:size] for part, size in zip(padded, sizes, strict=True)]


def plan(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    device: torch.device,
) -> PagedBatch:
    group = group_size(num_heads, num_kv_heads)
    per_tile = tokens_per_tile(max(query_lens), group)
    tile_seqs, tile_starts = [], []
    for seq, length in enumerate(query_lens):
        starts = range(0, length, per_tile)
        tile_seqs += [seq] * len(starts)
        tile_starts += starts
    width = max(len(table) for table in block_tables)
    table = torch.zeros(len(block_tables), width, dtype=torch.int32)
    for row, blocks in enumerate(block_tables):
        table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    query_starts = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    as_int = [torch.tensor(values, dtype=torch.int32) for values in (context_lens, tile_seqs, tile_starts)]
    host = (table, as_int[0], query_starts, as_int[1], as_int[2])
    # one copy to the device for all five (each copy from pageable memory holds the host up)
    sizes = [t.numel() for t in host]
    flat = torch.zeros(sum(aligned(size) for size in sizes), dtype=torch.int32)
    for part, values in zip(split_aligned(flat, sizes), host, strict=True):
        part.copy_(values.flatten())
    on_device = split_aligned(to_device(flat, device), sizes)
    parts = [part.view(t.shape) for part, t in zip(on_device, host, strict=True)]
    splits = num_splits(len(tile_seqs), num_kv_heads, max(context_lens), device, max(query_lens) == 1)
    return PagedBatch(*parts, block_size, per_tile, splits)


def paged_attention(
    q: torch.Tensor,  # [tokens, heads, head_dim]
    k_cache: torch.Tensor,  # [slots, kv_heads, head_dim] of one layer, this step's K already stored
    v_cache: torch.Tensor,
    batch: PagedBatch,
    scale: float,
    sliding_window: int | None,
    sinks: torch.Tensor | None = None,  # [heads]: a logit per head in each softmax's denominator (gpt-oss)
) -> torch.Tensor:
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = group_size(num_heads, num_kv_heads)
    out = torch.empty_like(q)
    tiles = batch.tile_seqs.shape[0]
    splits = batch.num_splits
    if splits > 1:
        partial = torch.empty(splits, tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, tokens, num_heads, dtype=torch.float32, device=q.device)
    else:
        partial, lse = out, out  # lse is not written without splits
    if batch.tokens_per_tile * group < ROWS_PER_TILE:
        launch = DECODE_LAUNCH
    elif q.element_size() > 2:
        launch = FLOAT32_PREFILL_LAUNCH
    else:
        launch = SPLIT_PREFILL_LAUNCH if splits > 1 else PREFILL_LAUNCH
    pdl, pdl_launch = options(q.device)
    _attention_kernel[(tiles, num_kv_heads, splits)](
        q, k_cache, v_cache, partial, lse, sinks if sinks is not None else q,
        batch.block_table, batch.context_lens, batch.query_starts, batch.tile_seqs, batch.tile_starts,
        scale * 1.4426950408889634,  # exp2 below: fold log2(e) into the scale
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        batch.block_table.stride(0),
        partial.stride(-3), partial.stride(-2),
        partial.stride(0) if splits > 1 else 0, lse.stride(0) if splits > 1 else 0,
        lse.stride(-2) if splits > 1 else 0,
        HEADS_PER_KV=num_heads // num_kv_heads, GROUP=group,
        ROWS=batch.tokens_per_tile * group, BLOCK_N=launch.block_keys, BLOCK_SIZE=batch.block_size,
        SLIDING_WINDOW=sliding_window or 0, SINKS=sinks is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 models stay exact
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), SPLIT=splits > 1,
        WIDE=needs_64_bit_offsets(k_cache), PDL=pdl, num_warps=launch.num_warps,
        num_stages=launch.num_stages, **pdl_launch,
    )  # fmt: skip
    if splits > 1:
        first, warps = merge_launch(splits)
        _merge_kernel[(tokens, num_heads)](
            partial, lse, out, splits,
            partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
            SPLITS_PAD=MAX_SPLITS, FIRST=first, CHUNK=16, PDL=pdl, num_warps=warps, **pdl_launch,
        )  # fmt: skip
    return out


def merge_launch(splits: int) -> tuple[int, int]:
    """(splits whose partial outputs load in the merge's first trip, warps) for a merge of `splits`.
    Every split in one trip where they are few: a turn's merge has a program per (token, head), thousands
    of them, and is bound by how many fit on an SM at once, which registers decide. Three sizes of trip,
    so three compiled merges at most (each compile stalls a step once)."""
    first = min(MERGE_FIRST_MAX, max(16, triton.next_power_of_2(splits)))
    return first, 8 if first >= 64 else 4


def needs_64_bit_offsets(cache: torch.Tensor) -> bool:
    """Offsets into one layer's K (or V) in 32 bits while they fit: 64-bit ones cost registers and address
    arithmetic per key (a 2048-token chunk over 16k cached: 1654 against 1585 us on an H100)."""
    return cache.numel() >= 2**31


# Triton compiles a kernel again for each new combination of its integer arguments' divisibility by 16:
# these change from step to step (table width, token count), and each compile stalls a step for a second
@triton.jit(do_not_specialize=["stride_table", "stride_out_split", "stride_lse_split"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, sinks_ptr,
    block_table_ptr, context_lens_ptr, query_starts_ptr, tile_seqs_ptr, tile_starts_ptr,
    scale_log2,
    stride_q_token, stride_q_head, stride_kv_slot, stride_kv_head, stride_table,
    stride_out_token, stride_out_head, stride_out_split, stride_lse_split, stride_lse_token,
    HEADS_PER_KV: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SLIDING_WINDOW: tl.constexpr, SINKS: tl.constexpr, PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLIT: tl.constexpr, WIDE: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous(PDL)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tile_seqs_ptr + tile)
    first_query = tl.load(tile_starts_ptr + tile)
    row_start = tl.load(query_starts_ptr + seq)
    query_len = tl.load(query_starts_ptr + seq + 1) - row_start
    context_len = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, ROWS)
    query = first_query + rows // GROUP
    head = kv_head * HEADS_PER_KV + rows % GROUP
    row_ok = (query < query_len) & (rows % GROUP < HEADS_PER_KV)
    position = context_len - query_len + query  # of each query token in its sequence
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q_offsets = (row_start + query)[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    # keys this tile can see: causal up to its last query, from its first query's window
    last_query = tl.minimum(first_query + ROWS // GROUP, query_len) - 1
    key_end = context_len - query_len + last_query + 1
    if SLIDING_WINDOW > 0:
        key_begin = tl.maximum(context_len - query_len + first_query - SLIDING_WINDOW + 1, 0)
    else:
        key_begin = 0
    steps = tl.cdiv(key_end - key_begin, BLOCK_N)
    per_split = tl.cdiv(steps, tl.num_programs(2))
    lo = key_begin + split * per_split * BLOCK_N
    hi = tl.minimum(lo + per_split * BLOCK_N, key_end)

    best = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    total = tl.zeros([ROWS], dtype=tl.float32)
    if SINKS:  # the sink is one more key with no value: the first split starts its sum with it
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        best = tl.where(split == 0, sink, best)
        total = tl.where(split == 0, 1.0, total)
    acc = tl.zeros([ROWS, HEAD_DIM_PAD], dtype=tl.float32)
    table = block_table_ptr + seq * stride_table
    step_keys = tl.arange(0, BLOCK_N)
    # whole steps of keys that every row of the tile sees (at or before its first query: a cached prefix)
    # run without the causal mask; the rest of the split, with it. Sliding windows mask every step
    if SLIDING_WINDOW > 0:
        unmasked_end = lo
    else:
        seen_by_all = tl.minimum(context_len - query_len + first_query + 1, hi)
        unmasked_end = lo + tl.maximum(seen_by_all - lo, 0) // BLOCK_N * BLOCK_N
    # each step's block ids load one step ahead: the keys' addresses depend on them, and a load issued in
    # the step that uses it stalls the step (77 new tokens over 32k cached: 120 against 151 us a layer)
    blocks = tl.load(table + (lo + step_keys) // BLOCK_SIZE, mask=lo + step_keys < unmasked_end, other=0)
    for start in range(lo, unmasked_end, BLOCK_N):
        keys = start + step_keys
        ahead = keys + BLOCK_N
        following = tl.load(table + ahead // BLOCK_SIZE, mask=ahead < unmasked_end, other=0)
        best, total, acc = _attend(q, k_ptr, v_ptr, blocks, keys, keys < hi, dims, dim_ok, position, kv_head,
                                   stride_kv_slot, stride_kv_head, scale_log2, best, total, acc,
                                   False, SLIDING_WINDOW, BLOCK_SIZE, WIDE, PRECISION)  # fmt: skip
        blocks = following
    for start in range(unmasked_end, hi, BLOCK_N):
        keys = start + step_keys
        key_ok = keys < hi
        blocks = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0)
        best, total, acc = _attend(q, k_ptr, v_ptr, blocks, keys, key_ok, dims, dim_ok, position, kv_head,
                                   stride_kv_slot, stride_kv_head, scale_log2, best, total, acc,
                                   True, SLIDING_WINDOW, BLOCK_SIZE, WIDE, PRECISION)  # fmt: skip

    result = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    out_offsets = (row_start + query)[:, None] * stride_out_token + head[:, None] * stride_out_head
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:  # a split past the tile's keys (a graph sized for the longest context) writes its lse alone
        out_offsets += split * stride_out_split
        saw_keys = (lo + tl.zeros([ROWS], tl.int32)) < hi
        tl.store(out_ptr + out_offsets + dims[None, :], result, mask=out_mask & saw_keys[:, None])
        lse = tl.where(total == 0.0, float("-inf"), best + tl.log2(tl.where(total == 0.0, 1.0, total)))
        lse_offsets = split * stride_lse_split + (row_start + query) * stride_lse_token + head
        tl.store(lse_ptr + lse_offsets, lse, mask=row_ok)
    else:
        tl.store(out_ptr + out_offsets + dims[None, :], result.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _attend(
    q, k_ptr, v_ptr, blocks, keys, key_ok, dims, dim_ok, position, kv_head, stride_kv_slot, stride_kv_head,
    scale_log2, best, total, acc, MASK: tl.constexpr, SLIDING_WINDOW: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    WIDE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One step of keys folded into the online softmax: (best, total, acc) updated. MASK: some row may not
    see some of the keys (causal, sliding window); without it every row sees every key."""
    slot = blocks.to(tl.int64 if WIDE else tl.int32) * BLOCK_SIZE + keys % BLOCK_SIZE
    kv_offsets = slot[:, None] * stride_kv_slot + kv_head * stride_kv_head + dims[None, :]
    kv_mask = key_ok[:, None] & dim_ok[None, :]
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
    dots = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASK:
        visible = key_ok[None, :] & (keys[None, :] <= position[:, None])
        if SLIDING_WINDOW > 0:
            visible &= keys[None, :] > position[:, None] - SLIDING_WINDOW
        scores = tl.where(visible, dots * scale_log2, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # a row that sees nothing yet
        weights = tl.exp2(scores - shift[:, None])
    else:  # every row sees a key: its maximum is finite; the scale folds into exp2's argument
        new_best = tl.maximum(best, tl.max(dots, 1) * scale_log2)
        shift = new_best
        weights = tl.exp2(dots * scale_log2 - shift[:, None])
    rescale = tl.exp2(best - shift)
    total = total * rescale + tl.sum(weights, 1)
    acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
    return new_best, total, acc


@triton.jit(do_not_specialize=["num_splits", "stride_p_split", "stride_lse_split"])
def _merge_kernel(
    partial_ptr, lse_ptr, out_ptr, num_splits,
    stride_p_split, stride_p_token, stride_p_head, stride_lse_split, stride_lse_token,
    stride_out_token, stride_out_head,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, FIRST: tl.constexpr,
    CHUNK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous(PDL)
    token = tl.program_id(0)
    head = tl.program_id(1)
    lse_base = lse_ptr + token * stride_lse_token + head
    partial_base = partial_ptr + token * stride_p_token + head * stride_p_head
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    # the first FIRST splits' partial outputs load with the lse, not after it: one trip to memory instead
    # of two a chunk (a merge is a few such trips in a row on a decode step's critical path). A split that
    # saw no key wrote no partial output: whatever is there is read and then dropped with weight 0
    first = tl.arange(0, FIRST)
    first_partial = tl.load(partial_base + first[:, None] * stride_p_split + dims[None, :],
                            mask=(first < num_splits)[:, None] & dim_ok[None, :], other=0.0)  # fmt: skip
    splits = tl.arange(0, SPLITS_PAD)
    lse = tl.load(lse_base + splits * stride_lse_split, mask=splits < num_splits, other=float("-inf"))
    best = tl.max(lse, 0)
    total = tl.sum(tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - best)), 0)
    first_lse = tl.load(lse_base + first * stride_lse_split, mask=first < num_splits, other=float("-inf"))
    merged = _weighted_sum(first_partial, first_lse, best)
    # splits past the last that saw a key for this row are skipped (a short context in a graph sized for
    # the longest leaves most of them empty); one before it that saw none has weight 0 and is not read
    used = tl.max(tl.where(lse == float("-inf"), -1, splits), 0) + 1
    for start in range(FIRST, used, CHUNK):  # past the first ones (long contexts): a chunk at a time
        chunk = start + tl.arange(0, CHUNK)
        chunk_ok = chunk < num_splits
        chunk_lse = tl.load(lse_base + chunk * stride_lse_split, mask=chunk_ok, other=float("-inf"))
        mask = (chunk_ok & (chunk_lse > float("-inf")))[:, None] & dim_ok[None, :]
        offsets = chunk[:, None] * stride_p_split + dims[None, :]
        partial = tl.load(partial_base + offsets, mask=mask, other=0.0)
        merged += _weighted_sum(partial, chunk_lse, best)
    out_offsets = token * stride_out_token + head * stride_out_head + dims
    tl.store(out_ptr + out_offsets, (merged / total).to(out_ptr.dtype.element_ty), mask=dim_ok)


@triton.jit
def _weighted_sum(partial, lse, best):
    """Sum over splits of each partial output times its share exp2(lse - best); a split with lse -inf
    adds 0 whatever its partial output holds (never written: NaN times 0 would be NaN)."""
    saw_keys = lse > float("-inf")
    weights = tl.where(saw_keys, tl.exp2(lse - best), 0.0)
    return tl.sum(tl.where(saw_keys[:, None], partial * weights[:, None], 0.0), 0)
