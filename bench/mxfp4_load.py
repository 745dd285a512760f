"""gpt-oss as published: a checkpoint whose experts are MXFP4, written with random values, then loaded and
decoded from: its size on disk, load time, the GPU memory the dequantised model takes, decode speed.

    python -m bench.mxfp4_load --tokenizer DIR --device cuda            # gpt-oss-20b's shape
    python -m bench.mxfp4_load --tokenizer DIR --device cpu --small     # the script's own check

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

from bench.common import device_name, print_table, synchronize, write_result
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams
from warmkv.models.loader import load_model
from warmkv.models.random_init import SHAPES

SMALL = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, layer_types=["sliding_attention", "full_attention"],
)  # fmt: skip
# gpt-oss's own list: what stays bf16
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder copied into the checkpoint")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="gpt-oss's layout in a tiny model")
    parser.add_argument("--out-dir", type=Path, help="where the checkpoint is written (kept)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    folder = args.out_dir or Path(tempfile.mkdtemp(prefix="warmkv-mxfp4-"))
    try:
        written = write_checkpoint(folder, Path(args.tokenizer), args.small, device)
        result = {"device": device_name(device), "shape": "small" if args.small else "gpt-oss-20b",
                  "checkpoint_gib": written / 2**30}  # fmt: skip
        result |= measure(folder, device, dtype, args.decode_tokens)
    finally:
        if args.out_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    print_table([{"measure": k, "value": v} for k, v in result.items()])
    result["command"] = "python -m bench.mxfp4_load " + " ".join(
        a for a in ("--small" if args.small else "", f"--device {args.device}") if a
    )
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{result['device']}-{result['shape']}".lower()).strip("-")
    print("wrote", write_result(f"mxfp4-load-{slug}", result))


def write_checkpoint(folder: Path, tokenizer: Path, small: bool, device: torch.device) -> int:
    """gpt-oss-20b's checkpoint layout with random values, a file per layer; returns its bytes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = SHAPES["gpt-oss-20b"] | (SMALL if small else {})
    hf_config = AutoConfig.for_model(**shape)
    with torch.device("meta"):
        names = AutoModelForCausalLM.from_config(hf_config).state_dict()
    quantization = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    config = hf_config.to_dict() | {"quantization_config": quantization}
    (folder / "config.json").write_text(json.dumps(config))
    for file in tokenizer.iterdir():
        shutil.copy(file, folder / file.name)
    generator = torch.Generator(device=device).manual_seed(0)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, meta in names.items():
        shard = shards.setdefault(name.split(".")[2] if name.startswith("model.layers.") else "rest", {})
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # [experts, in, out] unquantised: the blocks hold [experts, out, in / 32, 16]
            experts, depth, rows = meta.shape
            groups = (experts, rows, depth // 32)
            packed = dict(dtype=torch.uint8, device=device, generator=generator)
            shard[f"{name}_blocks"] = torch.randint(0, 256, (*groups, 16), **packed).cpu()
            # scales about 2**-6: activations stay finite through the layers
            shard[f"{name}_scales"] = torch.randint(118, 122, groups, **packed).cpu()
        else:
            norm = name.endswith("norm.weight")
            values = torch.randn(meta.shape, device=device, generator=generator) * (1.0 if norm else 0.02)
            shard[name] = (values + (1.0 if norm else 0.0)).to(torch.bfloat16).cpu()
    for layer, tensors in shards.items():
        save_file(tensors, str(folder / f"model-{layer}.safetensors"))
    return sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())


def measure(folder: Path, device: torch.device, dtype: torch.dtype, tokens: int) -> dict[str, float]:
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
