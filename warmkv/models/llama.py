"""The Llama family (Llama, Mistral, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, gpt-oss, DeepSeek-V3) as one
plain module.

Parameter names mirror Hugging Face checkpoints, except that q/k/v and gate/up are each one matmul
(`fuse_checkpoint_weights` concatenates them on load) and experts are stacked per layer. The variants
differ only in flags of ModelConfig: Qwen2's q/k/v bias, Qwen3's per-head q/k RMSNorm, Mistral's sliding
window, the MoE models' expert block in place of the MLP on the layers ModelConfig.moe names, and
gpt-oss's attention sinks and sliding window on every other layer, DeepSeek-V3's latent attention
(warmkv.models.mla) with its router and shared expert.
"""

from __future__ import annotations

import torch
from torch import nn

from warmkv.models.attention import AttentionBatch, paged_attention
from warmkv.models.config import ModelConfig
from warmkv.models.layers import Linear, RMSNorm, rotary_and_store, silu_and_mul
from warmkv.models.mla import MlaAttention, convert_deepseek_weights
from warmkv.models.moe import SparseMoeBlock, convert_gpt_oss_experts, stack_expert_weights
from warmkv.models.rope import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        hidden = config.hidden_size
        # q, k and v as one matmul: checkpoints' separate weights are concatenated on load
        self.qkv_proj = Linear(
            hidden, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=config.qkv_bias
        )
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.window_of(index)
        self.sinks = nn.Parameter(torch.empty(self.num_heads)) if config.attention_sinks else None

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        tokens, q_size, kv_size = (
            x.shape[0],
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        norms = (self.q_norm, self.k_norm) if self.qk_norm else None
        q, k = rotary_and_store(q, k, v, *rotary, kv[0], kv[1], batch.slot_mapping, norms)
        out = paged_attention(q, k, v, kv[0], kv[1], batch, self.scale, self.sliding_window, self.sinks)
        return self.o_proj(out.reshape(tokens, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_up_proj = Linear(hidden, 2 * inner, bias=config.mlp_bias)  # concatenated on load
        self.down_proj = Linear(inner, hidden, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.self_attn = MlaAttention(config) if config.mla else Attention(config, index)
        self.mlp = SparseMoeBlock(config) if config.is_moe_layer(index) else MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        batch: AttentionBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the caller adds them, fused with
        the next norm (which also sums a mixture of experts' k outputs, [tokens, top_k, hidden])."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(h, rotary, kv, batch)
        if isinstance(self.mlp, SparseMoeBlock):  # its router may run the norm in its own product
            return self.mlp.after_norm(h, residual, self.post_attention_layernorm)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope, config.head_dim)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [tokens], the new tokens of every sequence in the batch, flattened
        positions: torch.Tensor,  # [tokens]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # pool K and V: [layers, slots, kv_heads, head_dim]
        # (MLA: K holds the latents, V is empty)
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [tokens, hidden]."""
        x = self.model.embed_tokens(input_ids)
        rotary = self.model.rotary_emb(positions, x.dtype)
        residual = None
        for index, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, rotary, (kv_cache[0][index], kv_cache[1][index]), batch)
        return self.model.norm.add_and_norm(x, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def fuse_checkpoint_weights(weights: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Rename a Hugging Face state dict to this module's, in place: q/k/v and gate/up become one weight
    each (one matmul instead of three and two), per-expert weights one stacked tensor per layer."""
    if config.architecture == "GptOssForCausalLM":
        convert_gpt_oss_experts(weights)
    if config.mla is not None:
        convert_deepseek_weights(weights, config.mla, config.num_heads)
    stack_expert_weights(weights)
    groups = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
              "mlp.shared_expert.gate_up_proj": ("mlp.shared_expert.gate_proj",
                                                 "mlp.shared_expert.up_proj")}  # fmt: skip
    suffix = ".input_layernorm.weight"
    for layer in [name.removesuffix(suffix) for name in weights if name.endswith(suffix)]:
        for fused, parts in groups.items():
            for kind in ("weight", "bias"):
                names = [f"{layer}.{part}.{kind}" for part in parts]
                if all(n in weights for n in names):
                    weights[f"{layer}.{fused}.{kind}"] = torch.cat([weights.pop(n) for n in names])
