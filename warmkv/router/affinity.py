"""Prefix affinity: which replica most likely holds a request's longest cached prefix.

A request is summarised by its anchor chain: a hash of model + tools + system prompt + the first message,
then one more per message (Anthropic messages, Responses input items; for /v1/completions, per 1024
characters of the prompt; a Responses request naming a previous response starts from that response). The
router remembers which replica served each anchor; a new request goes to the replica of its deepest known
anchor, unless that replica is busier than the least-loaded one by more than `slack` requests, or down.
Unknown prefixes go to the least-loaded replica, ties broken by a rendezvous hash of the first anchor, so
sessions sharing a system prompt meet on one replica.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

COMPLETION_CHUNK = 1024  # characters per anchor of a raw completions prompt


def _digest(*parts: Any) -> str:
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def anchor_chain(body: dict[str, Any]) -> list[str]:
    """The request's anchors: one per message (chat completions, Anthropic messages), input item (Responses)
    or prompt chunk (completions), each chained on everything before it. A Responses request that goes on
    from a stored response starts with that response's anchor: the history lives where it was made."""
    head = _digest(body.get("model"), body.get("tools"), body.get("system"), body.get("instructions"))
    if "messages" in body:
        pieces: list[Any] = list(body["messages"])
    elif "input" in body:
        items = body["input"]
        pieces = list(items) if isinstance(items, list) else [items]
    else:
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        pieces = [text[i : i + COMPLETION_CHUNK] for i in range(0, len(text), COMPLETION_CHUNK)]
    previous = body.get("previous_response_id")
    chain = [response_anchor(previous)] if isinstance(previous, str) else []
    head = chain[0] if chain else head
    for piece in pieces:
        head = _digest(head, piece)
        chain.append(head)
    return chain


def response_anchor(response_id: str) -> str:
    """The anchor of a stored response (Responses API): its replica holds the conversation it ends."""
    return _digest("response", response_id)


@dataclass(slots=True)
class Replica:
    url: str
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    down_until: float = 0.0

    @property
    def up(self) -> bool:
        return time.monotonic() >= self.down_until


class Router:
    def __init__(self, urls: list[str], slack: int = 4, down_s: float = 10.0, anchors: int = 200_000) -> None:
        self.replicas = [Replica(url.rstrip("/").removesuffix("/v1")) for url in urls]
        self.slack, self.down_s, self.capacity = slack, down_s, anchors
        self._owner: OrderedDict[str, int] = OrderedDict()  # anchor -> replica index, least recent first

    def candidates(self, chain: list[str]) -> tuple[list[Replica], int]:
        """Replicas to try in order, and how many anchors of the first were seen on it."""
        up = [r for r in self.replicas if r.up] or list(self.replicas)  # all down: try them anyway
        least = min(r.in_flight for r in up)
        by_load = sorted(up, key=lambda r: (r.in_flight, _rendezvous(chain[0] if chain else "", r.url)))
        depth, owner = self._deepest(chain)
        if owner is not None and owner in up and owner.in_flight <= least + self.slack:
            return [owner, *(r for r in by_load if r is not owner)], depth
        return by_load, 0

    def _deepest(self, chain: list[str]) -> tuple[int, Replica | None]:
        for depth in range(len(chain), 0, -1):
            index = self._owner.get(chain[depth - 1])
            if index is not None:
                return depth, self.replicas[index]
        return 0, None

    def served(self, chain: list[str], replica: Replica) -> None:
        self.remember(chain, replica)
        replica.served += 1

    def remember(self, chain: list[str], replica: Replica) -> None:
        """These anchors' KV (or stored response) is on `replica` now."""
        index = self.replicas.index(replica)
        for anchor in chain:
            self._owner[anchor] = index
            self._owner.move_to_end(anchor)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def failed(self, replica: Replica) -> None:
        replica.failures += 1
        replica.down_until = time.monotonic() + self.down_s


def _rendezvous(key: str, url: str) -> str:
    return hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).hexdigest()
