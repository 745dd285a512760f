"""A latent-attention model (tiny DeepSeek-V3) in every tier: host RAM and disk keep the compressed latent
(what the pool keeps), and output with a hit from either equals output without the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from warmkv.cache.tiers.base import TierName
from warmkv.cache.tiers.codec import HEADER_SIZE
from warmkv.cache.tiers.disk import block_path
from warmkv.models.loader import LoadedModel, load_model

from ..conftest import save_tiny_model
from .test_tiers import (
    FOLLOW_UP,
    PROMPT,
    assert_hit_logits_exact,
    assert_host_hit_exact,
    cold_tokens,
    generate,
    make_engine,
)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = save_tiny_model("deepseekv3", tmp_path_factory.mktemp("mla-tiers-model"))
    return load_model(str(folder), torch.device("cpu"), torch.float32)


def test_host_hit_of_latents_is_exact(deepseek: LoadedModel) -> None:
    assert_host_hit_exact(deepseek)


def test_disk_keeps_the_latent_and_a_restart_reuses_it_exactly(deepseek: LoadedModel, tmp_path: Path) -> None:
    first = make_engine(deepseek, tmp_path)
    generate(first, PROMPT)
    first.close()
    key = first.prefix_cache.chain("", PROMPT)[0]
    layers, block = deepseek.config.num_layers, first.pool.block_size
    latent_bytes = block * layers * (32 + 8) * 4  # kv_lora_rank + rope values per token and layer, fp32
    assert block_path(first.prefix_cache.disk.directory, key).stat().st_size == HEADER_SIZE + latent_bytes
    restarted = make_engine(deepseek, tmp_path)
    seq = generate(restarted, FOLLOW_UP)
    assert seq.cache_hit.tokens_by_tier == {TierName.LIVE: 0, TierName.DISK: 48}
    assert seq.output_ids == cold_tokens(deepseek, FOLLOW_UP)
    assert_hit_logits_exact(make_engine(deepseek, tmp_path), deepseek, FOLLOW_UP, TierName.DISK)
