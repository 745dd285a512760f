"""The random GGUF of the GPU peer comparison: warmkv loads it in the shape asked for, with SmolLM2's
tokenizer carried through a tokenizer-only GGUF; llama-server serves it (skipped where it is not built)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.peers.random_gguf import write_random_gguf, write_tokenizer_gguf
from warmkv.bench.peers import LlamaServer, llama_server_binary
from warmkv.engine.config import EngineConfig
from warmkv.engine.forward_item import ForwardItem
from warmkv.engine.llm_engine import LLMEngine
from warmkv.models.loader import default_gguf_path, load_model

TINY_QWEN2 = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)  # fmt: skip

# read at import: the session fixtures then point warmkv's cache (and peers_home) at a temporary folder
BUILT_LLAMA_SERVER = llama_server_binary()


@pytest.fixture(scope="module")
def random_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("random-gguf")
    tokenizer = write_tokenizer_gguf(folder / "tokenizer.gguf", default_gguf_path())
    assert tokenizer.stat().st_size < 5_000_000  # small enough to carry beside the source
    return write_random_gguf(TINY_QWEN2, folder / "tiny-qwen2.gguf", tokenizer)


def test_random_gguf_loads_in_its_shape_with_smollm2s_tokenizer(random_gguf: Path) -> None:
    model = load_model(str(random_gguf), torch.device("cpu"), torch.float32)
    config = model.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (2, 64, 4, 2)
    assert config.qkv_bias and not config.tie_word_embeddings
    assert config.vocab_size == len(model.tokenizer) == 49152
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
    assert prompt.startswith("<|im_start|>")  # SmolLM2's chat template came along
    ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    engine = LLMEngine(model, EngineConfig(kv_pool_tokens=256))
    blocks = engine.pool.allocate(-(-len(ids) // engine.pool.block_size))
    (logits,) = engine.runner.forward([ForwardItem(ids, 0, blocks, all_logits=True)])
    assert logits.shape == (len(ids), 49152) and torch.isfinite(logits).all()


def test_random_gguf_refuses_moe_shapes(tmp_path: Path) -> None:
    from warmkv.errors import WarmkvError
    from warmkv.models.random_init import SHAPES

    with pytest.raises(WarmkvError, match="dense"):
        write_random_gguf(SHAPES["qwen3-30b-a3b"], tmp_path / "moe.gguf", default_gguf_path())


@pytest.mark.slow
@pytest.mark.skipif(not BUILT_LLAMA_SERVER.is_file(),
                    reason="llama-server is not built: run `python -m bench.peers llama.cpp`")  # fmt: skip
def test_llama_server_serves_the_random_gguf(random_gguf: Path) -> None:
    with LlamaServer(name="llama.cpp", model="random", gguf=random_gguf, binary=BUILT_LLAMA_SERVER,
                     ready_timeout_s=120) as peer:
        from openai import OpenAI

        client = OpenAI(base_url=peer.url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="random", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, extra_body={"ignore_eos": True})  # fmt: skip
    assert reply.usage is not None and reply.usage.completion_tokens == 4
