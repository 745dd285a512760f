"""DeepSeek's multi-head latent attention (MLA) over the paged pool, which keeps the compressed latent.

Per token and layer the pool holds kv_lora_rank normalised latent values c_kv, then the rotated key part
k_pe shared by all heads: 576 values for DeepSeek-V2/V3 shapes, against heads x (qk + v) for K and V
expanded (5120 for V2-Lite's 16 heads, 40960 for V3's 128). Every cache tier stores the same.
Attention reads it in one of two equivalent ways:

- expanded (prefill): K and V of every head are projected out of the context's latents by kv_b_proj,
  and the heads attend as in multi-head attention (transformers' computation);
- absorbed (decode, and other steps of few tokens): W_UK, the key half of kv_b_proj, is folded into
  each head's query, so queries score the latents directly, one shared "head" of the latent width for
  all query heads; the attended latent goes out through W_UV, the value half. A decode step then reads
  only the cached latents, not a projection of them per head.

Checkpoints lay the rotary pairs out interleaved, (x0, x1), (x2, x3), ...; `convert_deepseek_weights`
permutes the rows of the projections that produce them on load, so the rotate-half rotary of
`layers.rotate` gives transformers' numbers (q_pe and k_pe are permuted alike, so their dot products are
unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from warmkv.errors import ModelLoadError
from warmkv.models.attention import AttentionBatch, SequenceSlice, attend, build_mask
from warmkv.models.config import MlaConfig, ModelConfig
from warmkv.models.layers import Linear, RMSNorm, rotate
from warmkv.models.rope import yarn_mscale
from warmkv.uploads import to_device

LATENT_NORM_EPS = 1e-6  # the q and kv latent norms use RMSNorm's default, not the config's rms_norm_eps


class MlaAttention(nn.Module):
    # None: the cheaper path for each sequence's step (`absorbed_below`); True / False: that path for every
    # step (tests compare the two ways)
    absorbed: bool | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        mla = config.mla
        assert mla is not None
        self.mla, self.num_heads = mla, config.num_heads
        hidden, heads = config.hidden_size, config.num_heads
        qk_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        self.q_proj: Linear | None = None
        if mla.q_lora_rank is None:
            self.q_proj = Linear(hidden, heads * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(hidden, mla.q_lora_rank, bias=config.qkv_bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(mla.q_lora_rank, heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, mla.latent_dim, bias=config.qkv_bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        kv_dims = mla.qk_nope_head_dim + mla.v_head_dim
        self.kv_b_proj = Linear(mla.kv_lora_rank, heads * kv_dims, bias=False)
        self.o_proj = Linear(heads * mla.v_head_dim, hidden, bias=config.o_bias)
        self.scale = softmax_scale(config)
        # per query, key and head the absorbed path costs 2 * kv_lora_rank + rope multiply-adds against
        # qk + v expanded, but it spares expanding every context token (kv_lora_rank * (nope + v) per
        # head): it is the cheaper one for steps of fewer queries than this (170 for DeepSeek-V2/V3 sizes)
        extra_per_query = 2 * mla.kv_lora_rank + mla.qk_rope_head_dim - qk_dim - mla.v_head_dim
        self.absorbed_below = mla.kv_lora_rank * kv_dims / max(extra_per_query, 1)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],  # the pool's latents [slots, 1, latent_dim]; no V
        batch: AttentionBatch,
    ) -> torch.Tensor:
        mla, tokens = self.mla, x.shape[0]
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(tokens, self.num_heads, -1)
        q_nope, q_pe = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        q_pe = rotate(q_pe, *rotary)
        latent = torch.cat((self.kv_a_layernorm(c_kv), rotate(k_pe[:, None], *rotary)[:, 0]), dim=-1)
        kv[0][batch.slot_mapping] = latent[:, None]
        assert batch.paged is None, "MLA attends over its latents in PyTorch: the runner plans no kernel"
        out = q.new_empty(tokens, self.num_heads, mla.v_head_dim)
        decoding = [seq for seq in batch.sequences if seq.query_len == 1 and self._takes_absorbed(seq)]
        batched = {id(seq) for seq in decoding} if len(decoding) > 1 else set()
        if batched:  # the batch's decode steps in one attention, over their padded contexts
            rows, slots, key_ok = batch.per_step.get("latent_decode") or _decode_table(decoding, x.device)
            batch.per_step["latent_decode"] = rows, slots, key_ok  # the same for every layer
            latents = kv[0][slots, 0]
            out[rows] = self._absorbed(q_nope[rows, None], q_pe[rows, None], latents, key_ok[:, None])[:, 0]
        for seq in batch.sequences:
            if id(seq) in batched:
                continue
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            context = latent[rows] if seq.is_whole else kv[0][seq.context_slots, 0]
            if not self._takes_absorbed(seq):
                out[rows] = self._expanded(q_nope[rows], q_pe[rows], context, seq)
                continue
            visible = seq.mask(None)
            if visible is None and seq.query_len > 1:
                visible = build_mask(seq.query_len, context.shape[0], None, x.device)
            visible = None if visible is None else visible[None]
            out[rows] = self._absorbed(q_nope[None, rows], q_pe[None, rows], context[None], visible)[0]
        return self.o_proj(out.flatten(1))

    def _takes_absorbed(self, seq: SequenceSlice) -> bool:
        return self.absorbed if self.absorbed is not None else seq.query_len < self.absorbed_below

    def _expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, context: torch.Tensor, seq: SequenceSlice
    ) -> torch.Tensor:
        """[queries, heads, v_head_dim]: every head's K and V projected out of the context's latents."""
        mla = self.mla
        c_kv, k_pe = context.split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(context.shape[0], self.num_heads, -1)
        k_nope, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None].expand(-1, self.num_heads, -1)), dim=-1)
        return attend(torch.cat((q_nope, q_pe), dim=-1), k, v, seq, self.scale, None, None)

    def _absorbed(
        self,
        q_nope: torch.Tensor,  # [seqs, queries, heads, nope]
        q_pe: torch.Tensor,  # [seqs, queries, heads, rope]
        latents: torch.Tensor,  # [seqs, keys, latent_dim]
        visible: torch.Tensor | None,  # [seqs, queries or 1, keys] bool; None: every key
    ) -> torch.Tensor:
        """[seqs, queries, heads, v_head_dim]: the queries, with W_UK folded in, score the latents."""
        mla, (seqs, queries, heads, _) = self.mla, q_nope.shape
        w_kv = self.kv_b_proj.weight.view(heads, -1, mla.kv_lora_rank)
        w_uk, w_uv = w_kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=1)
        q = torch.cat((torch.einsum("sqhn,hnc->sqhc", q_nope, w_uk), q_pe), dim=-1)
        # every head attends to the same keys: one single-head attention whose rows are queries x heads
        latent_out = F.scaled_dot_product_attention(
            q.view(seqs, 1, queries * heads, -1),
            latents[:, None],
            latents[:, None, :, : mla.kv_lora_rank],
            attn_mask=None if visible is None else visible.repeat_interleave(heads, dim=1)[:, None],
            scale=self.scale,
        )
        return torch.einsum("sqhc,hvc->sqhv", latent_out.reshape(seqs, queries, heads, -1), w_uv)


def _decode_table(
    decoding: list[SequenceSlice], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of these one-token steps in the batch, their context slots padded to the longest [seqs, keys],
    and which of those are real keys."""
    width = max(seq.context_slots.shape[0] for seq in decoding)
    slots = torch.zeros(len(decoding), width, dtype=torch.long, device=device)
    key_ok = torch.zeros(len(decoding), width, dtype=torch.bool, device=device)
    for row, seq in enumerate(decoding):
        slots[row, : seq.context_slots.shape[0]] = seq.context_slots
        key_ok[row, : seq.context_slots.shape[0]] = True
    rows = to_device(torch.tensor([seq.query_start for seq in decoding]), device)
    return rows, slots, key_ok


def softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(qk head dim), times YaRN's mscale(factor, mscale_all_dim) squared where the rope sets it."""
    assert config.mla is not None
    scale = (config.mla.qk_nope_head_dim + config.mla.qk_rope_head_dim) ** -0.5
    rope = config.rope
    if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
        scale *= yarn_mscale(float(rope["factor"]), float(rope["mscale_all_dim"])) ** 2
    return scale


def convert_deepseek_weights(weights: dict[str, torch.Tensor], mla: MlaConfig, heads: int) -> None:
    """A DeepSeek-V3 checkpoint in our names, in place: the shared experts as `mlp.shared_expert`, and
    the rotary rows of q and of the latent projection de-interleaved (module docstring)."""
    if any(name.endswith("weight_scale_inv") for name in weights):
        raise ModelLoadError(
            "FP8 block-quantised DeepSeek weights (weight_scale_inv) are not supported; use a bf16 checkpoint"
        )
    for name in [n for n in weights if ".mlp.shared_experts." in n]:
        weights[name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")] = weights.pop(name)
    if not mla.interleaved_rope:
        return
    rope, qk_dim = mla.qk_rope_head_dim, mla.qk_nope_head_dim + mla.qk_rope_head_dim
    order = torch.cat((torch.arange(0, rope, 2), torch.arange(1, rope, 2)))
    for name in list(weights):
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            per_head = weights[name].reshape(heads, qk_dim, -1)
            rotary = per_head[:, mla.qk_nope_head_dim :][:, order]
            weights[name] = torch.cat((per_head[:, : mla.qk_nope_head_dim], rotary), dim=1).flatten(0, 1)
        elif name.endswith(("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa.bias")):
            latent, rotary = weights[name].split([mla.kv_lora_rank, rope])
            weights[name] = torch.cat((latent, rotary[order]))
