"""CUDA-graph replay of single-sequence decode steps.

Eager decode of a large model spends most of each step launching kernels from Python. A captured graph
replays the whole forward pass in one launch. Shapes must be static, so each graph serves contexts up to a
power-of-two bucket: the block table is padded with a scratch block and the mask hides the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from warmkv.engine.attention import AttentionBatch, SequenceSlice
from warmkv.engine.kv_pool import KVPool
from warmkv.models.llama import LlamaForCausalLM

SMALLEST_BUCKET = 256


@dataclass(slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # [token id, position, block table...] on the device
    logits: torch.Tensor  # [1, vocab], written by each replay


class DecodeGraphs:
    def __init__(self, module: LlamaForCausalLM, pool: KVPool) -> None:
        self.module = module
        self.pool = pool
        self.device = module.lm_head.weight.device
        # never handed to a sequence: padding slots point here, and warm-up runs write here
        self.scratch_block = pool.allocate(1)[0]
        self._graphs: dict[int, _Captured] = {}
        self._memory = torch.cuda.graph_pool_handle()

    def forward(self, token_id: int, position: int, block_ids: list[int]) -> torch.Tensor:
        bucket = max(SMALLEST_BUCKET, 1 << position.bit_length())
        captured = self._graphs.get(bucket) or self._capture(bucket)
        blocks = bucket // self.pool.block_size
        padded = block_ids[:blocks] + [self.scratch_block] * (blocks - len(block_ids))
        captured.inputs.copy_(torch.tensor([token_id, position, *padded], dtype=torch.long))
        captured.graph.replay()
        return captured.logits

    def _capture(self, bucket: int) -> _Captured:
        blocks = bucket // self.pool.block_size
        inputs = torch.tensor([0, 0] + [self.scratch_block] * blocks, dtype=torch.long, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph: lazy initialisation must not be captured
                self._step(inputs, bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory), torch.inference_mode():
            logits = self._step(inputs, bucket)
        self._graphs[bucket] = captured = _Captured(graph, inputs, logits)
        return captured

    def _step(self, inputs: torch.Tensor, bucket: int) -> torch.Tensor:
        size = self.pool.block_size
        token, position, block_table = inputs[:1], inputs[1:2], inputs[2:]
        keys = torch.arange(bucket, device=self.device)
        context_slots = block_table[keys // size] * size + keys % size
        mask = keys <= position
        if self.module.config.sliding_window is not None:
            mask &= keys > position - self.module.config.sliding_window
        batch = AttentionBatch(
            slot_mapping=block_table[position // size] * size + position % size,
            sequences=[SequenceSlice(0, 1, context_slots, mask[None, :], is_whole=False)],
        )
        hidden = self.module(token, position, (self.pool.k, self.pool.v), batch)
        return self.module.logits(hidden)
