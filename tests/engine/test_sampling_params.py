"""SamplingParams refuse what the sampler could not honour, so nothing invalid reaches the engine thread."""

from __future__ import annotations

import pytest
import torch

from warmkv.engine.sampling import SamplingParams, sample
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
