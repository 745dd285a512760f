"""Time to first token for a long prompt whose prefix is cached in each tier, against recomputing it.

    python -m bench.tiers                                       # the default model on this machine
    python -m bench.tiers --shape qwen2.5-7b --tokenizer DIR --prompt-tokens 8192   # on a GPU
    python -m bench.tiers --shape deepseek-v2-lite --tokenizer DIR --prompt-tokens 32768   # MLA's latent KV

The prompt is --prompt-tokens long; the request adds --new-tokens after it. "live" is a hit in the KV
pool, "host" after the pool was emptied into host RAM, "disk" after a restart (a new engine on the same
directory). Load bandwidth is what the engine measured while copying the hit into the pool.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (
    add_model_flags,
    device_name,
    kv_bytes_per_token,
    median_seconds,
    print_table,
    synchronize,
    write_result,
)
from warmkv.cache.config import CacheConfig, LoadPolicy
from warmkv.cache.tiers.base import TierName
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams
from warmkv.models.loader import LoadedModel
from warmkv.models.random_init import model_or_shape


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_flags(parser)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype)
    device = config.torch_device()
    dtype = config.torch_dtype(device)
    model = model_or_shape(args.model, args.shape, args.tokenizer, device, dtype)

    prompt = torch.randint(0, 32000, (args.prompt_tokens,)).tolist()
    request = [*prompt, *torch.randint(0, 32000, (args.new_tokens,)).tolist()]
    rows = []
    kv_dir = tempfile.mkdtemp(prefix="warmkv-bench-kv-")
    try:
        cold = LLMEngine(model, _config(config, args, None, prefix_cache=False))
        rows.append(_row("none (recompute)", [_ttft(cold, request)[0] for _ in range(args.repeats)]))
        del cold
        for tier in (TierName.LIVE, TierName.HOST, TierName.DISK):
            ttfts, bandwidths = [], []
            for repeat in range(args.repeats):
                engine = _warmed(model, config, args, Path(kv_dir) / f"{tier.value}-{repeat}", prompt, tier)
                ttft, hit = _ttft(engine, request)
                assert hit.tokens_by_tier.get(tier, 0) > 0, hit.tokens_by_tier
                ttfts.append(ttft)
                if hit.load_seconds:
                    bandwidths.append(hit.load_bytes / hit.load_seconds / 1e9)
                engine.close()
            rows.append(_row(tier.value, ttfts, bandwidths))
    finally:
        shutil.rmtree(kv_dir, ignore_errors=True)
    baseline = rows[0]["ttft_ms"]
    for row in rows:
        row["speedup"] = baseline / row["ttft_ms"]
    print_table(rows)
    print(f"KV bytes per token (pool and every tier): {kv_bytes_per_token(model)}")
    name = model.name
    result = {"device": device_name(device), "model": name, "dtype": str(dtype).removeprefix("torch."),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "kv_bytes_per_token": kv_bytes_per_token(model), "rows": rows,
              "command": "python -m bench.tiers " + " ".join(__import__("sys").argv[1:])}  # fmt: skip
    if device.type == "cuda":
        result |= _host_limit(model, args.prompt_tokens, rows, device)
        print_table([{"measure": k, "value": v} for k, v in result.items() if k.startswith("host_")])
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{result['device']}-{name}".lower()).strip("-")
    print("wrote", write_result(f"tiers-{slug}", result))


def _host_limit(model: LoadedModel, prompt_tokens: int, rows: list[dict], device: torch.device) -> dict:
    """The physical limit of a host-tier hit: the prefix's KV bytes over the measured pinned host-to-GPU
    bandwidth, plus computing the new tokens on top of it (the live hit's TTFT)."""
    kv_bytes = prompt_tokens * kv_bytes_per_token(model)
    pinned = torch.empty(2**30, dtype=torch.uint8).pin_memory()
    target = torch.empty_like(pinned, device=device)
    seconds = median_seconds(lambda: target.copy_(pinned, non_blocking=True), device, 5)
    bandwidth = pinned.numel() / seconds
    ttft = {row["cached prefix from"]: row["ttft_ms"] for row in rows}
    limit_ms = kv_bytes / bandwidth * 1000 + ttft["live"]
    return {"host_to_gpu_bytes_per_s": bandwidth, "host_prefix_kv_bytes": kv_bytes,
            "host_hit_physical_limit_ms": limit_ms,
            "host_hit_fraction_of_limit": limit_ms / ttft["host"]}  # fmt: skip


def _config(
    base: EngineConfig, args: argparse.Namespace, kv_dir: Path | None, prefix_cache: bool = True
) -> EngineConfig:
    return EngineConfig(
        model=base.model, device=base.device, dtype=base.dtype, prefix_cache=prefix_cache,
        kv_pool_tokens=4 * (args.prompt_tokens + args.new_tokens) + 256,
        max_batch_tokens=max(512, args.prompt_tokens + args.new_tokens),
        cache=CacheConfig(disk=kv_dir is not None, kv_dir=kv_dir, load_policy=LoadPolicy.ALWAYS,
                          host_tokens=4 * args.prompt_tokens),
    )  # fmt: skip


def _warmed(model: LoadedModel, base: EngineConfig, args: argparse.Namespace, kv_dir: Path, prompt: list[int],
            tier: TierName) -> LLMEngine:  # fmt: skip
    """An engine whose cache holds `prompt` in `tier` and in no tier above it."""
    engine = LLMEngine(model, _config(base, args, kv_dir))
    for _ in engine.generate(prompt, SamplingParams(max_tokens=1)):
        pass
    if tier is TierName.LIVE:
        return engine
    engine.prefix_cache.index.evict(len(engine.prefix_cache.index))  # demoted to host RAM
    if tier is TierName.HOST:
        return engine
    engine.close()
    del engine
    return LLMEngine(model, _config(base, args, kv_dir))  # a restart: only the disk remains


def _ttft(engine: LLMEngine, request: list[int]):
    device = engine.model.device
    synchronize(device)
    start = time.perf_counter()
    output = next(iter(engine.generate(request, SamplingParams(max_tokens=1))))
    synchronize(device)
    return (time.perf_counter() - start) * 1000, output.sequence.cache_hit


def _row(source: str, ttfts: list[float], bandwidths: list[float] | None = None) -> dict:
    ttfts = sorted(ttfts)
    bandwidth = sorted(bandwidths)[len(bandwidths) // 2] if bandwidths else None
    return {"cached prefix from": source, "ttft_ms": ttfts[len(ttfts) // 2],
            "load_GB_s": round(bandwidth, 2) if bandwidth else "-"}  # fmt: skip


if __name__ == "__main__":
    main()
