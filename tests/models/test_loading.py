"""Loading models: folders, GGUF files, the default model, and the errors a user sees."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams
from warmkv.errors import ModelLoadError, UnsupportedArchitecture
from warmkv.models import loader
from warmkv.models.loader import default_gguf_path, load_model

from ..conftest import make_tiny_hf_model

CPU = torch.device("cpu")


def _chat_ids(engine: LLMEngine, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(engine.model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


@pytest.mark.slow
def test_default_model_answers_paris() -> None:
    engine = LLMEngine.from_config(EngineConfig())
    prompt = _chat_ids(engine, "What is the capital of France?")
    answer = "".join(out.text for out in engine.generate(prompt, SamplingParams(max_tokens=20)))
    assert "Paris" in answer


@pytest.mark.slow
def test_default_model_converts_once(monkeypatch: pytest.MonkeyPatch) -> None:
    load_model(None, CPU, torch.float32)  # converts, or finds the folder converted earlier
    monkeypatch.setattr(loader, "convert_gguf", lambda *_: pytest.fail("converted a second time"))
    model = load_model(None, CPU, torch.float32)
    assert model.config.num_layers == 30 and model.config.tie_word_embeddings


@pytest.mark.slow
def test_default_model_logits_match_transformers_gguf_loader() -> None:
    """Our GGUF de-quantisation and q/k un-permutation give what transformers' own GGUF loader gives."""
    from transformers import AutoModelForCausalLM

    gguf_path = default_gguf_path()
    theirs = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).eval()
    ours = load_model(None, CPU, torch.float32)
    engine = LLMEngine(ours, EngineConfig(kv_pool_tokens=256))
    prompt = _chat_ids(engine, "Name three rivers.")
    with torch.no_grad():
        reference = theirs(torch.tensor([prompt])).logits[0, -1].float()
    greedy = next(iter(engine.generate(prompt, SamplingParams(max_tokens=1)))).token_ids[0]
    assert greedy == int(reference.argmax())
    from warmkv.engine.forward_item import ForwardItem

    blocks = engine.pool.allocate(-(-len(prompt) // engine.pool.block_size))
    (logits,) = engine.runner.forward([ForwardItem(prompt, 0, blocks)])
    torch.testing.assert_close(logits[0], reference, atol=2e-3, rtol=1e-3)


def add_smollm2_tokenizer(writer: Any, source: Any) -> None:
    """SmolLM2's tokenizer, from the default model's GGUF (`source`), into a GGUF being written."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(source.fields["tokenizer.ggml.tokens"].contents())
    writer.add_token_types(source.fields["tokenizer.ggml.token_type"].contents())
    writer.add_token_merges(source.fields["tokenizer.ggml.merges"].contents())
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def write_tiny_gguf(path: Path) -> torch.nn.Module:
    """A float32 GGUF of a tiny random Llama, laid out as llama.cpp writes it, with SmolLM2's tokenizer."""
    import gguf

    hf = make_tiny_hf_model("llama")
    cfg = hf.config
    source = gguf.GGUFReader(default_gguf_path())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    add_smollm2_tokenizer(writer, source)
    writer.add_chat_template(source.fields["tokenizer.chat_template"].contents())

    def permute(w: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's convert_hf_to_gguf
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"embed_tokens": "token_embd", "norm": "output_norm"}
    layer_names = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        w = tensor.numpy()
        parts = name.split(".")
        if parts[1] == "layers":
            gguf_name = f"blk.{parts[2]}.{layer_names['.'.join(parts[3:-1])]}.weight"
            if "q_proj" in name:
                w = permute(w, cfg.num_attention_heads)
            elif "k_proj" in name:
                w = permute(w, cfg.num_key_value_heads)
        else:
            gguf_name = f"{names[parts[1]]}.weight"
        writer.add_tensor(gguf_name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_gguf_file_loads_with_matching_logits(tmp_path: Path) -> None:
    hf = write_tiny_gguf(tmp_path / "tiny.gguf")
    model = load_model(str(tmp_path / "tiny.gguf"), CPU, torch.float32)
    engine = LLMEngine(model, EngineConfig(kv_pool_tokens=256))
    prompt = model.tokenizer("The rivers of France flow west", add_special_tokens=False)["input_ids"]
    blocks = engine.pool.allocate(-(-len(prompt) // engine.pool.block_size))
    from warmkv.engine.forward_item import ForwardItem

    (logits,) = engine.runner.forward([ForwardItem(prompt, 0, blocks, all_logits=True)])
    with torch.no_grad():
        reference = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    assert model.tokenizer.chat_template  # the chat template came from the GGUF metadata


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(UnsupportedArchitecture, match=r"GPT2LMHeadModel is not supported"):
        load_model(str(tmp_path), CPU, torch.float32)


def test_folder_without_weights_is_rejected(tiny_llama_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_llama_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights"):
        load_model(str(folder), CPU, torch.float32)


def test_missing_model_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nowhere"), CPU, torch.float32)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_gguf_is_rejected(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "broken.gguf"
    if damage == "truncated":
        path.write_bytes(default_gguf_path().read_bytes()[:5_000_000])
    else:
        path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    with pytest.raises(ModelLoadError, match=r"broken\.gguf"):
        load_model(str(path), CPU, torch.float32)
    assert not list((tmp_path.parent / "warmkv-cache").glob("**/broken-*"))  # nothing half-converted left
