"""SamplingParams refuse what the sampler could not honour, so nothing invalid reaches the engine thread."""

from __future__ import annotations

import pytest
import torch

from warmkv.engine.sampling import SamplingParams, sample, sample_tokens
from warmkv.errors import InvalidRequest


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_seed_torch_cannot_take_is_refused(seed: int) -> None:
    with pytest.raises(InvalidRequest, match="seed must be in"):
        SamplingParams(temperature=1.0, seed=seed)


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_every_seed_accepted_makes_a_generator(seed: int) -> None:
    generator = SamplingParams(temperature=1.0, seed=seed).generator(torch.device("cpu"))
    assert generator is not None


@pytest.mark.parametrize(("temperature", "top_p"), [(5e-324, 1.0), (1e-9, 0.5), (1.0, 5e-324), (2.0, 1e-45)])
def test_extreme_temperature_or_top_p_samples_the_likeliest_token(temperature: float, top_p: float) -> None:
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=1)
    assert sample(logits, params, params.generator(torch.device("cpu"))) == 1


@pytest.mark.parametrize(("top_p", "kept"), [(1.0, 4), (0.9, 3), (0.5, 2)])
def test_sampled_tokens_follow_the_kept_probabilities(top_p: float, kept: int) -> None:
    """4000 seeded draws: each token kept by top-p comes up as often as its renormalised probability
    (within 0.03), a token outside the nucleus never."""
    probs = torch.tensor([0.1, 0.45, 0.05, 0.4])  # by likelihood: 1, 3, 0, 2
    params = SamplingParams(temperature=1.0, top_p=top_p, seed=7)
    generator = params.generator(torch.device("cpu"))
    draws = torch.stack([sample(probs.log(), params, generator) for _ in range(4000)])
    ranked = [1, 3, 0, 2]
    nucleus = probs[ranked[:kept]] / probs[ranked[:kept]].sum()
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(counts[ranked[:kept]], nucleus, atol=0.03, rtol=0)
    assert counts[ranked[kept:]].sum() == 0


def test_rows_drawn_together_draw_what_each_draws_alone() -> None:
    """sample_tokens draws a batch's sampled rows in one set of tensor operations: each row's token is the
    one its parameters and generator give it alone, a greedy row's is its arg-max."""
    torch.manual_seed(0)
    logits = [torch.randn(50) * 3 for _ in range(6)]
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_p=0.8, seed=1),
        SamplingParams(temperature=1.3, top_k=5, seed=2),
        SamplingParams(temperature=1.0, min_p=0.2, seed=3),
        SamplingParams(temperature=2.0, seed=4),
        SamplingParams(temperature=1.0),  # unseeded: drawn with the others in one call
    ]
    cpu = torch.device("cpu")
    for _ in range(20):  # generators of the same seeds on both sides; other logits each round
        together = sample_tokens(logits, params, [p.generator(cpu) for p in params])
        alone = [sample(row, p, p.generator(cpu)) for row, p in zip(logits, params, strict=True)]
        assert together[:5].tolist() == [int(t) for t in alone[:5]]
        assert together[0] == logits[0].argmax()
        logits = [row.roll(1) for row in logits]


def test_unseeded_rows_drawn_together_each_follow_their_own_probabilities() -> None:
    """A step's unseeded rows share one draw of noise: each row must still get noise of its own (the same
    noise for every row would give every row the same token)."""
    torch.manual_seed(0)  # unseeded rows draw from torch's own generator: the same draws every run
    probs = torch.tensor([0.1, 0.45, 0.05, 0.4])
    rows = [probs.log()] * 4000
    draws = sample_tokens(rows, [SamplingParams(temperature=1.0)] * len(rows), [None] * len(rows))
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(counts, probs, atol=0.03, rtol=0)
