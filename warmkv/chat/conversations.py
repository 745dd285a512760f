"""Stored responses of the Responses API, for `previous_response_id`: each keeps its whole conversation
(input and output, as chat messages), so a follow-up replays it and reuses its KV. Bounded: the least
recently used are forgotten first."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, frozen=True)
class StoredResponse:
    namespace: str  # the tenant that created it: no other may continue it
    messages: list[dict[str, Any]]  # the conversation through this response's output, instructions excluded


class ConversationStore:
    def __init__(self, capacity: int = 4096) -> None:
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        with self._lock:
            self._responses[response_id] = stored
            while len(self._responses) > self._capacity:
                self._responses.popitem(last=False)

    def get(self, response_id: str, namespace: str) -> StoredResponse | None:
        """The response, if it is kept and was created by the same tenant."""
        with self._lock:
            stored = self._responses.get(response_id)
            if stored is None or stored.namespace != namespace:
                return None
            self._responses.move_to_end(response_id)
            return stored
