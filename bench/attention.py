"""The paged-attention kernel alone: prefill chunks over a cached prefix and batched decode, CUDA only.

    python -m bench.attention                 # the kernel's launch settings, beside PyTorch's flash attention
    python -m bench.attention --sweep         # every tile / warps / stages choice, to re-tune on new GPUs

Qwen2.5-7B's attention shape (28 query heads, 4 KV heads, head_dim 128), bf16, 16-token blocks scattered
through the pool. Prefill is reported in TFLOP/s (QK^T and PV, causal within the chunk); decode in GB/s of
K/V read. The reference is PyTorch's scaled_dot_product_attention on contiguous K/V without a mask.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.testing

from bench.common import device_name, print_table, write_result
from warmkv.kernels import paged_attention as kernel

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 28, 4, 128, 16
# (chunk, cached): a 64-token turn over a 32k cached prefix (a live hit), then chunks of a long prompt
PREFILL = [(64, 32000), (2048, 16384), (8192, 24576)]
DECODE = [(batch, context) for context in (4096, 32768) for batch in (1, 8, 32)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", action="store_true", help="time every launch setting, not only the chosen")
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    # the chosen launches, before the loops below set the module's to each setting they time
    prefill_launch, split_launch = kernel.PREFILL_LAUNCH, kernel.SPLIT_PREFILL_LAUNCH
    decode_launch = kernel.DECODE_LAUNCH
    for chunk, cached in PREFILL:
        tiles = -(-chunk // kernel.tokens_per_tile(chunk, kernel.group_size(HEADS, KV_HEADS)))
        # as the kernel will decide
        split = kernel.num_splits(tiles, KV_HEADS, cached + chunk, device, decode=False) > 1
        launch = split_launch if split else prefill_launch
        for rows_per_tile, keys, warps, stages in _settings(args.sweep, launch, prefill=True):
            kernel.ROWS_PER_TILE = rows_per_tile
            kernel.PREFILL_LAUNCH = kernel.SPLIT_PREFILL_LAUNCH = kernel.Launch(keys, warps, stages)
            ms = _time([chunk], [cached + chunk], device)
            flops = 4 * HEADS * HEAD_DIM * chunk * (cached + chunk / 2)
            setting = (rows_per_tile, keys, warps, stages)
            rate = f"{flops / ms / 1e9:.0f} TFLOP/s"
            rows.append(_row(f"prefill {chunk} over {cached}", setting, ms, rate))
    q = torch.randn(1, HEADS, 8192, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, HEADS, 32768, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    flops = 4 * HEADS * HEAD_DIM * 8192 * 32768
    rows.append(_row("SDPA 8192 x 32768, no mask", ("-",) * 4, ms, f"{flops / ms / 1e9:.0f} TFLOP/s"))
    for batch, context in DECODE:
        for _, keys, warps, stages in _settings(args.sweep, decode_launch, prefill=False):
            kernel.DECODE_LAUNCH = kernel.Launch(keys, warps, stages)
            ms = _time([1] * batch, [context] * batch, device)
            kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
            setting = ("-", keys, warps, stages)
            rows.append(_row(f"decode {batch} x {context}", setting, ms, f"{kv_bytes / ms / 1e6:.0f} GB/s"))
    print_table(rows)
    result = {"device": device_name(device), "shape": "qwen2.5-7b attention", "rows": rows,
              "command": "python -m bench.attention" + (" --sweep" if args.sweep else "")}  # fmt: skip
    print("wrote", write_result("attention-" + device_name(device).lower().replace(" ", "-"), result))


def _row(case: str, setting: tuple, ms: float, rate: str) -> dict:
    return {"case": case, **dict(zip(("rows", "keys", "warps", "stages"), setting, strict=True)),
            "us": 1000 * ms, "rate": rate}  # fmt: skip


def _settings(sweep: bool, launch: kernel.Launch, prefill: bool) -> list[tuple[int, int, int, int]]:
    """(rows per tile, keys per step, warps, stages): the case's chosen launch, or every one."""
    if not sweep:
        return [(kernel.ROWS_PER_TILE, launch.block_keys, launch.num_warps, launch.num_stages)]
    return list(itertools.product((64, 128) if prefill else (16,), (32, 64, 128), (2, 4, 8), (1, 2, 3)))


def _time(query_lens: list[int], context_lens: list[int], device: torch.device) -> float:
    blocks = sum(-(-c // BLOCK_SIZE) for c in context_lens)
    order = torch.randperm(blocks).tolist()
    tables, used = [], 0
    for context in context_lens:
        count = -(-context // BLOCK_SIZE)
        tables.append(order[used : used + count])
        used += count
    k = torch.randn(blocks * BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)  # apart from k: reading one tensor twice would be served from cache
    q = torch.randn(sum(query_lens), HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    batch = kernel.plan(query_lens, context_lens, tables, BLOCK_SIZE, HEADS, KV_HEADS, device)
    return triton.testing.do_bench(lambda: kernel.paged_attention(q, k, v, batch, HEAD_DIM**-0.5, None))


if __name__ == "__main__":
    main()
