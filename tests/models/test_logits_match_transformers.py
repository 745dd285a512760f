"""Our runner's logits equal transformers' on the same weights, for every way KV reaches attention.

Tolerance: float32 throughout, |ours - theirs| <= 1e-4 + 1e-4 * |theirs| per logit; the reference runs on
the CPU, ours on the CPU and (where present) on CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from warmkv.cache.kv_pool import KVPool
from warmkv.engine.forward_item import ForwardItem
from warmkv.engine.model_runner import ModelRunner
from warmkv.models.config import ModelConfig
from warmkv.models.loader import _read_json, _read_weights, build_module

from ..conftest import make_tiny_hf_model

TOL = dict(atol=1e-4, rtol=1e-4)
BLOCK = 8
PROMPT_LEN = 45  # not a multiple of the block size; past the Mistral sliding window


def _runner(folder: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> ModelRunner:
    config = ModelConfig.from_hf(_read_json(folder / "config.json"))
    module = build_module(config, _read_weights(folder, device, dtype), device, dtype)
    heads, head_dim, sides = config.kv_cache_layout
    return ModelRunner(module, KVPool(config.num_layers, 64, BLOCK, heads, head_dim, dtype, device, sides))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> torch.device:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device(request.param)


def _blocks_for(runner: ModelRunner, tokens: int) -> list[int]:
    return runner.pool.allocate(-(-tokens // BLOCK))


@pytest.fixture
def case(
    tiny_arch: str, tiny_folder: Path, device: torch.device
) -> tuple[ModelRunner, list[int], torch.Tensor]:
    torch.manual_seed(1)
    prompt = torch.randint(0, 49152, (PROMPT_LEN,)).tolist()
    with torch.no_grad():
        reference = make_tiny_hf_model(tiny_arch)(torch.tensor([prompt])).logits[0].float().to(device)
    return _runner(tiny_folder, device), prompt, reference


def test_one_shot_prefill_matches(case: tuple[ModelRunner, list[int], torch.Tensor]) -> None:
    runner, prompt, reference = case
    (logits,) = runner.forward([ForwardItem(prompt, 0, _blocks_for(runner, len(prompt)), all_logits=True)])
    torch.testing.assert_close(logits, reference, **TOL)


def test_chunked_prefill_matches(case: tuple[ModelRunner, list[int], torch.Tensor]) -> None:
    runner, prompt, reference = case
    blocks = _blocks_for(runner, len(prompt))
    chunks = [
        runner.forward([ForwardItem(prompt[start : start + 7], start, blocks, all_logits=True)])[0]
        for start in range(0, len(prompt), 7)
    ]
    torch.testing.assert_close(torch.cat(chunks), reference, **TOL)


def test_prefill_on_shared_blocks_matches(case: tuple[ModelRunner, list[int], torch.Tensor]) -> None:
    runner, prompt, reference = case
    shared_tokens = 4 * BLOCK
    owner_blocks = _blocks_for(runner, shared_tokens)
    runner.forward([ForwardItem(prompt[:shared_tokens], 0, owner_blocks)])
    for block in owner_blocks:  # a second sequence takes the prefix by reference, not by copy
        runner.pool.incref(block)
    blocks = owner_blocks + runner.pool.allocate(-(-(len(prompt) - shared_tokens) // BLOCK))
    (logits,) = runner.forward([ForwardItem(prompt[shared_tokens:], shared_tokens, blocks, all_logits=True)])
    torch.testing.assert_close(logits, reference[shared_tokens:], **TOL)
    assert [runner.pool.ref_counts[b] for b in owner_blocks] == [2] * 4


def test_decode_matches(case: tuple[ModelRunner, list[int], torch.Tensor]) -> None:
    runner, prompt, reference = case
    blocks = _blocks_for(runner, len(prompt))
    start = len(prompt) - 6
    runner.forward([ForwardItem(prompt[:start], 0, blocks)])
    for position in range(start, len(prompt)):
        (logits,) = runner.forward([ForwardItem([prompt[position]], position, blocks)])
        torch.testing.assert_close(logits[0], reference[position], **TOL)


def test_mixed_batch_matches(case: tuple[ModelRunner, list[int], torch.Tensor]) -> None:
    """A decode step and another sequence's prefill chunk in one forward pass do not disturb each other."""
    runner, prompt, reference = case
    first, second = _blocks_for(runner, len(prompt)), _blocks_for(runner, len(prompt))
    runner.forward([ForwardItem(prompt[:-1], 0, first)])
    decoded, prefilled = runner.forward(
        [ForwardItem(prompt[-1:], len(prompt) - 1, first), ForwardItem(prompt, 0, second, all_logits=True)]
    )
    torch.testing.assert_close(decoded[0], reference[-1], **TOL)
    torch.testing.assert_close(prefilled, reference, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_transformers_in_the_same_dtype(
    tiny_folder: Path, tiny_arch: str, dtype
) -> None:
    """bf16 / fp16: prefill, then decode on top of it, against transformers run in the same dtype.

    Tolerance: relative norm of the difference below 8e-3 (bf16) or 1.5e-3 (fp16), about three times what
    rounding in a different op order gives here (measured 2.4e-3 to 4.0e-3 and 3.6e-4 to 5.0e-4). DeepSeek-V3
    rounds more times in a row (the q and kv latents, their norms, the expansion per head): 1.6e-2 and 3e-3
    there (measured up to 9.2e-3 in bf16, while transformers' own bf16 is 0.7% to 1.7% off its float32 and
    ours no farther).
    """
    runner = _runner(tiny_folder, torch.device("cpu"), dtype)
    pool = runner.pool
    torch.manual_seed(2)
    prompt = torch.randint(0, 49152, (PROMPT_LEN,)).tolist()
    with torch.no_grad():
        reference = make_tiny_hf_model(tiny_arch).to(dtype)(torch.tensor([prompt])).logits[0].float()
    blocks = pool.allocate(-(-PROMPT_LEN // BLOCK))
    (prefill,) = runner.forward([ForwardItem(prompt[:-1], 0, blocks, all_logits=True)])
    (decode,) = runner.forward([ForwardItem(prompt[-1:], PROMPT_LEN - 1, blocks)])
    ours = torch.cat([prefill, decode])
    tolerance = 8e-3 if dtype is torch.bfloat16 else 1.5e-3
    if tiny_arch.startswith("deepseek"):
        tolerance *= 2
    assert ((ours - reference).norm() / reference.norm()).item() < tolerance
