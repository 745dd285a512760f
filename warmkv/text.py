"""Text helpers shared by streaming code."""

from __future__ import annotations

from collections.abc import Iterable


def partial_marker_length(text: str, markers: Iterable[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`: text a stream must
    hold back, since the next piece may complete the marker."""
    return max((n for m in markers for n in range(1, len(m)) if text.endswith(m[:n])), default=0)
