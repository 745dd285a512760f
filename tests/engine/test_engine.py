"""The engine loop as a caller sees it: tokens out, cached-token counts, stops, batching, eviction."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from warmkv.engine import llm_engine
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams
from warmkv.engine.sequence import FinishReason
from warmkv.errors import ContextOverflow, InvalidRequest
from warmkv.models.loader import load_model

PROMPT = list(range(1000, 1050))  # 50 tokens: three full blocks of 16 and a partial one


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_folder: Path):
    return load_model(str(tiny_llama_folder), torch.device("cpu"), torch.float32)


def engine_for(model, **overrides) -> LLMEngine:
    return LLMEngine(model, EngineConfig(kv_pool_tokens=4096, **overrides))


def run(engine: LLMEngine, prompt: list[int], **params) -> tuple[list[int], str, object]:
    outputs = list(engine.generate(prompt, SamplingParams(**params)))
    seq = outputs[-1].sequence
    return seq.output_ids, "".join(o.text for o in outputs), seq


def test_extending_request_reuses_cached_blocks_with_identical_output(tiny_model) -> None:
    cold = engine_for(tiny_model, prefix_cache=False)
    warm = engine_for(tiny_model)
    first_ids, _, first = run(warm, PROMPT, max_tokens=8, ignore_eos=True)
    assert first.num_cached == 0
    follow_up = PROMPT + first_ids + list(range(2000, 2010))
    ids, _, seq = run(warm, follow_up, max_tokens=8, ignore_eos=True)
    # the 50 prompt tokens + 7 computed outputs: 3 whole blocks and the reply frontier's partial block
    assert seq.num_cached == 57
    assert ids == run(cold, follow_up, max_tokens=8, ignore_eos=True)[0]


def test_fully_cached_prompt_still_computes_its_last_token(tiny_model) -> None:
    engine = engine_for(tiny_model)
    prompt = PROMPT[:48]  # exactly three blocks
    first, _, _ = run(engine, prompt, max_tokens=4, ignore_eos=True)
    again, _, seq = run(engine, prompt, max_tokens=4, ignore_eos=True)
    assert seq.num_cached == 32 and again == first


def test_prefill_only_request_caches_the_prompt(tiny_model) -> None:
    engine = engine_for(tiny_model)
    ids, _, seq = run(engine, PROMPT, max_tokens=0)
    assert ids == [] and seq.finish_reason is FinishReason.LENGTH
    assert run(engine, [*PROMPT, 7, 8], max_tokens=1)[2].num_cached == 50


def test_chunked_prefill_gives_the_same_tokens(tiny_model) -> None:
    whole = run(engine_for(tiny_model, prefix_cache=False), PROMPT, max_tokens=10, ignore_eos=True)[0]
    chunked = run(
        engine_for(tiny_model, prefix_cache=False, max_batch_tokens=7), PROMPT, max_tokens=10, ignore_eos=True
    )
    assert chunked[0] == whole


def test_concurrent_requests_decode_together_without_interference(tiny_model) -> None:
    prompts = [PROMPT, [*PROMPT[:20], 5, 6, 7], list(range(3000, 3033))]
    alone = [run(engine_for(tiny_model), p, max_tokens=12, ignore_eos=True)[0] for p in prompts]
    engine = engine_for(tiny_model)
    seqs = [engine.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True)) for p in prompts]
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    assert [s.output_ids for s in seqs] == alone
    assert steps < sum(len(ids) for ids in alone)  # decode steps were shared


def test_tiny_pool_evicts_and_preempts_but_stays_exact(tiny_model) -> None:
    prompts = [list(range(100 * i, 100 * i + 40)) for i in range(1, 6)]
    roomy = [run(engine_for(tiny_model), p, max_tokens=20, ignore_eos=True)[0] for p in prompts]
    engine = LLMEngine(tiny_model, EngineConfig(kv_pool_tokens=128, block_size=16))  # 8 blocks
    seqs = [engine.add_request(p, SamplingParams(max_tokens=20, ignore_eos=True)) for p in prompts]
    while engine.has_work:
        engine.step()
    assert [s.output_ids for s in seqs] == roomy
    cache = engine.prefix_cache
    holders = Counter([*cache.index._blocks.values(), *cache.partials._entries.values()])
    in_use = {b: n for b, n in enumerate(engine.pool.ref_counts) if n}
    assert in_use == dict(holders)  # nothing leaked: every held block is held by the cache alone
    assert engine.pool.num_free + len(in_use) == engine.pool.num_blocks


def test_seed_makes_sampling_reproducible(tiny_model) -> None:
    engine = engine_for(tiny_model)
    params = dict(max_tokens=16, temperature=1.5, top_p=0.95, top_k=50, ignore_eos=True)
    first = run(engine, PROMPT, seed=7, **params)[0]
    assert run(engine, PROMPT, seed=7, **params)[0] == first
    assert run(engine, PROMPT, seed=8, **params)[0] != first


def test_top_k_one_is_greedy(tiny_model) -> None:
    engine = engine_for(tiny_model)
    greedy = run(engine, PROMPT, max_tokens=10, ignore_eos=True)[0]
    assert run(engine, PROMPT, max_tokens=10, temperature=1.0, top_k=1, seed=3, ignore_eos=True)[0] == greedy


def test_stop_string_ends_generation_and_is_not_returned(tiny_model) -> None:
    engine = engine_for(tiny_model)
    _, text, _ = run(engine, PROMPT, max_tokens=30, ignore_eos=True)
    stop = text[10:14]
    assert stop and text.find(stop) >= 10
    _, stopped_text, seq = run(engine, PROMPT, max_tokens=30, ignore_eos=True, stop=[stop])
    assert stopped_text == text[: text.find(stop)]
    assert seq.finish_reason is FinishReason.STOP


def test_stop_token_id_and_max_tokens(tiny_model) -> None:
    engine = engine_for(tiny_model)
    ids, _, seq = run(engine, PROMPT, max_tokens=6, ignore_eos=True)
    assert len(ids) == 6 and seq.finish_reason is FinishReason.LENGTH
    ids_stopped, _, seq = run(engine, PROMPT, max_tokens=6, ignore_eos=True, stop_token_ids=[ids[3]])
    assert ids_stopped == ids[: ids.index(ids[3]) + 1] and seq.finish_reason is FinishReason.STOP


def test_prompt_past_context_window_is_refused(tiny_model) -> None:
    engine = engine_for(tiny_model, max_model_len=64)
    with pytest.raises(ContextOverflow, match="context window is 64 tokens; the prompt has 60"):
        engine.add_request(list(range(60)), SamplingParams(max_tokens=10))
    with pytest.raises(InvalidRequest):
        SamplingParams(top_p=0)


def test_decode_steps_back_to_back_give_each_sequence_its_own_tokens_and_stop(tiny_model) -> None:
    """Four greedy decode steps run before the host reads their tokens: three sequences decoding together
    give the tokens, text and finish reasons of one step at a time, in fewer engine steps, though they stop
    inside a run of four (a stop token, a stop string, max_tokens); the KV computed past a stop is never
    reused: a follow-up over a stopped reply reads its cached blocks and gives a cold engine's tokens."""
    check_decode_steps_back_to_back(tiny_model, tiny_model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_steps_back_to_back_on_gpu_graphs_feed_each_step_the_tokens_on_the_device(
    tiny_llama_folder: Path, tiny_model
) -> None:
    """The same on CUDA, where each replayed decode graph reads the tokens the one before chose without
    the host seeing them; every sequence still gives the CPU's tokens one step at a time."""
    model = load_model(str(tiny_llama_folder), torch.device("cuda"), torch.float32)
    check_decode_steps_back_to_back(model, tiny_model)


def check_decode_steps_back_to_back(model, cpu_model) -> None:
    prompts = [PROMPT, list(range(3000, 3033)), [*PROMPT[:20], 5, 6, 7], list(range(4000, 4025))]
    reference = engine_for(cpu_model, decode_steps=1)
    free = [
        run(reference, p, max_tokens=n, ignore_eos=True)
        for p, n in zip(prompts[:3], (14, 9, 13), strict=True)
    ]
    params = [
        SamplingParams(max_tokens=14, ignore_eos=True, stop_token_ids=[free[0][0][5]]),
        SamplingParams(max_tokens=9, ignore_eos=True),
        SamplingParams(max_tokens=13, ignore_eos=True, stop=[free[2][1][6:9]]),
        # sampled on the device with its own seeded generator, as one step at a time samples it
        SamplingParams(max_tokens=15, ignore_eos=True, temperature=0.9, top_p=0.95, top_k=50, seed=11),
    ]
    results = {}
    for steps in (1, 4):
        engine = engine_for(model, decode_steps=steps)
        seqs = [engine.add_request(p, q) for p, q in zip(prompts, params, strict=True)]
        texts, count = ["", "", "", ""], 0
        while engine.has_work:
            for out in engine.step():
                texts[seqs.index(out.sequence)] += out.text
            count += 1
        results[steps] = ([s.output_ids for s in seqs], texts, [s.finish_reason for s in seqs], count, engine)
    assert results[4][:3] == results[1][:3]
    ids, texts, reasons = results[4][:3]
    assert ids[0] == free[0][0][: free[0][0].index(free[0][0][5]) + 1] and ids[1] == free[1][0]
    assert texts[2] == free[2][1][: free[2][1].find(free[2][1][6:9])]
    assert reasons == [FinishReason.STOP, FinishReason.LENGTH, FinishReason.STOP, FinishReason.LENGTH]
    assert results[4][3] < results[1][3]  # the runs of four took fewer engine steps
    engine = results[4][4]
    follow_up = prompts[0] + ids[0] + list(range(2000, 2010))
    again, _, seq = run(engine, follow_up, max_tokens=8, ignore_eos=True)
    assert seq.num_cached == len(prompts[0]) + len(ids[0]) - 1  # the stopped reply, as computed
    assert (
        again == run(engine_for(cpu_model, prefix_cache=False), follow_up, max_tokens=8, ignore_eos=True)[0]
    )


def test_the_next_run_is_launched_before_the_host_reads_a_runs_tokens(tiny_model, monkeypatch) -> None:
    """While the host reads a run's tokens and streams them, the GPU already has the next run of the
    same sequences queued: each read finds four more steps launched than it reads (the last run's aside)."""
    engine = engine_for(tiny_model, decode_steps=4)
    launched, reads, forward = [0], [], engine.runner.forward

    def counting(items, new_tokens=None):
        launched[0] += 1
        return forward(items, new_tokens=new_tokens)

    monkeypatch.setattr(engine.runner, "forward", counting)
    tokens = llm_engine._Run.tokens
    monkeypatch.setattr(llm_engine._Run, "tokens", lambda run: reads.append(launched[0]) or tokens(run))
    ids, _, _ = run(engine, PROMPT, max_tokens=18, ignore_eos=True)
    # the prompt's step, then runs of 4, 4, 4, 4 and 1: each of the first three read with the next launched
    assert reads == [1 + 8, 1 + 12, 1 + 16, 1 + 16]
    assert ids == run(engine_for(tiny_model, decode_steps=1), PROMPT, max_tokens=18, ignore_eos=True)[0]


def test_a_request_arriving_while_a_run_is_queued_is_admitted_right_after_it(tiny_model) -> None:
    """No run follows a queued one while a request waits: the request's prompt runs in the next step."""
    engine = engine_for(tiny_model, decode_steps=4)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    first = engine.add_request(PROMPT, params)
    engine.step()  # its prompt
    engine.step()  # a run of four, the next one queued
    assert engine._in_flight is not None
    late = engine.add_request(list(range(4000, 4020)), params)
    engine.step()  # the queued run read
    assert engine._in_flight is None and not late.output_ids
    engine.step()
    assert late.output_ids  # its prompt, and its first token
    while engine.has_work:
        engine.step()
    solo = engine_for(tiny_model, decode_steps=1)
    assert first.output_ids == run(solo, PROMPT, max_tokens=20, ignore_eos=True)[0]
    assert late.output_ids == run(solo, list(range(4000, 4020)), max_tokens=20, ignore_eos=True)[0]


def test_abort_and_arrival_while_a_run_is_queued_lose_nothing(tiny_model) -> None:
    """A run launched before the last one's tokens were read still holds a sequence aborted meanwhile: it
    gets no output after its abort, the others go on with their solo tokens, a request arriving then is
    admitted once the queued run is read and gives its solo tokens, and every block comes back."""
    check_abort_and_arrival_while_a_run_is_queued(tiny_model, tiny_model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_abort_and_arrival_while_a_run_is_queued_on_gpu_graphs(tiny_llama_folder: Path, tiny_model) -> None:
    """The same with CUDA graphs, where the queued run is still writing the aborted sequence's blocks
    when they go back to the pool: the late request that takes them gives the CPU's tokens."""
    model = load_model(str(tiny_llama_folder), torch.device("cuda"), torch.float32)
    check_abort_and_arrival_while_a_run_is_queued(model, tiny_model)


def check_abort_and_arrival_while_a_run_is_queued(model, cpu_model) -> None:
    solo = engine_for(cpu_model, decode_steps=1, prefix_cache=False)
    prompts = [PROMPT, list(range(3000, 3033)), list(range(4000, 4020))]
    alone = [run(solo, p, max_tokens=20, ignore_eos=True)[0] for p in prompts]
    # a pool of 10 blocks (the decode graphs keep one more): the late request takes one of the aborted's
    pool_tokens = 160 + (16 if model.device.type == "cuda" else 0)
    engine = LLMEngine(model, EngineConfig(kv_pool_tokens=pool_tokens, decode_steps=4, prefix_cache=False))
    free = engine.pool.num_free
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    first, aborted = engine.add_request(prompts[0], params), engine.add_request(prompts[1], params)
    engine.step()  # both prompts
    engine.step()  # a run of four, the next one queued
    assert engine._in_flight is not None
    given_back = set(aborted.block_ids)
    engine.abort(aborted)
    late = engine.add_request(prompts[2], params)
    outputs, taken = [], set()
    while engine.has_work:
        outputs += engine.step()
        taken |= set(late.block_ids)
    assert taken & given_back
    assert not any(out.sequence is aborted for out in outputs)
    # its first token (the prompt's step) and a run of four
    assert aborted.output_ids == alone[1][:5] and aborted.finish_reason is FinishReason.ABORT
    assert first.output_ids == alone[0] and late.output_ids == alone[2]
    assert engine.pool.num_free == free


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_request_filling_a_small_pool_on_gpu_completes(tiny_llama_folder: Path) -> None:
    """The decode graphs keep one block of the pool for their padding rows: a pool smaller than the model's
    context holds one block less for requests, a request of exactly that many tokens completes (it waited
    for the kept block forever), and one more token is refused with the number."""
    model = load_model(str(tiny_llama_folder), torch.device("cuda"), torch.float32)
    engine = LLMEngine(model, EngineConfig(kv_pool_tokens=64, max_batch_tokens=64))  # 4 blocks of 16
    assert engine.max_model_len == 48
    ids, _, seq = run(engine, list(range(500, 540)), max_tokens=8, ignore_eos=True)
    assert len(ids) == 8 and seq.finish_reason is FinishReason.LENGTH
    with pytest.raises(ContextOverflow, match="the KV pool holds 48 tokens"):
        engine.add_request(list(range(500, 541)), SamplingParams(max_tokens=8))


def test_a_pool_too_small_for_two_blocks_is_refused_naming_the_minimum(tiny_llama) -> None:
    minimum = r"holds 16 tokens; it needs at least 32: two blocks of --block-size 16"
    with pytest.raises(InvalidRequest, match=minimum):
        LLMEngine(tiny_llama, EngineConfig(kv_pool_tokens=16))


def test_a_failed_write_at_exit_still_gives_the_pool_back(
    tiny_llama, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_for(tiny_llama)
    run(engine, PROMPT, max_tokens=2)

    def failing_close() -> None:
        raise RuntimeError("device fault")

    monkeypatch.setattr(engine.prefix_cache, "close", failing_close)
    with pytest.raises(RuntimeError, match="device fault"):
        engine.close()
    assert engine.pool.num_blocks == 0 and engine.pool.k.numel() == 0


def graphs_replayed(engine: LLMEngine) -> list:
    """The shapes of the graphs the engine replays from now on, in order."""
    served, replay = [], engine.runner.graphs.forward
    engine.runner.graphs.forward = lambda items, shape, new_tokens=None: (
        served.append(shape) or replay(items, shape, new_tokens)
    )
    return served


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_concurrent_decode_on_gpu_kernels_and_graphs_matches_the_cpu_reference(
    tiny_llama_folder: Path, tiny_llama
) -> None:
    """Five sequences of different lengths decode together (paged-attention kernel, CUDA graphs of
    shrinking batch buckets as they finish, a prefill chunk on top of cached blocks) and each gives the
    tokens the CPU's PyTorch path gives it alone."""
    model = load_model(str(tiny_llama_folder), torch.device("cuda"), torch.float32)
    prompts = [list(range(500, 500 + n)) for n in (3, 40, 130, 300, 17)]
    lengths = [30, 16, 25, 40, 20]  # long enough that all five decode together (bucket 8)
    cpu = engine_for(tiny_llama, prefix_cache=False)
    want = [run(cpu, p, max_tokens=n, ignore_eos=True)[0] for p, n in zip(prompts, lengths, strict=True)]
    for graphs in (True, False):
        gpu = LLMEngine(model, EngineConfig(kv_pool_tokens=4096, max_batch_tokens=64, cuda_graphs=graphs))
        sequences = [gpu.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True))
                     for p, n in zip(prompts, lengths, strict=True)]  # fmt: skip
        while gpu.has_work:
            gpu.step()
        assert [s.output_ids for s in sequences] == want
        served = []
        if graphs:  # every bucket's graph was captured before the first request
            assert set(gpu.runner.graphs._graphs) == set(gpu.runner.graphs.shapes)
            served = graphs_replayed(gpu)
        # the longest prompt again: its prefix comes from the cache, the rest is a chunk over cached blocks
        again = gpu.add_request(prompts[3] + want[3][:10] + [7, 8, 9], SamplingParams(max_tokens=6))
        while gpu.has_work:
            gpu.step()
        assert again.num_cached > 300
        if graphs:  # the chunk was one sequence's prefill graph, its decode steps the batch-1 graph
            assert [s.decode_only for s in served] == [False] + [True] * 5
        alone = run(cpu, prompts[3] + want[3][:10] + [7, 8, 9], max_tokens=6)[0]
        assert again.output_ids == alone


def test_idle_time_prefill_yields_to_a_request_at_once(tiny_model) -> None:
    engine = engine_for(tiny_model, max_batch_tokens=16)
    background = engine.add_request(list(range(3000, 3100)), SamplingParams(max_tokens=0), background=True)
    engine.step()
    engine.step()  # two 16-token chunks of the history are in the cache
    request = engine.add_request(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    assert background.finish_reason is FinishReason.ABORT  # gone before the request's first step
    assert engine.running == [request] and request.num_computed == 16
    while engine.has_work:
        engine.step()
    assert (
        request.output_ids
        == run(engine_for(tiny_model, prefix_cache=False), PROMPT, max_tokens=4, ignore_eos=True)[0]
    )
    again = engine.add_request([*range(3000, 3100), 1], SamplingParams(max_tokens=1))
    while engine.has_work:
        engine.step()
    assert again.num_cached == 32  # what the idle time computed was kept


def test_cpu_install_without_triton_generates_the_same_tokens(tiny_model, tiny_llama_folder: Path) -> None:
    """CPU builds of torch do not bring Triton: the engine must not need it there."""
    script = (
        "import sys, json, torch; sys.modules['triton'] = None\n"
        "from warmkv.engine.config import EngineConfig\n"
        "from warmkv.engine.llm_engine import LLMEngine\n"
        "from warmkv.engine.sampling import SamplingParams\n"
        "from warmkv.models.loader import load_model\n"
        f"model = load_model({str(tiny_llama_folder)!r}, torch.device('cpu'), torch.float32)\n"
        "engine = LLMEngine(model, EngineConfig(kv_pool_tokens=4096, prefix_cache=False))\n"
        f"out = list(engine.generate({PROMPT!r}, SamplingParams(max_tokens=6, ignore_eos=True)))\n"
        "print(json.dumps(out[-1].sequence.output_ids))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    want = run(engine_for(tiny_model, prefix_cache=False), PROMPT, max_tokens=6, ignore_eos=True)[0]
    assert json.loads(done.stdout.splitlines()[-1]) == want


def test_a_context_window_other_than_asked_is_said_in_the_log(
    tiny_model, caplog: pytest.LogCaptureFixture
) -> None:
    """--max-model-len past the model's positions, or past what the pool holds: served, and said so."""
    with caplog.at_level("WARNING", logger="warmkv.engine"):
        engine = LLMEngine(tiny_model, EngineConfig(kv_pool_tokens=256, max_model_len=1024))
    assert engine.max_model_len == 256
    said = caplog.text
    assert "--max-model-len 1024 is past the model's 512 positions" in said
    assert "--max-model-len 1024: the KV pool holds 256 tokens, so the context window is 256" in said
    caplog.clear()
    with caplog.at_level("WARNING", logger="warmkv.engine"):
        within = LLMEngine(tiny_model, EngineConfig(kv_pool_tokens=4096, max_model_len=500))
    assert within.max_model_len == 500
    assert "--max-model-len" not in caplog.text
