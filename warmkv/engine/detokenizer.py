"""Incremental detokenisation with stop strings.

Text is released only once it can no longer change: a trailing partial UTF-8 character, or a tail that
could still grow into a stop string, is held back until the next token decides it.
"""

from __future__ import annotations

from typing import Any

from warmkv.text import partial_marker_length


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already released
        self.stopped = False

    @property
    def text(self) -> str:
        return self._tokenizer.decode(self._ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append a token; return the newly released text (maybe empty). Sets `stopped` on a stop string."""
        self._ids.append(token_id)
        text = self.text
        for stop in self._stop:
            at = text.find(stop, max(0, self._emitted - len(stop) + 1))
            if at != -1:
                self.stopped = True
                return self._release(text, at)
        if text.endswith("\ufffd"):
            return ""
        return self._release(text, len(text) - partial_marker_length(text, self._stop))

    def flush(self) -> str:
        """Release everything still held (generation ended without a stop string)."""
        text = self.text
        return self._release(text, len(text.rstrip("\ufffd")) if not self.stopped else self._emitted)

    def _release(self, text: str, end: int) -> str:
        end = max(end, self._emitted)
        released = text[self._emitted : end]
        self._emitted = end
        return released
