"""Per-conversation cache bookkeeping, the warm-up policy and the miss reasons; no I/O of its own."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from warmkv.client.hygiene import tool_order_warning, volatile_text_warnings
from warmkv.client.ledger import CacheLog, Prices, TurnRecord
from warmkv.client.prefix import Change, Diff, PrefixSnapshot, diff
from warmkv.client.usage import CacheUsage

log = logging.getLogger("warmkv.client")


class WarmupMode(str, Enum):
    OFF = "off"
    AUTO = "auto"  # after a tool-call reply, while the client runs its tools; stops when it does not pay
    ALWAYS = "always"  # also right before every later turn


@dataclass(slots=True)
class WarmupPolicy:
    mode: WarmupMode = WarmupMode.AUTO
    patience: int = 2  # warm-ups in a row that add no cached tokens before a conversation stops warming
    granularity: int = 64  # the upstream caches in units of this many tokens (DeepSeek 64, OpenAI 128)


@dataclass(slots=True)
class Conversation:
    id: str
    turns: int = 0
    last: PrefixSnapshot | None = None
    last_prompt_tokens: int = 0
    last_messages: list[dict] = field(default_factory=list)
    warmed: PrefixSnapshot | None = None
    warmed_prompt_tokens: int = 0
    fruitless_warmups: int = 0
    warmup_disabled: bool = False


@dataclass(slots=True, frozen=True)
class Warmup:
    conversation: Conversation
    messages: list[dict]
    turns: int  # the conversation's turn count when planned: a late result for an older turn is ignored


class CacheTracker:
    def __init__(self, policy: WarmupPolicy, log_file: CacheLog, prices: Prices | None) -> None:
        self.policy, self.log, self.prices = policy, log_file, prices
        self.conversations: dict[str, Conversation] = {}
        self._ids = itertools.count(1)
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def conversation_for(self, messages: Sequence[dict], tools: Sequence[dict] | None,
                         conversation: str | None) -> Conversation:  # fmt: skip
        """The named conversation, or the one whose last request this one extends, or a new one."""
        with self._lock:
            if conversation is not None:
                return self.conversations.setdefault(conversation, Conversation(conversation))
            current = PrefixSnapshot.of(messages, tools)
            known = [c for c in self.conversations.values() if c.last is not None]
            extended = [c for c in known if current.extends(c.last)]  # type: ignore[arg-type]
            if extended:
                return max(extended, key=lambda c: len(c.last.messages))  # type: ignore[union-attr]
            opener = _opener(messages)
            same_start = [c for c in known if opener and _opener(c.last_messages) == opener]
            if same_start:  # same task, edited system prompt / tools / history
                return same_start[-1]
            name = f"conversation-{next(self._ids)}"
            return self.conversations.setdefault(name, Conversation(name))

    def check_hygiene(self, messages: Sequence[dict], tools: Sequence[dict] | None) -> None:
        snapshot = PrefixSnapshot.of(messages, tools)
        warnings = volatile_text_warnings(snapshot.system)
        order = tool_order_warning(tools)
        for warning in [*warnings, *([order] if order else [])]:
            if warning not in self._warned:
                self._warned.add(warning)
                log.warning(warning)

    def warmup_before_turn(self, conv: Conversation, messages: Sequence[dict]) -> Warmup | None:
        """Under `always`: warm the history through the last assistant message before sending the turn."""
        if self.policy.mode is not WarmupMode.ALWAYS or conv.turns == 0 or conv.warmup_disabled:
            return None
        stable = stable_prefix(messages)
        return Warmup(conv, stable, conv.turns) if stable else None

    def warmup_after_reply(self, conv: Conversation, messages: Sequence[dict], reply: dict) -> Warmup | None:
        """After a reply with tool calls the next prompt is predictable: the history plus that reply."""
        if self.policy.mode is WarmupMode.OFF or conv.warmup_disabled or not reply.get("tool_calls"):
            return None
        return Warmup(conv, [*messages, reply], conv.turns)

    def record_warmup(self, warmup: Warmup, tools: Sequence[dict] | None, model: str,
                      usage: CacheUsage | None, latency: float) -> None:  # fmt: skip
        conv = warmup.conversation
        if usage is None or conv.turns != warmup.turns:
            return
        conv.warmed = PrefixSnapshot.of(warmup.messages, tools)
        conv.warmed_prompt_tokens = usage.prompt_tokens
        self._append(conv, "warmup", model, usage, "", latency, None)

    def record_request(self, conv: Conversation, messages: Sequence[dict], tools: Sequence[dict] | None,
                       model: str, usage: CacheUsage | None, latency: float) -> Diff | None:  # fmt: skip
        current = PrefixSnapshot.of(messages, tools)
        reason = diff(conv.last, current)
        benefit = None
        if usage is not None:
            reason = self._eviction_check(conv, current, reason, usage)
            benefit = self._warmup_benefit(conv, current, usage)
            self._append(conv, "request", model, usage, str(reason), latency, benefit)
        conv.turns += 1
        conv.last, conv.last_messages = current, list(messages)
        conv.last_prompt_tokens = usage.prompt_tokens if usage else 0
        conv.warmed = None
        return reason

    def _eviction_check(self, conv: Conversation, current: PrefixSnapshot, reason: Diff,
                        usage: CacheUsage) -> Diff:  # fmt: skip
        """The prefix was kept but fewer tokens hit than the upstream had seen: it dropped them."""
        if reason.change is not Change.NEW_TAIL:
            return reason
        expected = conv.last_prompt_tokens
        if conv.warmed is not None and current.extends(conv.warmed):
            expected = max(expected, conv.warmed_prompt_tokens)
        if usage.cached_tokens + self.policy.granularity <= expected:
            return Diff(Change.EVICTED, f"{expected} tokens were sent before, {usage.cached_tokens} hit")
        return reason

    def _warmup_benefit(self, conv: Conversation, current: PrefixSnapshot, usage: CacheUsage) -> int | None:
        if conv.warmed is None or not current.extends(conv.warmed):
            return None
        benefit = max(0, usage.cached_tokens - conv.last_prompt_tokens)
        conv.fruitless_warmups = 0 if benefit > 0 else conv.fruitless_warmups + 1
        if conv.fruitless_warmups >= self.policy.patience and not conv.warmup_disabled:
            conv.warmup_disabled = True
            log.info("conversation %s: warm-ups added no cached tokens %d times; stopped warming",
                     conv.id, conv.fruitless_warmups)  # fmt: skip
        return benefit

    def _append(self, conv: Conversation, kind: str, model: str, usage: CacheUsage, reason: str,
                latency: float, benefit: int | None) -> None:  # fmt: skip
        prices = self.prices
        tokens = (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
        self.log.append(TurnRecord(
            time=time.time(), conversation=conv.id, turn=conv.turns, kind=kind, model=model,
            prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens, reason=reason, latency_s=round(latency, 4),
            warmup_benefit_tokens=benefit,
            cost_saved=prices.saved(usage.cached_tokens) if prices else None,
            cost=prices.cost(*tokens) if prices else None,
        ))  # fmt: skip


def _opener(messages: Sequence[dict]) -> str | None:
    """The first non-system message: a conversation's identity when its system prompt is edited."""
    first = next((m for m in messages if m.get("role") not in ("system", "developer")), None)
    return PrefixSnapshot.of([first]).messages[0] if first else None


def stable_prefix(messages: Sequence[dict]) -> list[dict]:
    """The history a turn resends unchanged: every message through the last assistant message."""
    last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    return list(messages[: last_assistant + 1])
