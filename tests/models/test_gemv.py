"""The matrix-vector kernel (decode's linear layers at one row, and each (token, expert) pair of a
mixture of experts) gives what F.linear gives.

Without CUDA it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET): shapes stay
small there, with launches that leave partial column blocks and reduction steps. On CUDA the same tests
run compiled, and in bf16 at Qwen3-30B-A3B's shapes against cuBLAS.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from warmkv.kernels import fused
from warmkv.kernels.gemv import GemvLaunch, gemv, norm_and_gemv
from warmkv.models import layers

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# 4 columns a program over 37 of them, 32 of a depth of 100: the last block and the last step are partial
SMALL = GemvLaunch(cols=4, depth=32, num_warps=4)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_f_linear_in_float32(rows: int, with_bias: bool) -> None:
    torch.manual_seed(rows)
    x = torch.randn(rows, 100, device=DEVICE)
    weight = torch.randn(37, 100, device=DEVICE)
    bias = torch.randn(37, device=DEVICE) if with_bias else None
    got = gemv(x, weight, bias, launch=SMALL)
    assert got.shape == (rows, 37)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


def test_each_pair_multiplies_its_token_by_its_expert_with_swiglu_and_router_weight() -> None:
    """Pair p reads token p // 2's row and expert_ids[p]'s weight: [gate | up] rows give silu(gate) * up,
    the router weight scales the output."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, device=DEVICE)
    experts = torch.randn(5, 2 * 24, 64, device=DEVICE)
    bias = torch.randn(5, 2 * 24, device=DEVICE)
    expert_ids = torch.tensor([4, 1, 1, 0], device=DEVICE)
    router = torch.tensor([0.5, 2.0, 1.0, -1.0], device=DEVICE)
    got = gemv(x, experts, bias, expert_ids, 2, router, swiglu=True, launch=SMALL)
    for pair, expert in enumerate(expert_ids.tolist()):
        gate, up = F.linear(x[pair // 2], experts[expert], bias[expert]).chunk(2)
        torch.testing.assert_close(got[pair], F.silu(gate) * up * router[pair], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if CUDA else [torch.float32])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])  # gpt-oss's router has one
def test_router_product_that_normalises_its_input_gives_the_bits_of_norm_then_product(
    rows: int, with_bias: bool, dtype: torch.dtype
) -> None:
    """norm_and_gemv adds the residual and normalises the row in each program, then multiplies: the
    router's logits, the normalised row and the residual stream have the bits of the rms_norm kernel
    followed by the product (the interpreter has no bfloat16: that runs on CUDA)."""
    torch.manual_seed(rows)
    x, residual = (torch.randn(rows, 100, device=DEVICE).to(dtype) * 3 for _ in range(2))
    norm_weight = torch.randn(100, device=DEVICE).to(dtype)
    weight = torch.randn(37, 100, device=DEVICE).to(dtype)
    bias = torch.randn(37, device=DEVICE).to(dtype) if with_bias else None
    logits, normed, stream = norm_and_gemv(x, residual, norm_weight, 1e-6, weight, bias)
    want_normed, want_stream = fused.rms_norm(x, norm_weight, 1e-6, residual)
    for got, want in (
        (stream, want_stream),
        (normed, want_normed),
        (logits, gemv(want_normed, weight, bias)),
    ):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("cols", "depth"), [(5120, 2048), (2048, 4096), (128, 2048), (151936, 2048)])
def test_one_row_linear_layers_at_qwen3_moe_shapes_match_cublas_in_bfloat16(
    cols: int, depth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """q/k/v, o, the router and the LM head at one token: `Linear` takes the kernel there, within bf16
    rounding of cuBLAS (both sum in float32, in other orders). The LM head's 75,968 column blocks pass
    the grid's second axis limit (65,535): they go on the first."""
    torch.manual_seed(cols)
    layer = layers.Linear(depth, cols, bias=False).to(DEVICE, torch.bfloat16)
    x = torch.randn(1, depth, device=DEVICE, dtype=torch.bfloat16)
    calls = []
    monkeypatch.setattr(layers.gemv, "gemv", lambda *args: calls.append(args) or gemv(*args))
    got, want = layer(x).float(), F.linear(x, layer.weight).float()
    assert len(calls) == 1  # the kernel, not F.linear compared with itself
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert ((got - want).norm() / want.norm()).item() < 5e-3
