"""The mixture-of-experts feed-forward block (Qwen2-MoE, Qwen3-MoE, gpt-oss, DeepSeek-V3): a router picks
top-k experts per token, each a SwiGLU MLP; their outputs are summed, weighted by the router's scores.

Expert weights are stacked per layer as checkpoints converted by transformers hold them
(`gate_up_proj` [experts, 2 * inner, hidden], `down_proj` [experts, hidden, inner]); per-expert
tensors of Hugging Face folders are stacked on load (`stack_expert_weights`). On CUDA Triton kernels run
over the selected experts only (warmkv.kernels.fused_moe: a matrix-vector product per (token, expert)
pair for a few tokens, one grouped GEMM per projection for more), with static shapes so decode graphs
capture them; elsewhere a PyTorch loop over the experts that were hit is the reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from warmkv.errors import ModelLoadError
from warmkv.models import mxfp4
from warmkv.models.config import ModelConfig, MoeConfig
from warmkv.models.layers import TRITON, Linear, RMSNorm, has_kernels, linear, norm_and_linear, silu_and_mul

if TRITON:
    from warmkv.kernels.fused_moe import fused_experts, route_top_k


class Experts(nn.Module):
    def __init__(self, hidden: int, moe: MoeConfig) -> None:
        super().__init__()
        inner = moe.intermediate_size
        self.gate_up_proj = _projection(moe, 2 * inner, hidden)
        self.down_proj = _projection(moe, hidden, inner)
        # MXFP4: the projections above are their bytes, two values each, and these a scale per 32 values
        self.gate_up_proj_scales: nn.Parameter | None = None
        self.down_proj_scales: nn.Parameter | None = None
        if moe.mxfp4:
            self.gate_up_proj_scales = _projection(moe, 2 * inner, hidden // 32, packed=False)
            self.down_proj_scales = _projection(moe, hidden, inner // 32, packed=False)
        self.gate_up_proj_bias: nn.Parameter | None = None
        self.down_proj_bias: nn.Parameter | None = None
        if moe.biases:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(moe.num_experts, 2 * inner))
            self.down_proj_bias = nn.Parameter(torch.empty(moe.num_experts, hidden))
        self.clamped_swiglu = moe.clamped_swiglu

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, summed: bool = True
    ) -> torch.Tensor:
        """weights[t, k] * expert[expert_ids[t, k]](x[t]), summed over k: [tokens, hidden]; or each of a
        token's k outputs, [tokens, top_k, hidden]."""
        tensors = (x, self.gate_up_proj, self.down_proj, weights, expert_ids)
        biases = (self.gate_up_proj_bias, self.down_proj_bias)
        scales = None
        if self.gate_up_proj_scales is not None and self.down_proj_scales is not None:
            scales = (self.gate_up_proj_scales, self.down_proj_scales)
        if has_kernels(x.device):  # silu(gate) * up runs in the first GEMM; the clamped variant on its own
            activation = None if self.clamped_swiglu is None else self.activation
            return fused_experts(*tensors, activation, *biases, summed=summed, scales=scales)
        return experts_reference(*tensors, self.activation, *biases, summed=summed, scales=scales)

    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[tokens, 2 * inner] -> [tokens, inner]: silu(gate) * up, or gpt-oss's clamped variant."""
        if self.clamped_swiglu is None:
            return silu_and_mul(gate_up)
        alpha, limit = self.clamped_swiglu
        gate, up = gate_up.chunk(2, dim=-1)
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _projection(moe: MoeConfig, rows: int, depth: int, packed: bool = True) -> nn.Parameter:
    """[experts, rows, depth] weights, or with moe.mxfp4 uint8 (`packed`: bytes of two values each)."""
    if not moe.mxfp4:
        return nn.Parameter(torch.empty(moe.num_experts, rows, depth))
    shape = (moe.num_experts, rows, depth // 2 if packed else depth)
    return nn.Parameter(torch.empty(shape, dtype=torch.uint8), requires_grad=False)


def experts_reference(
    x: torch.Tensor,  # [tokens, hidden]
    gate_up_proj: torch.Tensor,  # [experts, 2 * inner, hidden]
    down_proj: torch.Tensor,  # [experts, hidden, inner]
    weights: torch.Tensor,  # [tokens, top_k] in the model dtype
    expert_ids: torch.Tensor,  # [tokens, top_k]
    activation: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul,  # [n, 2 * inner] -> [n, inner]
    gate_up_bias: torch.Tensor | None = None,  # [experts, 2 * inner]
    down_bias: torch.Tensor | None = None,  # [experts, hidden]
    summed: bool = True,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # MXFP4: the projections are bytes
) -> torch.Tensor:
    """Each expert that was chosen runs once on its tokens, rounding where transformers rounds; the k
    outputs of a token are summed in the order of its choices, as the fused kernels sum them (or, not
    summed, returned as [tokens, top_k, hidden])."""
    tokens, top_k = expert_ids.shape
    per_choice = torch.empty(tokens, top_k, x.shape[1], dtype=x.dtype, device=x.device)
    for expert in expert_ids.unique().tolist():
        rows, choice = torch.where(expert_ids == expert)
        gate_up, down = gate_up_proj[expert], down_proj[expert]
        if scales is not None:
            gate_up = mxfp4.unpack(gate_up, scales[0][expert], x.dtype)
            down = mxfp4.unpack(down, scales[1][expert], x.dtype)
        h = F.linear(x[rows], gate_up)
        h = activation(h if gate_up_bias is None else h + gate_up_bias[expert])
        h = F.linear(h, down)
        h = h if down_bias is None else h + down_bias[expert]
        per_choice[rows, choice] = h * weights[rows, choice, None]
    return per_choice.sum(dim=1) if summed else per_choice


def route(
    logits: torch.Tensor, top_k: int, normalize: bool, softmax_over_top_k: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights in the logits' dtype, expert ids), each [tokens, top_k]: softmax in float32, top-k,
    optionally renormalised over the chosen k; or (gpt-oss) top-k logits, softmax over those. On CUDA one
    kernel; the PyTorch steps are the reference."""
    if has_kernels(logits.device) and logits.dim() == 2:
        return route_top_k(logits, top_k, renormalize=normalize or softmax_over_top_k)
    if softmax_over_top_k:
        top, expert_ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(top, dim=-1), expert_ids
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), expert_ids


# kept in float32 whatever the model's dtype, as transformers keeps it: rounded to bf16, the load-balancing
# bias would change which of two close experts a token goes to
FLOAT32_TENSORS = ("e_score_correction_bias",)


class SoftmaxRouter(nn.Module):
    """Qwen-MoE's and gpt-oss's router: a linear layer (named as nn.Linear's), then `route`."""

    def __init__(self, hidden: int, moe: MoeConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden))
        self.bias = nn.Parameter(torch.empty(moe.num_experts)) if moe.biases else None
        self.top_k, self.normalize, self.softmax_over_top_k = moe.top_k, moe.normalize_top_k, moe.biases

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._route(linear(x, self.weight, self.bias))

    def norm_and_route(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:  # fmt: skip
        """((weights, expert ids), norm(x + residual), x + residual): where it can, the norm runs in the
        router's own product (one kernel less on a decode step's critical path)."""
        logits, normed, stream = norm_and_linear(x, residual, norm, self.weight, self.bias)
        return self._route(logits), normed, stream

    def _route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(logits, self.top_k, self.normalize, self.softmax_over_top_k)


class SigmoidGroupRouter(nn.Module):
    """DeepSeek-V3's router, in float32 as transformers runs it: sigmoid scores; the experts are chosen by
    score + e_score_correction_bias (the load-balancing bias), only within the `topk_group` groups whose
    two best experts sum highest; the chosen experts' scores (without the bias) are the weights,
    renormalised if the model says so, times routed_scaling_factor."""

    def __init__(self, hidden: int, moe: MoeConfig) -> None:
        super().__init__()
        assert moe.sigmoid_groups is not None
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden))
        self.register_buffer("e_score_correction_bias", torch.zeros(moe.num_experts))
        self.groups, self.top_groups = moe.sigmoid_groups
        self.top_k, self.normalize, self.scaling = moe.top_k, moe.normalize_top_k, moe.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        by_group = choice.view(x.shape[0], self.groups, -1)
        best_groups = by_group.topk(2, dim=-1)[0].sum(dim=-1).topk(self.top_groups, dim=-1)[1]
        in_best = torch.zeros_like(by_group[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
        choice = by_group.masked_fill(~in_best[..., None], float("-inf")).flatten(1)
        expert_ids = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, expert_ids)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scaling).to(x.dtype), expert_ids


class SharedExpert(nn.Module):
    """The expert that sees every token: DeepSeek's as it is, Qwen2-MoE's scaled per token by
    sigmoid(shared_expert_gate(x))."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * inner, bias=False)  # concatenated on load
        self.down_proj = Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe = config.moe
        assert moe is not None
        router = SigmoidGroupRouter if moe.sigmoid_groups else SoftmaxRouter
        self.gate = router(config.hidden_size, moe)
        self.experts = Experts(config.hidden_size, moe)
        self.shared_expert: SharedExpert | None = None
        self.shared_expert_gate: Linear | None = None
        if moe.shared_intermediate_size:
            self.shared_expert = SharedExpert(config.hidden_size, moe.shared_intermediate_size)
        if moe.shared_intermediate_size and moe.shared_expert_gate:
            self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, hidden]; or, without a shared expert, the k experts' outputs [tokens, top_k, hidden],
        which the residual add that follows sums (RMSNorm.add_and_norm)."""
        return self._experts(x, self.gate(x))

    def after_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
                   ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(the block's output for norm(x + residual), x + residual): with a softmax router the norm may
        run inside the router's product."""
        if isinstance(self.gate, SoftmaxRouter):
            routing, h, residual = self.gate.norm_and_route(x, residual, norm)
        else:
            h, residual = norm.add_and_norm(x, residual)
            routing = self.gate(h)
        return self._experts(h, routing), residual

    def _experts(self, x: torch.Tensor, routing: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.shared_expert is None:
            return self.experts(x, *routing, summed=False)
        out = self.experts(x, *routing)
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out + shared


_EXPERT_TENSOR = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def stack_expert_weights(weights: dict[str, torch.Tensor]) -> None:
    """Per-expert tensors of a Hugging Face checkpoint (`mlp.experts.7.up_proj.weight`) become one stacked
    tensor per layer and projection, in place; already stacked checkpoints pass through."""
    found: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name in [n for n in weights if _EXPERT_TENSOR.fullmatch(n)]:
        prefix, expert, projection = _EXPERT_TENSOR.fullmatch(name).groups()  # type: ignore[union-attr]
        found.setdefault(prefix, {}).setdefault(projection, {})[int(expert)] = weights.pop(name)
    for prefix, projections in found.items():
        count = max(len(by_expert) for by_expert in projections.values())
        if len(projections) < 3 or any(sorted(e) != list(range(count)) for e in projections.values()):
            raise ModelLoadError(f"{prefix}: the checkpoint lacks some experts' weights")
        gate, up, down = (
            [projections[p][e] for e in range(count)] for p in ("gate_proj", "up_proj", "down_proj")
        )
        pairs = zip(gate, up, strict=True)
        weights[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in pairs])
        weights[f"{prefix}.down_proj"] = torch.stack(down)


def convert_gpt_oss_experts(weights: dict[str, torch.Tensor]) -> None:
    """gpt-oss's layout to ours, in place: the router is `gate`, expert matrices are transposed to
    [experts, out, in], and gate/up, interleaved column by column, become [gate | up]. MXFP4 bytes and
    scales (mxfp4.load_pairs' packed ones) are [experts, out, ...] already: only their gate/up rows move."""
    for name in [n for n in weights if ".mlp.router." in n]:
        weights[name.replace(".mlp.router.", ".mlp.gate.")] = weights.pop(name)
    for name in [n for n in weights if n.endswith(".mlp.experts.gate_up_proj")]:
        packed = f"{name}{mxfp4.SCALES}" in weights
        for part in (name, f"{name}_bias", *([f"{name}{mxfp4.SCALES}"] if packed else [])):
            # [experts, 2 * inner, ...], gate and up interleaved
            stacked = weights[part].transpose(1, 2) if part == name and not packed else weights[part]
            weights[part] = torch.cat((stacked[:, 0::2], stacked[:, 1::2]), dim=1).contiguous()
    for name in [n for n in weights if n.endswith(".mlp.experts.down_proj")]:
        if f"{name}{mxfp4.SCALES}" not in weights:
            weights[name] = weights[name].transpose(1, 2).contiguous()
