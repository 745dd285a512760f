"""The stable prefix of a chat request (system, tools, history) and why a request's differs from the last."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

EXCERPT = 40


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def as_dict(message: Any) -> dict:
    """A message as the API sends it: pydantic objects dumped, unset (None) fields dropped."""
    if hasattr(message, "model_dump"):
        message = message.model_dump(exclude_none=True)
    return {k: v for k, v in dict(message).items() if v is not None and v != []}


def tool_name(tool: dict) -> str:
    return str((tool.get("function") or {}).get("name") or tool.get("name") or "")


def canonical_tools(tools: Sequence[dict] | None) -> list[dict]:
    """Tools sorted by name, so the same set always renders the same prefix whatever order it was built in."""
    return sorted(tools or [], key=tool_name)


def _text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


@dataclass(slots=True, frozen=True)
class PrefixSnapshot:
    """What a request's prompt is made of, by parts whose change breaks the cached prefix."""

    system: str
    tools: dict[str, str]  # name -> digest of its definition
    tool_order: tuple[str, ...]
    messages: tuple[str, ...]  # digest of each message (system messages included), in order
    roles: tuple[str, ...]

    @classmethod
    def of(cls, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> PrefixSnapshot:
        tools = list(tools or [])
        messages = [as_dict(m) for m in messages]
        return cls(
            system="\n".join(_text(m) for m in messages if m.get("role") in ("system", "developer")),
            tools={tool_name(t): _digest(t) for t in tools},
            tool_order=tuple(tool_name(t) for t in tools),
            messages=tuple(_digest(m) for m in messages),
            roles=tuple(str(m.get("role")) for m in messages),
        )

    @property
    def key(self) -> str:
        """Identity of system + tools: requests sharing it can share a cached prefix."""
        return _digest([self.system, sorted(self.tools.items())])

    def extends(self, earlier: PrefixSnapshot) -> bool:
        """True when this request resends `earlier`'s whole prompt (tools and messages) unchanged."""
        n = len(earlier.messages)
        return self.tool_order == earlier.tool_order and self.tools == earlier.tools and (
            self.messages[:n] == earlier.messages
        )


class Change(str, Enum):
    FIRST = "first request"
    TOOLS = "tools changed"
    SYSTEM = "system prompt changed"
    HISTORY = "history rewritten"
    NEW_TAIL = "only new tail"
    EVICTED = "upstream eviction"


@dataclass(slots=True, frozen=True)
class Diff:
    change: Change
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.change.value}: {self.detail}" if self.detail else self.change.value


def _excerpt_at(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"at char {i}: {a[max(0, i - 10) : i + EXCERPT]!r} vs {b[max(0, i - 10) : i + EXCERPT]!r}"


def diff(previous: PrefixSnapshot | None, current: PrefixSnapshot) -> Diff:
    """The first part of `current`, in prompt order, that differs from `previous`."""
    if previous is None:
        return Diff(Change.FIRST)
    if previous.tools != current.tools or previous.tool_order != current.tool_order:
        added = sorted(current.tools.keys() - previous.tools.keys())
        removed = sorted(previous.tools.keys() - current.tools.keys())
        changed = sorted(n for n in current.tools.keys() & previous.tools.keys()
                         if current.tools[n] != previous.tools[n])  # fmt: skip
        parts = [f"{label} {', '.join(names)}" for label, names in
                 (("added", added), ("removed", removed), ("changed", changed)) if names]  # fmt: skip
        return Diff(Change.TOOLS, "; ".join(parts) or "reordered")
    if previous.system != current.system:
        return Diff(Change.SYSTEM, _excerpt_at(previous.system, current.system))
    for index, (old, new) in enumerate(zip(previous.messages, current.messages, strict=False)):
        if old != new:
            return Diff(Change.HISTORY, f"message {index} ({current.roles[index]}) differs")
    if len(current.messages) < len(previous.messages):
        return Diff(Change.HISTORY, f"messages from {len(current.messages)} on were dropped")
    return Diff(Change.NEW_TAIL)
