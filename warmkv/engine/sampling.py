"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from warmkv.errors import InvalidRequest

# what torch.Generator.manual_seed accepts (a signed or unsigned 64-bit integer); beyond it, it raises
SEED_RANGE = (-(2**63), 2**64 - 1)
# below this a temperature divides logits into infinities; such a distribution is the greedy choice anyway
GREEDY_BELOW = 1e-5


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise InvalidRequest(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise InvalidRequest(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed}")

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None or self.temperature == 0:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def sample_batch(
    logits: list[torch.Tensor], params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token id per sequence; greedy rows are decided together, with one device-to-host copy."""
    tokens = [0] * len(logits)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    if greedy:
        for i, token in zip(
            greedy, torch.stack([logits[i] for i in greedy]).argmax(-1).tolist(), strict=True
        ):
            tokens[i] = token
    for i, p in enumerate(params):
        if p.temperature != 0:
            tokens[i] = sample(logits[i], p, generators[i])
    return tokens


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from float32 logits of shape [vocab]."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # drop a token once the tokens more likely than it already cover top_p
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        outside[0] = False  # the likeliest token stays, however small top_p is
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
