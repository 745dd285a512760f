"""CUDA-graph replay of forward passes: decode steps of 1 to max_num_seqs sequences, and the new tokens of
one sequence (a turn on top of its cached prefix, a short prompt).

Launched eagerly, a forward pass of a large model spends most of its time launching kernels from Python:
about 10 ms for a 7B model's 28 layers, more than the GPU work of a 64-token turn over a cached 32k
prefix. A captured graph replays the whole pass in one launch. Shapes must be static, so a graph is
captured per size bucket: the batch is padded with sequences that write a scratch block, and block tables
are as wide as the context window. The paged-attention kernel reads every length, query tile and block
table at run time, so one graph serves every context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from warmkv.cache.kv_pool import KVPool
from warmkv.engine.forward_item import ForwardItem
from warmkv.kernels.paged_attention import (
    PagedBatch,
    aligned,
    group_size,
    num_splits,
    split_aligned,
    tokens_per_tile,
)
from warmkv.models.attention import AttentionBatch
from warmkv.models.llama import LlamaForCausalLM

DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# new tokens of one sequence; past 512 a 7B model's GPU work (about 10 ms) outweighs launching it, and
# buckets cost a graph each at start-up
PREFILL_BUCKETS = (16, 32, 64, 96, 128, 192, 256, 384, 512)


@dataclass(frozen=True, slots=True)
class GraphShape:
    """The static sizes of one captured graph."""

    seqs: int  # sequence rows: the step's sequences first, then padding sequences
    tokens: int  # token rows
    outputs: int  # the most real sequences it serves: logits of each one's last token
    tokens_per_tile: int  # query tokens per attention tile
    tiles: int  # enough for any split of `tokens` over `seqs` into tiles

    @property
    def decode_only(self) -> bool:
        """A token per sequence row: the graph serves decode steps alone."""
        return self.seqs == self.tokens

    @property
    def context_tiles(self) -> int:
        """The tiles whose queries may see a long context: not a prefill's padding sequence's, which sees
        its scratch block (attention's splits are planned for these)."""
        return self.tiles if self.decode_only else self.tiles - 1

    @classmethod
    def decode(cls, batch: int, group: int) -> GraphShape:
        return cls(batch, batch, batch, tokens_per_tile(1, group), batch)

    @classmethod
    def prefill(cls, tokens: int, group: int) -> GraphShape:
        """One sequence's tokens, and one padding sequence for the rows it leaves."""
        per_tile = tokens_per_tile(tokens, group)
        return cls(2, tokens, 1, per_tile, -(-tokens // per_tile) + 1)

    def sections(self, max_blocks: int) -> dict[str, int]:
        """The int32 inputs of a step, in their order in one buffer, and their sizes."""
        tokens, seqs = self.tokens, self.seqs
        return {
            "token_ids": tokens, "positions": tokens, "slots": tokens, "context_lens": seqs,
            "query_starts": seqs + 1, "tile_seqs": self.tiles, "tile_starts": self.tiles,
            "last_rows": self.outputs, "block_table": seqs * max_blocks,
        }  # fmt: skip


def inputs_size(shape: GraphShape, max_blocks: int) -> int:
    return sum(aligned(size) for size in shape.sections(max_blocks).values())


def split_inputs(buffer: torch.Tensor, shape: GraphShape, max_blocks: int) -> dict[str, torch.Tensor]:
    """The sections of a graph's inputs buffer, each starting 16-byte aligned (as plan's)."""
    sections = shape.sections(max_blocks)
    parts = dict(zip(sections, split_aligned(buffer, list(sections.values())), strict=True))
    parts["block_table"] = parts["block_table"].view(shape.seqs, max_blocks)
    return parts


def fill_inputs(
    inputs: dict[str, np.ndarray], shape: GraphShape, items: list[ForwardItem], block_size: int,
    scratch_block: int,
) -> None:  # fmt: skip
    """Write one step's items into a graph's host inputs. Padding sequences take the token rows the items
    leave (the first of them all but one each of the others), write their K/V into the scratch block and
    attend only to it; their table rows are the scratch block's, set at capture, or stale entries of an
    earlier step's sequence, which a padding row of one token reads one block of: harmless."""
    lengths = [len(item.token_ids) for item in items]
    real = sum(lengths)  # token rows of the items; the rest are padding
    pads = shape.seqs - len(items)
    lengths += [shape.tokens - real - pads + 1] + [1] * (pads - 1) if pads else []
    counts = np.asarray(lengths)
    starts = np.asarray([item.start for item in items] + [0] * pads)
    table = inputs["block_table"]
    for row, item in enumerate(items):
        table[row, : len(item.block_ids)] = item.block_ids
    query_starts = inputs["query_starts"]
    query_starts[0] = 0
    np.cumsum(counts, out=query_starts[1:])
    rows = np.repeat(np.arange(shape.seqs), counts)
    positions = np.arange(shape.tokens) + np.repeat(starts - query_starts[:-1], counts)
    inputs["positions"][:] = positions
    inputs["context_lens"][:] = starts + counts
    inputs["token_ids"][:real] = [token for item in items for token in item.token_ids]
    slots, size = inputs["slots"], block_size
    slots[:real] = table[rows[:real], positions[:real] // size] * size + positions[:real] % size
    slots[real:] = scratch_block * size + positions[real:] % size
    # each sequence's rows in tiles of tokens_per_tile; tiles to spare start past the last sequence's rows
    # (no query of their own, over that padding sequence's few keys)
    per_seq = -(-counts // shape.tokens_per_tile)
    used = int(per_seq.sum())
    inputs["tile_seqs"][:used] = np.repeat(np.arange(shape.seqs), per_seq)
    inputs["tile_seqs"][used:] = shape.seqs - 1
    first_tiles = np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    inputs["tile_starts"][:used] = (np.arange(used) - first_tiles) * shape.tokens_per_tile
    inputs["tile_starts"][used:] = lengths[-1]
    inputs["last_rows"][: len(items)] = query_starts[1 : len(items) + 1] - 1
    inputs["last_rows"][len(items) :] = 0


@dataclass(slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    staging: torch.Tensor  # pinned host copy of `inputs`, filled by the CPU each step
    host: dict[str, np.ndarray]  # the staging buffer's sections
    inputs: torch.Tensor  # on the device: the graph reads its step from here
    token_ids: torch.Tensor  # the inputs' token ids section
    logits: torch.Tensor  # [outputs, vocab], written by each replay
    # recorded after the latest copy out of `staging`: a step that samples nothing (a prefill chunk) does not
    # wait for the device, so the next step of this graph must not refill staging before that copy has run
    copied: torch.cuda.Event | None = None


class StepGraphs:
    def __init__(self, module: LlamaForCausalLM, pool: KVPool, max_batch: int, max_context: int,
                 max_prefill: int) -> None:  # fmt: skip
        self.module = module
        self.pool = pool
        self.device = module.lm_head.weight.device
        self.max_blocks = -(-max_context // pool.block_size)
        cfg = module.config
        group = group_size(cfg.num_heads, cfg.num_kv_heads)
        decode = [b for b in DECODE_BUCKETS if b < max_batch] + [max_batch]
        self.shapes = [GraphShape.decode(b, group) for b in decode]
        self.shapes += [GraphShape.prefill(t, group) for t in PREFILL_BUCKETS if t <= max_prefill]
        # never handed to a sequence: padding rows write here, and warm-up runs too
        self.scratch_block = pool.allocate(1)[0]
        self._graphs: dict[GraphShape, _Captured] = {}
        self._memory = torch.cuda.graph_pool_handle()

    def capture_all(self) -> None:
        """Capture every bucket's graph now: captured on first use, each would stall the step that needs it
        (on a 7B model, a fraction of a second each, and more for the first kernels it compiles)."""
        for shape in self.shapes:
            if shape not in self._graphs:
                self._capture(shape)

    def shape_for(self, items: list[ForwardItem]) -> GraphShape | None:
        """The smallest captured shape that serves these items, if any: all decoding, or one sequence."""
        if any(item.all_logits for item in items):
            return None
        tokens = sum(len(item.token_ids) for item in items)
        decode = tokens == len(items)
        for shape in self.shapes:
            fits = len(items) <= shape.outputs and tokens <= shape.tokens
            if fits and shape.decode_only == decode:
                return shape
        return None

    def forward(
        self, items: list[ForwardItem], shape: GraphShape, new_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [items, vocab] of each item's last token; the new tokens' KV is stored in their slots.
        new_tokens: the items' tokens (a decode step's, one each) on the device, in place of theirs."""
        captured = self._graphs.get(shape) or self._capture(shape)
        if captured.copied is not None:
            # usually long done: the last step of this shape has sampled (a step queued behind another
            # waits here for that one's copy, which runs once the GPU reaches it)
            captured.copied.synchronize()
        fill_inputs(captured.host, shape, items, self.pool.block_size, self.scratch_block)
        captured.inputs.copy_(captured.staging, non_blocking=True)
        if new_tokens is not None:  # after the copy above in stream order: these are the tokens read
            captured.token_ids[: len(new_tokens)].copy_(new_tokens)
        captured.copied = torch.cuda.Event()
        captured.copied.record()
        captured.graph.replay()
        return captured.logits[: len(items)]

    def _capture(self, shape: GraphShape) -> _Captured:
        staging = torch.zeros(inputs_size(shape, self.max_blocks), dtype=torch.int32).pin_memory()
        host = {name: part.numpy() for name, part in split_inputs(staging, shape, self.max_blocks).items()}
        host["block_table"][:] = self.scratch_block
        # a step of padding alone: what warm-up and capture run
        fill_inputs(host, shape, [], self.pool.block_size, self.scratch_block)
        inputs = staging.to(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph: Triton compiles, cuBLAS picks its kernels
                self._step(inputs, shape)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # captured on a stream of this device: torch's default capture stream is one per process, made on
        # whichever GPU was current first, and entering it would move the capture (and Triton) there
        with torch.cuda.graph(graph, pool=self._memory, stream=side), torch.inference_mode():
            logits = self._step(inputs, shape)
        token_ids = split_inputs(inputs, shape, self.max_blocks)["token_ids"]
        self._graphs[shape] = captured = _Captured(graph, staging, host, inputs, token_ids, logits)
        return captured

    def _step(self, inputs: torch.Tensor, shape: GraphShape) -> torch.Tensor:
        return step(self.module, self.pool, split_inputs(inputs, shape, self.max_blocks), shape)


def step(
    module: LlamaForCausalLM, pool: KVPool, inputs: dict[str, torch.Tensor], shape: GraphShape
) -> torch.Tensor:
    """The forward pass a graph captures, from its inputs: logits [outputs, vocab]."""
    cfg = module.config
    max_context = inputs["block_table"].shape[1] * pool.block_size
    paged = PagedBatch(
        block_table=inputs["block_table"],
        context_lens=inputs["context_lens"],
        query_starts=inputs["query_starts"],
        tile_seqs=inputs["tile_seqs"],
        tile_starts=inputs["tile_starts"],
        block_size=pool.block_size,
        tokens_per_tile=shape.tokens_per_tile,
        num_splits=num_splits(
            shape.context_tiles, cfg.num_kv_heads, max_context, inputs["slots"].device, shape.decode_only
        ),
    )
    batch = AttentionBatch(slot_mapping=inputs["slots"], sequences=[], paged=paged)
    hidden = module(inputs["token_ids"], inputs["positions"], (pool.k, pool.v), batch)
    return module.logits(hidden.index_select(0, inputs["last_rows"]))
