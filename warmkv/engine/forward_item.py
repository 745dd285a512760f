"""One sequence's share of a forward pass: what the model runner and its CUDA graphs are given."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ForwardItem:
    """New tokens of one sequence, placed after the `start` tokens whose KV is already in its blocks."""

    token_ids: list[int]
    start: int
    block_ids: list[int]
    all_logits: bool = False  # logits for every new token instead of only the last
