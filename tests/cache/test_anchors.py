"""Anchors: a turn's frontier is reused to the exact token, and shared prefixes outlive session tails."""

from __future__ import annotations

from warmkv.cache.config import CacheConfig
from warmkv.cache.hit_policy import HitPolicyConfig, HitPolicyName
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams
from warmkv.models.loader import LoadedModel

PROMPT = list(range(1000, 1057))  # 57 tokens: 3 whole blocks and a 9-token tail at the frontier


def engine_with(
    model: LoadedModel, pool_tokens: int = 4096, emulation: HitPolicyConfig | None = None
) -> LLMEngine:
    config = CacheConfig(disk=False, host_tokens=0)
    return LLMEngine(model, EngineConfig(kv_pool_tokens=pool_tokens, cache=config, hit_emulation=emulation))


def run(engine: LLMEngine, prompt: list[int], max_tokens: int = 6):
    outputs = list(engine.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    return outputs[-1].sequence


def cold(model: LoadedModel, prompt: list[int]) -> list[int]:
    return run(LLMEngine(model, EngineConfig(kv_pool_tokens=4096, prefix_cache=False)), prompt).output_ids


def test_next_turn_reuses_the_prompt_to_its_exact_frontier(tiny_llama: LoadedModel) -> None:
    engine = engine_with(tiny_llama)
    run(engine, PROMPT, max_tokens=1)
    follow_up = [*PROMPT, *range(3000, 3010)]
    seq = run(engine, follow_up)
    assert seq.num_cached == 57  # not 48: the frontier's partial block is reused too
    assert seq.output_ids == cold(tiny_llama, follow_up)


def test_next_turn_reuses_the_reply_to_its_end(tiny_llama: LoadedModel) -> None:
    engine = engine_with(tiny_llama)
    reply = run(engine, PROMPT).output_ids
    follow_up = [*PROMPT, *reply, *range(3000, 3010)]
    seq = run(engine, follow_up)
    assert seq.num_cached == 57 + 5  # every token whose KV was computed (the last sampled one never is)
    assert seq.output_ids == cold(tiny_llama, follow_up)


def test_other_caches_rules_serve_no_partial_blocks(tiny_llama: LoadedModel) -> None:
    engine = engine_with(tiny_llama, emulation=HitPolicyConfig(HitPolicyName.UNITS, unit=16))
    run(engine, PROMPT, max_tokens=1)
    assert run(engine, [*PROMPT, 7, 8]).num_cached == 48


def test_shared_prefix_outlives_session_tails_under_pressure(tiny_llama: LoadedModel) -> None:
    engine = engine_with(tiny_llama, pool_tokens=16 * 12)  # 12 blocks
    system = list(range(5000, 5048))  # 3 blocks, shared by two sessions below
    run(engine, [*system, 1, 2], max_tokens=1)
    run(engine, [*system, 3, 4], max_tokens=1)  # hits the system blocks: now a shared anchor
    for n in range(4):  # unrelated sessions, 4 blocks each, more than the pool has spare
        run(engine, list(range(10_000 * (n + 1), 10_000 * (n + 1) + 64)), max_tokens=1)
    assert run(engine, [*system, 9, 9], max_tokens=1).num_cached == 48


def test_a_resent_prompt_reuses_all_but_its_last_token(tiny_llama: LoadedModel) -> None:
    engine = engine_with(tiny_llama)
    run(engine, PROMPT, max_tokens=1)
    seq = run(engine, PROMPT)
    assert seq.num_cached == 56
    assert seq.output_ids == cold(tiny_llama, PROMPT)


def test_message_end_anchors_are_reused_to_the_exact_token(tiny_llama: LoadedModel) -> None:
    engine = engine_with(tiny_llama)
    system = list(range(5000, 5040))  # a 40-token system message: ends 8 tokens into the third block
    first_user = list(range(6000, 6030))  # long enough that the prompt's frontier lies two blocks later
    engine.add_request([*system, *first_user], SamplingParams(max_tokens=1), anchors=(40,))
    while engine.has_work:
        engine.step()
    other_user = [*system, 7, 7, 7, 7]
    seq = run(engine, other_user)
    assert seq.num_cached == 40  # whole blocks would stop at 32
    assert seq.output_ids == cold(tiny_llama, other_user)
