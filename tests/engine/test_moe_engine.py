"""Mixture-of-experts models (tiny random Qwen3-MoE; gpt-oss with sinks and alternating sliding windows;
DeepSeek-V3 with latent attention) on the paged, cached engine: reuse is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams
from warmkv.models.loader import load_model

from ..conftest import save_tiny_model
from .test_scheduler import PROMPTS, REPLY, run_all, small_pool

PROMPT = list(range(1000, 1050))  # three full blocks of 16 and a partial one


@pytest.fixture(scope="module", params=["qwen3moe", "gptoss", "deepseekv3"])
def moe_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="module")
def moe_model(moe_folder: Path):
    return load_model(str(moe_folder), torch.device("cpu"), torch.float32)


def _generate(engine: LLMEngine, prompt: list[int], max_tokens: int):
    outputs = list(engine.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    return outputs[-1].sequence


def test_moe_model_reuses_cached_prefix_with_identical_output(moe_model) -> None:
    cold = LLMEngine(moe_model, EngineConfig(kv_pool_tokens=4096, prefix_cache=False))
    warm = LLMEngine(moe_model, EngineConfig(kv_pool_tokens=4096))
    first = _generate(warm, PROMPT, 8)
    follow_up = PROMPT + first.output_ids + list(range(2000, 2010))
    again = _generate(warm, follow_up, 8)
    assert again.num_cached == 57  # the prompt and 7 computed outputs came from the cache
    assert again.output_ids == _generate(cold, follow_up, 8).output_ids
    chunked = LLMEngine(moe_model, EngineConfig(kv_pool_tokens=4096, prefix_cache=False, max_batch_tokens=7))
    assert _generate(chunked, follow_up, 8).output_ids == again.output_ids


def test_moe_sessions_oversubscribing_the_pool_get_their_solo_outputs(moe_model) -> None:
    """Six sessions decode together (DeepSeek-V3: one latent attention for all of them) in a pool of a
    quarter of their KV: sequences are preempted, swapped to the host tier and back, and each still gets
    the tokens it gets alone."""
    roomy = LLMEngine(moe_model, EngineConfig(kv_pool_tokens=4096, prefix_cache=False))
    alone = [_generate(roomy, p, REPLY).output_ids for p in PROMPTS]
    engine = small_pool(moe_model)
    seqs, _ = run_all(engine, PROMPTS)
    assert [s.output_ids for s in seqs] == alone
    assert engine.stats.preemptions > 0 and engine.stats.swapped_in_bytes > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_decode_with_fused_experts_and_graphs_matches_the_cpu_reference(
    moe_folder: Path, moe_model
) -> None:
    """Sequences decode together on CUDA (fused MoE kernels in prefill and in captured decode graphs) and
    each gives the tokens the CPU's expert loop gives it alone."""
    model = load_model(str(moe_folder), torch.device("cuda"), torch.float32)
    prompts = [list(range(500, 500 + n)) for n in (3, 40, 130, 17)]
    cpu = LLMEngine(moe_model, EngineConfig(kv_pool_tokens=4096, prefix_cache=False))
    want = [_generate(cpu, p, 12).output_ids for p in prompts]
    for graphs in (True, False):
        gpu = LLMEngine(model, EngineConfig(kv_pool_tokens=4096, max_batch_tokens=64, cuda_graphs=graphs))
        sequences = [gpu.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True)) for p in prompts]
        while gpu.has_work:
            gpu.step()
        assert [s.output_ids for s in sequences] == want
        if graphs and model.config.mla is None:  # latent attention runs in PyTorch ops, without graphs
            assert gpu.runner.graphs is not None and gpu.runner.graphs._graphs
    alone = list(range(900, 1100))  # a fresh prompt on its own, in chunks: gpt-oss's sinks through the kernel
    assert _generate(gpu, alone, 6).output_ids == _generate(cpu, alone, 6).output_ids
