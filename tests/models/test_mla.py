"""DeepSeek-V3's multi-head latent attention: the pool keeps the compressed latent, and both ways of
attending over it (K/V expanded per head, or the absorbed weights scoring the latents) give transformers'
logits.

Tolerance: float32, |ours - theirs| <= 1e-4 + 1e-4 * |theirs| per logit, as for the other architectures
(measured: about 2e-7).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from warmkv.cache.kv_pool import KVPool
from warmkv.engine.forward_item import ForwardItem
from warmkv.errors import ModelLoadError
from warmkv.models.mla import MlaAttention

from ..conftest import make_tiny_hf_model, save_tiny_model
from .test_logits_match_transformers import BLOCK, PROMPT_LEN, TOL, _runner

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["deepseekv3", "deepseekv3-qlora"])
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(arch, tmp_path_factory.mktemp(arch))


@pytest.fixture(scope="module")
def prompt_and_reference(arch: str):
    """A prompt, transformers' logits for it and its latent cache (per layer: c_kv and the rotated k_pe)."""
    torch.manual_seed(3)
    prompt = torch.randint(0, 49152, (PROMPT_LEN,)).tolist()
    with torch.no_grad():
        out = make_tiny_hf_model(arch)(torch.tensor([prompt]), use_cache=True)
    latents = [
        torch.cat((layer.keys[0, 0], layer.values[0, 0]), dim=-1) for layer in out.past_key_values.layers
    ]
    return prompt, out.logits[0], latents


def test_pool_and_blocks_hold_the_latent_transformers_caches(folder: Path, prompt_and_reference) -> None:
    """One vector of kv_lora_rank + rope values per token and layer (normalised c_kv, then the rotated
    k_pe): transformers' own latent cache, under a third of what expanded K and V of these 4 heads take."""
    prompt, _, latents = prompt_and_reference
    runner = _runner(folder, CPU)
    pool, config = runner.pool, runner.module.config
    blocks = pool.allocate(-(-PROMPT_LEN // BLOCK))
    runner.forward([ForwardItem(prompt, 0, blocks)])
    slots = pool.slots(blocks, 0, PROMPT_LEN)
    for layer, latent in enumerate(latents):
        torch.testing.assert_close(pool.k[layer, slots, 0], latent, atol=1e-5, rtol=1e-5)
    assert pool.v.numel() == 0
    latent_dim = 32 + 8  # kv_lora_rank + qk_rope_head_dim
    assert pool.block_shape == (1, config.num_layers, BLOCK, 1, latent_dim)
    assert pool.read_blocks(blocks[:2]).shape == (2, *pool.block_shape)
    expanded = config.num_layers * config.num_heads * (16 + 8 + config.mla.v_head_dim) * 4
    assert pool.block_bytes == BLOCK * config.num_layers * latent_dim * 4 < BLOCK * expanded / 3


@pytest.mark.parametrize("absorbed", [True, False], ids=["absorbed", "expanded"])
def test_both_ways_of_attending_match_transformers(
    folder: Path, prompt_and_reference, absorbed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked prefill over the pool, then decode, with every step forced through one of the two paths."""
    prompt, reference, _ = prompt_and_reference
    monkeypatch.setattr(MlaAttention, "absorbed", absorbed)
    runner = _runner(folder, CPU)
    blocks = runner.pool.allocate(-(-PROMPT_LEN // BLOCK))
    decode_from = PROMPT_LEN - 4
    chunks = [
        runner.forward(
            [ForwardItem(prompt[start : min(start + 9, decode_from)], start, blocks, all_logits=True)]
        )[0]
        for start in range(0, decode_from, 9)
    ]
    torch.testing.assert_close(torch.cat(chunks), reference[:decode_from], **TOL)
    for position in range(decode_from, PROMPT_LEN):
        (logits,) = runner.forward([ForwardItem([prompt[position]], position, blocks)])
        torch.testing.assert_close(logits[0], reference[position], **TOL)


def test_decode_steps_of_a_batch_attend_together_exactly(folder: Path, prompt_and_reference) -> None:
    """Three sequences of different lengths decode in one step (one attention over padded contexts)
    beside another's prefill chunk; each gets transformers' logits for its position."""
    prompt, reference, _ = prompt_and_reference
    runner = _runner(folder, CPU)
    lengths = (9, 30, PROMPT_LEN - 1)
    tables = [runner.pool.allocate(-(-PROMPT_LEN // BLOCK)) for _ in range(len(lengths) + 1)]
    runner.forward([ForwardItem(prompt[:n], 0, table) for n, table in zip(lengths, tables, strict=False)])
    runner.forward([ForwardItem(prompt[:20], 0, tables[-1])])
    *decoded, chunk = runner.forward(
        [ForwardItem([prompt[n]], n, table) for n, table in zip(lengths, tables, strict=False)]
        + [ForwardItem(prompt[20:40], 20, tables[-1], all_logits=True)]
    )
    for n, logits in zip(lengths, decoded, strict=True):
        torch.testing.assert_close(logits[0], reference[n], **TOL)
    torch.testing.assert_close(chunk, reference[20:40], **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absorbed_decode_on_cuda_matches_the_expanded_path(
    folder: Path, prompt_and_reference, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of decode steps on CUDA over the same prefilled pool: the absorbed weights (what decode
    runs) give the expanded path's logits, and in float32 transformers' (tolerance as above; bf16:
    relative norm of the difference below 1e-2)."""
    prompt, reference, _ = prompt_and_reference
    cuda = torch.device("cuda")
    results = {}
    for absorbed in (True, False):
        runner = _runner(folder, cuda, dtype)
        first, second = (runner.pool.allocate(-(-PROMPT_LEN // BLOCK)) for _ in range(2))
        runner.forward([ForwardItem(prompt[:-3], 0, first), ForwardItem(prompt[:-2], 0, second)])
        monkeypatch.setattr(MlaAttention, "absorbed", absorbed)  # the decode step alone differs
        steps = [runner.forward([ForwardItem([prompt[-3]], PROMPT_LEN - 3, first),
                                 ForwardItem([prompt[-2]], PROMPT_LEN - 2, second)])]  # fmt: skip
        results[absorbed] = torch.cat([torch.cat(step) for step in steps]).cpu()
    want = reference[[PROMPT_LEN - 3, PROMPT_LEN - 2]]
    if dtype == torch.float32:
        torch.testing.assert_close(results[True], want, **TOL)
        torch.testing.assert_close(results[False], want, **TOL)
    else:
        difference = (results[True] - results[False]).norm() / results[False].norm()
        assert difference.item() < 1e-2


def test_fp8_checkpoint_is_refused_with_its_reason(tmp_path: Path) -> None:
    """DeepSeek's published FP8 weights carry block scales: cast without them they would give garbage."""
    from warmkv.models.loader import load_model

    folder = save_tiny_model("deepseekv3", tmp_path / "fp8")
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="FP8 block-quantised DeepSeek weights"):
        load_model(str(folder), CPU, torch.float32)


def test_checkpoint_without_the_routing_bias_is_refused(tmp_path: Path) -> None:
    from warmkv.models.loader import load_model

    folder = save_tiny_model("deepseekv3", tmp_path / "no-bias")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.gate.e_score_correction_bias"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="e_score_correction_bias"):
        load_model(str(folder), CPU, torch.float32)


def test_groups_that_do_not_divide_the_experts_are_refused(tmp_path: Path) -> None:
    from warmkv.models.loader import load_model

    folder = save_tiny_model("deepseekv3", tmp_path / "groups")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"n_group": 3}))
    with pytest.raises(ModelLoadError, match="n_group 3"):
        load_model(str(folder), CPU, torch.float32)


def test_v2_lite_shape_keeps_31104_bytes_per_token_against_qwen_7b_57344() -> None:
    """The benchmark shape's KV per token in bf16: 27 layers x 576 latent values, against Qwen2.5-7B's
    28 layers x K and V of 4 heads x 128 (and 276480 bytes were the latent expanded to 16 heads' K/V)."""
    from warmkv.models.config import ModelConfig
    from warmkv.models.random_init import SHAPES

    def per_token(shape: str) -> int:
        config = ModelConfig.from_hf(SHAPES[shape])
        return KVPool.bytes_per_token(config.num_layers, *config.kv_cache_layout[:2], torch.bfloat16,
                                      config.kv_cache_layout[2])  # fmt: skip

    assert per_token("deepseek-v2-lite") == 27 * 576 * 2 == 31104
    assert per_token("qwen2.5-7b") == 57344


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.kv_b_proj": "attn_kv_b", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}  # fmt: skip


def _deepseek2_tensors(hf: torch.nn.Module, split_kv_b: bool) -> dict[str, torch.Tensor]:
    """llama.cpp's names and layouts for deepseek2: stacked experts, the routing bias `exp_probs_b`, and
    in newer files kv_b_proj split into k_b (transposed) and v_b."""
    cfg = hf.config
    tensors = {"token_embd.weight": hf.model.embed_tokens.weight, "output_norm.weight": hf.model.norm.weight,
               "output.weight": hf.lm_head.weight}  # fmt: skip
    for index, layer in enumerate(hf.model.layers):
        for name, tensor in layer.state_dict().items():
            module, kind = name.rsplit(".", 1)
            if module == "mlp.experts":
                inner = cfg.moe_intermediate_size
                if kind == "gate_up_proj":
                    tensors[f"blk.{index}.ffn_gate_exps.weight"] = tensor[:, :inner]
                    tensors[f"blk.{index}.ffn_up_exps.weight"] = tensor[:, inner:]
                else:
                    tensors[f"blk.{index}.ffn_down_exps.weight"] = tensor
            elif kind == "e_score_correction_bias":
                tensors[f"blk.{index}.exp_probs_b.bias"] = tensor
            elif module == "self_attn.kv_b_proj" and split_kv_b:
                kv_b = tensor.view(cfg.num_attention_heads, -1, cfg.kv_lora_rank)
                tensors[f"blk.{index}.attn_k_b.weight"] = kv_b[:, : cfg.qk_nope_head_dim].transpose(1, 2)
                tensors[f"blk.{index}.attn_v_b.weight"] = kv_b[:, cfg.qk_nope_head_dim :]
            else:
                tensors[f"blk.{index}.{_GGUF_NAMES[module]}.{kind}"] = tensor
    return tensors


def _write_deepseek2_gguf(hf: torch.nn.Module, path: Path, split_kv_b: bool) -> None:
    """A float32 deepseek2 GGUF as llama.cpp's converter writes one: MLA as one KV head over the latent in
    newer files (key/value_length the latent's, *_mla the heads'), the heads' lengths in older ones."""
    import gguf

    from warmkv.models.loader import default_gguf_path

    from .test_loading import add_smollm2_tokenizer

    cfg, rope = hf.config, hf.config.rope_parameters
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    writer.add_q_lora_rank(cfg.q_lora_rank)
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    qk_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if split_kv_b:
        writer.add_head_count_kv(1)
        writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        writer.add_value_length(cfg.kv_lora_rank)
        writer.add_key_length_mla(qk_dim)
        writer.add_value_length_mla(cfg.v_head_dim)
    else:
        writer.add_head_count_kv(cfg.num_attention_heads)
        writer.add_key_length(qk_dim)
        writer.add_value_length(cfg.v_head_dim)
    writer.add_leading_dense_block_count(cfg.first_k_dense_replace)
    writer.add_expert_count(cfg.n_routed_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    writer.add_expert_shared_count(cfg.n_shared_experts)
    writer.add_expert_weights_scale(cfg.routed_scaling_factor)
    writer.add_expert_weights_norm(cfg.norm_topk_prob)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_expert_group_count(cfg.n_group)
    writer.add_expert_group_used_count(cfg.topk_group)
    add_smollm2_tokenizer(writer, gguf.GGUFReader(default_gguf_path()))
    for name, tensor in _deepseek2_tensors(hf, split_kv_b).items():
        writer.add_tensor(name, tensor.detach().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("split_kv_b", [True, False], ids=["k_b-v_b", "kv_b"])
def test_deepseek2_gguf_loads_with_matching_logits(split_kv_b: bool, tmp_path: Path) -> None:
    """DeepSeek-V3 as a llama.cpp deepseek2 file (q latent, interleaved rotary, YaRN, grouped sigmoid
    router with its bias, a shared expert) gives transformers' logits for a prefill and a decode step."""
    from warmkv.engine.model_runner import ModelRunner
    from warmkv.models.loader import load_model

    hf = make_tiny_hf_model("deepseekv3-qlora")
    _write_deepseek2_gguf(hf, tmp_path / "tiny-deepseek.gguf", split_kv_b)
    model = load_model(str(tmp_path / "tiny-deepseek.gguf"), CPU, torch.float32)
    assert model.config.mla is not None and model.config.moe.sigmoid_groups == (2, 1)
    heads, head_dim, sides = model.config.kv_cache_layout
    pool = KVPool(model.config.num_layers, 16, BLOCK, heads, head_dim, torch.float32, CPU, sides)
    prompt = model.tokenizer("The rivers of France flow west to the sea", add_special_tokens=False)[
        "input_ids"
    ]
    runner, blocks = ModelRunner(model.module, pool), pool.allocate(3)
    (prefill,) = runner.forward([ForwardItem(prompt[:-1], 0, blocks, all_logits=True)])
    (decode,) = runner.forward([ForwardItem(prompt[-1:], len(prompt) - 1, blocks)])
    with torch.no_grad():
        reference = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(torch.cat([prefill, decode]), reference, **TOL)


def test_deepseek2_gguf_with_a_softmax_router_is_refused(tmp_path: Path) -> None:
    import gguf

    from warmkv.errors import UnsupportedArchitecture
    from warmkv.models.gguf_convert import gguf_hf_config

    writer = gguf.GGUFWriter(str(tmp_path / "v2.gguf"), "deepseek2")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_tensor("token_embd.weight", torch.zeros(10, 64).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitecture, match="softmax router"):
        gguf_hf_config(gguf.GGUFReader(tmp_path / "v2.gguf"))


def test_bf16_model_keeps_the_routing_bias_in_float32(folder: Path) -> None:
    """As transformers keeps it: rounded to bf16, the bias would move tokens between close experts."""
    from warmkv.models.loader import load_model

    saved = load_file(str(folder / "model.safetensors"))["model.layers.1.mlp.gate.e_score_correction_bias"]
    model = load_model(str(folder), CPU, torch.bfloat16)
    bias = model.module.model.layers[1].mlp.gate.e_score_correction_bias
    assert model.dtype == torch.bfloat16 and bias.dtype == torch.float32
    assert torch.equal(bias, saved)
