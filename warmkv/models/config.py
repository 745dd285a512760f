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
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
}
_ARCHITECTURE_BY_MODEL_TYPE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}


@dataclass(slots=True, frozen=True)
class MoeConfig:
    """Routed experts (and an optional shared expert) replacing the dense MLP of some layers."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    normalize_top_k: bool  # renormalise the top-k router probabilities to sum to one
    layers: frozenset[int]  # the layers whose MLP is the expert block
    shared_intermediate_size: int = 0  # Qwen2-MoE's always-on expert, scaled by a sigmoid gate; 0: none
    # gpt-oss: biases on the router and the experts, softmax over the top-k logits only, and a clamped
    # SwiGLU (alpha, limit) in place of silu(gate) * up
    biases: bool = False
    clamped_swiglu: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ModelLoadError(f"num_experts_per_tok {self.top_k} is not within 1..{self.num_experts}")


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
    moe: MoeConfig | None = None  # mixture-of-experts feed-forward, on the layers it names
    window_layers: frozenset[int] | None = None  # the layers sliding_window applies to; None: all
    attention_sinks: bool = False  # gpt-oss: a learned logit per head in each softmax's denominator

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.layers

    def window_of(self, layer: int) -> int | None:
        """The sliding window of this layer's attention, None for full attention."""
        if self.window_layers is not None and layer not in self.window_layers:
            return None
        return self.sliding_window

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
                qkv_bias=_qkv_bias_of(architecture, hf),
                o_bias=architecture not in _QWEN2 and bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                qk_norm=architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
                sliding_window=_sliding_window_of(hf),
                rope=_rope_of(hf),
                eos_token_ids=_ids(hf.get("eos_token_id")),
                moe=_moe_of(hf),
                window_layers=_window_layers_of(hf),
                attention_sinks=architecture == "GptOssForCausalLM",
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


_QWEN2 = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")


def _qkv_bias_of(architecture: str, hf: dict[str, Any]) -> bool:
    if architecture in _QWEN2:
        return bool(hf.get("qkv_bias", True))  # Qwen2's q/k/v always have one; Qwen2-MoE's config says
    return bool(hf.get("attention_bias", False))


def _window_layers_of(hf: dict[str, Any]) -> frozenset[int] | None:
    # gpt-oss alternates sliding-window and full attention layers
    if hf.get("model_type") != "gpt_oss":
        return None
    types = hf.get("layer_types") or []
    return frozenset(i for i, kind in enumerate(types) if kind == "sliding_attention")


def _moe_of(hf: dict[str, Any]) -> MoeConfig | None:
    # transformers >= 5 writes num_local_experts; the published checkpoints have num_experts
    experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
    if not experts:
        return None
    layers, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or ())
    gpt_oss = hf.get("model_type") == "gpt_oss"  # every layer routes, to experts of intermediate_size
    return MoeConfig(
        num_experts=experts,
        top_k=hf["num_experts_per_tok"],
        intermediate_size=hf["intermediate_size" if gpt_oss else "moe_intermediate_size"],
        normalize_top_k=bool(hf.get("norm_topk_prob", False)),
        layers=frozenset(i for i in range(layers) if i not in dense and (i + 1) % step == 0),
        shared_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
        biases=gpt_oss,
        clamped_swiglu=(hf.get("swiglu_alpha", 1.702), hf.get("swiglu_limit", 7.0)) if gpt_oss else None,
    )


def _sliding_window_of(hf: dict[str, Any]) -> int | None:
    qwen = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
    if hf.get("model_type") in qwen and not hf.get("use_sliding_window", False):
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
    if rope["rope_type"] in ("llama3", "yarn"):  # the trained context, where transformers reads it
        rope.setdefault(
            "original_max_position_embeddings",
            hf.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 4096),
        )
    return rope


def _ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)
