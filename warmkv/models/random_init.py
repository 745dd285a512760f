"""Random weights in a real model's shape, with a real tokenizer: for speed measurements, where values
do not matter. transformers initialises the weights; our module takes the same tensors (q/k/v and
gate/up concatenated). The initialisation is seeded, so every process that makes the same shape on the
same kind of device holds the same tensors: replicas of a random model share cached KV (their cache
fingerprint names the seed and a sample of the weights)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from warmkv.errors import WarmkvError
from warmkv.models import mxfp4
from warmkv.models.config import ModelConfig
from warmkv.models.loader import LoadedModel, build_module, load_model, load_tokenizer, with_mxfp4_experts

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    # Qwen3-30B-A3B / Qwen3-Coder-30B-A3B: 128 experts, 8 active per token (~3.3B active parameters)
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # gpt-oss-20b: 32 experts, 4 active; sliding window of 128 on every other layer; attention sinks
    "gpt-oss-20b": dict(
        architectures=["GptOssForCausalLM"], model_type="gpt_oss", vocab_size=201088, hidden_size=2880,
        intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 12, attention_bias=True,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096, "rope_theta": 150000.0},
    ),
    # DeepSeek-V2-Lite's sizes (15.7B parameters, 2.4B active: 64 experts, 6 active, 2 shared; MLA with
    # kv_lora_rank 512, q without a latent) in the DeepSeek-V3 architecture (sigmoid router, one group):
    # its pool and tiers keep 576 values per token and layer, 27 x 576 x 2 = 31104 bytes per token in bf16
    "deepseek-v2-lite": dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=102400,
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, first_k_dense_replace=1, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "factor": 40.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 0.707, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                         "rope_theta": 10000.0},
    ),
    # the same architectures small enough for a CPU run: prove the benchmarks' code paths work
    # a long window on a model this small: the per-request work around a 32k hit (bench.ttft) on a CPU, where
    # the forward pass takes milliseconds, not the seconds of a real model's
    "llama-tiny-64k": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=65536, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "qwen3-moe-tiny": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=49152, hidden_size=128,
        intermediate_size=256, moe_intermediate_size=64, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "gpt-oss-tiny": dict(
        architectures=["GptOssForCausalLM"], model_type="gpt_oss", vocab_size=49152, hidden_size=64,
        intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"], attention_bias=True,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "deepseek-mla-tiny": dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=49152, hidden_size=128,
        intermediate_size=256, moe_intermediate_size=64, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
}  # fmt: skip
# gpt-oss-120b: gpt-oss-20b's layers, 128 experts and 36 of them (its MXFP4 experts fit one 80 GB GPU, bf16
# ones do not)
SHAPES["gpt-oss-120b"] = SHAPES["gpt-oss-20b"] | dict(
    num_local_experts=128, num_hidden_layers=36, layer_types=["sliding_attention", "full_attention"] * 18
)


def random_pair(
    shape: str, tokenizer: str | Path | None, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[LoadedModel, Any]:
    """Our model and transformers' model over the same random tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in SHAPES:
        raise WarmkvError(f"--shape {shape}: choose one of {', '.join(SHAPES)}")
    if tokenizer is None:
        raise WarmkvError("--shape needs --tokenizer DIR (a tokenizer folder, e.g. from ../shared/data)")
    hf_config = AutoConfig.for_model(**SHAPES[shape])
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []  # seeding sets them all
    torch.set_default_dtype(dtype)
    try:  # forked generators: the caller's random state is left as it was
        with torch.random.fork_rng(devices=devices), torch.device(device):
            torch.manual_seed(seed)
            theirs = AutoModelForCausalLM.from_config(hf_config)
    finally:
        torch.set_default_dtype(torch.float32)
    config = ModelConfig.from_hf(SHAPES[shape])
    module = build_module(config, dict(theirs.state_dict()), device, dtype)
    folder = Path(tokenizer)
    made_by = _made_by(f"{shape}-{dtype}-seed{seed}", theirs.get_input_embeddings().weight)
    ours = LoadedModel(
        f"random-{shape}", folder, config, module, load_tokenizer(folder), in_memory_id=made_by
    )
    return ours, theirs.eval()


def _made_by(recipe: str, embedding: torch.Tensor) -> str:
    # random weights named by what made them and by a sample of what they are: a GPU's random numbers may
    # depend on the model of GPU, and two processes must share cached KV only over the same tensors
    sample = embedding[:2].detach().float().cpu().numpy().tobytes()
    return f"random-{recipe}-{hashlib.blake2b(sample, digest_size=8).hexdigest()}"


def random_mxfp4_checkpoint(shape: str, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A gpt-oss shape as its published checkpoint holds it, random: the experts' projections MXFP4 blocks
    [experts, out, in / 32, 16] and scales (about 2 ** -6: activations stay finite through the layers),
    everything else bf16 (norms about 1). Made on `device`, a tensor at a time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        names = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SHAPES[shape])).state_dict()
    generator = torch.Generator(device=device).manual_seed(seed)
    checkpoint = {}
    for name, meta in names.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [experts, in, out] unquantised
            experts, depth, rows = meta.shape
            blocks, scales = random_mxfp4((experts, rows, depth), device, generator)
            checkpoint[f"{name}{mxfp4.BLOCKS}"], checkpoint[f"{name}{mxfp4.SCALES}"] = blocks, scales
        else:
            norm = name.endswith("norm.weight")
            values = torch.randn(meta.shape, device=device, generator=generator) * (1.0 if norm else 0.02)
            checkpoint[name] = (values + (1.0 if norm else 0.0)).to(torch.bfloat16)
    return checkpoint


def random_mxfp4(
    shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks [..., depth / 32, 16] and scales [..., depth / 32] of a [..., depth] weight:
    codes uniform, scales about 2 ** -6 (activations stay finite through a model's layers)."""
    groups = (*shape[:-1], shape[-1] // 32)
    packed = dict(dtype=torch.uint8, device=device, generator=generator)
    return torch.randint(0, 256, (*groups, 16), **packed), torch.randint(118, 122, groups, **packed)


def random_mxfp4_model(
    shape: str, tokenizer: str | Path | None, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> LoadedModel:
    """A gpt-oss shape with random MXFP4 experts (random_mxfp4_checkpoint's), held as a loaded checkpoint
    is: packed where the kernels read MXFP4 (CUDA), dequantised elsewhere. Without transformers' copy:
    gpt-oss-120b's would not fit a GPU."""
    if tokenizer is None:
        raise WarmkvError("--shape needs --tokenizer DIR (a tokenizer folder, e.g. from ../shared/data)")
    if SHAPES.get(shape, {}).get("model_type") != "gpt_oss":
        raise WarmkvError(f"--mxfp4: {shape} is not a gpt-oss shape (MXFP4 experts are gpt-oss's)")
    config = with_mxfp4_experts(ModelConfig.from_hf(SHAPES[shape]), device)
    weights = random_mxfp4_checkpoint(shape, device, seed)
    weights = {name: t if mxfp4.is_packed(name) else t.to(dtype) for name, t in weights.items()}
    mxfp4.load_pairs(weights, dtype, packed=config.moe is not None and config.moe.mxfp4)
    made_by = _made_by(f"{shape}-mxfp4-{dtype}-seed{seed}", weights["model.embed_tokens.weight"])
    module = build_module(config, weights, device, dtype)
    folder = Path(tokenizer)
    return LoadedModel(f"random-{shape}-mxfp4", folder, config, module, load_tokenizer(folder), made_by)


def model_or_shape(spec: str | None, shape: str | None, tokenizer: str | Path | None,
                   device: torch.device, dtype: torch.dtype) -> LoadedModel:  # fmt: skip
    """The model a benchmark's --model / --shape / --tokenizer flags name."""
    return random_model(shape, tokenizer, device, dtype) if shape else load_model(spec, device, dtype)


def random_model(
    shape: str, tokenizer: str | Path | None, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    return random_pair(shape, tokenizer, device, dtype)[0]
