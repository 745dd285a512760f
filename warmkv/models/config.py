"""The model hyper-parameters warmkv needs, read from a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from warmkv.errors import ModelLoadError, UnsupportedArchitecture

# architecture name -> the model_type transformers writes for it
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_ARCHITECTURE_BY_MODEL_TYPE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}


@dataclass(slots=True, frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    rope: dict[str, Any] = field(default_factory=dict)  # rope_type, rope_theta and the type's parameters
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        architecture = _architecture_of(hf)
        try:
            num_heads = hf["num_attention_heads"]
            hidden_size = hf["hidden_size"]
            return cls(
                architecture=architecture,
                vocab_size=hf["vocab_size"],
                hidden_size=hidden_size,
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=hf.get("num_key_value_heads") or num_heads,
                head_dim=hf.get("head_dim") or hidden_size // num_heads,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                max_position_embeddings=hf.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=architecture == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
                o_bias=architecture != "Qwen2ForCausalLM" and bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                qk_norm=architecture == "Qwen3ForCausalLM",
                sliding_window=_sliding_window_of(hf),
                rope=_rope_of(hf),
                eos_token_ids=_ids(hf.get("eos_token_id")),
            )
        except KeyError as missing:
            raise ModelLoadError(f"config.json lacks the field {missing}") from None


def _architecture_of(hf: dict[str, Any]) -> str:
    names = hf.get("architectures") or [_ARCHITECTURE_BY_MODEL_TYPE.get(hf.get("model_type", ""), "")]
    name = names[0] or f"model_type {hf.get('model_type')!r}"
    if name not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"architecture {name} is not supported; warmkv runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return name


def _sliding_window_of(hf: dict[str, Any]) -> int | None:
    if hf.get("model_type") in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        return None
    if hf.get("use_sliding_window") and hf.get("max_window_layers", 0) < hf.get("num_hidden_layers", 0):
        raise UnsupportedArchitecture(
            "sliding window on only some layers (max_window_layers) is not supported"
        )
    return hf.get("sliding_window")


def _rope_of(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes rope_parameters; older configs have rope_theta + rope_scaling
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def _ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)
