"""The fused MoE path (expert sorting + Triton grouped GEMMs) gives what the PyTorch expert loop gives.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET): shapes
stay tiny there. On CUDA the same tests run compiled, in bf16 too, and through a captured CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from warmkv.kernels.fused_moe import align_by_expert, fused_experts, products_per_pair, route_top_k
from warmkv.models import mxfp4
from warmkv.models.config import MoeConfig
from warmkv.models.layers import silu_and_mul
from warmkv.models.moe import Experts, experts_reference, route

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _experts(num_experts: int, hidden: int, inner: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gate_up = torch.randn(num_experts, 2 * inner, hidden, device=DEVICE) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inner, device=DEVICE) * inner**-0.5
    return gate_up.to(dtype), down.to(dtype)


def _routed(tokens: int, num_experts: int, top_k: int, hidden: int, dtype: torch.dtype):
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    weights, expert_ids = route(torch.randn(tokens, num_experts, device=DEVICE).to(dtype), top_k, True)
    return x, weights, expert_ids


def test_alignment_puts_each_expert_in_whole_tiles_of_its_own() -> None:
    expert_ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2]], device=DEVICE)
    alignment = align_by_expert(expert_ids, num_experts=5, tile_rows=2)
    pairs = alignment.sorted_pairs.view(-1, 2).cpu()
    experts = alignment.tile_experts.cpu().tolist()
    flat = expert_ids.flatten().cpu()
    # expert 0: pairs 1, 4; 1: pair 3 + padding; 2: pair 7 + padding; 3: pairs 0, 2, 5, 6; 4: none
    assert experts[:5] == [0, 1, 2, 3, 3] and set(experts[5:]) == {-1}
    # within an expert's run the pairs may come in any order (on CUDA, as atomics hand out the rows)
    runs = {0: pairs[0], 1: pairs[1], 2: pairs[2], 3: pairs[3:5].flatten()}
    assert {e: sorted(run.tolist()) for e, run in runs.items()} == {0: [1, 4], 1: [3, 8], 2: [7, 8],
                                                                     3: [0, 2, 5, 6]}  # fmt: skip
    assert (pairs[5:] == flat.numel()).all()  # the worst case's spare tiles: padding
    for tile, expert in enumerate(experts[:5]):
        real = pairs[tile][pairs[tile] < flat.numel()]
        assert (flat[real.long()] == expert).all()


@pytest.mark.parametrize("num_experts", [60, 128])  # Qwen2-MoE's count is not a power of two
def test_alignment_of_many_pairs_holds_each_pair_once_in_a_tile_of_its_expert(num_experts: int) -> None:
    torch.manual_seed(num_experts)
    expert_ids = torch.randint(0, num_experts, (700, 4), device=DEVICE)
    alignment = align_by_expert(expert_ids, num_experts, tile_rows=16)
    pairs, experts = alignment.sorted_pairs.view(-1, 16).cpu(), alignment.tile_experts.cpu()
    flat = expert_ids.flatten().cpu()
    real = pairs[pairs < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))  # each pair exactly once
    for tile, expert in enumerate(experts.tolist()):
        in_tile = pairs[tile][pairs[tile] < flat.numel()].long()
        assert (flat[in_tile] == expert).all() and (expert >= 0 or len(in_tile) == 0)
    used = experts[experts >= 0]
    assert (used[1:] >= used[:-1]).all()  # runs in expert order, so a weight is read by adjacent tiles
    assert set(used.tolist()) == set(flat.tolist())


# a product per pair (decode: 1 and 2 tokens), then sorted into tiles of 16, 32 and 64 rows
@pytest.mark.parametrize(("tokens", "top_k"), [(1, 2), (2, 2), (5, 3), (40, 2), (600, 2)])
def test_fused_experts_match_the_expert_loop_in_float32(tokens: int, top_k: int) -> None:
    torch.manual_seed(tokens)
    gate_up, down = _experts(8, 64, 32, torch.float32)
    x, weights, expert_ids = _routed(tokens, 8, top_k, 64, torch.float32)
    got = fused_experts(x, gate_up, down, weights, expert_ids)
    want = experts_reference(x, gate_up, down, weights, expert_ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 40])  # a product per pair, then sorted
def test_swiglu_in_the_first_gemm_with_biases_unsummed_matches_the_loop(tokens: int) -> None:
    """silu(gate) * up computed in the gate/up GEMM's epilogue, after each half's bias; each token's k
    outputs left unsummed for the residual add."""
    torch.manual_seed(tokens)
    gate_up, down = _experts(8, 64, 32, torch.float32)
    biases = (torch.randn(8, 64, device=DEVICE), torch.randn(8, 64, device=DEVICE))
    x, weights, expert_ids = _routed(tokens, 8, 2, 64, torch.float32)
    got = fused_experts(x, gate_up, down, weights, expert_ids, None, *biases, summed=False)
    want = experts_reference(x, gate_up, down, weights, expert_ids, silu_and_mul, *biases, summed=False)
    assert got.shape == (tokens, 2, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 6])  # a product per pair, then sorted
def test_fused_experts_with_biases_and_clamped_swiglu_match_the_loop(tokens: int) -> None:
    """gpt-oss's experts: a bias on both projections, the clamped SwiGLU, softmax over the top-k."""
    torch.manual_seed(3)
    moe = MoeConfig(8, 2, 32, False, frozenset({0}), biases=True, clamped_swiglu=(1.702, 7.0))
    experts = Experts(64, moe).to(DEVICE)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0.0, 0.5)  # large enough that the clamp at 7 cuts some gate and up values
    x = torch.randn(tokens, 64, device=DEVICE)
    weights, expert_ids = route(torch.randn(tokens, 8, device=DEVICE), 2, False, softmax_over_top_k=True)
    tensors = (experts.gate_up_proj, experts.down_proj, weights, expert_ids, experts.activation,
               experts.gate_up_proj_bias, experts.down_proj_bias)  # fmt: skip
    with torch.no_grad():
        got, want = fused_experts(x, *tensors), experts_reference(x, *tensors)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def _mxfp4_experts(experts: Experts, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Random MXFP4 bytes and scales (about 2 ** -3) into packed Experts; each projection's values."""
    values = {}
    with torch.no_grad():
        for name, (rows, depth) in shapes.items():
            packed, scales = getattr(experts, name), getattr(experts, f"{name}_scales")
            packed.copy_(torch.randint(0, 256, packed.shape, dtype=torch.uint8))
            scales.copy_(torch.randint(122, 126, scales.shape, dtype=torch.uint8))
            pairs = zip(packed, scales, strict=True)
            values[name] = torch.stack([mxfp4.unpack(p, s, torch.float32) for p, s in pairs])
            assert values[name].shape[1:] == (rows, depth)
    return values


# a product per pair (1, 2 tokens), then sorted; the SwiGLU fused into the first GEMM, and gpt-oss's own
@pytest.mark.parametrize("tokens", [1, 2, 6, 40])
@pytest.mark.parametrize("clamped", [False, True])
def test_mxfp4_experts_read_packed_give_what_their_dequantised_values_give(
    tokens: int, clamped: bool
) -> None:
    """The kernels read gpt-oss's MXFP4 bytes and scales and multiply by the values they stand for: what
    the same kernels give over the dequantised weights, within float32 rounding (a decoded step may be
    summed in another order); the PyTorch reference over the packed weights is the reference over the
    dequantised ones, exactly."""
    torch.manual_seed(tokens)
    moe = MoeConfig(8, 2, 96, False, frozenset({0}), biases=True, mxfp4=True,
                    clamped_swiglu=(1.702, 7.0) if clamped else None)  # fmt: skip
    experts = Experts(64, moe).to(DEVICE)
    values = _mxfp4_experts(experts, {"gate_up_proj": (192, 64), "down_proj": (64, 96)})
    with torch.no_grad():
        experts.gate_up_proj_bias.normal_()
        experts.down_proj_bias.normal_()
    x, weights, expert_ids = _routed(tokens, 8, 2, 64, torch.float32)
    biases = (experts.gate_up_proj_bias, experts.down_proj_bias)
    scales = (experts.gate_up_proj_scales, experts.down_proj_scales)
    dense = (values["gate_up_proj"], values["down_proj"], weights, expert_ids)
    packed = (experts.gate_up_proj, experts.down_proj, weights, expert_ids)
    activation = experts.activation if clamped else None
    with torch.no_grad():
        got = fused_experts(x, *packed, activation, *biases, scales=scales)
        want = fused_experts(x, *dense, activation, *biases)
        reference = experts_reference(x, *dense, experts.activation, *biases)
        packed_reference = experts_reference(x, *packed, experts.activation, *biases, scales=scales)
        module = experts(x, weights, expert_ids)  # the kernels on CUDA, the packed reference elsewhere
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-5)
    assert torch.equal(packed_reference, reference)
    assert torch.equal(module, got if CUDA else packed_reference)


def test_pairs_are_products_of_their_own_only_while_few_experts_are_chosen_twice() -> None:
    assert products_per_pair(1, 8, 128) and products_per_pair(8, 8, 128)  # Qwen3-30B-A3B's decode
    assert not products_per_pair(9, 8, 128)  # past 64 pairs
    assert products_per_pair(4, 4, 32) and not products_per_pair(8, 4, 32)  # gpt-oss-20b: 1.21, 1.52
    for tokens, top_k in [(1, 2), (2, 2), (5, 3), (6, 2)]:  # the tests here: each way is run
        assert products_per_pair(tokens, top_k, 8) == (tokens <= 2)


# Qwen3-MoE (renormalised), Qwen2-MoE (not), gpt-oss (softmax over the top-k logits)
ROUTINGS = [(True, False), (False, False), (False, True)]


@pytest.mark.parametrize(("normalize", "softmax_over_top_k"), ROUTINGS)
def test_router_kernel_matches_the_pytorch_steps(normalize: bool, softmax_over_top_k: bool) -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, 12, device=DEVICE) * 3  # 12 experts, top 3: both padded to a power of two
    weights, expert_ids = route_top_k(logits, 3, renormalize=normalize or softmax_over_top_k)
    want_weights, want_ids = route(logits.cpu(), 3, normalize, softmax_over_top_k)
    assert expert_ids.dtype == torch.int64 and expert_ids.cpu().tolist() == want_ids.tolist()
    torch.testing.assert_close(weights.cpu(), want_weights, atol=1e-6, rtol=1e-6)


def test_router_kernel_gives_ties_to_the_lower_expert() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]], device=DEVICE)
    weights, expert_ids = route_top_k(logits, 2, renormalize=True)
    assert expert_ids.cpu().tolist() == [[1, 2]]
    assert weights.cpu().tolist() == [[0.5, 0.5]]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("normalize", "softmax_over_top_k"), ROUTINGS)
def test_router_kernel_in_bfloat16_at_qwen3_moe_shape(normalize: bool, softmax_over_top_k: bool) -> None:
    """128 experts, top 8, bf16 logits (distinct: bf16 ties would leave the order to each top-k)."""
    logits = torch.stack([torch.randperm(128) for _ in range(33)]).to(DEVICE, torch.bfloat16) / 16
    weights, expert_ids = route(logits, 8, normalize, softmax_over_top_k)  # the kernel, on CUDA
    want_weights, want_ids = route(logits.cpu(), 8, normalize, softmax_over_top_k)
    assert expert_ids.cpu().tolist() == want_ids.tolist()
    torch.testing.assert_close(weights.cpu(), want_weights, atol=0, rtol=2**-7)  # one bf16 rounding


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 2, 7, 300, 3000])
def test_fused_experts_match_the_expert_loop_in_bfloat16(tokens: int) -> None:
    """Qwen3-30B-A3B's expert shape; bf16 sums the k experts in another order than the loop, so the
    tolerance is a few bf16 ulps of the output."""
    torch.manual_seed(tokens)
    gate_up, down = _experts(128, 2048, 768, torch.bfloat16)
    x, weights, expert_ids = _routed(tokens, 128, 8, 2048, torch.bfloat16)
    got = fused_experts(x, gate_up, down, weights, expert_ids).float()
    want = experts_reference(x, gate_up, down, weights, expert_ids).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 2, 20])  # a product per pair, then sorted
def test_fused_experts_replay_in_a_cuda_graph_with_new_routing(tokens: int) -> None:
    """Decode graphs capture the sorting and both GEMMs once; a replay with other experts chosen gives
    the eager result for those experts."""
    torch.manual_seed(0)
    gate_up, down = _experts(16, 256, 128, torch.float32)
    x, weights, expert_ids = _routed(tokens, 16, 4, 256, torch.float32)
    static = [x.clone(), weights.clone(), expert_ids.clone()]
    fused_experts(*static[:1], gate_up, down, *static[1:])  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(static[0], gate_up, down, static[1], static[2])
    x2, weights2, expert_ids2 = _routed(tokens, 16, 4, 256, torch.float32)
    for target, value in zip(static, (x2, weights2, expert_ids2), strict=True):
        target.copy_(value)
    graph.replay()
    torch.testing.assert_close(out, experts_reference(x2, gate_up, down, weights2, expert_ids2))
