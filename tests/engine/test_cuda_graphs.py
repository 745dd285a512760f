"""What a captured graph computes, from the inputs a step fills in: the same logits as the eager pass, with
padding rows that touch no block but the scratch block.

Graphs need CUDA; the forward pass they capture (`step`) runs anywhere, its paged-attention kernel in
Triton's interpreter on the CPU, so the step's inputs are checked here without a GPU. The GPU tests here
and in test_engine.py replay the graphs themselves.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from warmkv.engine.config import EngineConfig
from warmkv.engine.cuda_graphs import GraphShape, fill_inputs, inputs_size, split_inputs, step
from warmkv.engine.forward_item import ForwardItem
from warmkv.engine.llm_engine import LLMEngine
from warmkv.kernels.paged_attention import group_size
from warmkv.models.loader import load_model


def _graph_step(engine: LLMEngine, shape: GraphShape, items: list[ForwardItem], scratch: int) -> torch.Tensor:
    max_blocks = 64
    buffer = torch.zeros(inputs_size(shape, max_blocks), dtype=torch.int32)
    inputs = split_inputs(buffer, shape, max_blocks)
    inputs["block_table"][:] = scratch  # as a capture sets it
    host = {name: part.numpy() for name, part in inputs.items()}
    fill_inputs(host, shape, items, engine.pool.block_size, scratch)
    with torch.inference_mode():
        return step(engine.runner.module, engine.pool, inputs, shape)


@pytest.mark.parametrize(
    ("kind", "new_tokens"),
    [("prefill", [5]), ("prefill", [16]), ("decode", [1, 1, 1]), ("decode", [1, 1, 1, 1])],
)
def test_graph_step_gives_the_eager_logits_and_pads_into_the_scratch_block(
    tiny_llama, kind: str, new_tokens: list[int]
) -> None:
    engine = LLMEngine(tiny_llama, EngineConfig(kv_pool_tokens=1024, prefix_cache=False))
    pool, runner = engine.pool, engine.runner
    cfg = runner.module.config
    group = group_size(cfg.num_heads, cfg.num_kv_heads)
    shape = GraphShape.prefill(16, group) if kind == "prefill" else GraphShape.decode(4, group)
    scratch = pool.allocate(1)[0]
    items = []
    for index, count in enumerate(new_tokens):  # cached prefixes of different lengths, then new tokens
        prefix = list(range(300 + index, 300 + index + 20 + 7 * index))
        blocks = pool.allocate(-(-(len(prefix) + count) // pool.block_size))
        runner.forward([ForwardItem(prefix, 0, blocks)])
        items.append(ForwardItem(list(range(900, 900 + count)), len(prefix), blocks))
    want = runner.forward(items)  # eager, on the PyTorch path: it writes the same KV the graph writes
    before = pool.k.clone()
    got = _graph_step(engine, shape, items, scratch)
    assert got.shape[0] == shape.outputs
    torch.testing.assert_close(got[: len(items)].float(), torch.cat(want), atol=1e-4, rtol=1e-4)
    size = pool.block_size
    moved = (pool.k - before).abs().amax(dim=(0, 2, 3)) > 1e-4  # per slot
    changed = {slot // size for slot in moved.nonzero().flatten().tolist()}
    assert changed <= {scratch}  # real KV rewritten with the same values; padding only in the scratch block
    if kind == "prefill" and sum(new_tokens) < shape.tokens:
        assert scratch in changed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_graph_replayed_again_before_the_device_caught_up_keeps_each_steps_inputs(
    tiny_llama_folder: Path,
) -> None:
    """Prefill chunks sample nothing, so nothing waits for the device between them: the second chunk
    through the same graph must not overwrite the first one's inputs before the device has read them."""
    model = load_model(str(tiny_llama_folder), torch.device("cuda"), torch.float32)
    engine = LLMEngine(model, EngineConfig(kv_pool_tokens=4096, prefix_cache=False))
    prompts = [list(range(100, 120)), list(range(300, 320))]  # both through the 32-token graph
    blocks = [engine.pool.allocate(2) for _ in prompts]
    torch.cuda._sleep(1_000_000_000)  # the device lags behind the host
    for prompt, table in zip(prompts, blocks, strict=True):
        engine.runner.forward([ForwardItem(prompt, 0, table)])
    graphed = [engine.pool.read_blocks(table) for table in blocks]
    for prompt, table in zip(prompts, blocks, strict=True):
        engine.runner.forward([ForwardItem(prompt, 0, table)], graphs=False)
        torch.testing.assert_close(engine.pool.read_blocks(table), graphed.pop(0), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_eager_pass_is_queued_without_waiting_for_the_device(tiny_llama_folder: Path) -> None:
    """A prompt too long for any graph (a fresh one, then a chunk over its blocks) is queued behind work
    the device has not done yet, without the host waiting for that work or for the pass itself (staged
    evictions and the next scheduling run meanwhile), and gives the logits it gives with an idle device."""
    model = load_model(str(tiny_llama_folder), torch.device("cuda"), torch.float32)
    engine = LLMEngine(model, EngineConfig(kv_pool_tokens=4096, prefix_cache=False))
    prompt = list(range(100, 400))
    blocks = engine.pool.allocate(-(-len(prompt) // engine.pool.block_size))
    items = [ForwardItem(prompt[:200], 0, blocks), ForwardItem(prompt[200:], 200, blocks)]
    idle = [engine.runner.forward([item], graphs=False)[0].cpu() for item in items]
    torch.cuda._sleep(1_000_000_000)  # the device lags behind the host
    queued = [engine.runner.forward([item], graphs=False)[0] for item in items]
    assert not torch.cuda.current_stream().query()  # both passes queued, the host not held up
    for logits, want in zip(queued, idle, strict=True):
        torch.testing.assert_close(logits.cpu(), want, atol=1e-4, rtol=1e-4)
