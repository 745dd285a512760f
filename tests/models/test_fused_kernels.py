"""The fused Triton kernels give the same bits as the PyTorch reference they replace on CUDA.

Without CUDA they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from warmkv.kernels import fused
from warmkv.models import layers

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]  # the interpreter has no bfloat16


def reference(function, *args):
    """The PyTorch path of a layers function, on the CPU whatever the device."""
    on_cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    return function(*on_cpu)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_residual(dtype: torch.dtype) -> None:
    x = torch.randn(5, 200, dtype=dtype, device=DEVICE) * 3
    residual = torch.randn_like(x)
    weight = torch.randn(200, dtype=dtype, device=DEVICE)
    for extra in (None, residual):
        got = fused.rms_norm(x, weight, 1e-6, extra)
        want = reference(layers.rms_norm, x, weight, 1e-6, extra)
        torch.testing.assert_close(got[1].cpu(), want[1], atol=0, rtol=0)  # the stream: one rounding
        torch.testing.assert_close(
            got[0].cpu(), want[0], atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 1e-2
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_and_norm_sums_the_parts_of_a_mixture_of_experts_first(dtype: torch.dtype) -> None:
    parts = torch.randn(5, 8, 200, dtype=dtype, device=DEVICE)  # a token's 8 experts' outputs
    residual = torch.randn(5, 200, dtype=dtype, device=DEVICE)
    weight = torch.randn(200, dtype=dtype, device=DEVICE)
    got = fused.rms_norm(parts, weight, 1e-6, residual)
    want = reference(layers.rms_norm, parts.sum(dim=1), weight, 1e-6, residual)  # what summing first gives
    # the sum's order is torch's own (pairwise on the CPU): float32 ulps apart, at most one rounding of bf16
    stream = (1e-6, 0.0) if dtype == torch.float32 else (1e-2, 2**-7)
    torch.testing.assert_close(got[1].cpu(), want[1], atol=stream[0], rtol=stream[1])
    torch.testing.assert_close(
        got[0].cpu(), want[0], atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 1e-2
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    gate_up = torch.randn(3, 2 * 1500, dtype=dtype, device=DEVICE) * 4
    got = fused.silu_and_mul(gate_up)
    torch.testing.assert_close(got.cpu(), reference(layers.silu_and_mul, gate_up), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])  # Qwen3 normalises each head of q and k first
def test_rotary_rotates_q_and_k_and_stores_k_and_v_in_their_slots(dtype: torch.dtype, qk_norm: bool) -> None:
    tokens, heads, kv_heads, head_dim = 4, 6, 2, 32
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split(sizes, dim=-1))  # strided views
    angles = torch.rand(tokens, head_dim // 2, device=DEVICE) * 50
    cos, sin = (torch.cat((f(angles), f(angles)), -1).to(dtype) for f in (torch.cos, torch.sin))
    slots = torch.tensor([7, 2, 9, 0], device=DEVICE)
    caches = [torch.zeros(12, kv_heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(2)]
    want_caches = [torch.zeros(12, kv_heads, head_dim, dtype=dtype) for _ in range(2)]
    norms = None
    if qk_norm:
        norms = (layers.RMSNorm(head_dim, 1e-6).to(dtype), layers.RMSNorm(head_dim, 1e-6).to(dtype))
        with torch.no_grad():
            for norm in norms:
                norm.weight.uniform_(0.5, 2.0)
    want_q, want_k = reference(
        layers.rotary_and_store, q.clone() * 3, k.clone() * 3, v, cos, sin, *want_caches, slots, norms
    )
    q.mul_(3), k.mul_(3)  # the norm must undo the scale
    weights = (norms[0].weight.to(DEVICE), norms[1].weight.to(DEVICE), 1e-6) if norms else None
    fused.rotary_and_store(q, k, v, cos, sin, *caches, slots, weights)
    # within one rounding of the dtype: the GPU may fuse a multiply-add the reference rounds twice
    exact = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2**-5, "rtol": 2**-7}
    torch.testing.assert_close(q.cpu(), want_q, **exact)
    torch.testing.assert_close(k.cpu(), want_k, **exact)
    for got, want in zip(caches, want_caches, strict=True):
        torch.testing.assert_close(got.cpu(), want, **exact)
    assert caches[0][[1, 3]].abs().sum() == 0  # slots no token maps to are untouched
