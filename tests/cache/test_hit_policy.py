"""Other caches' reuse rules on our engine: what each serves of the same cached prefix."""

from __future__ import annotations

import pytest

from warmkv.cache.config import CacheConfig
from warmkv.cache.hit_policy import HitPolicyConfig, HitPolicyName
from warmkv.cli import build_parser
from warmkv.config_flags import engine_config_from
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams
from warmkv.errors import WarmkvError
from warmkv.models.loader import LoadedModel


def engine_with(model: LoadedModel, policy: HitPolicyConfig | None) -> LLMEngine:
    """policy None: warmkv's own rule, as served (no emulation at all)."""
    cache = CacheConfig(disk=False, host_tokens=0)
    return LLMEngine(model, EngineConfig(kv_pool_tokens=4096, cache=cache, hit_emulation=policy))


def cached(engine: LLMEngine, prompt: list[int], max_tokens: int = 1) -> tuple[int, list[int]]:
    outputs = list(engine.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    seq = outputs[-1].sequence
    return seq.num_cached, seq.output_ids


def tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_blocks_serve_every_cached_block_including_generated_ones(tiny_llama: LoadedModel) -> None:
    engine = engine_with(tiny_llama, None)
    prompt = tokens(1000, 100)
    _, reply = cached(engine, prompt, max_tokens=40)
    hit, _ = cached(engine, [*prompt, *reply, *tokens(3000, 5)])
    assert hit == 139  # every token before the new ones whose KV was computed (8 blocks + a tail)


def test_units_serve_whole_units_of_earlier_prompts_only(tiny_llama: LoadedModel) -> None:
    engine = engine_with(tiny_llama, HitPolicyConfig(HitPolicyName.UNITS, unit=64))
    prompt = tokens(1000, 150)
    _, reply = cached(engine, prompt, max_tokens=40)
    hit, _ = cached(engine, [*prompt, *reply, *tokens(3000, 5)])
    assert hit == 128  # the prompt's 150 tokens cut to whole 64-token units; the reply is never served
    hit, _ = cached(engine, [*prompt[:100], *tokens(5000, 30)])
    assert hit == 64


def test_checkpoints_keep_a_stale_cold_anchor(tiny_llama: LoadedModel) -> None:
    policy = HitPolicyConfig(HitPolicyName.CHECKPOINTS, checkpoint_align=64, checkpoint_interval=128)
    engine = engine_with(tiny_llama, policy)
    system = tokens(1000, 100)
    cached(engine, [*system, *tokens(2000, 20)])  # cold anchor at 64, no interval point yet (120 < 128)
    hit, _ = cached(engine, [*system, *tokens(2100, 20)])
    assert hit == 64
    edited = [*system[:10], 7, *system[11:]]  # an early block rewritten
    assert cached(engine, [*edited, *tokens(2200, 20)])[0] == 0
    hit, _ = cached(engine, [*edited, *tokens(2300, 20)])
    assert hit == 0  # no refresh: the anchor still points at the old prefix

    warmkv = engine_with(tiny_llama, None)
    cached(warmkv, [*system, *tokens(2000, 20)])
    cached(warmkv, [*edited, *tokens(2200, 20)])
    assert cached(warmkv, [*edited, *tokens(2300, 20)])[0] == 96  # the rewritten prefix's whole blocks


def test_checkpoints_serve_interval_points(tiny_llama: LoadedModel) -> None:
    policy = HitPolicyConfig(HitPolicyName.CHECKPOINTS, checkpoint_align=64, checkpoint_interval=64)
    engine = engine_with(tiny_llama, policy)
    conversation = tokens(1000, 150)
    cached(engine, conversation)
    hit, _ = cached(engine, [*conversation, *tokens(4000, 60)])
    assert hit == 128  # checkpoints at 64 and 128; the 16 tokens after 128 are recomputed


def test_policy_flags_are_checked() -> None:
    args = build_parser().parse_args(["serve", "--hit-policy", "units", "--cache-unit", "50"])
    with pytest.raises(WarmkvError, match="--cache-unit must be a multiple of --block-size 16, got 50"):
        engine_config_from(args)
    args = build_parser().parse_args(["serve", "--hit-policy", "checkpoints", "--checkpoint-align", "512"])
    emulation = engine_config_from(args).hit_emulation
    assert emulation is not None and emulation.name is HitPolicyName.CHECKPOINTS


def test_serving_builds_no_emulation(tiny_llama: LoadedModel) -> None:
    """Other caches' rules are for benchmarks: plain `serve` (or `--hit-policy blocks`) asks for none."""
    for flags in ([], ["--hit-policy", "blocks"]):
        assert engine_config_from(build_parser().parse_args(["serve", *flags])).hit_emulation is None
    engine = engine_with(tiny_llama, None)
    assert engine.prefix_cache is not None and engine.prefix_cache.emulation is None
