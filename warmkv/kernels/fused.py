"""Fused element-wise kernels of the decoder layer (Triton).

A decode step of a 7B model is ~30 layers of small tensors: unfused, each RMSNorm, rotary embedding and
activation is half a dozen kernel launches that cost more than the arithmetic. Each kernel here is one
launch and rounds to the model dtype exactly where the PyTorch reference in warmkv.models.layers does,
so both paths produce the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from warmkv.kernels.dependent_launch import options, wait_for_previous


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, residual stream): the stream is x + residual (or x alone), the norm is of the stream. x is
    [rows, size], or [rows, parts, size] with a residual: the parts are summed first (in float32, rounded
    once, as torch's sum), so a mixture of experts' k outputs need no kernel of their own."""
    rows, size = x.shape[0], x.shape[-1]
    parts = x.shape[1] if x.dim() == 3 else 1
    assert parts == 1 or residual is not None
    out = torch.empty(rows, size, dtype=x.dtype, device=x.device)
    stream = torch.empty_like(out) if residual is not None else x
    pdl, launch = options(x.device)
    _rms_norm_kernel[(rows,)](
        x, residual if residual is not None else x, stream, weight, out, eps,
        x.stride(0), x.stride(1) if parts > 1 else 0, x.stride(0) if residual is None else residual.stride(0),
        stream.stride(0), out.stride(0), size, ADD=residual is not None, PARTS=parts,
        BLOCK=triton.next_power_of_2(size), PDL=pdl, **launch,
    )  # fmt: skip
    return out, stream


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, stream_ptr, weight_ptr, out_ptr, eps,
    stride_x, stride_part, stride_residual, stride_stream, stride_out, size,
    ADD: tl.constexpr, PARTS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)  # rows x top_k x hidden passes 2**31 in a long prefill
    cols = tl.arange(0, BLOCK)
    ok = cols < size
    if PARTS > 1:  # summed in order, in float32, rounded once
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for part in tl.static_range(PARTS):
            total += tl.load(x_ptr + row * stride_x + part * stride_part + cols, mask=ok, other=0.0)
        x = total.to(stream_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if ADD:
        x = added(x, tl.load(residual_ptr + row * stride_residual + cols, mask=ok, other=0.0))
        tl.store(stream_ptr + row * stride_stream + cols, x, mask=ok)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, normalised(x, weight, eps, size), mask=ok)


@triton.jit
def added(x, residual):
    """x + residual in float32, rounded to x's dtype: the residual stream."""
    return (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)


@triton.jit
def normalised(stream, weight, eps, size):
    """One row's RMSNorm (lanes past `size` hold 0) times weight (float32), rounded where transformers
    rounds, in the stream's dtype. Shared with the router's product, which normalises its own input."""
    x32 = stream.to(tl.float32)
    normed = x32 * tl.rsqrt(tl.sum(x32 * x32, 0) / size + eps)
    return (normed.to(stream.dtype).to(tl.float32) * weight).to(stream.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    rows, double = gate_up.shape
    size = double // 2
    out = torch.empty(rows, size, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(size, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), size, BLOCK=block
    )
    return out


@triton.jit
def _silu_and_mul_kernel(in_ptr, out_ptr, stride_in, stride_out, size, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < size
    gate = tl.load(in_ptr + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(in_ptr + row * stride_in + size + cols, mask=ok, other=0.0).to(tl.float32)
    activated = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (activated * up).to(out_ptr.dtype.element_ty), mask=ok)


def rotary_and_store(
    q: torch.Tensor,  # [tokens, heads, head_dim], rotated in place
    k: torch.Tensor,  # [tokens, kv_heads, head_dim], rotated in place
    v: torch.Tensor,
    cos: torch.Tensor,  # [tokens, head_dim] in the model dtype
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [slots, kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [tokens]
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,  # q's and k's RMSNorm weights, eps
) -> None:
    """Rotate q and k (rotate-half layout) and store k and v in their pool slots, in one launch; with
    qk_norm (Qwen3), each head of q and k is RMS-normalised first."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q_weight, k_weight, eps = qk_norm if qk_norm is not None else (q, k, 0.0)
    pdl, launch = options(q.device)
    _rotary_kernel[(tokens, heads + kv_heads)](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping, q_weight, k_weight, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1),
        HEADS=heads, HALF=head_dim // 2, HALF_PAD=triton.next_power_of_2(head_dim // 2),
        QK_NORM=qk_norm is not None, PDL=pdl, **launch,
    )  # fmt: skip


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, q_norm_ptr, k_norm_ptr, eps,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_cos, stride_cache_slot, stride_cache_head,
    HEADS: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, QK_NORM: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous(PDL)
    token = tl.program_id(0)
    head = tl.program_id(1)
    dims = tl.arange(0, HALF_PAD)
    ok = dims < HALF
    dtype = q_ptr.dtype.element_ty
    cos_lo = tl.load(cos_ptr + token * stride_cos + dims, mask=ok).to(tl.float32)
    cos_hi = tl.load(cos_ptr + token * stride_cos + HALF + dims, mask=ok).to(tl.float32)
    sin_lo = tl.load(sin_ptr + token * stride_cos + dims, mask=ok).to(tl.float32)
    sin_hi = tl.load(sin_ptr + token * stride_cos + HALF + dims, mask=ok).to(tl.float32)
    if head < HEADS:
        base = q_ptr + token * stride_q_token + head * stride_q_head
        norm_weight = q_norm_ptr
    else:
        base = k_ptr + token * stride_k_token + (head - HEADS) * stride_k_head
        norm_weight = k_norm_ptr
    lo = tl.load(base + dims, mask=ok, other=0.0).to(tl.float32)
    hi = tl.load(base + HALF + dims, mask=ok, other=0.0).to(tl.float32)
    if QK_NORM:  # RMSNorm of the head, rounded as the rms_norm kernel rounds
        scale = tl.rsqrt((tl.sum(lo * lo, 0) + tl.sum(hi * hi, 0)) / (2 * HALF) + eps)
        weight_lo = tl.load(norm_weight + dims, mask=ok).to(tl.float32)
        weight_hi = tl.load(norm_weight + HALF + dims, mask=ok).to(tl.float32)
        lo = ((lo * scale).to(dtype).to(tl.float32) * weight_lo).to(dtype).to(tl.float32)
        hi = ((hi * scale).to(dtype).to(tl.float32) * weight_hi).to(dtype).to(tl.float32)
    # x * cos + rotate_half(x) * sin, each product and the sum rounded to the model dtype
    new_lo = ((lo * cos_lo).to(dtype).to(tl.float32) + (-hi * sin_lo).to(dtype).to(tl.float32)).to(dtype)
    new_hi = ((hi * cos_hi).to(dtype).to(tl.float32) + (lo * sin_hi).to(dtype).to(tl.float32)).to(dtype)
    tl.store(base + dims, new_lo, mask=ok)
    tl.store(base + HALF + dims, new_hi, mask=ok)
    if head >= HEADS:
        kv_head = head - HEADS
        slot = tl.load(slot_ptr + token).to(tl.int64)
        cache = slot * stride_cache_slot + kv_head * stride_cache_head
        tl.store(k_cache_ptr + cache + dims, new_lo, mask=ok)
        tl.store(k_cache_ptr + cache + HALF + dims, new_hi, mask=ok)
        v_base = v_ptr + token * stride_v_token + kv_head * stride_v_head
        tl.store(v_cache_ptr + cache + dims, tl.load(v_base + dims, mask=ok), mask=ok)
        tl.store(v_cache_ptr + cache + HALF + dims, tl.load(v_base + HALF + dims, mask=ok), mask=ok)
