"""Recent turns' exact token ids, so a re-sent history reuses them instead of tokenising its text again.

The rule: when a request's rendered text begins with the text of a remembered turn (its prompt, or its
prompt plus the reply the model generated), the ids of that turn are used for that part verbatim and only
the rest is tokenised. So a reply whose text re-tokenises differently from the ids the model generated,
or a prompt whose last token would merge with the next message, still matches the cached KV. A request
that branches off a remembered turn instead (a sub-agent with the same system prompt and tools, a retry
with another last message) reuses its ids up to the last message end the two share: messages are
tokenised one at a time, so a message end is a token boundary in both.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

MESSAGE_ENDS_KEPT = 64  # a turn's message ends a branch can start from: its first 8 and its last 56
FIRST_ENDS_KEPT = 8


class TurnMemory:
    """The most recent turns of every namespace, least recently used dropped first. The capacity is shared:
    many sessions in one namespace (clients without a tenant all share "") each keep their last turns, where
    a per-namespace count would let fifty concurrent sessions push each other's turns out."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()  # every turn, oldest first
        self._turns: dict[str, dict[str, _Turn]] = {}  # namespace -> text -> the turn
        # (namespace, digest of the text up to a message end) -> the turn ending a message there, its tokens
        self._message_ends: dict[tuple[str, bytes], tuple[str, int]] = {}
        # (namespace, digest of the text up to its last message end) -> the turns whose last end it is: a
        # request finds the turns it begins with at its own message ends, not by comparing every turn held
        # (a hundred-turn session's 160k-character history cost 5.6 ms a request so, on this project's CPU)
        self._by_last_end: dict[tuple[str, bytes], set[str]] = {}
        self._lock = threading.Lock()  # requests render in worker threads

    def remember(self, namespace: str, text: str, token_ids: list[int],
                 message_ends: Iterable[tuple[int, int | None]] = ()) -> None:  # fmt: skip
        """`message_ends`: (character, token) offsets just past the messages that end inside the turn. A
        token offset of None is taken from the remembered turn that ends a message there with the same
        ids, and the end passes to this turn: a session's early message ends outlive its early turns."""
        if not text:
            return
        ends = sorted(message_ends)
        if len(ends) > MESSAGE_ENDS_KEPT:  # bounded memory: branches leave the head or the tail
            ends = ends[:FIRST_ENDS_KEPT] + ends[FIRST_ENDS_KEPT - MESSAGE_ENDS_KEPT :]
        digests = _prefix_digests(text, [chars for chars, _ in ends])
        ids = array("i", token_ids)
        last_end = digests[-1] if digests else _START
        with self._lock:
            kept = []
            for digest, (_, tokens) in zip(digests, ends, strict=True):
                tokens = tokens if tokens is not None else self._tokens_before(namespace, digest, ids)
                if tokens is not None:
                    self._message_ends[(namespace, digest)] = (text, tokens)
                    kept.append(digest)
            turns = self._turns.setdefault(namespace, {})
            if text in turns:
                self._unindex(namespace, text, turns[text])
            turns[text] = _Turn(ids, kept, last_end)
            self._by_last_end.setdefault((namespace, last_end), set()).add(text)
            self._order[(namespace, text)] = None
            self._order.move_to_end((namespace, text))
            while len(self._order) > self._capacity:
                self._forget(*self._order.popitem(last=False)[0])

    def _tokens_before(self, namespace: str, digest: bytes, ids: array) -> int | None:
        """The token offset of a remembered message end, if the turn remembered there has these ids."""
        found = self._ending_at(namespace, digest)
        if found is None or found[1].token_ids[: found[2]] != ids[: found[2]]:
            return None
        return found[2]

    def _ending_at(self, namespace: str, digest: bytes) -> tuple[str, _Turn, int] | None:
        """The remembered turn with a message ending where the text's digest is: its text, it, the tokens."""
        found = self._message_ends.get((namespace, digest))
        turn = self._turns.get(namespace, {}).get(found[0]) if found else None
        return None if found is None or turn is None else (found[0], turn, found[1])

    def longest_prefix_of(self, namespace: str, text: str,
                          message_ends: Iterable[int] = ()) -> tuple[str, list[int]] | None:  # fmt: skip
        """The longest start of `text` whose ids are remembered: a whole remembered turn that `text` begins
        with, or else as far as one of `text`'s own message ends (character offsets) shared with a turn. A
        turn is found at the last of its message ends, which must be one of `text`'s (or at the start, for
        a turn remembered without any): a turn `text` begins with ends its messages where `text` does."""
        ends = sorted(message_ends)
        digests = _prefix_digests(text, ends)  # outside the lock: the hashing reads the whole text
        with self._lock:
            turns, best = self._turns.get(namespace, {}), ""
            for digest in [*reversed(digests), _START]:  # the latest end first: its turns are the longest
                for turn in self._by_last_end.get((namespace, digest), ()):
                    if len(turn) > len(best) and text.startswith(turn):
                        best = turn
            if best:
                self._order.move_to_end((namespace, best))
                return best, turns[best].token_ids.tolist()
            for end, digest in zip(reversed(ends), reversed(digests), strict=True):
                found = self._ending_at(namespace, digest)
                if found is not None and found[0][:end] == text[:end]:
                    self._order.move_to_end((namespace, found[0]))
                    return text[:end], found[1].token_ids[: found[2]].tolist()
        return None

    def _forget(self, namespace: str, text: str) -> None:
        turns = self._turns[namespace]
        turn = turns.pop(text)
        self._unindex(namespace, text, turn)
        for digest in turn.message_end_digests:
            if self._message_ends.get((namespace, digest), ("",))[0] == text:
                del self._message_ends[(namespace, digest)]
        if not turns:
            del self._turns[namespace]

    def _unindex(self, namespace: str, text: str, turn: _Turn) -> None:
        texts = self._by_last_end[(namespace, turn.last_end)]
        texts.discard(text)
        if not texts:
            del self._by_last_end[(namespace, turn.last_end)]


@dataclass(slots=True)
class _Turn:
    token_ids: array  # 4 bytes a token
    message_end_digests: list[bytes]
    last_end: bytes  # the digest of the text up to its last message end: where requests look it up


_START = hashlib.blake2b(digest_size=16).digest()  # the digest of no text: turns without a message end


def _prefix_digests(text: str, ends: list[int]) -> list[bytes]:
    """A digest of text[:end] for each of the sorted `ends`, in one pass over the text."""
    digests, hashed, at = [], hashlib.blake2b(digest_size=16), 0
    for end in ends:
        hashed.update(text[at:end].encode("utf-8", "surrogatepass"))
        at = end
        digests.append(hashed.copy().digest())
    return digests
