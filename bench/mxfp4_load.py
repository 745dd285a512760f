"""gpt-oss as published: a checkpoint whose experts are MXFP4, written with random values, then loaded and
decoded from: its size on disk, load time, the GPU memory the model takes (its experts kept MXFP4 on
CUDA, dequantised elsewhere), decode speed.

    python -m bench.mxfp4_load --tokenizer DIR --device cuda                          # gpt-oss-20b
    python -m bench.mxfp4_load --tokenizer DIR --device cpu --shape gpt-oss-tiny      # the script's check

The checkpoint has the published one's names, shapes and dtypes (experts as `*_blocks` / `*_scales`,
the rest bf16), written to --out-dir (a temporary folder by default, removed after).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from bench.common import device_name, print_table, synchronize, write_result
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams
from warmkv.models.loader import load_model
from warmkv.models.random_init import SHAPES, random_mxfp4_checkpoint

# gpt-oss's own list: what stays bf16
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder copied into the checkpoint")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=[n for n, c in SHAPES.items() if c["model_type"] == "gpt_oss"],
                        default="gpt-oss-20b")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, help="where the checkpoint is written (kept)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    folder = args.out_dir or Path(tempfile.mkdtemp(prefix="warmkv-mxfp4-"))
    try:
        written = write_checkpoint(folder, Path(args.tokenizer), args.shape, device)
        result = {"device": device_name(device), "shape": args.shape, "checkpoint_gib": written / 2**30}
        result |= measure(folder, device, dtype, args.decode_tokens)
    finally:
        if args.out_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    print_table([{"measure": k, "value": v} for k, v in result.items()])
    result["command"] = (
        f"python -m bench.mxfp4_load --tokenizer DIR --device {args.device} --shape {args.shape}"
    )
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{result['device']}-{result['shape']}".lower()).strip("-")
    print("wrote", write_result(f"mxfp4-load-{slug}", result))


def write_checkpoint(folder: Path, tokenizer: Path, shape: str, device: torch.device) -> int:
    """The shape's checkpoint in gpt-oss's published layout with random values (made on `device`), a file
    per layer; returns its bytes."""
    hf_config = AutoConfig.for_model(**SHAPES[shape])
    quantization = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    config = hf_config.to_dict() | {"quantization_config": quantization}
    (folder / "config.json").write_text(json.dumps(config))
    for file in tokenizer.iterdir():
        shutil.copy(file, folder / file.name)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in random_mxfp4_checkpoint(shape, device).items():
        shard = shards.setdefault(name.split(".")[2] if name.startswith("model.layers.") else "rest", {})
        shard[name] = tensor.cpu()
    for layer, tensors in shards.items():
        save_file(tensors, str(folder / f"model-{layer}.safetensors"))
    return sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())


def measure(folder: Path, device: torch.device, dtype: torch.dtype, tokens: int) -> dict[str, float]:
    if device.type == "cuda":  # the checkpoint made on the GPU is gone: its cached memory is free again
        torch.cuda.empty_cache()
    synchronize(device)
    start = time.perf_counter()
    model = load_model(str(folder), device, dtype)
    synchronize(device)
    out = {"load_seconds": time.perf_counter() - start}
    if device.type == "cuda":
        out["gpu_gib_allocated"] = torch.cuda.memory_allocated(device) / 2**30
    start = time.perf_counter()
    engine = LLMEngine(model, EngineConfig(max_model_len=4096, kv_pool_tokens=None if device.type == "cuda"
                                           else 8192))  # fmt: skip
    out["engine_ready_seconds"] = time.perf_counter() - start
    runs, params = [], SamplingParams(max_tokens=tokens, ignore_eos=True)
    for _ in range(2):  # the second: every kernel compiled
        synchronize(device)
        start = time.perf_counter()
        for _output in engine.generate(list(range(100, 132)), params):
            pass
        synchronize(device)
        runs.append(tokens / (time.perf_counter() - start))
    out["decode_bs1_end_to_end_tok_s"] = runs[-1]
    return out


if __name__ == "__main__":
    main()
