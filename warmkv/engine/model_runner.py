"""Runs one batched forward pass: the new tokens of several sequences, each over its own block table."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from warmkv.engine.attention import AttentionBatch, SequenceSlice, build_mask
from warmkv.engine.cuda_graphs import DecodeGraphs
from warmkv.engine.kv_pool import KVPool
from warmkv.models.llama import LlamaForCausalLM


@dataclass(slots=True)
class ForwardItem:
    """New tokens of one sequence, placed after the `start` tokens whose KV is already in its blocks."""

    token_ids: list[int]
    start: int
    block_ids: list[int]
    all_logits: bool = False  # logits for every new token instead of only the last


class ModelRunner:
    def __init__(self, module: LlamaForCausalLM, pool: KVPool, cuda_graphs: bool = False) -> None:
        self.module = module
        self.pool = pool
        self.device = module.lm_head.weight.device
        self.sliding_window = module.config.sliding_window
        self.decode_graphs = (
            DecodeGraphs(module, pool) if cuda_graphs and self.device.type == "cuda" else None
        )

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        """Float32 logits per item: [1, vocab], or [new tokens, vocab] with all_logits."""
        if (
            self.decode_graphs
            and len(items) == 1
            and len(items[0].token_ids) == 1
            and not items[0].all_logits
        ):
            item = items[0]
            return [self.decode_graphs.forward(item.token_ids[0], item.start, item.block_ids)]
        input_ids = torch.tensor([t for item in items for t in item.token_ids], device=self.device)
        positions = torch.cat([torch.arange(i.start, i.start + len(i.token_ids)) for i in items])
        context_slots = [self.pool.slots(i.block_ids, 0, i.start + len(i.token_ids)) for i in items]
        batch = AttentionBatch(
            slot_mapping=torch.cat([slots[i.start :] for slots, i in zip(context_slots, items, strict=True)]),
            sequences=self._slices(items, context_slots),
        )
        hidden = self.module(input_ids, positions.to(self.device), (self.pool.k, self.pool.v), batch)
        rows, offset = [], 0
        for item in items:
            offset += len(item.token_ids)
            rows.append(
                hidden[offset - len(item.token_ids) : offset]
                if item.all_logits
                else hidden[offset - 1 : offset]
            )
        return [self.module.logits(r) for r in rows]

    def _slices(self, items: list[ForwardItem], context_slots: list[torch.Tensor]) -> list[SequenceSlice]:
        slices, offset = [], 0
        for item, slots in zip(items, context_slots, strict=True):
            query_len, context_len = len(item.token_ids), item.start + len(item.token_ids)
            window = self.sliding_window
            needs_mask = item.start > 0 or (window is not None and context_len > window)
            slices.append(
                SequenceSlice(
                    query_start=offset,
                    query_len=query_len,
                    context_slots=slots,
                    mask=build_mask(query_len, context_len, window, self.device) if needs_mask else None,
                    is_whole=item.start == 0,
                )
            )
            offset += query_len
        return slices
