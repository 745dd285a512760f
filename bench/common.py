"""What every benchmark shares: timing that respects asynchronous devices, the hardware limits a result is
compared with (measured in the same run), tables, JSON results."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from warmkv.cache.kv_pool import KVPool
from warmkv.models.loader import LoadedModel
from warmkv.models.random_init import SHAPES

RESULTS = Path(__file__).parent / "results"


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model a benchmark runs (`warmkv.models.random_init.model_or_shape` reads them) and where."""
    parser.add_argument("--model", help="model folder or .gguf (default: the default model)")
    parser.add_argument("--shape", choices=SHAPES, help="random weights in this model's shape instead")
    parser.add_argument("--tokenizer", help="tokenizer folder for --shape")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall time of `run` after one warm-up, waiting for the device each time."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass(slots=True, frozen=True)
class HardwareLimits:
    """What the device can do at best, measured: memory traffic and matmul throughput."""

    copy_bytes_per_s: float  # bytes read + written per second by a large device-to-device copy
    matmul_flop_per_s: float  # a large square matmul in the model's dtype

    @classmethod
    def measure(cls, device: torch.device, dtype: torch.dtype) -> HardwareLimits:
        return cls(copy_bandwidth(device), matmul_rate(device, dtype))

    def forward_seconds(self, model: LoadedModel, new_tokens: int, cached_tokens: int) -> float:
        """The least time one forward pass can take: every weight and the whole KV read once at the copy
        bandwidth, plus the new tokens' FLOPs at the matmul rate (logits of the last token only)."""
        kv_bytes = (cached_tokens + new_tokens) * kv_bytes_per_token(model)
        read = (weight_bytes_read(model) + kv_bytes) / self.copy_bytes_per_s
        return read + prefill_flops(model, new_tokens, cached_tokens) / self.matmul_flop_per_s


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a device-to-device copy (2 GiB on a GPU, 256 MiB on the CPU)."""
    source = torch.empty(2**30 if device.type == "cuda" else 2**27, dtype=torch.int16, device=device)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, 10)
    return 2 * source.numel() * source.element_size() / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024  # the CPU's rate is reached long before
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, device, 10)


def kv_bytes_per_token(model: LoadedModel) -> int:
    """What the KV pool and every cache tier keep per token (MLA: the compressed latent)."""
    heads, head_dim, sides = model.config.kv_cache_layout
    return KVPool.bytes_per_token(model.config.num_layers, heads, head_dim, model.dtype, sides)


def _embedding_params(model: LoadedModel) -> int:
    return model.config.vocab_size * model.config.hidden_size


def weight_bytes_read(model: LoadedModel) -> int:
    """Weight bytes a forward pass reads: all but an untied embedding table, which is gathered, not read."""
    total = sum(p.numel() * p.element_size() for p in model.module.parameters())
    gathered = 0 if model.config.tie_word_embeddings else _embedding_params(model)
    return total - gathered * model.module.lm_head.weight.element_size()


def prefill_flops(model: LoadedModel, new_tokens: int, cached_tokens: int) -> float:
    """FLOPs of the linear layers for `new_tokens` and of causal attention over the cached keys and,
    causally, half the new ones (the LM head for one token is left out)."""
    cfg = model.config
    lm_heads = 1 if model.config.tie_word_embeddings else 2  # the embedding, and an untied head
    linear_params = sum(p.numel() for p in model.module.parameters()) - lm_heads * _embedding_params(model)
    keys_per_query = cached_tokens + new_tokens / 2
    attention = cfg.attention_flops_per_key * new_tokens * keys_per_query
    return 2 * linear_params * new_tokens + attention


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def cpu_name() -> str:
    """The processor's model name, as the results name their machine."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cpu"
    found = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    return found.group(1).strip() if found else "cpu"


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0])
    widths = [max(len(c), *(len(_cell(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(_cell(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))


def _cell(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def write_result(name: str, result: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
