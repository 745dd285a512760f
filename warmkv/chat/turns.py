"""Recent turns' exact token ids, so a re-sent history reuses them instead of tokenising its text again.

The rule: when a request's rendered text begins with the text of a remembered turn (its prompt, or its
prompt plus the reply the model generated), the ids of that turn are used for that part verbatim and only
the rest is tokenised. So a reply whose text re-tokenises differently from the ids the model generated,
or a prompt whose last token would merge with the next message, still matches the cached KV.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict


class TurnMemory:
    """The most recent turns of every namespace, least recently used dropped first. The capacity is shared:
    many sessions in one namespace (clients without a tenant all share "") each keep their last turns, where
    a per-namespace count would let fifty concurrent sessions push each other's turns out."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()  # every turn, oldest first
        self._turns: dict[str, dict[str, array]] = {}  # namespace -> text -> ids (4 bytes a token)
        self._lock = threading.Lock()  # requests render in worker threads

    def remember(self, namespace: str, text: str, token_ids: list[int]) -> None:
        if not text:
            return
        with self._lock:
            self._turns.setdefault(namespace, {})[text] = array("i", token_ids)
            self._order[(namespace, text)] = None
            self._order.move_to_end((namespace, text))
            while len(self._order) > self._capacity:
                old_namespace, old_text = self._order.popitem(last=False)[0]
                turns = self._turns[old_namespace]
                del turns[old_text]
                if not turns:
                    del self._turns[old_namespace]

    def longest_prefix_of(self, namespace: str, text: str) -> tuple[str, list[int]] | None:
        with self._lock:
            turns = self._turns.get(namespace, {})
            # startswith fails at the first differing character: other sessions cost their shared prefix
            best = max((t for t in turns if text.startswith(t)), key=len, default=None)
            if best is None:
                return None
            self._order.move_to_end((namespace, best))
            return best, turns[best].tolist()
