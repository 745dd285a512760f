"""Grammars that constrain what a sequence may generate: compiled once, matched per sequence.

llguidance does the work (see pyproject.toml for why it, not xgrammar or outlines-core): a grammar is
text in its Lark dialect, where `%json{...}` embeds a JSON schema. Compiling is cheap but not free (tens
of milliseconds for a large schema, one second to index a tokenizer), so it runs off the event loop
(the server calls `compile` in a worker thread) and each distinct grammar is compiled once per tokenizer.
A sequence gets its own matcher, a copy of the compiled one, advanced by each token it accepts: the state
lives on the sequence, so a preempted sequence resumes with it unchanged.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from warmkv.errors import InvalidRequest

GRAMMAR_CACHE_SIZE = 256  # distinct grammars kept compiled (tool lists and schemas of recent requests)


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """A grammar whose language is the JSON documents valid under `schema`, laid out as json.dumps lays
    them out (no free whitespace, so a model cannot spend its budget on blank space)."""
    return f"start: {json_value(schema)}"


def json_value(schema: dict[str, Any]) -> str:
    """The Lark expression of one JSON value valid under `schema`, to embed in a larger grammar."""
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    return "%json" + json.dumps({**schema, "x-guidance": {**options, **schema.get("x-guidance", {})}})


def lark_string(text: str) -> str:
    """`text` as a Lark string literal."""
    return json.dumps(text)


class GrammarCompiler:
    """Compiles grammars for one tokenizer; the same grammar text is compiled once (LRU)."""

    def __init__(self, tokenizer: Any, eos_token_ids: set[int]) -> None:
        self._tokenizer = tokenizer
        self._eos = sorted(eos_token_ids)  # the grammar's end allows exactly the tokens the engine stops at
        self.compile = functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)(self._compile)

    @functools.cached_property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        return llguidance.hf.from_tokenizer(self._tokenizer, eos_token=self._eos)

    def _compile(self, grammar: str) -> Grammar:
        """Raises InvalidRequest naming the problem when the grammar (or a schema in it) is invalid."""
        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error:
            raise InvalidRequest(f"the requested structure cannot be enforced: {error.splitlines()[0]}")
        return Grammar(llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0))


class Grammar:
    """A compiled grammar: a matcher at its start, copied for each sequence (never advanced itself)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._start = matcher

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._start.deep_copy())


class GrammarMatcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def allowed(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Boolean mask [vocab_size] of the tokens the grammar allows next; ids the tokenizer does not
        know (a padded embedding table) are never allowed."""
        # one bit per token, little-endian within each 32-bit word: numpy unpacks it in microseconds
        packed = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(packed, bitorder="little").view(np.bool_)
        if bits.size >= vocab_size:
            bits = bits[:vocab_size]
        else:
            bits = np.concatenate([bits, np.zeros(vocab_size - bits.size, dtype=np.bool_)])
        return torch.from_numpy(bits).to(device, non_blocking=True)

    def advance(self, token: int) -> bool:
        """Accept a sampled token; False if the grammar does not allow it (the matcher is then broken)."""
        return self._matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the end token, if any, already accepted)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()
