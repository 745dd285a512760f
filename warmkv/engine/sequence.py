"""A request's state inside the engine: its tokens, its block table and how far its KV is computed."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from warmkv.engine.detokenizer import IncrementalDetokenizer
from warmkv.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from warmkv.cache.prefix_cache import PrefixHit
    from warmkv.engine.logits import LogitsProcessor


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence token, stop token id or stop string
    LENGTH = "length"  # max_tokens or the context window reached
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # failed on its own (its prefix could not be loaded, its forward or sampling raised)


@dataclass(slots=True, eq=False)  # identity, not field equality: two requests may look alike
class Sequence:
    request_id: str
    arrival: int  # order of arrival: the scheduler's priority (older first), kept across preemptions
    token_ids: list[int]  # prompt, then generated tokens as they come
    num_prompt_tokens: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    cache_namespace: str = ""
    background: bool = False  # idle-time prefill: runs only while no request is waiting or running
    anchors: tuple[int, ...] = ()  # token offsets where messages end: reused to the exact token later
    cache_breakpoint: int = 0  # prompt tokens up to the client's last cache breakpoint: kept longest
    logits_processors: list[LogitsProcessor] = field(default_factory=list)  # penalties, bias, grammar
    block_ids: list[int] = field(default_factory=list)  # the block table
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-index keys of the leading full blocks
    num_computed: int = 0  # leading tokens whose KV is stored in block_ids
    num_cached: int = 0  # prompt tokens whose KV was reused rather than computed
    cache_hit: PrefixHit | None = None  # how the prompt's cached prefix was found
    finish_reason: FinishReason | None = None
    preemptions: int = 0  # times its KV was taken back to make room for older sequences
    swapped_out_bytes: int = 0  # KV copied to the host tier at its preemptions
    swapped_in_bytes: int = 0  # KV loaded back from the host tier when it resumed
    num_recomputed: int = 0  # tokens whose KV it had computed before a preemption and computed again
    num_computed_when_preempted: int = 0

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed
