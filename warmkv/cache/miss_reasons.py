"""Why a prompt's first uncached token was not served from the cache, said so a person can act on it.

The cache remembers recent prompts per namespace. For a request, the nearest one (longest common prefix)
shows whether the miss is new text, an earlier message that changed, or a prefix that was cached once and
is gone (evicted), too short to reuse (below minimum: less than a block), or cheaper to recompute.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

EXCERPT_TOKENS = 10


class Span(Protocol):
    """Where a prompt's message ends, in tokens: chat's MessageSpan is one. The cache names messages in its
    explanations but knows nothing of chats, so it asks only for these three fields."""

    @property
    def index(self) -> int: ...
    @property
    def role(self) -> str: ...
    @property
    def end(self) -> int: ...  # token offset just past the message


class MissKind(str, enum.Enum):
    NEW_TOKENS = "new tokens"
    CHANGED = "changed"
    EVICTED = "evicted"
    BELOW_MINIMUM = "below minimum"
    SLOWER_THAN_RECOMPUTE = "load slower than recompute"
    UNREADABLE = "unreadable"
    POOL_FULL = "pool full"


class LookupStop(str, enum.Enum):
    """Why a lookup served fewer blocks than the tiers hold."""

    POOL_FULL = "pool full"  # no free block to load into
    UNREADABLE = "unreadable"  # a stored block failed to read or verify, and was dropped
    SLOWER_THAN_RECOMPUTE = "slower than recompute"  # loading would take longer than computing


_MISS_OF_STOP = {
    LookupStop.POOL_FULL: MissKind.POOL_FULL,
    LookupStop.UNREADABLE: MissKind.UNREADABLE,
    LookupStop.SLOWER_THAN_RECOMPUTE: MissKind.SLOWER_THAN_RECOMPUTE,
}


@dataclass(slots=True)
class MissReason:
    kind: MissKind
    token: int  # the first token computed rather than reused
    message_index: int | None
    role: str | None
    text: str  # one sentence for people
    request_excerpt: str | None = None
    cached_excerpt: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value}


@dataclass(slots=True, eq=False)  # identity: entries are removed by it
class _Remembered:
    token_ids: np.ndarray
    keys: list[bytes]  # block keys of its leading whole blocks (those whose KV was computed)


class RecentPrompts:
    """The last few token sequences of each namespace and their block keys: a new prompt is compared with
    them (why it missed) and chained from them (its leading blocks' keys are not hashed again).

    A sequence that is a prefix of another shares no longer prefix with any prompt than the other does, so
    only the longer is kept: a conversation growing turn by turn costs one entry, not one per turn. Many
    sessions share a namespace (every client without a tenant shares ""), so it keeps a few hundred; a
    comparison costs about the prefix two sequences share, not their length."""

    def __init__(self, per_namespace: int = 256, namespaces: int = 1024) -> None:
        self._by_namespace: OrderedDict[str, list[_Remembered]] = OrderedDict()
        self._per_namespace, self._namespaces = per_namespace, namespaces

    def remember(self, namespace: str, token_ids: list[int], keys: list[bytes] | None = None) -> None:
        """`keys`: the chained block keys of token_ids' leading whole blocks, as many as are known."""
        new = _Remembered(_as_array(token_ids), list(keys or []))
        entries = self._by_namespace.setdefault(namespace, [])
        self._by_namespace.move_to_end(namespace)
        for entry in list(entries):
            if _starts_with(entry.token_ids, new.token_ids):  # already covered: refresh it
                entries.remove(entry)
                new = entry if len(entry.keys) >= len(new.keys) else _Remembered(entry.token_ids, new.keys)
                break
            if _starts_with(new.token_ids, entry.token_ids):  # the new one covers it
                entries.remove(entry)
                if len(entry.keys) > len(new.keys):
                    new.keys = entry.keys
        entries.append(new)
        del entries[: -self._per_namespace]
        while len(self._by_namespace) > self._namespaces:
            self._by_namespace.popitem(last=False)

    def nearest(self, namespace: str, token_ids: list[int]) -> Nearest:
        """The remembered sequence sharing the longest prefix with token_ids, and that prefix's length."""
        query = _as_array(token_ids)
        entries = self._by_namespace.get(namespace, ())
        # usually the prompt goes on from one of them: no entry is a prefix of another, so that one is
        # the nearest, found at the cost of one token per entry
        for entry in reversed(entries):
            if len(entry.token_ids) and _starts_with(query, entry.token_ids):
                return Nearest(entry, len(entry.token_ids))
        best, best_common = None, 0
        for entry in reversed(entries):
            common = _common_prefix(entry.token_ids, query)
            if common > best_common:
                best, best_common = entry, common
        return Nearest(best, best_common)


@dataclass(slots=True, frozen=True)
class Nearest:
    """A prompt's nearest remembered sequence (None: none shares a token) and the prefix they share."""

    entry: _Remembered | None
    common: int

    def known_keys(self, block_size: int) -> list[bytes]:
        """Keys of the prompt's leading whole blocks that the remembered sequence shares and was keyed for."""
        return self.entry.keys[: self.common // block_size] if self.entry else []


def _as_array(token_ids: list[int]) -> np.ndarray:
    # int32 from an iterator: the fastest conversion of a long list (a 32k prompt: 0.6 ms, not 0.9)
    return np.fromiter(token_ids, dtype=np.int32, count=len(token_ids))


def _starts_with(sequence: np.ndarray, prefix: np.ndarray) -> bool:
    """Whether `sequence` begins with `prefix`; a differing last token (the usual answer) costs one lookup."""
    n = len(prefix)
    if n > len(sequence) or (n and sequence[n - 1] != prefix[n - 1]):
        return False
    return _common_prefix(sequence, prefix) == n


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the prefix a and b share, compared in growing chunks: the cost follows that length."""
    length, start, chunk = min(len(a), len(b)), 0, 256
    while start < length:
        end = min(start + chunk, length)
        differ = np.flatnonzero(a[start:end] != b[start:end])
        if len(differ):
            return start + int(differ[0])
        start, chunk = end, chunk * 4
    return length


def explain_miss(
    prompt_ids: list[int],
    cached_tokens: int,
    stop: LookupStop | None,
    stop_text: str | None,
    nearest: Nearest,
    spans: Sequence[Span],
    tokenizer: Any,
    block_size: int,
) -> MissReason:
    """stop / stop_text: why the lookup ended early, if it did, and that said for people."""
    entry, common = nearest.entry, nearest.common
    # the most an ideal block cache could have served: whole blocks, and never the last prompt token
    reusable = min(common, len(prompt_ids) - 1) // block_size * block_size
    span = _message_at(spans, cached_tokens)
    if reusable > cached_tokens:  # it was cached once and was not served this time
        return _not_served(cached_tokens, reusable, stop, stop_text, spans)
    if common < cached_tokens:
        # the cache served more than any prompt remembered since start-up shares: it is older (a restart)
        text = f"new tokens after the {cached_tokens} served from the cache"
        return MissReason(MissKind.NEW_TOKENS, cached_tokens, *_message(span), _where(span) + text)
    if entry and common < min(len(entry.token_ids), len(prompt_ids)):  # the two prompts part ways
        if common >= block_size:  # they shared whole blocks: an earlier prompt, edited
            return _changed(prompt_ids, entry.token_ids, common, cached_tokens, spans, tokenizer)
        text = "new tokens: no earlier request shares a whole block with this prompt's start"
        return MissReason(MissKind.NEW_TOKENS, cached_tokens, *_message(span), _where(span) + text)
    if common > cached_tokens:
        text = (
            f"{common - cached_tokens} more tokens match an earlier request: less than a whole "
            f"{block_size}-token block, or the prompt's last token, which is always computed"
        )
        return MissReason(MissKind.BELOW_MINIMUM, cached_tokens, *_message(span), _where(span) + text)
    text = "new tokens" if entry else "new tokens: no earlier request shares this prompt's start"
    return MissReason(MissKind.NEW_TOKENS, cached_tokens, *_message(span), _where(span) + text)


def _not_served(
    cached: int, reusable: int, stop: LookupStop | None, stop_text: str | None, spans: Sequence[Span]
) -> MissReason:
    span = _message_at(spans, cached)
    if stop is not None:
        kind, text = _MISS_OF_STOP[stop], f"{stop_text or stop.value}: tokens {cached}-{reusable} recomputed"
    else:
        kind, text = (
            MissKind.EVICTED,
            f"tokens {cached}-{reusable} were cached by an earlier request and evicted",
        )
    return MissReason(kind, cached, *_message(span), _where(span) + text)


def _changed(
    prompt_ids: list[int],
    entry: Sequence[int],
    common: int,
    cached: int,
    spans: Sequence[Span],
    tokenizer: Any,
) -> MissReason:
    span = _message_at(spans, common)
    ours, theirs = _excerpt(tokenizer, prompt_ids, common), _excerpt(tokenizer, entry, common)
    name = f"{span.role} message #{span.index}" if span else "the prompt"
    text = f"{name} changed at token {common}: {ours!r} vs {theirs!r}"
    if cached < common:
        text += f" (reuse stops at the whole block before it, token {cached})"
    return MissReason(MissKind.CHANGED, cached, *_message(span), text, ours, theirs)


def _message_at(spans: Sequence[Span], token: int) -> Span | None:
    """The message a token position belongs to: the first whose end lies past it."""
    return next((span for span in spans if token < span.end), None)


def _message(span: Span | None) -> tuple[int | None, str | None]:
    return (span.index, span.role) if span else (None, None)


def _where(span: Span | None) -> str:
    return f"{span.role} message #{span.index}: " if span else ""


def _excerpt(tokenizer: Any, token_ids: Sequence[int], at: int) -> str:
    window = token_ids[max(0, at - EXCERPT_TOKENS) : at + EXCERPT_TOKENS]  # before any conversion
    return "..." + tokenizer.decode([int(token) for token in window])
