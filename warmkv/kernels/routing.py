"""A softmax router's top-k choice (Triton): which k experts each token goes to, and their weights.

One kernel (`route_top_k`) turns a batch's router logits into weights and expert ids: in PyTorch the
softmax, top-k and renormalisation are half a dozen. The choice itself (`top_k_weights`) is a jit
function that other kernels call too: at decode the experts' matrix-vector products take each pair's
expert and weight straight from the logits (`RouterLogits`), and no routing kernel runs between the
router's product and theirs. Every program of theirs recomputes the choice of its token: k rounds of a
max over a few hundred logits, a small fraction of a microsecond, against a kernel launch that waited
for the router and made the experts wait for it (2.6 us a layer on the critical path of Qwen3-30B-A3B's
batch-1 step on an H100, a kernel profile of graph replays).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from warmkv.kernels.dependent_launch import options, wait_for_previous


@dataclass(slots=True, frozen=True)
class RouterLogits:
    """A softmax router's output before its top-k: the kernels that need the choice make it themselves."""

    logits: torch.Tensor  # [tokens, experts] in the model dtype
    top_k: int
    renormalize: bool  # weights softmaxed over the chosen k (or gpt-oss's softmax over top-k logits)

    def chosen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights in the logits' dtype, int64 expert ids), each [tokens, top_k]."""
        return route_top_k(self.logits, self.top_k, self.renormalize)


def route_top_k(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights in the logits' dtype, int64 expert ids), each [tokens, top_k], in one launch: the k largest
    logits, weighted by their softmax over all experts, or over the chosen k when `renormalize` (which
    is also gpt-oss's softmax over the top-k logits). Ties go to the lower expert id."""
    tokens, experts = logits.shape
    weights = torch.empty(tokens, top_k, dtype=logits.dtype, device=logits.device)
    expert_ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    pdl, launch = options(logits.device)
    _route_kernel[(tokens,)](
        logits, weights, expert_ids, logits.stride(0), experts,
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK=triton.next_power_of_2(experts),
        RENORMALIZE=renormalize, PDL=pdl, **launch,
    )  # fmt: skip
    return weights, expert_ids


@triton.jit
def top_k_weights(
    logits_row_ptr, experts, TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):  # fmt: skip
    """(float32 weights [K_PAD], int64 expert ids [K_PAD]) of one token's row of logits; slots past TOP_K
    hold weight 0. The weights are to be rounded to the logits' dtype, as route_top_k stores them."""
    cols = tl.arange(0, BLOCK)
    logits = tl.load(logits_row_ptr + cols, mask=cols < experts, other=float("-inf")).to(tl.float32)
    biggest = tl.max(logits, 0)
    total = tl.sum(tl.exp(logits - biggest), 0)
    # one max a round over keys that order as the logits do, the lower expert first among equals: the
    # float's bits made monotonic as an integer, above the complement of the expert id
    bits = logits.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    keys = (ordered << 32) | (BLOCK - 1 - cols).to(tl.int64)
    slots = tl.arange(0, K_PAD)
    top = tl.full((K_PAD,), float("-inf"), tl.float32)
    ids = tl.zeros((K_PAD,), tl.int64)
    for k in tl.static_range(TOP_K):  # k rounds of arg-max: k is small, the experts fit one block
        best = tl.max(keys, 0)
        best_id = BLOCK - 1 - (best & 0xFFFFFFFF)
        best_bits = (best >> 32).to(tl.int32)
        best_logit = tl.where(best_bits >= 0, best_bits, best_bits ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
        top = tl.where(slots == k, best_logit, top)
        ids = tl.where(slots == k, best_id, ids)
        keys = tl.where(cols == best_id, -0x7FFFFFFFFFFFFFFF, keys)  # taken: below every logit's key
    scores = tl.exp(top - biggest)  # 0 in the padding slots
    return scores / (tl.sum(scores, 0) if RENORMALIZE else total), ids


@triton.jit
def _route_kernel(
    logits_ptr, weights_ptr, ids_ptr, stride_logits, experts,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr, RENORMALIZE: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous(PDL)
    row = tl.program_id(0)
    weights, ids = top_k_weights(logits_ptr + row * stride_logits, experts, TOP_K, K_PAD, BLOCK, RENORMALIZE)
    slots = tl.arange(0, K_PAD)
    chosen = slots < TOP_K
    tl.store(weights_ptr + row * TOP_K + slots, weights.to(weights_ptr.dtype.element_ty), mask=chosen)
    tl.store(ids_ptr + row * TOP_K + slots, ids, mask=chosen)
