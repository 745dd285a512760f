"""From a sequence's raw logits to the ones it samples from: penalties, logit bias, a grammar's mask.

Each processor belongs to one sequence and keeps its state there (token counts, the grammar's position),
advanced by every token the sequence accepts, so a preempted sequence resumes exactly where it was. A
sequence without processors samples from the model's logits untouched.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from warmkv.engine.grammar import GrammarMatcher
from warmkv.engine.sampling import SamplingParams

log = logging.getLogger("warmkv.engine")


class LogitsProcessor(Protocol):
    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The processed logits [vocab] (a new tensor: the input may be a captured graph's buffer)."""
        ...

    def accept(self, token: int) -> bool:
        """Take note of the sequence's next token; True when nothing may follow it (a grammar's end)."""
        ...


class Penalties:
    """presence and frequency penalties over the generated tokens (OpenAI's definition); the repetition
    penalty over prompt and generated tokens, dividing positive logits and multiplying negative ones
    (CTRL's definition, as transformers and vLLM apply it)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device):
        self._presence, self._frequency = params.presence_penalty, params.frequency_penalty
        self._repetition = params.repetition_penalty
        self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)  # generated tokens
        self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # prompt and generated
        # a tokenizer's added tokens may lie beyond the model's vocabulary: the model never scores them
        scored = [t for t in prompt_ids if t < vocab_size]
        self._seen[torch.tensor(scored, dtype=torch.long, device=device)] = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self._repetition != 1.0:
            penalised = torch.where(logits > 0, logits / self._repetition, logits * self._repetition)
            logits = torch.where(self._seen, penalised, logits)
        if self._frequency or self._presence:
            logits = logits - self._frequency * self._counts - self._presence * (self._counts > 0).float()
        return logits

    def accept(self, token: int) -> bool:
        self._counts[token] += 1
        self._seen[token] = True
        return False


class LogitBias:
    """A fixed amount added to the logits of chosen tokens (OpenAI's logit_bias, -100 to 100)."""

    def __init__(self, bias: dict[int, float], device: torch.device) -> None:
        self._ids = torch.tensor(list(bias), dtype=torch.long, device=device)
        self._values = torch.tensor(list(bias.values()), dtype=torch.float32, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(0, self._ids, self._values)

    def accept(self, token: int) -> bool:
        return False


class GrammarMask:
    """Only the tokens the grammar allows next keep their logits; applied last, so nothing re-admits one."""

    def __init__(self, matcher: GrammarMatcher) -> None:
        self._matcher = matcher

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(~self._matcher.allowed(logits.shape[-1], logits.device), float("-inf"))

    def accept(self, token: int) -> bool:
        if not self._matcher.advance(token):
            # cannot happen while the mask is applied; if it does, stop rather than continue unconstrained
            log.error("token %d broke its grammar: %s", token, self._matcher.error)
        return self._matcher.finished


def logits_processors(
    params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device
) -> list[LogitsProcessor]:
    processors: list[LogitsProcessor] = []
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        processors.append(Penalties(params, prompt_ids, vocab_size, device))
    if params.logit_bias:
        processors.append(LogitBias(params.logit_bias, device))
    if params.grammar is not None:
        processors.append(GrammarMask(params.grammar.matcher()))
    return processors


def process(processors: list[LogitsProcessor], logits: torch.Tensor) -> torch.Tensor:
    for processor in processors:
        logits = processor(logits)
    # an extreme parameter (a repetition penalty of 5e-324 divides a logit into +inf) must not make the
    # sampler's probabilities NaN: the largest finite logit still wins; -inf (a grammar's mask) stays
    return logits.clamp(max=torch.finfo(logits.dtype).max) if processors else logits


def accept(processors: list[LogitsProcessor], token: int) -> bool:
    """Advance every processor by the sequence's new token; True when one of them ends the sequence."""
    return any([processor.accept(token) for processor in processors])  # every one sees the token
