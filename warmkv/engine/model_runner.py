"""Runs one batched forward pass: the new tokens of several sequences, each over its own block table."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from warmkv.cache.kv_pool import KVPool
from warmkv.models.attention import AttentionBatch, SequenceSlice
from warmkv.models.layers import has_kernels
from warmkv.models.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from warmkv.engine.cuda_graphs import DecodeGraphs

log = logging.getLogger("warmkv.engine")


@dataclass(slots=True)
class ForwardItem:
    """New tokens of one sequence, placed after the `start` tokens whose KV is already in its blocks."""

    token_ids: list[int]
    start: int
    block_ids: list[int]
    all_logits: bool = False  # logits for every new token instead of only the last


class ModelRunner:
    def __init__(
        self,
        module: LlamaForCausalLM,
        pool: KVPool,
        cuda_graphs: bool = False,
        max_batch: int = 1,
        max_context: int = 1,
    ) -> None:
        self.module = module
        self.pool = pool
        self.device = module.lm_head.weight.device
        # the paged Triton attention kernel and the decode graphs built on it; MLA attends over its latents
        # in PyTorch ops (warmkv.models.mla)
        self.kernels = has_kernels(self.device) and module.config.mla is None
        self.decode_graphs: DecodeGraphs | None = None
        if cuda_graphs and self.kernels:
            from warmkv.engine.cuda_graphs import DecodeGraphs  # Triton is there: kernels are

            self.decode_graphs = DecodeGraphs(module, pool, max_batch, max_context)

    def warm_up(self) -> None:
        """Compile the Triton kernels and capture the decode graphs now, so that the first requests do not
        wait for them: a fresh prompt, a chunk on top of its blocks, decode steps, then every batch size's
        graph."""
        if self.pool.num_free < 2:
            return
        log.info("warming up: compiling the kernels and capturing the decode graphs ...")
        blocks = self.pool.allocate(2)
        try:
            tokens = list(range(self.pool.block_size + 4))
            split = self.pool.block_size + 1
            self.forward([ForwardItem(tokens[:split], 0, blocks)])
            self.forward([ForwardItem(tokens[split:], split, blocks)])
            for position in (len(tokens), len(tokens) + 1):
                self.forward([ForwardItem([1], position, blocks)])
        finally:
            self.pool.decref_many(blocks)
        if self.decode_graphs is not None:
            started = time.perf_counter()
            self.decode_graphs.capture_all()
            seconds, buckets = time.perf_counter() - started, ", ".join(map(str, self.decode_graphs.buckets))
            log.info("captured decode graphs for batches of %s in %.1f s", buckets, seconds)

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        """Float32 logits per item: [1, vocab], or [new tokens, vocab] with all_logits."""
        if self.decode_graphs and self.decode_graphs.serves(items):
            logits = self.decode_graphs.forward(
                [i.token_ids[0] for i in items], [i.start for i in items], [i.block_ids for i in items]
            )
            return list(logits.split(1))
        input_ids = torch.tensor([t for item in items for t in item.token_ids], device=self.device)
        positions = torch.cat([torch.arange(i.start, i.start + len(i.token_ids)) for i in items])
        hidden = self.module(
            input_ids, positions.to(self.device), (self.pool.k, self.pool.v), self._batch(items)
        )
        rows, sizes, offset = [], [], 0
        for item in items:
            offset += len(item.token_ids)
            first = offset - len(item.token_ids) if item.all_logits else offset - 1
            rows.append(torch.arange(first, offset))
            sizes.append(offset - first)
        # one lm_head matmul for the whole batch: its weight is read once, not once per sequence
        return list(self.module.logits(hidden[torch.cat(rows).to(self.device)]).split(sizes))

    def _batch(self, items: list[ForwardItem]) -> AttentionBatch:
        slot_mapping = torch.cat(
            [self.pool.slots(i.block_ids, i.start, i.start + len(i.token_ids)) for i in items]
        ).to(self.device)
        fresh_prompt = len(items) == 1 and items[0].start == 0
        if self.kernels and not fresh_prompt:
            from warmkv.kernels.paged_attention import plan  # Triton is there: kernels are

            cfg = self.module.config
            paged = plan([len(i.token_ids) for i in items], [i.start + len(i.token_ids) for i in items],
                         [i.block_ids for i in items], self.pool.block_size, cfg.num_heads, cfg.num_kv_heads,
                         self.device)  # fmt: skip
            return AttentionBatch(slot_mapping, [], paged)
        return AttentionBatch(slot_mapping, self._slices(items))

    def _slices(self, items: list[ForwardItem]) -> list[SequenceSlice]:
        slices, offset = [], 0
        for item in items:
            context_len = item.start + len(item.token_ids)
            slices.append(
                SequenceSlice(
                    query_start=offset,
                    query_len=len(item.token_ids),
                    context_slots=self.pool.slots(item.block_ids, 0, context_len).to(self.device),
                    is_whole=item.start == 0,
                )
            )
            offset += len(item.token_ids)
        return slices
