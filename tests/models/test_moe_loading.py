"""Loading mixture-of-experts models: GGUF files laid out as llama.cpp writes them, damaged folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from warmkv.cache.kv_pool import KVPool
from warmkv.engine.forward_item import ForwardItem
from warmkv.engine.model_runner import ModelRunner
from warmkv.errors import ModelLoadError, UnsupportedArchitecture
from warmkv.models import loader, mxfp4
from warmkv.models.loader import default_gguf_path, load_model

from ..conftest import make_tiny_hf_model, save_tiny_model
from .test_loading import add_smollm2_tokenizer

CPU = torch.device("cpu")
GGUF_ARCH = {"qwen3moe": "qwen3moe", "qwen2moe": "qwen2moe", "gptoss": "gpt-oss"}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}  # fmt: skip


def _gguf_tensors(hf: torch.nn.Module) -> dict[str, np.ndarray]:
    """llama.cpp's names and layouts: experts stacked per projection, the shared gate a vector."""
    tensors = {"token_embd.weight": hf.model.embed_tokens.weight, "output_norm.weight": hf.model.norm.weight,
               "output.weight": hf.lm_head.weight}  # fmt: skip
    inner = hf.config.moe_intermediate_size
    for index, layer in enumerate(hf.model.layers):
        for name, tensor in layer.state_dict().items():
            module, kind = name.rsplit(".", 1)
            if module == "mlp.experts":  # transformers stacks [experts, 2 * inner, hidden] as gate | up
                if kind == "gate_up_proj":
                    tensors[f"blk.{index}.ffn_gate_exps.weight"] = tensor[:, :inner]
                    tensors[f"blk.{index}.ffn_up_exps.weight"] = tensor[:, inner:]
                else:
                    tensors[f"blk.{index}.ffn_down_exps.weight"] = tensor
                continue
            if module == "mlp.shared_expert_gate":
                tensor = tensor[0]
            tensors[f"blk.{index}.{_LAYER_NAMES[module]}.{kind}"] = tensor
    return {name: np.ascontiguousarray(t.detach().numpy()) for name, t in tensors.items()}


_GPT_OSS_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.router": "ffn_gate_inp",
}  # fmt: skip


def _gpt_oss_gguf_tensors(hf: torch.nn.Module, mxfp4_experts: bool, fused: bool) -> dict[str, tuple]:
    """What llama.cpp's converter writes for gpt-oss: the experts' gate and up apart (or fused, gate rows
    then up rows), each [experts, out, in], MXFP4 or not; the sinks a tensor of their own. MXFP4 experts
    are also written back into `hf`, so it holds the values the file does."""
    import gguf

    tensors: dict[str, tuple] = {
        "token_embd.weight": (hf.model.embed_tokens.weight, None),
        "output_norm.weight": (hf.model.norm.weight, None),
        "output.weight": (hf.lm_head.weight, None),
    }
    for index, layer in enumerate(hf.model.layers):
        experts, blk = layer.mlp.experts, f"blk.{index}"
        for name, tensor in layer.state_dict().items():
            module, kind = name.rsplit(".", 1)
            if module in _GPT_OSS_NAMES:
                tensors[f"{blk}.{_GPT_OSS_NAMES[module]}.{kind}"] = (tensor, None)
        tensors[f"{blk}.attn_sinks.weight"] = (layer.self_attn.sinks, None)
        gate_up = experts.gate_up_proj.detach().transpose(1, 2)  # [experts, 2 * inner, hidden]
        weights = {
            "gate": gate_up[:, 0::2],
            "up": gate_up[:, 1::2],
            "down": experts.down_proj.transpose(1, 2),
        }
        bias = {"gate": experts.gate_up_proj_bias[:, 0::2], "up": experts.gate_up_proj_bias[:, 1::2],
                "down": experts.down_proj_bias}  # fmt: skip
        parts = [("gate_up", ("gate", "up"))] if fused else [("gate", ("gate",)), ("up", ("up",))]
        for name, joined in [*parts, ("down", ("down",))]:
            weight = torch.cat([weights[part] for part in joined], dim=1).detach().numpy()
            raw_type = gguf.GGMLQuantizationType.MXFP4 if mxfp4_experts else None
            if raw_type is not None:
                weight = gguf.quants.quantize(weight, raw_type)
                rounded = gguf.quants.dequantize(weight, raw_type)
                weights |= dict(zip(joined, torch.from_numpy(rounded).chunk(len(joined), dim=1), strict=True))
            tensors[f"{blk}.ffn_{name}_exps.weight"] = (weight, raw_type)
            tensors[f"{blk}.ffn_{name}_exps.bias"] = (torch.cat([bias[part] for part in joined], dim=1), None)
        with torch.no_grad():  # the model holds what the file holds
            experts.gate_up_proj[..., 0::2] = weights["gate"].transpose(1, 2)
            experts.gate_up_proj[..., 1::2] = weights["up"].transpose(1, 2)
            experts.down_proj.copy_(weights["down"].transpose(1, 2))
    return tensors


def write_tiny_moe_gguf(name: str, path: Path, mxfp4_experts: bool = False, fused: bool = False):
    import gguf

    hf = make_tiny_hf_model(name)
    cfg = hf.config
    gpt_oss = name == "gptoss"
    source = gguf.GGUFReader(default_gguf_path())
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH[name])
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if cfg.rope_parameters["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(cfg.rope_parameters["factor"])
        writer.add_rope_scaling_orig_ctx_len(cfg.rope_parameters["original_max_position_embeddings"])
    writer.add_expert_count(cfg.num_local_experts if gpt_oss else cfg.num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_expert_feed_forward_length(cfg.intermediate_size if gpt_oss else cfg.moe_intermediate_size)
    if getattr(cfg, "shared_expert_intermediate_size", 0):
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if gpt_oss:
        writer.add_sliding_window(cfg.sliding_window)
    add_smollm2_tokenizer(writer, source)
    if gpt_oss:
        tensors = _gpt_oss_gguf_tensors(hf, mxfp4_experts, fused)
    else:
        tensors = {name: (array, None) for name, array in _gguf_tensors(hf).items()}
    for gguf_name, (array, raw_type) in tensors.items():
        if isinstance(array, torch.Tensor):
            array = np.ascontiguousarray(array.detach().numpy())
        writer.add_tensor(gguf_name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.mark.parametrize("name", ["qwen3moe", pytest.param("qwen2moe", marks=pytest.mark.slow)])
def test_moe_gguf_loads_with_matching_logits(name: str, tmp_path: Path) -> None:
    """The tiny Qwen3-MoE has a dense layer (no router tensor in the file), renormalised top-k (what
    llama.cpp does for qwen3moe) and YaRN; the Qwen2-MoE has a shared expert whose gate the file holds as
    a vector."""
    hf = write_tiny_moe_gguf(name, tmp_path / f"{name}.gguf")
    model = load_model(str(tmp_path / f"{name}.gguf"), CPU, torch.float32)
    assert model.config.moe is not None and model.config.moe.num_experts == 8
    assert_logits_match(model, hf)


@pytest.mark.parametrize("mxfp4_experts, fused", [(True, False), (False, True)])
def test_gpt_oss_gguf_loads_with_matching_logits(mxfp4_experts: bool, fused: bool, tmp_path: Path) -> None:
    """gpt-oss as llama.cpp converts it: MXFP4 experts stay MXFP4 in the converted folder (gpt-oss's
    published layout, dequantised on load), float ones are stacked as transformers has them; gate and up
    apart or fused; the sinks, the router's bias, the alternating sliding window and YaRN come through."""
    path = tmp_path / "gpt-oss.gguf"
    hf = write_tiny_moe_gguf("gptoss", path, mxfp4_experts=mxfp4_experts, fused=fused)
    model = load_model(str(path), CPU, torch.float32)
    assert model.config.moe is not None and model.config.moe.num_experts == 8
    assert model.config.window_layers == {0} and model.config.sliding_window == 24
    saved = load_file(str(model.folder / "model.safetensors"))
    packed = [n for n, t in saved.items() if n.endswith("_blocks") and t.dtype == torch.uint8]
    assert len(packed) == (4 if mxfp4_experts else 0)  # gate_up and down, two layers
    assert_logits_match(model, hf)


def assert_logits_match(model, hf: torch.nn.Module) -> None:
    """Our logits of every token of a short prompt are transformers' (float32, on the model's device)."""
    pool = KVPool(model.config.num_layers, 16, 8, model.config.num_kv_heads, model.config.head_dim,
                  torch.float32, model.device)  # fmt: skip
    prompt = model.tokenizer("The rivers of France flow west", add_special_tokens=False)["input_ids"]
    (logits,) = ModelRunner(model.module, pool).forward(
        [ForwardItem(prompt, 0, pool.allocate(-(-len(prompt) // 8)), all_logits=True)]
    )
    with torch.no_grad():
        reference = hf(torch.tensor([prompt], device=model.device)).logits[0]
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_checkpoint_missing_an_expert_is_rejected(tmp_path: Path) -> None:
    folder = save_tiny_model("qwen3moe", tmp_path / "damaged")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.0.mlp.experts.5.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.mlp\.experts: .*lacks some experts"):
        load_model(str(folder), CPU, torch.float32)


def _mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert tensor [experts, in, out] as gpt-oss's checkpoints store it quantised: MXFP4 blocks and
    scales of its [experts, out, in] rows, each value rounded to the nearest E2M1 one under its group's
    scale (the smallest power of two that brings the group within E2M1's largest, 6)."""
    groups = weight.transpose(1, 2).float().reshape(weight.shape[0], weight.shape[2], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2**-100) / 6)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    magnitudes = torch.tensor(mxfp4.E2M1[:8])
    codes = (scaled.abs()[..., None] - magnitudes).abs().argmin(-1) + 8 * (scaled < 0)
    return (codes[..., 0::2] | codes[..., 1::2] << 4).to(torch.uint8), (exponent + 127).to(torch.uint8)


CUDA_PARAM = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)


@pytest.mark.parametrize("device", ["cpu", CUDA_PARAM])  # loading dequantises on the model's device
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_dequantises_to_transformers_bits(dtype: torch.dtype, device: str) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8)
    scales = torch.randint(100, 150, (3, 10, 4), dtype=torch.uint8)
    got = mxfp4.dequantize(blocks.to(device), scales.to(device), dtype).transpose(1, 2).cpu()
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)


def _mxfp4_gpt_oss_folder(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A tiny gpt-oss checkpoint as published (experts MXFP4, config naming the scheme), and transformers'
    model holding the weights transformers' own dequantisation gives."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    folder = save_tiny_model("gptoss", tmp_path / "mxfp4")
    hf = make_tiny_hf_model("gptoss")
    weights = load_file(str(folder / "model.safetensors"))
    for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = _mxfp4(weights.pop(name))
        weights[f"{name}_blocks"], weights[f"{name}_scales"] = blocks, scales
        with torch.no_grad():
            hf.get_parameter(name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(weights, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn"],
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder, hf


@pytest.mark.parametrize("device", ["cpu", CUDA_PARAM])
def test_mxfp4_gpt_oss_checkpoint_loads_with_the_logits_of_its_dequantised_weights(
    tmp_path: Path, device: str
) -> None:
    """gpt-oss as published: the experts' projections MXFP4 blocks and scales, config.json naming the
    scheme. It loads (on CUDA its experts stay MXFP4 bytes, which the kernels read; on the CPU they are
    dequantised), and its logits are those of transformers' model holding the weights transformers' own
    dequantisation gives."""
    folder, hf = _mxfp4_gpt_oss_folder(tmp_path)
    model = load_model(str(folder), torch.device(device), torch.float32)
    experts = model.module.model.layers[0].mlp.experts
    packed = device == "cuda"
    assert model.config.moe is not None and model.config.moe.mxfp4 == packed
    assert experts.gate_up_proj.dtype == (torch.uint8 if packed else torch.float32)
    assert experts.gate_up_proj.shape == (8, 2 * 96, 64 // 2 if packed else 64)
    assert_logits_match(model, hf.to(device))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mxfp4_experts_kept_packed_decode_alike_with_cache_reuse_and_cuda_graphs(tmp_path: Path) -> None:
    """Exactness with the experts read as MXFP4 bytes: a later turn over the cached first one, decoded
    through CUDA graphs in runs of steps, gives the tokens an engine without cache or graphs gives."""
    from warmkv.engine.config import EngineConfig
    from warmkv.engine.llm_engine import LLMEngine
    from warmkv.engine.sampling import SamplingParams

    folder, _ = _mxfp4_gpt_oss_folder(tmp_path)
    model = load_model(str(folder), torch.device("cuda"), torch.float32)
    assert model.module.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.uint8

    def run(engine: LLMEngine, prompt: list[int]) -> tuple[list[int], int]:
        seq = list(engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True)))[-1].sequence
        return seq.output_ids, seq.num_cached

    warm = LLMEngine(model, EngineConfig(kv_pool_tokens=2048))
    cold = LLMEngine(model, EngineConfig(kv_pool_tokens=2048, prefix_cache=False, cuda_graphs=False))
    prompt = list(range(100, 160))
    first, _ = run(warm, prompt)
    later = prompt + first + list(range(300, 320))
    ids, cached = run(warm, later)
    assert cached >= len(prompt) - 8  # the first turn's blocks were reused
    assert first == run(cold, prompt)[0] and ids == run(cold, later)[0]


@pytest.mark.parametrize("method", ["awq", "mxfp4"])  # MXFP4 is gpt-oss's experts' only
def test_checkpoint_quantised_another_way_is_refused_by_name(tmp_path: Path, method: str) -> None:
    folder = save_tiny_model("llama", tmp_path / method)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps(config | {"quantization_config": {"quant_method": method}})
    )
    with pytest.raises(ModelLoadError, match=f"LlamaForCausalLM weights quantised with '{method}' are not"):
        load_model(str(folder), CPU, torch.float32)


def test_mxfp4_pairs_must_be_whole_and_fit_float16() -> None:
    blocks, scales = (
        torch.zeros(2, 3, 1, 16, dtype=torch.uint8),
        torch.full((2, 3, 1), 127, dtype=torch.uint8),
    )
    for packed in (False, True):  # dequantised on load, or kept for the kernels
        with pytest.raises(ModelLoadError, match=r"x\.down_proj_scales: MXFP4 scales without their blocks"):
            mxfp4.load_pairs({"x.down_proj_scales": scales}, torch.bfloat16, packed)
        with pytest.raises(ModelLoadError, match=r"x\.down_proj_blocks: MXFP4 blocks without their scales"):
            mxfp4.load_pairs({"x.down_proj_blocks": blocks}, torch.bfloat16, packed)
    assert mxfp4.dequantize(blocks, scales, torch.bfloat16).shape == (2, 3, 32)
    scales[1, 2, 0] = 127 + 14  # 6 * 2**14 is past float16's largest
    for packed in (False, True):  # the kernels decode to the model's dtype too
        pairs = {"x.down_proj_blocks": blocks, "x.down_proj_scales": scales}
        with pytest.raises(ModelLoadError, match="past float16's range: load this model in bfloat16"):
            mxfp4.load_pairs(pairs, torch.float16, packed)
    scales[1, 2, 0] = 241  # past what the kernels' scales hold
    with pytest.raises(ModelLoadError, match="MXFP4 scale 241 is past 240"):
        mxfp4.load_pairs({"x.down_proj_blocks": blocks, "x.down_proj_scales": scales}, torch.bfloat16, True)


def test_mxfp4_kept_packed_stands_for_the_values_dequantisation_gives() -> None:
    """The bytes the kernels read (reordered on load) and their scales are the checkpoint's values."""
    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8)
    scales = torch.randint(100, 150, (3, 10, 4), dtype=torch.uint8)
    kept = {"x.down_proj_blocks": blocks, "x.down_proj_scales": scales}
    mxfp4.load_pairs(kept, torch.bfloat16, packed=True)
    assert kept.keys() == {"x.down_proj", "x.down_proj_scales"} and kept["x.down_proj"].shape == (3, 10, 64)
    for expert in range(3):
        packed, packed_scales = kept["x.down_proj"][expert], kept["x.down_proj_scales"][expert]
        want = mxfp4.dequantize(blocks, scales, torch.float32)[expert]
        assert torch.equal(mxfp4.unpack(packed, packed_scales, torch.float32), want)


def test_weights_larger_than_the_gpus_free_memory_are_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted as they would be on the GPU: MXFP4 blocks and scales a byte each where the kernels read
    them, a block's 16 bytes 32 values where they are dequantised. With free memory between the two, a
    checkpoint kept MXFP4 loads (its size check passes) and the same one dequantised is refused."""
    folder = save_tiny_model("gptoss", tmp_path / "big")
    weights = load_file(str(folder / "model.safetensors"))
    for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        weights[f"{name}_blocks"], weights[f"{name}_scales"] = _mxfp4(weights.pop(name))
    save_file(weights, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps(config | {"quantization_config": {"quant_method": "mxfp4"}})
    )
    packed = sum(t.numel() * (1 if mxfp4.is_packed(n) else 2) for n, t in weights.items())
    dequantised = sum(t.numel() * (4 if n.endswith("_blocks") else 0 if n.endswith("_scales") else 2)
                      for n, t in weights.items())  # fmt: skip
    files, cuda = [folder / "model.safetensors"], torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (packed, 80 * 2**30))
    loader._check_fits(folder, files, cuda, torch.bfloat16, mxfp4_packed=True)
    with pytest.raises(ModelLoadError, match=r"GiB in torch.bfloat16 on the GPU; cuda has"):
        loader._check_fits(folder, files, cuda, torch.bfloat16, mxfp4_packed=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (packed - 1, 80 * 2**30))
    with pytest.raises(ModelLoadError, match=r"GiB in torch.bfloat16 on the GPU; cuda has"):
        load_model(str(folder), cuda, torch.bfloat16)  # kept MXFP4 on CUDA, and still too big
    assert packed < dequantised


def test_deepseek_v2_is_refused_as_unsupported(tmp_path: Path) -> None:
    """DeepSeek-V2's softmax router is not implemented (V3's is): the user hears so, and which
    architectures run, before any weight is read."""
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2"})
    )
    with pytest.raises(UnsupportedArchitecture, match=r"DeepseekV2ForCausalLM is not supported.*DeepseekV3"):
        load_model(str(tmp_path), CPU, torch.float32)
