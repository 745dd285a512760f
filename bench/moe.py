"""The fused mixture-of-experts kernels alone (router, expert sort, both grouped GEMMs), CUDA only.

    python -m bench.moe            # the chosen tiles, at Qwen3-30B-A3B's and gpt-oss-20b's expert shapes
    python -m bench.moe --sweep    # every tile / warps / stages choice sorted, every matrix-vector launch
                                   # per pair, where few enough pairs make that a choice
    python -m bench.moe --mxfp4 --shapes gpt-oss-20b gpt-oss-120b   # the experts as MXFP4 bytes

Each case is timed as a replayed CUDA graph, as decode runs it, so the launch of every small kernel counts.
Rate: bytes of the experts the tokens chose (each read once) per second, as a fraction of the copy
bandwidth (bytes read + written) measured in the same run, the limit bench.engine uses for decode.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton.testing

from bench.common import copy_bandwidth, device_name, print_table, write_result
from warmkv.kernels import fused_moe, gemv
from warmkv.models.moe import route
from warmkv.models.random_init import random_mxfp4

# hidden, expert inner size, experts, top-k, normalised top-k
SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8, True), "gpt-oss-20b": (2880, 2880, 32, 4, False),
          "gpt-oss-120b": (2880, 2880, 128, 4, False)}  # fmt: skip
TOKENS = (1, 2, 4, 8, 16, 32, 256, 2048)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", action="store_true", help="time every launch setting, not only the chosen")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES)[:2])
    parser.add_argument(
        "--mxfp4", action="store_true", help="the experts as MXFP4 bytes and scales (gpt-oss's)"
    )
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)  # bytes read + written: what HBM moves per second
    rows = [row for name in args.shapes
            for row in _shape_rows(name, args.tokens, args.sweep, bandwidth, args.mxfp4)]  # fmt: skip
    print_table(rows)
    flags = [f for f, on in (("--sweep", args.sweep), ("--mxfp4", args.mxfp4)) if on]
    command = " ".join(
        ["python -m bench.moe", *flags, "--tokens", *map(str, args.tokens), "--shapes", *args.shapes]
    )
    result = {"device": device_name(device), "copy_bytes_per_s": bandwidth, "rows": rows, "command": command}
    name = "moe-" + device_name(device).lower().replace(" ", "-") + ("-mxfp4" if args.mxfp4 else "")
    print("wrote", write_result(name, result))


def _shape_rows(name: str, token_counts: list[int], sweep: bool, bandwidth: float, mxfp4: bool) -> list[dict]:
    hidden, inner, experts, top_k, normalize = SHAPES[name]
    device = torch.device("cuda")
    scales = None
    if mxfp4:  # the kernels' bytes (random, so in any order) and scales
        (gate_up, gate_up_scales), (down, down_scales) = (
            random_mxfp4((experts, rows, depth), device)
            for rows, depth in ((2 * inner, hidden), (hidden, inner))
        )
        gate_up, down, scales = gate_up.flatten(-2), down.flatten(-2), (gate_up_scales, down_scales)
    else:
        gate_up = torch.randn(experts, 2 * inner, hidden, device=device, dtype=torch.bfloat16) / hidden**0.5
        down = torch.randn(experts, hidden, inner, device=device, dtype=torch.bfloat16) / inner**0.5
    router = torch.randn(experts, hidden, device=device, dtype=torch.bfloat16) / hidden**0.5
    expert_bytes = sum(w[0].numel() * w.element_size() for w in (gate_up, down, *(scales or ())))
    launch_rule = "mxfp4_gemv_launch" if mxfp4 else "gemv_launch"  # the matrix-vector launches of this run
    chosen = fused_moe.tiles_for, fused_moe.products_per_pair, getattr(gemv, launch_rule)
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)

        def routed(x: torch.Tensor = x) -> tuple[torch.Tensor, torch.Tensor]:
            return route(F.linear(x, router), top_k, normalize)

        weights, expert_ids = routed()
        read = expert_ids.unique().numel() * expert_bytes
        pairs = tokens * top_k
        gate_up_launch = chosen[2](hidden, pairs)  # what the chosen way runs
        for setting in _settings(sweep, pairs, chosen[0](pairs, mxfp4), gate_up_launch,
                                 chosen[1](tokens, top_k, experts)):  # fmt: skip
            per_pair = isinstance(setting, gemv.GemvLaunch)
            fused_moe.products_per_pair = lambda *_, per_pair=per_pair: per_pair
            if per_pair and sweep:
                setattr(gemv, launch_rule, lambda *_, launch=setting: launch)
            elif not per_pair:
                fused_moe.tiles_for = lambda *_, tiles=setting, **__: tiles
            args = (x, gate_up, down, weights, expert_ids)
            experts_us = _graph_us(lambda args=args: fused_moe.fused_experts(*args, scales=scales))
            block_us = _graph_us(
                lambda x=x: fused_moe.fused_experts(x, gate_up, down, *routed(x), scales=scales)
            )
            rows.append({
                "shape": name, "tokens": tokens, "sorted": not per_pair, "cols": setting.cols,
                "depth": setting.depth, "warps": setting.num_warps,
                "stages": None if per_pair else setting.num_stages,
                "experts us": experts_us, "router+experts us": block_us, "experts read MB": read / 1e6,
                "fraction of bandwidth": read / experts_us / 1e-6 / bandwidth,
            })  # fmt: skip
            fused_moe.tiles_for, fused_moe.products_per_pair = chosen[:2]
            setattr(gemv, launch_rule, chosen[2])
    return rows


def _settings(
    sweep: bool, pairs: int, tiles: fused_moe.Tiles, gate_up_launch: gemv.GemvLaunch, per_pair: bool
) -> list[fused_moe.Tiles | gemv.GemvLaunch]:
    """The chosen way (the sorted tiles, or per pair the gate/up projection's matrix-vector launch); with
    `sweep` every tile, and every launch per pair (both projections) where few pairs make it a choice
    (`per_pair`: the serving path would take a product per pair)."""
    if not sweep:
        return [gate_up_launch if per_pair else tiles]
    grid = itertools.product((32, 64, 128), (64, 128, 256), (2, 4), (2, 4))
    settings: list = [replace(tiles, cols=c, depth=d, num_warps=w, num_stages=s) for c, d, w, s in grid]
    if per_pair:
        grid = itertools.product((1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048), (4, 8))
        settings += [gemv.GemvLaunch(c, d, w) for c, d, w in grid if c * d <= 32768]
    return settings


def _graph_us(run: Callable[[], object]) -> float:
    run()  # compile outside the capture
    return 1000 * triton.testing.do_bench_cudagraph(run)


if __name__ == "__main__":
    main()
