"""The scheduler under KV pressure: more sequences than the pool holds all finish, exactly as alone;
preempted KV comes back from the host tier; a sequence's own failure fails it alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from warmkv.cache.config import CacheConfig, LoadPolicy
from warmkv.engine.config import EngineConfig
from warmkv.engine.forward_item import ForwardItem
from warmkv.engine.llm_engine import LLMEngine, StepOutput
from warmkv.engine.sampling import SamplingParams
from warmkv.engine.sequence import FinishReason, Sequence
from warmkv.errors import ContextOverflow, EngineFailure
from warmkv.models.loader import load_model

BLOCK = 16
POOL = 320  # 20 blocks
# six sessions of 150 prompt + 40 generated tokens: 1,140 tokens of KV, 3.6 times the pool
PROMPTS = [list(range(1000 * i, 1000 * i + 150)) for i in range(1, 7)]
REPLY = 40


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_folder: Path):
    return load_model(str(tiny_llama_folder), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def solo_outputs(tiny_model) -> list[list[int]]:
    """Each session run alone on a roomy engine without any cache."""
    engine = LLMEngine(tiny_model, EngineConfig(kv_pool_tokens=4096, prefix_cache=False))
    return [
        list(engine.generate(p, SamplingParams(max_tokens=REPLY, ignore_eos=True)))[-1].sequence.output_ids
        for p in PROMPTS
    ]


def small_pool(model, host_tokens: int = 2048, **overrides) -> LLMEngine:
    # loading from the host tier always (the CPU's cost model may prefer recomputing a tiny model)
    cache = CacheConfig(disk=False, host_tokens=host_tokens, load_policy=LoadPolicy.ALWAYS)
    return LLMEngine(model, EngineConfig(kv_pool_tokens=POOL, max_batch_tokens=64, cache=cache, **overrides))


def run_all(engine: LLMEngine, prompts: list[list[int]]) -> tuple[list[Sequence], list[StepOutput]]:
    seqs = [engine.add_request(p, SamplingParams(max_tokens=REPLY, ignore_eos=True)) for p in prompts]
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    return seqs, outputs


def count_forwarded_tokens(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Tokens the model computes, per sequence (named by its first block)."""
    computed: Counter = Counter()
    forward = engine.runner.forward

    def counting(items: list[ForwardItem]):
        computed["all"] += sum(len(item.token_ids) for item in items)
        return forward(items)

    monkeypatch.setattr(engine.runner, "forward", counting)
    return computed


def assert_no_blocks_leaked(engine: LLMEngine) -> None:
    cache = engine.prefix_cache
    holders = Counter([*cache.index._blocks.values(), *cache.partials._entries.values()])
    assert {b: n for b, n in enumerate(engine.pool.ref_counts) if n} == dict(holders)


@pytest.mark.parametrize("decode_steps", [1, 4])  # one step at a time, and runs of four back to back
def test_oversubscribed_sessions_all_complete_with_their_solo_outputs(
    tiny_model, solo_outputs, decode_steps: int
) -> None:
    engine = small_pool(tiny_model, decode_steps=decode_steps)
    working_set = sum(len(p) + REPLY for p in PROMPTS)
    assert working_set >= 3 * POOL
    runs, launch_run = [], engine._launch_run
    engine._launch_run = lambda seqs, steps, after=None: (
        runs.append(after is not None) or launch_run(seqs, steps, after)
    )
    seqs, outputs = run_all(engine, PROMPTS)
    # runs of four did happen between preemptions, some launched before the last one's tokens were read
    assert bool(runs) == any(runs) == (decode_steps > 1)
    assert [out.error for out in outputs if out.error] == []
    assert [s.finish_reason for s in seqs] == [FinishReason.LENGTH] * len(PROMPTS)
    assert [s.output_ids for s in seqs] == solo_outputs
    assert engine.stats.preemptions > 0  # the pool really was too small for all of them at once
    assert seqs[0].preemptions == 0  # the oldest is never the one to give way
    assert_no_blocks_leaked(engine)


def test_preempted_sequence_resumes_from_the_host_tier_without_recomputing(
    tiny_model, solo_outputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = small_pool(tiny_model)
    computed = count_forwarded_tokens(engine, monkeypatch)
    seqs, _ = run_all(engine, PROMPTS)
    assert [s.output_ids for s in seqs] == solo_outputs
    preempted = [s for s in seqs if s.preemptions]
    assert preempted and engine.stats.swapped_out_bytes > 0 and engine.stats.swapped_in_bytes > 0
    assert any(s.swapped_in_bytes > 0 for s in preempted)
    # whole blocks come back from a tier; at most each preemption's partial last block is computed again
    for seq in preempted:
        assert seq.num_recomputed < BLOCK * seq.preemptions
    uninterrupted = sum(len(p) + REPLY - 1 for p in PROMPTS)
    assert computed["all"] == uninterrupted + engine.stats.recomputed_tokens
    assert engine.stats.recomputed_tokens < BLOCK * engine.stats.preemptions


def test_without_a_host_tier_preempted_sequences_recompute_and_stay_exact(
    tiny_model, solo_outputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = small_pool(tiny_model, host_tokens=0)
    computed = count_forwarded_tokens(engine, monkeypatch)
    seqs, _ = run_all(engine, PROMPTS)
    assert [s.output_ids for s in seqs] == solo_outputs
    assert engine.stats.preemptions > 0 and engine.stats.swapped_out_bytes == 0
    assert engine.stats.recomputed_tokens > BLOCK * engine.stats.preemptions  # what swapping saves
    assert computed["all"] == sum(len(p) + REPLY - 1 for p in PROMPTS) + engine.stats.recomputed_tokens


def test_prompt_larger_than_the_pool_is_refused_with_the_numbers(tiny_model) -> None:
    engine = small_pool(tiny_model)
    with pytest.raises(ContextOverflow, match=r"the KV pool holds 320 tokens .*; the prompt has 330 tokens"):
        engine.add_request(list(range(330)), SamplingParams(max_tokens=4))
    with pytest.raises(ContextOverflow, match="the prompt has 300 tokens and max_tokens asks for 40 more"):
        engine.add_request(list(range(300)), SamplingParams(max_tokens=40))
    assert not engine.has_work


def test_cancelled_sequence_gives_its_blocks_back(tiny_model) -> None:
    engine = small_pool(tiny_model)
    seqs = [engine.add_request(p, SamplingParams(max_tokens=REPLY, ignore_eos=True)) for p in PROMPTS[:3]]
    for _ in range(6):
        engine.step()
    held = {b for s in seqs for b in s.block_ids}
    assert held
    for seq in seqs:
        engine.abort(seq)
    assert not engine.has_work and all(s.block_ids == [] for s in seqs)
    assert_no_blocks_leaked(engine)  # only the cache holds blocks now (reclaimable by anyone)


def test_short_prompt_is_not_stuck_behind_a_long_cold_prefill(tiny_model) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(kv_pool_tokens=4096, max_batch_tokens=64, prefix_cache=False))
    long = engine.add_request(list(range(2000, 2400)), SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    assert long.num_computed == 64  # alone, it takes the whole step
    short = engine.add_request(list(range(5000, 5020)), SamplingParams(max_tokens=2, ignore_eos=True))
    outputs = engine.step()
    assert [out.sequence for out in outputs] == [short]  # its first token, in the next step
    assert long.num_computed == 64 + 44  # the long prompt kept the rest of the step


def test_decodes_run_every_step_while_a_long_prompt_prefills(tiny_model) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(kv_pool_tokens=4096, max_batch_tokens=32, prefix_cache=False))
    stream = engine.add_request(list(range(100, 120)), SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    engine.add_request(list(range(3000, 3400)), SamplingParams(max_tokens=1))
    for _ in range(10):
        assert stream in [out.sequence for out in engine.step()]


def fail_when_in_batch(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch, poison: int) -> None:
    """The model raises whenever a chunk containing the `poison` token is in the batch."""
    forward = engine.runner.forward

    def flaky(items: list[ForwardItem]):
        if any(poison in item.token_ids for item in items):
            raise RuntimeError("injected failure")
        return forward(items)

    monkeypatch.setattr(engine.runner, "forward", flaky)


def test_a_failing_sequence_fails_alone_and_the_batch_goes_on(
    tiny_model, solo_outputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(kv_pool_tokens=4096, max_batch_tokens=512))
    fail_when_in_batch(engine, monkeypatch, poison=77777 % 49152)
    culprit = [1, 2, 3, 77777 % 49152, 5]
    seqs, outputs = run_all(engine, [PROMPTS[0], culprit, PROMPTS[1], PROMPTS[2]])
    failures = [out for out in outputs if out.error is not None]
    assert [out.sequence for out in failures] == [seqs[1]]
    assert isinstance(failures[0].error, EngineFailure) and "injected failure" in str(failures[0].error)
    assert seqs[1].finish_reason is FinishReason.ERROR and seqs[1].block_ids == []
    assert [s.output_ids for s in (seqs[0], seqs[2], seqs[3])] == solo_outputs[:3]
    assert engine.stats.failed_sequences == 1


def test_a_prefix_that_cannot_be_loaded_fails_only_its_request(
    tiny_model, solo_outputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(kv_pool_tokens=4096))
    acquire = engine.prefix_cache.acquire

    def broken_for_one_tenant(namespace: str, token_ids: list[int]):
        if namespace == "damaged":
            raise ValueError("shape '[2, 30, 17, 3, 64]' is invalid for input of size 184320")
        return acquire(namespace, token_ids)

    monkeypatch.setattr(engine.prefix_cache, "acquire", broken_for_one_tenant)
    params = SamplingParams(max_tokens=REPLY, ignore_eos=True)
    good = [engine.add_request(p, params) for p in PROMPTS[:2]]
    bad = engine.add_request(PROMPTS[2], params, cache_namespace="damaged")
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    assert [out.sequence for out in outputs if out.error] == [bad]
    assert [s.output_ids for s in good] == solo_outputs[:2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_oversubscribed_sessions_on_gpu_swap_through_pinned_memory(
    tiny_llama_folder: Path, solo_outputs
) -> None:
    """On CUDA (kernels, decode graphs, pinned host tier) preempted sequences come back from host memory
    and every session gives the CPU's solo tokens."""
    model = load_model(str(tiny_llama_folder), torch.device("cuda"), torch.float32)
    engine = small_pool(model)
    assert engine.prefix_cache.host._slab.is_pinned()
    seqs, outputs = run_all(engine, PROMPTS)
    assert [out.error for out in outputs if out.error] == []
    assert [s.output_ids for s in seqs] == solo_outputs
    assert engine.stats.preemptions > 0 and engine.stats.swapped_in_bytes > 0
    assert engine.stats.recomputed_tokens < BLOCK * engine.stats.preemptions


def _hits_after_pressure(model, breakpoint: int) -> int:
    """Cached tokens of a prompt A (marked for caching up to `breakpoint`), resent after a newer prompt B
    and then a long one forced evictions from a pool with no tier below it."""
    engine = LLMEngine(model, EngineConfig(kv_pool_tokens=POOL, cache=CacheConfig(disk=False, host_tokens=0)))
    first, second, filler = list(range(3000, 3064)), list(range(4000, 4064)), list(range(5000, 5256))

    def run(prompt: list[int], cache_breakpoint: int = 0) -> Sequence:
        seq = engine.add_request(prompt, SamplingParams(max_tokens=1), cache_breakpoint=cache_breakpoint)
        while engine.has_work:
            engine.step()
        return seq

    run(first, breakpoint)
    run(second)
    run(filler)  # 17 blocks of a 20-block pool: most of A's or B's blocks must go
    return run(first).num_cached


def test_cache_breakpoint_blocks_are_evicted_last(tiny_model) -> None:
    # without a breakpoint the older prompt's blocks go first (least recently used) ...
    assert _hits_after_pressure(tiny_model, breakpoint=0) < 48
    # ... with one (Anthropic's cache_control) they outlive the newer prompt's: A hits all 3 whole blocks
    assert _hits_after_pressure(tiny_model, breakpoint=64) >= 48
