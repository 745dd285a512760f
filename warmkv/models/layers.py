"""The decoder layer's element-wise steps: PyTorch on any device, one fused Triton kernel each on CUDA.

The PyTorch versions are the reference (they round where transformers rounds); the kernels in
warmkv.kernels.fused match them and are what CUDA runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from warmkv.kernels import fused, gemv
except ImportError:  # no Triton (CPU-only installs): PyTorch everywhere
    fused = gemv = None  # type: ignore[assignment]

# token rows up to which a linear layer on CUDA is a matrix-vector product per row
# (warmkv.kernels.gemv) rather than cuBLAS's GEMM: at 2 and 4 rows it is slower (`python -m bench.gemv`)
GEMV_ROWS_MAX = 1
# token rows up to which a router's product normalises its own input (norm_and_linear): the experts' products
# take the matrix-vector kernel up to 8 tokens too, where few experts are chosen twice
# (warmkv.kernels.fused_moe.products_per_pair)
NORM_AND_GEMV_ROWS_MAX = 8


TRITON = fused is not None


def has_kernels(device: torch.device) -> bool:
    return TRITON and device.type == "cuda"


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, residual stream): the stream is x + residual, or x when there is no residual yet."""
    if has_kernels(x.device) and x.dim() == 2:
        return fused.rms_norm(x, weight, eps, residual)
    stream = x if residual is None else x + residual
    # normalise in float32, scale in the input dtype: the order transformers uses
    x32 = stream.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype), stream


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)[0]

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm of x + residual, x + residual) in one pass. x may be [tokens, parts, hidden] (the k outputs
        of a mixture of experts): its parts are summed first, in float32 rounded once as torch sums."""
        if x.dim() == 3 and has_kernels(x.device):
            return fused.rms_norm(x, self.weight, self.eps, residual)
        return rms_norm(x.sum(dim=1) if x.dim() == 3 else x, self.weight, self.eps, residual)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias): F.linear, or on CUDA at one row the matrix-vector kernel, which reads the
    weight before the previous kernel has finished: a weight is a parameter, never written during a step."""
    one_row = x.dim() == 2 and x.shape[0] <= GEMV_ROWS_MAX
    if has_kernels(x.device) and one_row and x.stride(-1) == 1 and weight.stride(-1) == 1:
        return gemv.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def norm_and_linear(
    x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h @ weight.T + bias, h, x + residual) where h = norm(x + residual): on CUDA at a few rows one kernel
    (the residual add and norm run in every program of the product), for a small weight such as a
    router's, whose programs all read the whole row anyway; elsewhere add_and_norm, then `linear`."""
    few_rows = x.dim() == 2 and x.shape[0] <= NORM_AND_GEMV_ROWS_MAX and gemv is not None
    if has_kernels(x.device) and few_rows and x.is_contiguous() and residual.is_contiguous() \
            and weight.stride(-1) == 1 and gemv.depth_fits(x.shape[1]):  # fmt: skip
        return gemv.norm_and_gemv(x, residual, norm.weight, norm.eps, weight, bias)
    h, stream = norm.add_and_norm(x, residual)
    return linear(h, weight, bias), h, stream


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if has_kernels(gate_up.device):
        return fused.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_and_store(
    q: torch.Tensor,  # [tokens, heads, head_dim]
    k: torch.Tensor,  # [tokens, kv_heads, head_dim]
    v: torch.Tensor,
    cos: torch.Tensor,  # [tokens, head_dim]
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [slots, kv_heads, head_dim] of one layer
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [tokens]
    qk_norm: tuple[RMSNorm, RMSNorm] | None = None,  # per-head norms of q and k (Qwen3), before rotating
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated q and k; the rotated k and v are stored in their pool slots."""
    if has_kernels(q.device):
        norms = (qk_norm[0].weight, qk_norm[1].weight, qk_norm[0].eps) if qk_norm else None
        fused.rotary_and_store(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, norms)
        return q, k
    if qk_norm is not None:
        q, k = qk_norm[0](q), qk_norm[1](k)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k_cache[slot_mapping] = k
    v_cache[slot_mapping] = v
    return q, k


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout: x [tokens, heads, dim], cos and sin [tokens, dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]
