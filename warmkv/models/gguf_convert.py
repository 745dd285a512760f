"""Convert a GGUF file into a Hugging Face model folder: config, de-quantised float32 weights (gpt-oss's MXFP4
experts kept MXFP4, in its published checkpoints' layout), tokenizer.

The conversion runs once per file; the folder it writes then loads like any other.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from warmkv.errors import ModelLoadError, UnsupportedArchitecture
from warmkv.models.config import SUPPORTED_ARCHITECTURES

GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "deepseek2": "DeepseekV3ForCausalLM",  # with the sigmoid router (DeepSeek-V3); V2's softmax is refused
    "gpt-oss": "GptOssForCausalLM",
}
# llama.cpp renormalises the top-k router weights of these (its norm_w), unless the file says otherwise
_NORMALIZED_TOP_K = {"qwen3moe"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{expert}.gate_proj",  # [experts, inner, hidden]: split per expert
    "ffn_up_exps": "mlp.experts.{expert}.up_proj",
    "ffn_down_exps": "mlp.experts.{expert}.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "attn_k_b": "self_attn.k_b_proj",  # newer files split kv_b_proj: k_b [heads, kv_lora_rank, nope] ...
    "attn_v_b": "self_attn.v_b_proj",  # ... and v_b [heads, v_head_dim, kv_lora_rank]
}
# gpt-oss's own names; its experts are joined into transformers' stacked layout by _join_gpt_oss_experts
_GPT_OSS_NAMES = _LAYER_NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_gate_inp": "mlp.router",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_gate_up_exps": "mlp.experts.fused_gate_up_proj",  # newer converters: gate rows, then up rows
    "ffn_down_exps": "mlp.experts.down_proj",
}
_WHOLE_TENSORS = {  # not a module's weight or bias
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "attn_sinks.weight": "self_attn.sinks",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write out_dir atomically: a half-converted folder never appears under its final name."""
    import gguf  # imported here: only conversion needs it

    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as err:  # the reader raises many kinds on a damaged file
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF file: {err}") from err
    hf_config = gguf_hf_config(reader)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file(_hf_tensors(reader, hf_config, gguf), str(staging / "model.safetensors"))
        _write_tokenizer(gguf_path, staging)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Write only the tokenizer files convert_gguf would write (seconds, not minutes), atomically too."""
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write_tokenizer(gguf_path, staging)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gguf_hf_config(reader: Any) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"GGUF architecture {arch!r} is not supported; warmkv runs {', '.join(GGUF_ARCHITECTURES)}"
        )
    tensor_names = {t.name for t in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ModelLoadError("GGUF file has no token_embd.weight tensor")
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    config: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": SUPPORTED_ARCHITECTURES[GGUF_ARCHITECTURES[arch]],  # qwen3moe -> qwen3_moe
        "vocab_size": int(embedding.shape[1]),
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": _field(reader, f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": _field(reader, f"{arch}.context_length", 4096),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", None),
        "torch_dtype": "float32",
    }
    if arch == "deepseek2":
        config.update(_deepseek_config(reader, arch, heads))
    elif arch == "gpt-oss":
        config.update(_gpt_oss_config(reader, arch, config["num_hidden_layers"]))
    elif _field(reader, f"{arch}.expert_count", 0):
        config.update(_moe_config(reader, arch, tensor_names, config["num_hidden_layers"]))
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling in ("linear", "yarn"):
        factor = _field(reader, f"{arch}.rope.scaling.factor")
        config["rope_scaling"] = {"rope_type": scaling, "factor": factor}
    if scaling == "yarn":  # as llama.cpp's converter writes Qwen3's YaRN
        config["rope_scaling"]["original_max_position_embeddings"] = _field(
            reader, f"{arch}.rope.scaling.original_context_length"
        )
    if scaling == "yarn" and arch == "gpt-oss":  # the published config's; llama.cpp's metadata omits them
        config["rope_scaling"] |= {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
    if scaling == "yarn" and arch == "deepseek2":  # llama.cpp keeps 0.1 * mscale_all_dim (= mscale)
        mscale = round(_field(reader, f"{arch}.rope.scaling.yarn_log_multiplier", 0.0) / 0.1, 6)
        config["rope_scaling"] |= {"mscale": mscale, "mscale_all_dim": mscale}
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedArchitecture("GGUF with a rope_freqs tensor (llama3 rope scaling) is not supported")
    return config


def _moe_config(reader: Any, arch: str, tensor_names: set[str], layers: int) -> dict[str, Any]:
    return {
        # a layer without a router keeps its dense MLP
        "mlp_only_layers": [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names],
        "num_experts": _field(reader, f"{arch}.expert_count"),
        "num_experts_per_tok": _field(reader, f"{arch}.expert_used_count"),
        "moe_intermediate_size": _field(reader, f"{arch}.expert_feed_forward_length"),
        "shared_expert_intermediate_size": _field(reader, f"{arch}.expert_shared_feed_forward_length", 0),
        "norm_topk_prob": bool(_field(reader, f"{arch}.expert_weights_norm", arch in _NORMALIZED_TOP_K)),
    }


def _gpt_oss_config(reader: Any, arch: str, layers: int) -> dict[str, Any]:
    return {
        "num_local_experts": _field(reader, f"{arch}.expert_count"),
        "num_experts_per_tok": _field(reader, f"{arch}.expert_used_count"),
        "intermediate_size": _field(reader, f"{arch}.expert_feed_forward_length"),
        "attention_bias": True,
        "sliding_window": _field(reader, f"{arch}.attention.sliding_window"),
        # llama.cpp's swa pattern 2, as transformers' default: the even layers slide, the odd attend to all
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
    } | ({"quantization_config": {"quant_method": "mxfp4"}} if _experts_stay_mxfp4(reader) else {})


def _deepseek_config(reader: Any, arch: str, heads: int) -> dict[str, Any]:
    if _field(reader, f"{arch}.expert_gating_func", 1) != 2:  # llama.cpp: 1 softmax (its default), 2 sigmoid
        raise UnsupportedArchitecture(
            "GGUF deepseek2 with a softmax router (DeepSeek-V2) is not supported; DeepSeek-V3's sigmoid is"
        )
    rope = _field(reader, f"{arch}.rope.dimension_count")
    # llama.cpp writes MLA as one KV head over the latent: key/value_length are then the latent's, and
    # *_mla the heads' (files without *_mla have the heads' in key/value_length)
    key, value = f"{arch}.attention.key_length", f"{arch}.attention.value_length"
    qk = _field(reader, f"{key}_mla", None) or _field(reader, key)
    v = _field(reader, f"{value}_mla", None) or _field(reader, value)
    return {
        "num_key_value_heads": heads,
        "q_lora_rank": _field(reader, f"{arch}.attention.q_lora_rank", 0) or None,
        "kv_lora_rank": _field(reader, f"{arch}.attention.kv_lora_rank"),
        "qk_nope_head_dim": qk - rope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v,
        "n_routed_experts": _field(reader, f"{arch}.expert_count"),
        "num_experts_per_tok": _field(reader, f"{arch}.expert_used_count"),
        "moe_intermediate_size": _field(reader, f"{arch}.expert_feed_forward_length"),
        "n_shared_experts": _field(reader, f"{arch}.expert_shared_count", 0),
        "first_k_dense_replace": _field(reader, f"{arch}.leading_dense_block_count", 0),
        "routed_scaling_factor": _field(reader, f"{arch}.expert_weights_scale", 1.0),
        "norm_topk_prob": bool(_field(reader, f"{arch}.expert_weights_norm", False)),
        "n_group": _field(reader, f"{arch}.expert_group_count", 1),  # absent: no group limit, as llama.cpp
        "topk_group": _field(reader, f"{arch}.expert_group_used_count", 1),
    }


def _hf_tensors(reader: Any, config: dict[str, Any], gguf: Any) -> dict[str, np.ndarray]:
    # llama.cpp interleaves the rotary halves of q/k rows for Llama models; undo it for rotate-half
    permuted = config["model_type"] == "llama"
    gpt_oss = config["model_type"] == "gpt_oss"
    packed = gpt_oss and _experts_stay_mxfp4(reader)
    tensors = {}
    for tensor in tqdm(reader.tensors, desc="converting GGUF tensors", unit="tensor"):
        name = _hf_name(tensor.name, _GPT_OSS_NAMES if gpt_oss else _LAYER_NAMES)
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        if packed and _is_expert_weight(tensor.name):  # kept as MXFP4, for the loader (warmkv.models.mxfp4)
            blocks, scales = _hf_mxfp4(np.asarray(tensor.data), shape)
            tensors[name.replace(".weight", "_blocks")] = blocks
            tensors[name.replace(".weight", "_scales")] = scales
            continue
        weights = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weights = weights.reshape(shape)
        if "{expert}" in name:  # Hugging Face folders hold one tensor per expert
            for expert, rows in enumerate(weights):
                tensors[name.format(expert=expert)] = np.ascontiguousarray(rows)
            continue
        if name.endswith("shared_expert_gate.weight"):
            weights = weights.reshape(1, -1)  # a [1, hidden] linear, however the file shapes it
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            weights = _unpermute(weights, config["num_attention_heads"])
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            weights = _unpermute(weights, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(weights)
    _join_kv_b(tensors)
    if gpt_oss:
        _join_gpt_oss_experts(tensors)
    return tensors


_EXPERT_WEIGHT = re.compile(r"blk\.\d+\.ffn_(gate|up|gate_up|down)_exps\.weight")


def _is_expert_weight(gguf_name: str) -> bool:
    return _EXPERT_WEIGHT.fullmatch(gguf_name) is not None


def _experts_stay_mxfp4(reader: Any) -> bool:
    """gpt-oss's experts stay packed when every one of them is MXFP4 (as llama.cpp converts the published
    checkpoints): the folder is then gpt-oss's published layout, a quarter of float32's size."""
    import gguf

    types = {t.tensor_type for t in reader.tensors if _is_expert_weight(t.name)}
    return types == {gguf.GGMLQuantizationType.MXFP4}


def _hf_mxfp4(data: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """ggml's MXFP4 rows (blocks of a scale byte, then 16 bytes whose low nibbles are the block's first 16
    values and high nibbles its last 16) as gpt-oss checkpoints store them: blocks [..., groups, 16] with
    two consecutive values a byte (the lower nibble first), scales [..., groups]. The scale bytes are the
    same E8M0 powers of two; ggml doubles its E2M1 table and halves the scale, so the values are too."""
    raw = data.reshape(*shape[:-1], shape[-1] // 32, 17)
    codes = np.concatenate((raw[..., 1:] & 0x0F, raw[..., 1:] >> 4), axis=-1)  # [..., groups, 32] in order
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4)), np.ascontiguousarray(raw[..., 0])


def _join_gpt_oss_experts(tensors: dict[str, np.ndarray]) -> None:
    """llama.cpp's gpt-oss experts (gate, up and down apart, each [experts, out, in]; or gate and up fused
    as gate rows then up rows) in transformers' layout: gate_up_proj [experts, in, 2 * inner] with gate
    and up columns interleaved, down_proj [experts, inner, hidden], their biases alike; MXFP4 blocks and
    scales keep the [experts, out, in] rows of the published checkpoints, interleaved the same way."""
    for name in [n for n in tensors if ".mlp.experts.fused_gate_up_proj" in n]:
        gate, up = np.split(tensors.pop(name), 2, axis=1)
        tensors[name.replace("fused_gate_up_proj", "gate_proj")] = gate
        tensors[name.replace("fused_gate_up_proj", "up_proj")] = up
    for name in [n for n in tensors if ".mlp.experts.gate_proj" in n]:
        up = tensors.pop(name.replace("gate_proj", "up_proj"))
        gate_up = np.stack((tensors.pop(name), up), axis=2).reshape(up.shape[0], -1, *up.shape[2:])
        experts, kind = name.split(".gate_proj")
        tensors[f"{experts}.gate_up_proj{_HF_EXPERT_SUFFIX[kind]}"] = _in_out(gate_up, kind)
    for name in [n for n in tensors if ".mlp.experts.down_proj." in n]:
        experts, kind = name.split(".down_proj")
        tensors[f"{experts}.down_proj{_HF_EXPERT_SUFFIX[kind]}"] = _in_out(tensors.pop(name), kind)


_HF_EXPERT_SUFFIX = {".weight": "", ".bias": "_bias", "_blocks": "_blocks", "_scales": "_scales"}


def _in_out(tensor: np.ndarray, kind: str) -> np.ndarray:
    # transformers stacks gpt-oss's float expert weights [experts, in, out]; blocks keep [experts, out, in]
    return np.ascontiguousarray(tensor.swapaxes(1, 2) if kind == ".weight" else tensor)


def _join_kv_b(tensors: dict[str, np.ndarray]) -> None:
    """kv_b_proj [heads * (nope + v), kv_lora_rank] again, from the halves newer deepseek2 files hold."""
    for k_name in [n for n in tensors if n.endswith("self_attn.k_b_proj.weight")]:
        k_b = tensors.pop(k_name).swapaxes(1, 2)  # [heads, nope, kv_lora_rank]
        v_b = tensors.pop(k_name.replace("k_b_proj", "v_b_proj"))
        joined = np.concatenate((k_b, v_b), axis=1).reshape(-1, k_b.shape[-1])
        tensors[k_name.replace("k_b_proj", "kv_b_proj")] = np.ascontiguousarray(joined)


def _hf_name(gguf_name: str, layer_names: dict[str, str]) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and f"{match.group(2)}.{match.group(3)}" in _WHOLE_TENSORS:
        return f"model.layers.{match.group(1)}.{_WHOLE_TENSORS[f'{match.group(2)}.{match.group(3)}']}"
    if not match or match.group(2) not in layer_names:
        raise UnsupportedArchitecture(f"GGUF tensor {gguf_name!r} has no place in the Llama-family model")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{layer_names[part]}.{kind}"


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    where = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except Exception as err:
        # transformers' GGUF loader refuses architectures it cannot load (deepseek2) before it reads the
        # tokenizer; the generic fast tokenizer reads the same tokenizer fields without asking
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(**where)
        except Exception:
            raise ModelLoadError(f"the tokenizer in {gguf_path} could not be converted: {err}") from err
    tokenizer.save_pretrained(str(out_dir))


_MISSING = object()


def _field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ModelLoadError(f"GGUF metadata lacks {key}")
        return default
    value = field.contents()
    return value.item() if hasattr(value, "item") else value
