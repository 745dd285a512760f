"""CUDA-graph replay of decode steps for batches of 1 to max_num_seqs sequences.

Eager decode of a large model spends most of each step launching kernels from Python; a captured graph
replays the whole forward pass in one launch. Shapes must be static, so a graph is captured per batch
size bucket (a batch is padded up to its bucket with rows that write a scratch slot) and reads block
tables as wide as the context window. The paged-attention kernel reads each row's context length at run
time, so one graph serves every context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from warmkv.cache.kv_pool import KVPool
from warmkv.kernels.paged_attention import PagedBatch, group_size, num_splits, tokens_per_tile
from warmkv.models.attention import AttentionBatch
from warmkv.models.llama import LlamaForCausalLM

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass(slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    staging: torch.Tensor  # pinned host copy of `inputs`, filled by the CPU each step
    inputs: torch.Tensor  # [token ids | positions | slots | context lengths | block table rows], int32
    logits: torch.Tensor  # [batch, vocab], written by each replay


class DecodeGraphs:
    def __init__(self, module: LlamaForCausalLM, pool: KVPool, max_batch: int, max_context: int) -> None:
        self.module = module
        self.pool = pool
        self.device = module.lm_head.weight.device
        self.max_blocks = -(-max_context // pool.block_size)
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        # never handed to a sequence: padding rows write here, and warm-up runs too
        self.scratch_block = pool.allocate(1)[0]
        self._graphs: dict[int, _Captured] = {}
        self._memory = torch.cuda.graph_pool_handle()

    def capture_all(self) -> None:
        """Capture every bucket's graph now: captured on first use, each would stall the step that needs it
        (on a 7B model, a fraction of a second each, and more for the first kernels it compiles)."""
        for bucket in self.buckets:
            if bucket not in self._graphs:
                self._capture(bucket)

    def serves(self, items: list) -> bool:
        return len(items) <= self.buckets[-1] and all(
            len(i.token_ids) == 1 and not i.all_logits for i in items
        )

    def forward(
        self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]
    ) -> torch.Tensor:
        """Logits [batch, vocab] of one decode step; each sequence's KV is stored at its position."""
        count = len(token_ids)
        bucket = next(b for b in self.buckets if b >= count)
        captured = self._graphs.get(bucket) or self._capture(bucket)
        host = captured.staging.numpy()
        size = self.pool.block_size
        host[:count] = token_ids
        host[bucket : bucket + count] = positions
        slots = host[2 * bucket : 3 * bucket]
        host[3 * bucket : 3 * bucket + count] = np.asarray(positions) + 1
        table = host[4 * bucket :].reshape(bucket, self.max_blocks)
        for row, (position, blocks) in enumerate(zip(positions, block_tables, strict=True)):
            # entries past a row's context are never read: only the used part is written
            table[row, : len(blocks)] = blocks
            slots[row] = blocks[position // size] * size + position % size
        captured.inputs.copy_(captured.staging, non_blocking=True)
        captured.graph.replay()
        return captured.logits[:count]

    def _capture(self, bucket: int) -> _Captured:
        staging = torch.zeros(4 * bucket + bucket * self.max_blocks, dtype=torch.int32).pin_memory()
        scratch_slot = self.scratch_block * self.pool.block_size
        staging[2 * bucket : 3 * bucket] = scratch_slot  # padding rows: write the scratch slot ...
        staging[3 * bucket : 4 * bucket] = 1  # ... and attend to one token ...
        staging[4 * bucket :: self.max_blocks] = self.scratch_block  # ... of the scratch block
        inputs = staging.to(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph: Triton compiles, cuBLAS picks its kernels
                self._step(inputs, bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory), torch.inference_mode():
            logits = self._step(inputs, bucket)
        self._graphs[bucket] = captured = _Captured(graph, staging, inputs, logits)
        return captured

    def _step(self, inputs: torch.Tensor, bucket: int) -> torch.Tensor:
        cfg = self.module.config
        token_ids, positions, slots, context_lens = inputs[: 4 * bucket].view(4, bucket)
        rows = torch.arange(bucket, dtype=torch.int32, device=self.device)
        paged = PagedBatch(
            block_table=inputs[4 * bucket :].view(bucket, self.max_blocks),
            context_lens=context_lens,
            query_starts=torch.arange(bucket + 1, dtype=torch.int32, device=self.device),
            tile_seqs=rows,
            tile_starts=torch.zeros_like(rows),
            block_size=self.pool.block_size,
            tokens_per_tile=tokens_per_tile(1, group_size(cfg.num_heads, cfg.num_kv_heads)),
            num_splits=num_splits(
                bucket, cfg.num_kv_heads, self.max_blocks * self.pool.block_size, self.device
            ),
        )
        batch = AttentionBatch(slot_mapping=slots, sequences=[], paged=paged)
        hidden = self.module(token_ids, positions, (self.pool.k, self.pool.v), batch)
        return self.module.logits(hidden)
