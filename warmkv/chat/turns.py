"""Recent turns' exact token ids, so a re-sent history reuses them instead of tokenising its text again.

The rule: when a request's rendered text begins with the text of a remembered turn (its prompt, or its
prompt plus the reply the model generated), the ids of that turn are used for that part verbatim and only
the rest is tokenised. So a reply whose text re-tokenises differently from the ids the model generated,
or a prompt whose last token would merge with the next message, still matches the cached KV.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque


class TurnMemory:
    def __init__(self, per_namespace: int = 32, namespaces: int = 1024) -> None:
        self._turns: OrderedDict[str, deque[tuple[str, list[int]]]] = OrderedDict()
        self._per_namespace, self._namespaces = per_namespace, namespaces
        self._lock = threading.Lock()  # prompts are built on a worker thread, turns remembered on the loop

    def remember(self, namespace: str, text: str, token_ids: list[int]) -> None:
        with self._lock:
            turns = self._turns.setdefault(namespace, deque(maxlen=self._per_namespace))
            self._turns.move_to_end(namespace)
            turns.append((text, list(token_ids)))
            while len(self._turns) > self._namespaces:
                self._turns.popitem(last=False)

    def longest_prefix_of(self, namespace: str, text: str) -> tuple[str, list[int]] | None:
        with self._lock:
            turns = list(self._turns.get(namespace, ()))
        matches = [turn for turn in turns if turn[0] and text.startswith(turn[0])]
        return max(matches, key=lambda turn: len(turn[0]), default=None)
