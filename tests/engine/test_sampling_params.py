"""SamplingParams refuse what the sampler could not honour, so nothing invalid reaches the engine thread."""

from __future__ import annotations

import pytest
import torch

from warmkv.engine.sampling import SamplingParams
from warmkv.errors import InvalidRequest


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_seed_torch_cannot_take_is_refused(seed: int) -> None:
    with pytest.raises(InvalidRequest, match="seed must be in"):
        SamplingParams(temperature=1.0, seed=seed)


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_every_seed_accepted_makes_a_generator(seed: int) -> None:
    generator = SamplingParams(temperature=1.0, seed=seed).generator(torch.device("cpu"))
    assert generator is not None
