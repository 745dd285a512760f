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
        self._text = ""  # decoded text of the tokens up to _read
        self._prefix = 0  # window start: tokens before _read that give the decoder its context
        self._read = 0
        self._emitted = 0  # characters of _text already released
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the newly released text (maybe empty). Sets `stopped` on a stop string."""
        self._ids.append(token_id)
        self._decode_window()
        text = self._text
        for stop in self._stop:
            at = text.find(stop, max(0, self._emitted - len(stop) + 1))
            if at != -1:
                self.stopped = True
                return self._release(at)
        return self._release(len(text) - partial_marker_length(text, self._stop))

    def flush(self) -> str:
        """Release everything still held (generation ended without a stop string)."""
        if self.stopped:
            return ""
        self._decode_window(final=True)
        return self._release(len(self._text))

    def _decode_window(self, final: bool = False) -> None:
        # decode only a short window, not the whole output: the text that the new tokens add is the
        # difference between the window with and without them (cost per token stays constant)
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self._ids[self._prefix :], skip_special_tokens=True)
        if final:
            after = after.rstrip("\ufffd")
        elif after.endswith("\ufffd"):  # a character split across tokens: wait for its last byte
            return
        if len(after) > len(before):
            self._text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)

    def _release(self, end: int) -> str:
        end = max(end, self._emitted)
        released = self._text[self._emitted : end]
        self._emitted = end
        return released
