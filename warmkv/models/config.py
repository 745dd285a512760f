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
    "DeepseekV3ForCausalLM": "deepseek_v3",
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
    # DeepSeek-V3: sigmoid scores; experts chosen by score + a learned bias among the best `topk_group` of
    # `n_group` groups, (n_group, topk_group); the chosen scores scaled by routed_scaling_factor; the
    # shared expert ungated
    sigmoid_groups: tuple[int, int] | None = None
    routed_scaling_factor: float = 1.0
    shared_expert_gate: bool = True  # Qwen2-MoE scales its shared expert by sigmoid(shared_expert_gate(x))
    # the experts' projections kept as MXFP4 bytes and scales (gpt-oss's checkpoints, on CUDA)
    mxfp4: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ModelLoadError(f"num_experts_per_tok {self.top_k} is not within 1..{self.num_experts}")


@dataclass(slots=True, frozen=True)
class MlaConfig:
    """DeepSeek's multi-head latent attention: K and V of every head are projected out of one small
    latent per token (kv_lora_rank values, normalised) plus one rotated key part shared by the heads."""

    q_lora_rank: int | None  # None: q is one projection of the hidden state, not two through a norm
    kv_lora_rank: int
    qk_nope_head_dim: int  # per head, the part of q and k without rotary embedding
    qk_rope_head_dim: int  # the rotated part: k's is the one shared by every head
    v_head_dim: int
    interleaved_rope: bool  # checkpoints' rotary pairs are (x0, x1), (x2, x3), ... (permuted on load)

    @property
    def latent_dim(self) -> int:
        """Values the KV pool keeps per token and layer: the latent, then the rotated key part."""
        return self.kv_lora_rank + self.qk_rope_head_dim


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
    mla: MlaConfig | None = None  # DeepSeek-V3: multi-head latent attention (head_dim: its rotary part)

    @property
    def attention_flops_per_key(self) -> int:
        """FLOPs of one query token on one key, all layers and heads: QK^T and PV as prefill computes them
        (MLA: over K and V expanded)."""
        qk, v = self.head_dim, self.head_dim
        if self.mla is not None:
            qk, v = self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim, self.mla.v_head_dim
        return 2 * self.num_layers * self.num_heads * (qk + v)

    @property
    def kv_cache_layout(self) -> tuple[int, int, int]:
        """(heads, head_dim, sides) of what one token of one layer keeps in the KV pool: K and V of each
        KV head (sides 2), or with MLA the compressed latent alone, as one head (sides 1)."""
        if self.mla is not None:
            return 1, self.mla.latent_dim, 1
        return self.num_kv_heads, self.head_dim, 2

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
                head_dim=_head_dim_of(hf, hidden_size // num_heads),
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
                mla=_mla_of(hf),
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


def _head_dim_of(hf: dict[str, Any], default: int) -> int:
    if hf.get("model_type") == "deepseek_v3":  # the rotary embedding's width, as transformers has it
        return hf["qk_rope_head_dim"]
    return hf.get("head_dim") or default


def _mla_of(hf: dict[str, Any]) -> MlaConfig | None:
    if hf.get("model_type") != "deepseek_v3":
        return None
    return MlaConfig(
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        interleaved_rope=hf.get("rope_interleave", True),
    )


def _moe_of(hf: dict[str, Any]) -> MoeConfig | None:
    if hf.get("model_type") == "deepseek_v3":
        return _deepseek_moe_of(hf)
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


def _deepseek_moe_of(hf: dict[str, Any]) -> MoeConfig:
    # defaults: DeepSeek-V3's, as transformers' DeepseekV3Config has them
    dense_layers, every = hf.get("first_k_dense_replace", 3), hf.get("moe_layer_freq", 1)
    inner = hf["moe_intermediate_size"]
    groups = (hf.get("n_group") or 1, hf.get("topk_group") or 1)
    experts = hf.get("n_routed_experts", 256)
    if experts % groups[0] or experts // groups[0] < 2 or not 0 < groups[1] <= groups[0]:
        raise ModelLoadError(f"n_group {groups[0]} / topk_group {groups[1]} do not fit the experts")
    return MoeConfig(
        num_experts=experts,
        top_k=hf.get("num_experts_per_tok", 8),
        intermediate_size=inner,
        normalize_top_k=bool(hf.get("norm_topk_prob", True)),
        layers=frozenset(i for i in range(hf["num_hidden_layers"]) if i >= dense_layers and i % every == 0),
        shared_intermediate_size=inner * hf.get("n_shared_experts", 1),
        sigmoid_groups=groups,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)),
        shared_expert_gate=False,
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
