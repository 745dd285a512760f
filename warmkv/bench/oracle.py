"""The oracle: what an infinite cache would reuse. For each request, the longest token prefix it shares
with any earlier request of the run (its prompt as the server tokenises it: warmkv's rendering for warmkv's
rows, a peer's own tokens for a peer's row)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from warmkv.bench.peer_tokens import ServerTokenizer
from warmkv.bench.trace import TraceRequest


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n


def oracle_hits(prompts: list[list[int]]) -> list[int]:
    """Per request: tokens shared with the best earlier prompt; the last token is always computed."""
    arrays = [np.asarray(p, dtype=np.int64) for p in prompts]
    hits = []
    for i, prompt in enumerate(arrays):
        best = max((common_prefix(prompt, earlier) for earlier in arrays[:i]), default=0)
        hits.append(min(best, len(prompt) - 1))
    return hits


class ServedRequest(Protocol):
    """A request as the server answered it: a replay's turn or a load run's request."""

    @property
    def prompt_tokens(self) -> int: ...  # as the server's usage counted them

    @property
    def error(self) -> str | None: ...  # falsy when it succeeded


@dataclass(slots=True, frozen=True)
class PeerOracle:
    """The oracle over a peer's own prompt tokens, read before the replay (tokenising touches no cache)."""

    lengths: list[int]
    hits: list[int]
    dialect: str

    def clipped(self, turns: Sequence[ServedRequest]) -> list[int]:
        """Where the peer's usage counts fewer prompt tokens than its tokenizer did (a template that renders
        differently for generation), the oracle cannot exceed what the request really had."""
        return [min(hit, max(0, t.prompt_tokens - 1)) if not t.error else hit
                for hit, t in zip(self.hits, turns, strict=True)]  # fmt: skip

    def mismatches(self, turns: Sequence[ServedRequest]) -> int:
        """Requests whose usage.prompt_tokens differs from the tokenizer's count (0: the oracle is exact)."""
        pairs = zip(self.lengths, turns, strict=True)
        return sum(1 for n, t in pairs if not t.error and n != t.prompt_tokens)


def peer_oracle(tokenizer: ServerTokenizer, requests: list[TraceRequest]) -> PeerOracle:
    prompts = [tokenizer.prompt_ids(r) for r in requests]
    assert tokenizer.dialect is not None  # found by the first prompt_ids
    return PeerOracle([len(p) for p in prompts], oracle_hits(prompts), tokenizer.dialect.value)
