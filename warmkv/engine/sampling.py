"""Sampling parameters and the sampler: greedy, temperature, top-k, min-p, top-p, seeded; log-probs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from warmkv.errors import InvalidRequest
from warmkv.uploads import to_device

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
    """One token id per sequence, left on the logits' device: the greedy rows' arg-max, the sampled rows
    drawn together (sample_rows), each with its own parameters and generator. Nothing waits for the
    device, so decode steps can follow one another on the tokens chosen here (llm_engine's runs)."""
    rows = torch.stack(logits)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return greedy_tokens(rows)
    if len(sampled) == len(params):
        return sample_rows(rows, params, generators)
    index = _to_device(sampled, rows.device, torch.int64)
    drawn = sample_rows(rows[index], [params[i] for i in sampled], [generators[i] for i in sampled])
    return greedy_tokens(rows).index_copy(0, index, drawn)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The likeliest token of each row of float32 logits [rows, vocab], left on their device (the lowest id
    among equals): the one greedy rule."""
    return logits.argmax(-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token id from float32 logits of shape [vocab], as a 0-d tensor on their device."""
    if params.temperature == 0:
        return logits.argmax()
    return sample_rows(logits[None], [params], [generator])[0]


def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """A token id drawn from each row of float32 logits [rows, vocab] (no row greedy), the rows at once:
    temperature, top-k, min-p and top-p in batched tensor operations, so a batch costs about what one
    row does. The draw is an exponential race in vocabulary order: with E_t ~ Exp(1) from the row's own
    generator, p_t / E_t is largest for token t with probability p_t / sum(p) (elementwise kernels and an
    arg-max, where torch.multinomial scans a row in one thread block). A seeded row's draw depends only on
    its own logits and generator, not on the rows beside it (up to rounding in the batched kernels); the
    unseeded rows' draws are made in one call (a step of many streams launched one per row)."""
    vocab = logits.shape[-1]

    def per_row(values: list[float]) -> torch.Tensor:
        return _to_device(values, logits.device, logits.dtype)[:, None]

    logits = logits / per_row([p.temperature for p in params])
    if any(p.top_k for p in params):
        limits = [min(p.top_k, vocab) for p in params]  # 0: no limit
        top = torch.topk(logits, max(limits)).values
        kth = top.gather(1, _to_device([max(k, 1) - 1 for k in limits], logits.device, torch.int64)[:, None])
        kth = kth.masked_fill(
            _to_device([k == 0 for k in limits], logits.device, torch.bool)[:, None], float("-inf")
        )
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(p.min_p for p in params):
        probs = probs.masked_fill(
            probs < per_row([p.min_p for p in params]) * probs.amax(-1, keepdim=True), 0
        )
    if any(p.top_p < 1 for p in params):
        # drop a token once the tokens more likely than it already cover top_p (ties: the lower id first)
        ranked, order = probs.sort(dim=-1, descending=True, stable=True)
        outside = ranked.cumsum(-1) - ranked >= per_row(
            [p.top_p if p.top_p < 1 else float("inf") for p in params]
        )
        outside[:, 0] = False  # the likeliest token stays, however small top_p is
        probs = probs.masked_fill(torch.empty_like(outside).scatter_(1, order, outside), 0.0)
    noise = torch.empty_like(probs)
    if None in generators:  # the unseeded rows' draws in one call, not one per row
        noise.exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:  # a seeded row draws from its own generator alone: reproducible
            noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(-1)


def _to_device(values: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small host list on `device` without waiting for the work queued there (a decode run launched
    ahead)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


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
