"""Attention over the paged KV pool, after this step's K/V are stored in their slots.

On CUDA a Triton kernel reads every sequence's context through its block table. Elsewhere (and for a
single fresh prompt, which needs no pool reads) PyTorch's fused attention runs per sequence on the
context gathered out of the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    mask: torch.Tensor | None  # [query_len, context_len] bool, None when no masking is needed
    is_whole: bool  # the context is exactly this step's tokens: attend to them directly, causally


@dataclass(slots=True)
class AttentionBatch:
    slot_mapping: torch.Tensor  # [tokens]: where each new token's K/V is stored
    sequences: list[SequenceSlice]  # the PyTorch path's view of the batch
    paged: PagedBatch | None = None  # the kernel's view; set on CUDA unless the batch is one fresh prompt


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
) -> torch.Tensor:
    if batch.paged is not None:
        return kernel.paged_attention(q, k_cache, v_cache, batch.paged, scale, sliding_window)
    if len(batch.sequences) == 1 and batch.sequences[0].is_whole:
        return _attend(q, k, v, batch.sequences[0], scale)
    out = torch.empty_like(q)
    for seq in batch.sequences:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        out[rows] = _attend(q[rows], k_cache[seq.context_slots], v_cache[seq.context_slots], seq, scale)
    return out


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: SequenceSlice, scale: float
) -> torch.Tensor:
    causal = seq.is_whole and seq.mask is None and seq.query_len > 1
    # [1, heads, tokens, head_dim]: the fused CPU and CUDA kernels want the batch dimension
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=None if causal else seq.mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)
