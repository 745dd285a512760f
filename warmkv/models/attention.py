"""Attention over the paged KV pool, after this step's K/V are stored in their slots.

On CUDA a Triton kernel reads every sequence's context through its block table. Elsewhere (and for a
single fresh prompt, which needs no pool reads) PyTorch's fused attention runs per sequence on the
context gathered out of the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from warmkv.models.layers import TRITON

if TRITON:
    from warmkv.kernels import paged_attention as kernel
    from warmkv.kernels.paged_attention import PagedBatch
else:
    PagedBatch = None  # type: ignore[assignment,misc]


@dataclass(slots=True)
class SequenceSlice:
    """One sequence's share of a batched forward pass, for the PyTorch path."""

    query_start: int  # first row of this sequence in the flattened batch
    query_len: int  # new tokens computed this step
    context_slots: torch.Tensor  # [context_len] pool slots of every token attended to, new ones included
    is_whole: bool  # the context is exactly this step's tokens: attend to them directly, causally
    # built on first use per sliding window (None: full attention), shared by the layers using it
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """[query_len, context_len] bool, None when no masking is needed."""
        if sliding_window not in self._masks:
            context_len = self.context_slots.shape[0]
            windowed = sliding_window is not None and context_len > sliding_window
            self._masks[sliding_window] = (
                build_mask(self.query_len, context_len, sliding_window, self.context_slots.device)
                if not self.is_whole or windowed
                else None
            )
        return self._masks[sliding_window]


@dataclass(slots=True)
class AttentionBatch:
    slot_mapping: torch.Tensor  # [tokens]: where each new token's K/V is stored
    sequences: list[SequenceSlice]  # the PyTorch path's view of the batch
    paged: PagedBatch | None = None  # the kernel's view; set on CUDA unless the batch is one fresh prompt
    per_step: dict[str, Any] = field(default_factory=dict)  # what the first layer builds for all of them


def build_mask(
    query_len: int, context_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Causal mask for queries that are the last `query_len` positions of a `context_len` context."""
    if query_len == 1 and (sliding_window is None or context_len <= sliding_window):
        return None
    query_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]
    key_pos = torch.arange(context_len, device=device)[None, :]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask


def paged_attention(
    q: torch.Tensor,  # [tokens, heads, head_dim]
    k: torch.Tensor,  # [tokens, kv_heads, head_dim], already stored in the pool
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [slots, kv_heads, head_dim] of one layer
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None,
    sinks: torch.Tensor | None = None,  # [heads]: a logit per head that joins each softmax's denominator
) -> torch.Tensor:
    if batch.paged is not None:
        return kernel.paged_attention(q, k_cache, v_cache, batch.paged, scale, sliding_window, sinks)
    if len(batch.sequences) == 1 and batch.sequences[0].is_whole:
        return attend(q, k, v, batch.sequences[0], scale, sliding_window, sinks)
    out = torch.empty_like(q)
    for seq in batch.sequences:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        context = k_cache[seq.context_slots], v_cache[seq.context_slots]
        out[rows] = attend(q[rows], *context, seq, scale, sliding_window, sinks)
    return out


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq: SequenceSlice,
    scale: float,
    sliding_window: int | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """One sequence's queries over its context's K and V, [queries, heads, v_head_dim]."""
    mask = seq.mask(sliding_window)
    if sinks is not None:
        return _attend_with_sinks(q, k, v, mask, seq.query_len, scale, sinks)
    causal = seq.is_whole and mask is None and seq.query_len > 1
    # [1, heads, tokens, head_dim]: the fused CPU and CUDA kernels want the batch dimension
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=None if causal else mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def _attend_with_sinks(
    q: torch.Tensor,  # [queries, heads, head_dim]
    k: torch.Tensor,  # [keys, kv_heads, head_dim]
    v: torch.Tensor,
    mask: torch.Tensor | None,
    query_len: int,
    scale: float,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """Attention whose softmax has one more logit per head, the sink, with no value: transformers' eager
    gpt-oss attention (PyTorch's fused attention takes no sink)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if mask is None and query_len > 1:  # a whole prompt: causal
        mask = build_mask(query_len, k.shape[0], None, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype)[:, None, None].expand(-1, query_len, 1)
    logits = torch.cat((scores, sink), dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return torch.einsum("hqk,khd->qhd", probs.to(v.dtype), v)
