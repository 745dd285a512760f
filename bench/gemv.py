"""A decode step's linear layers at one to a few token rows: cuBLAS (F.linear) against the
matrix-vector kernel (warmkv.kernels.gemv), CUDA only.

    python -m bench.gemv            # each layer of each shape at 1, 2 and 4 rows, the chosen launch
    python -m bench.gemv --sweep    # at one row, every launch (columns a program, step, warps) too

Each case is timed as a replayed CUDA graph, as decode runs it, over enough copies of the weight to
pass twice the L2 cache (a model's layers never find their weights there: a layer smaller than L2,
replayed alone, would). Rate: the weight's bytes per second as a fraction of the copy bandwidth (bytes
read + written) measured in the same run, the limit bench.engine uses for decode. A read-only kernel
can pass 1.0 of it.
"""

from __future__ import annotations

import argparse
import itertools
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton.testing

from bench.common import copy_bandwidth, device_name, print_table, write_result
from warmkv.kernels.gemv import GemvLaunch, gemv, gemv_launch
from warmkv.models.config import ModelConfig
from warmkv.models.layers import Linear
from warmkv.models.llama import LlamaForCausalLM
from warmkv.models.moe import SoftmaxRouter
from warmkv.models.random_init import SHAPES

ROWS = (1, 2, 4)
MODELS = ("qwen3-30b-a3b", "qwen2.5-7b", "gpt-oss-20b")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", action="store_true", help="every launch at one row too")
    parser.add_argument("--shapes", nargs="+", choices=MODELS, default=list(MODELS))
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    rows = []
    for model in args.shapes:
        for layer, (cols, depth) in linear_shapes(model).items():
            rows += _layer_rows(f"{model} {layer}", cols, depth, args.sweep, bandwidth)
    print_table(rows)
    result = {"device": device_name(device), "copy_bytes_per_s": bandwidth, "rows": rows,
              "command": "python -m bench.gemv" + (" --sweep" if args.sweep else "")}  # fmt: skip
    print("wrote", write_result("gemv-" + device_name(device).lower().replace(" ", "-"), result))


def linear_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(output columns, depth) of each distinct linear layer of a shape, named without its layer index."""
    with torch.device("meta"):
        module = LlamaForCausalLM(ModelConfig.from_hf(SHAPES[model]))
    shapes = {}
    for name, layer in module.named_modules():
        if isinstance(layer, Linear | SoftmaxRouter):
            shapes.setdefault(re.sub(r"layers\.\d+\.", "", name), tuple(layer.weight.shape))
    return shapes


def _layer_rows(name: str, cols: int, depth: int, sweep: bool, bandwidth: float) -> list[dict]:
    device = torch.device("cuda")
    weight = torch.randn(cols, depth, device=device, dtype=torch.bfloat16) / depth**0.5
    weight_bytes = weight.numel() * weight.element_size()
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    weights = [weight] + [weight.clone() for _ in range(2 * l2_bytes // weight_bytes)]
    rows = []
    for tokens in ROWS:
        x = torch.randn(tokens, depth, device=device, dtype=torch.bfloat16)
        chosen = gemv_launch(depth, tokens)
        launches = _launches(chosen) if sweep and tokens == 1 else [chosen]
        cublas_us = _graph_us(lambda x=x: [F.linear(x, w) for w in weights]) / len(weights)
        for launch in launches:
            us = _graph_us(lambda x=x, launch=launch: [gemv(x, w, launch=launch) for w in weights])
            us /= len(weights)
            rows.append({
                "layer": name, "cols": cols, "depth": depth, "rows": tokens, "chosen": launch == chosen,
                "cols/program": launch.cols, "step": launch.depth, "warps": launch.num_warps,
                "cublas us": cublas_us, "gemv us": us,
                "cublas fraction": weight_bytes / cublas_us / 1e-6 / bandwidth,
                "gemv fraction": weight_bytes / us / 1e-6 / bandwidth,
            })  # fmt: skip
    return rows


def _launches(chosen: GemvLaunch) -> list[GemvLaunch]:
    grid = itertools.product((1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048), (4, 8))
    launches = [GemvLaunch(c, d, w) for c, d, w in grid if c * d <= 32768]
    return launches if chosen in launches else [chosen, *launches]


def _graph_us(run: Callable[[], object]) -> float:
    run()  # compile outside the capture
    return 1000 * triton.testing.do_bench_cudagraph(run)


if __name__ == "__main__":
    main()
