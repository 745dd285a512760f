"""Runs one batched forward pass: the new tokens of several sequences, each over its own block table."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from warmkv.cache.kv_pool import KVPool
from warmkv.engine.forward_item import ForwardItem
from warmkv.models.attention import AttentionBatch, SequenceSlice
from warmkv.models.layers import has_kernels
from warmkv.models.llama import LlamaForCausalLM
from warmkv.uploads import to_device

if TYPE_CHECKING:
    from warmkv.engine.cuda_graphs import StepGraphs

log = logging.getLogger("warmkv.engine")


class ModelRunner:
    def __init__(
        self,
        module: LlamaForCausalLM,
        pool: KVPool,
        cuda_graphs: bool = False,
        max_batch: int = 1,
        max_context: int = 1,
        max_prefill: int = 1,
    ) -> None:
        """max_batch: sequences decoding together; max_prefill: the most new tokens of one step."""
        self.module = module
        self.pool = pool
        self.device = module.lm_head.weight.device
        # the paged Triton attention kernel and the graphs built on it; MLA attends over its latents in
        # PyTorch ops (warmkv.models.mla)
        self.kernels = has_kernels(self.device) and module.config.mla is None
        self.graphs: StepGraphs | None = None
        if cuda_graphs and self.kernels:
            from warmkv.engine.cuda_graphs import StepGraphs  # Triton is there: kernels are

            self.graphs = StepGraphs(module, pool, max_batch, max_context, min(max_prefill, max_context))

    def warm_up(self) -> None:
        """Compile the Triton kernels and capture the graphs now, so that the first requests do not wait
        for them: a fresh prompt, a chunk on top of its blocks, decode steps, then every graph."""
        if self.pool.num_free < 2:
            return
        log.info("warming up: compiling the kernels and capturing the CUDA graphs ...")
        blocks = self.pool.allocate(2)
        try:
            tokens = list(range(self.pool.block_size + 4))
            split = self.pool.block_size + 1
            self.forward([ForwardItem(tokens[:split], 0, blocks)], graphs=False)
            self.forward([ForwardItem(tokens[split:], split, blocks)], graphs=False)
            for position in (len(tokens), len(tokens) + 1):
                self.forward([ForwardItem([1], position, blocks)], graphs=False)
        finally:
            self.pool.decref_many(blocks)
        if self.graphs is not None:
            started = time.perf_counter()
            self.graphs.capture_all()
            shapes = self.graphs.shapes
            decode = ", ".join(str(s.seqs) for s in shapes if s.decode_only)
            prefill = ", ".join(str(s.tokens) for s in shapes if not s.decode_only)
            seconds = time.perf_counter() - started
            log.info("captured CUDA graphs in %.1f s: decode batches of %s, one sequence's %s new tokens",
                     seconds, decode, prefill)  # fmt: skip

    @torch.inference_mode()
    def forward(
        self, items: list[ForwardItem], graphs: bool = True, new_tokens: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Float32 logits per item: [1, vocab], or [new tokens, vocab] with all_logits. graphs=False: the
        eager pass, even where a captured graph serves the items. new_tokens: the items' tokens on the
        device (a decode step's, one each, sampled by the step before and not yet read by the host); the
        items' own token ids are then placeholders."""
        shape = self.graphs.shape_for(items) if graphs and self.graphs else None
        if shape is not None:
            return list(self.graphs.forward(items, shape, new_tokens).split(1))  # type: ignore[union-attr]
        # every host input goes up before the layers are queued, none of them waiting for the device
        input_ids = (
            to_device(torch.tensor([t for item in items for t in item.token_ids]), self.device)
            if new_tokens is None
            else new_tokens
        )
        positions = torch.cat([torch.arange(i.start, i.start + len(i.token_ids)) for i in items])
        rows, sizes, offset = [], [], 0
        for item in items:
            offset += len(item.token_ids)
            first = offset - len(item.token_ids) if item.all_logits else offset - 1
            rows.append(torch.arange(first, offset))
            sizes.append(offset - first)
        logit_rows = to_device(torch.cat(rows), self.device)
        hidden = self.module(
            input_ids, to_device(positions, self.device), (self.pool.k, self.pool.v), self._batch(items)
        )
        # one lm_head matmul for the whole batch: its weight is read once, not once per sequence
        return list(self.module.logits(hidden[logit_rows]).split(sizes))

    def _batch(self, items: list[ForwardItem]) -> AttentionBatch:
        slot_mapping = to_device(
            torch.cat([self.pool.slots(i.block_ids, i.start, i.start + len(i.token_ids)) for i in items]),
            self.device,
        )
        # PyTorch's fused attention takes no sinks (gpt-oss): unfused, a long prompt's scores alone would
        # take gigabytes, so such a model's fresh prompt reads the pool through the kernel too
        sinks = self.module.config.attention_sinks
        fresh_prompt = len(items) == 1 and items[0].start == 0 and not sinks
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
                    context_slots=to_device(self.pool.slots(item.block_ids, 0, context_len), self.device),
                    is_whole=item.start == 0,
                )
            )
            offset += len(item.token_ids)
        return slices
