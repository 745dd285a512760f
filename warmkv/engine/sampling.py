"""Sampling parameters and the sampler: greedy, temperature, top-k, min-p, top-p, seeded; log-probs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from warmkv.errors import InvalidRequest

if TYPE_CHECKING:
    from warmkv.engine.grammar import Grammar

# what torch.Generator.manual_seed accepts (a signed or unsigned 64-bit integer); beyond it, it raises
SEED_RANGE = (-(2**63), 2**64 - 1)
# below this a temperature divides logits into infinities; such a distribution is the greedy choice anyway
GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs allows


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest one
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 means none
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # report each token's log-prob and this many alternatives; None: none
    grammar: Grammar | None = None  # the output must be a sentence of this grammar

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
        if not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not -100 <= bias <= 100 for bias in self.logit_bias.values()):
            raise InvalidRequest("logit_bias values must be in [-100, 100]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs: 0 to {MAX_LOGPROBS} alternatives per token, not {self.logprobs}")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the request names must be the model's."""
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            if any(not 0 <= token < vocab_size for token in ids):
                raise InvalidRequest(f"{name}: token ids must be in [0, {vocab_size})")

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None or self.temperature == 0:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def sample_batch(
    logits: list[torch.Tensor], params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token id per sequence, read with one device-to-host copy."""
    return sample_tokens(logits, params, generators).tolist()


def sample_tokens(
    logits: list[torch.Tensor], params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """One token id per sequence, left on the logits' device: the greedy rows decided together, each other
    row sampled with its own parameters and generator. Nothing waits for the device, so decode steps can
    follow one another on the tokens chosen here (llm_engine's runs)."""
    greedy = [row for row, p in zip(logits, params, strict=True) if p.temperature == 0]
    if len(greedy) == len(params):
        return greedy_tokens(torch.stack(logits))
    argmax = iter(greedy_tokens(torch.stack(greedy)) if greedy else ())
    return torch.stack([
        next(argmax) if p.temperature == 0 else sample(row, p, generator)
        for row, p, generator in zip(logits, params, generators, strict=True)
    ])  # fmt: skip


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The likeliest token of each row of float32 logits [rows, vocab], left on their device (the lowest id
    among equals): the one greedy rule."""
    return logits.argmax(-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token id from float32 logits of shape [vocab], as a 0-d tensor on their device."""
    if params.temperature == 0:
        return logits.argmax()
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    order = None
    if params.top_p < 1:  # drawn among the tokens sorted by probability, then mapped back to their ids
        probs, order = probs.sort(descending=True)
        # drop a token once the tokens more likely than it already cover top_p
        outside = probs.cumsum(-1) - probs >= params.top_p
        outside[0] = False  # the likeliest token stays, however small top_p is
        probs = probs.masked_fill(outside, 0.0)
    # an exponential race: with E_i ~ Exp(1), p_i / E_i is largest for token i with probability p_i / sum(p).
    # Elementwise kernels and one arg-max over the vocabulary, where torch.multinomial scans it in one
    # thread block
    choice = (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax()
    return choice if order is None else order[choice]


@dataclass(slots=True)
class TokenLogprobs:
    """A generated token's log-probability under the model, and the likeliest alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-prob), likeliest first


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """From the model's raw logits [vocab], before penalties, bias, masks and temperature (as vLLM
    reports them by default): what the model itself thought of the token."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())
    alternatives = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprobs(token, float(logprobs[token]), alternatives)
