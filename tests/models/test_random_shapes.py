"""The benchmarks' random models: weights straight from transformers' module in the named shape."""

from __future__ import annotations

import pytest
import torch

from warmkv.cache.kv_pool import KVPool
from warmkv.engine.forward_item import ForwardItem
from warmkv.engine.model_runner import ModelRunner
from warmkv.models.random_init import random_pair

from ..conftest import smollm2_tokenizer

CPU = torch.device("cpu")


@pytest.mark.parametrize("shape", ["deepseek-mla-tiny", "qwen3-moe-tiny", "llama-tiny-64k"])
def test_random_shape_matches_transformers_on_the_same_tensors(shape: str) -> None:
    """Experts come stacked, MLA's latents as the pool keeps them: the logits are transformers'."""
    torch.manual_seed(0)
    ours, theirs = random_pair(shape, smollm2_tokenizer(), CPU, torch.float32)
    heads, head_dim, sides = ours.config.kv_cache_layout
    pool = KVPool(ours.config.num_layers, 16, 8, heads, head_dim, torch.float32, CPU, sides)
    prompt = torch.randint(0, 49152, (20,)).tolist()
    (logits,) = ModelRunner(ours.module, pool).forward(
        [ForwardItem(prompt, 0, pool.allocate(3), all_logits=True)]
    )
    with torch.no_grad():
        torch.testing.assert_close(logits, theirs(torch.tensor([prompt])).logits[0], atol=1e-4, rtol=1e-4)


def test_random_models_made_alike_hold_the_same_tensors_and_share_a_cache_fingerprint() -> None:
    """What lets replicas of a random model, each in its own process, reuse each other's KV: the same
    seed gives the same tensors and the same identity; another seed gives neither."""
    torch.manual_seed(123)
    untouched = torch.rand(4)
    torch.manual_seed(123)
    first, _ = random_pair("llama-tiny-64k", smollm2_tokenizer(), CPU, torch.float32)
    second, _ = random_pair("llama-tiny-64k", smollm2_tokenizer(), CPU, torch.float32)
    other, _ = random_pair("llama-tiny-64k", smollm2_tokenizer(), CPU, torch.float32, seed=1)
    weights = [dict(m.module.state_dict()) for m in (first, second, other)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not all(torch.equal(weights[0][name], weights[2][name]) for name in weights[0])
    assert first.in_memory_id == second.in_memory_id != other.in_memory_id
    assert torch.equal(torch.rand(4), untouched)  # the caller's random stream was not consumed
