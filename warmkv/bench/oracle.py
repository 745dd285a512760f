"""The oracle: what an infinite cache would reuse. For each request, the longest token prefix it shares
with any earlier request of the run (its prompt as the server tokenises it)."""

from __future__ import annotations

import numpy as np


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
