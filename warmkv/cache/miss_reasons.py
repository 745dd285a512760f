"""Why a prompt's first uncached token was not served from the cache, said so a person can act on it.

The cache remembers recent prompts per namespace. For a request, the nearest one (longest common prefix)
shows whether the miss is new text, an earlier message that changed, or a prefix that was cached once and
is gone (evicted), too short to reuse (below minimum: less than a block), or cheaper to recompute.
"""

from __future__ import annotations

import bisect
import enum
import itertools
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
    data: bytes  # the tokens as big-endian uint32: byte order is token order, so entries sort by it
    keys: list[bytes]  # block keys of its leading whole blocks (those whose KV was computed)
    stamp: int  # when it was last remembered: the more recent of two equally near entries wins

    @property
    def token_ids(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=_TOKEN)


_TOKEN = np.dtype(">u4")


class _Sorted:
    """One namespace's entries sorted by their tokens, and by age to forget the oldest."""

    def __init__(self) -> None:
        self.data: list[bytes] = []  # sorted
        self.entries: list[_Remembered] = []  # in the same order
        self.by_age: list[_Remembered] = []  # oldest first

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: _Remembered) -> None:
        at = bisect.bisect_left(self.data, entry.data)
        self.data.insert(at, entry.data)
        self.entries.insert(at, entry)
        self.by_age.append(entry)

    def remove(self, at: int) -> _Remembered:
        entry = self.entries.pop(at)
        del self.data[at]
        self.by_age.remove(entry)
        return entry

    def forget_oldest(self, keep: int) -> None:
        while len(self.by_age) > keep:
            oldest = self.by_age[0]
            at = bisect.bisect_left(self.data, oldest.data)
            while self.entries[at] is not oldest:  # equal data: the entries of one sequence
                at += 1
            self.remove(at)


class RecentPrompts:
    """The last few token sequences of each namespace and their block keys: a new prompt is compared with
    them (why it missed) and chained from them (its leading blocks' keys are not hashed again).

    A sequence that is a prefix of another shares no longer prefix with any prompt than the other does, so
    only the longer is kept: a conversation growing turn by turn costs one entry, not one per turn. Many
    sessions share a namespace (every client without a tenant shares ""), so it keeps a few hundred,
    sorted: the entry sharing the longest prefix with a prompt sorts right next to it, so finding it costs
    a binary search and two comparisons, however many sessions share a system prompt."""

    def __init__(self, per_namespace: int = 256, namespaces: int = 1024) -> None:
        self._by_namespace: OrderedDict[str, _Sorted] = OrderedDict()
        self._per_namespace, self._namespaces = per_namespace, namespaces
        self._clock = itertools.count()

    def remember(self, namespace: str, token_ids: list[int], keys: list[bytes] | None = None,
                 head: bytes = b"") -> None:  # fmt: skip
        """`keys`: the chained block keys of token_ids' leading whole blocks, as many as are known. `head`:
        token_ids' first tokens as `nearest` converted them (a sequence's prompt, looked up when it was
        admitted; its tokens only grow), so only the rest is converted (a 32k prompt: 0.75 ms a conversion
        on an H100's host)."""
        head = head[: len(token_ids) * _TOKEN.itemsize]  # (a prompt cut short: only what was computed)
        data = head + _as_bytes(token_ids[len(head) // _TOKEN.itemsize :])
        new = _Remembered(data, list(keys or []), next(self._clock))
        entries = self._by_namespace.setdefault(namespace, _Sorted())
        self._by_namespace.move_to_end(namespace)
        at = bisect.bisect_left(entries.data, new.data)
        if at < len(entries.data) and entries.data[at].startswith(new.data):  # already covered: refresh it
            covering = entries.remove(at)
            new.data, new.keys = covering.data, max(covering.keys, new.keys, key=len)
        elif at and new.data.startswith(entries.data[at - 1]):  # the new one covers it
            covered = entries.remove(at - 1)
            new.keys = max(new.keys, covered.keys, key=len)
        entries.add(new)
        entries.forget_oldest(self._per_namespace)
        while len(self._by_namespace) > self._namespaces:
            self._by_namespace.popitem(last=False)

    def nearest(self, namespace: str, token_ids: list[int]) -> Nearest:
        """The remembered sequence sharing the longest prefix with token_ids, and that prefix's length."""
        data = _as_bytes(token_ids)
        entries = self._by_namespace.get(namespace)
        if not entries:
            return Nearest(None, 0, data)
        query = np.frombuffer(data, dtype=_TOKEN)
        at = bisect.bisect_right(entries.data, data)
        best, best_common = None, 0
        for neighbour in entries.entries[max(0, at - 1) : at + 1]:
            common = _common_prefix(neighbour.token_ids, query)
            if common > best_common or (common and common == best_common and neighbour.stamp > best.stamp):
                best, best_common = neighbour, common
        return Nearest(best, best_common, data)


@dataclass(slots=True, frozen=True)
class Nearest:
    """A prompt's nearest remembered sequence (None: none shares a token) and the prefix they share."""

    entry: _Remembered | None
    common: int
    query: bytes = b""  # the prompt's tokens as compared (RecentPrompts.remember takes them back)

    def known_keys(self, block_size: int) -> list[bytes]:
        """Keys of the prompt's leading whole blocks that the remembered sequence shares and was keyed for."""
        return self.entry.keys[: self.common // block_size] if self.entry else []


def _as_bytes(token_ids: list[int]) -> bytes:
    # from an iterator: the fastest conversion of a long list (a 32k prompt: 0.6 ms, not 0.9)
    return np.fromiter(token_ids, dtype=_TOKEN, count=len(token_ids)).tobytes()


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


# prompts are compared within a tenant: another API key (curl without one, an SDK with "unused") or
# cache_salt has a cache of its own, and a user reading the log must be told why the other's does not count
_OF_TENANT = "with this API key and cache_salt"


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
        text = f"new tokens: no earlier request {_OF_TENANT} shares a whole block with this prompt's start"
        return MissReason(MissKind.NEW_TOKENS, cached_tokens, *_message(span), _where(span) + text)
    if common > cached_tokens:
        more = common - cached_tokens
        text = (
            f"{more} more {'token matches' if more == 1 else 'tokens match'} an earlier request: less than a "
            f"whole {block_size}-token block, or the prompt's last token, which is always computed"
        )
        return MissReason(MissKind.BELOW_MINIMUM, cached_tokens, *_message(span), _where(span) + text)
    text = "new tokens" if entry else f"new tokens: no earlier request {_OF_TENANT} shares its start"
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
