"""`WarmClient` / `AsyncWarmClient`: the official openai client, plus cache tracking and warm-ups.

    client = WarmClient(OpenAI(base_url=...), log="cache.jsonl", prices=Prices(0.27, 0.07))
    reply = client.chat.completions.create(model=..., messages=..., tools=...)  # as with OpenAI

Requests go through unchanged (tools sorted by name unless `sort_tools=False`). Each response's cache
usage is logged with the reason it missed; a warm-up never fails or delays a request beyond
`warmup_wait_s` (the time a request waits for its own conversation's warm-up still in flight).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from openai import AsyncOpenAI, OpenAI

from warmkv.client.ledger import CacheLog, Prices, TurnRecord
from warmkv.client.prefix import as_dict, canonical_tools
from warmkv.client.tracker import CacheTracker, Conversation, Warmup, WarmupMode, WarmupPolicy
from warmkv.client.usage import read_usage

log = logging.getLogger("warmkv.client")
PASSED_TO_WARMUP = ("extra_body", "extra_headers", "user")  # cache namespaces (cache_salt, keys) must match


@dataclass(slots=True)
class _Turn:
    conversation: Conversation
    messages: list[dict]
    tools: list[dict] | None
    request: dict[str, Any]
    started: float


class _ReplyAccumulator:
    """Rebuilds the assistant message from streamed deltas (content and tool calls)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.calls: dict[int, dict] = {}
        self.usage: Any = None

    def add(self, chunk: Any) -> None:
        self.usage = chunk.usage or self.usage
        for choice in chunk.choices[:1]:
            delta = choice.delta
            self.content.append(delta.content or "")
            for call in delta.tool_calls or []:
                entry = self.calls.setdefault(call.index, {"type": "function", "function": {"arguments": ""}})
                entry["id"] = call.id or entry.get("id")
                if call.function and call.function.name:
                    entry["function"]["name"] = call.function.name
                if call.function and call.function.arguments:
                    entry["function"]["arguments"] += call.function.arguments

    def message(self) -> dict:
        calls = [self.calls[i] for i in sorted(self.calls)]
        return as_dict({"role": "assistant", "content": "".join(self.content) or None, "tool_calls": calls})


class _WarmBase:
    def __init__(self, warmup: WarmupPolicy | WarmupMode | str, log_path: str | Path | None,
                 prices: Prices | None, sort_tools: bool, warmup_max_tokens: int | None,
                 warmup_wait_s: float) -> None:  # fmt: skip
        policy = warmup if isinstance(warmup, WarmupPolicy) else WarmupPolicy(WarmupMode(warmup))
        self.tracker = CacheTracker(policy, CacheLog(log_path), prices)
        self.sort_tools = sort_tools
        self.warmup_max_tokens = warmup_max_tokens  # None: 0 against a warmkv server, else 1
        self.warmup_wait_s = warmup_wait_s

    @property
    def records(self) -> list[TurnRecord]:
        return self.tracker.log.records

    def _begin(self, request: dict[str, Any], conversation: str | None) -> _Turn:
        request = dict(request)
        messages = [as_dict(m) for m in request["messages"]]
        tools = request.get("tools")
        if tools and self.sort_tools:
            tools = request["tools"] = canonical_tools(tools)
        self.tracker.check_hygiene(messages, tools)
        conv = self.tracker.conversation_for(messages, tools, conversation)
        return _Turn(conv, messages, tools, request, time.monotonic())

    def _finish(self, turn: _Turn, usage: Any, reply: dict) -> Warmup | None:
        self.tracker.record_request(turn.conversation, turn.messages, turn.tools, turn.request["model"],
                                    read_usage(usage), time.monotonic() - turn.started)  # fmt: skip
        return self.tracker.warmup_after_reply(turn.conversation, turn.messages, reply)

    def _warmup_request(self, warmup: Warmup, turn: _Turn, max_tokens: int) -> dict[str, Any]:
        request = {"model": turn.request["model"], "messages": warmup.messages, "max_tokens": max_tokens,
                   "temperature": 0, "stream": False}  # fmt: skip
        if turn.tools:
            request |= {"tools": turn.tools, "tool_choice": "none"}
        return request | {k: turn.request[k] for k in PASSED_TO_WARMUP if k in turn.request}

    def _record_warmup(self, warmup: Warmup, turn: _Turn, response: Any, started: float) -> None:
        self.tracker.record_warmup(warmup, turn.tools, turn.request["model"], read_usage(response.usage),
                                   time.monotonic() - started)  # fmt: skip

    @staticmethod
    def _stream_request(request: dict[str, Any]) -> dict[str, Any]:
        options = dict(request.get("stream_options") or {})
        options.setdefault("include_usage", True)
        return request | {"stream_options": options}


def _is_warmkv(models: Any) -> bool:
    return any(getattr(m, "owned_by", None) == "warmkv" for m in models.data)


def _reply(response: Any) -> dict:
    return as_dict(response.choices[0].message) if response.choices else {}


class WarmClient(_WarmBase):
    def __init__(self, client: OpenAI, *, warmup: WarmupPolicy | WarmupMode | str = "auto",
                 log: str | Path | None = None, prices: Prices | None = None, sort_tools: bool = True,
                 warmup_max_tokens: int | None = None, warmup_wait_s: float = 0.5) -> None:  # fmt: skip
        super().__init__(warmup, log, prices, sort_tools, warmup_max_tokens, warmup_wait_s)
        self.client = client
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="warmkv-warmup")
        self._in_flight: dict[str, Future] = {}

    def create(self, *, conversation: str | None = None, **request: Any) -> Any:
        turn = self._begin(request, conversation)
        self._wait_for_warmup(turn.conversation)
        before = self.tracker.warmup_before_turn(turn.conversation, turn.messages)
        if before:
            self._warm(before, turn)
        if turn.request.get("stream"):
            return self._stream(turn)
        response = self.client.chat.completions.create(**turn.request)
        self._start_warmup(self._finish(turn, response.usage, _reply(response)), turn)
        return response

    def _stream(self, turn: _Turn) -> Iterator[Any]:
        reply = _ReplyAccumulator()
        for chunk in self.client.chat.completions.create(**self._stream_request(turn.request)):
            reply.add(chunk)
            yield chunk
        self._start_warmup(self._finish(turn, reply.usage, reply.message()), turn)

    def _start_warmup(self, warmup: Warmup | None, turn: _Turn) -> None:
        if warmup:
            self._in_flight[warmup.conversation.id] = self._pool.submit(self._warm, warmup, turn)

    def _wait_for_warmup(self, conv: Conversation) -> None:
        future = self._in_flight.pop(conv.id, None)
        if future is not None:
            try:
                future.result(timeout=self.warmup_wait_s)
            except FutureTimeout:
                log.info("conversation %s: warm-up still running; sending the request anyway", conv.id)

    def _warm(self, warmup: Warmup, turn: _Turn) -> None:
        started = time.monotonic()
        try:
            if self.warmup_max_tokens is None:
                self.warmup_max_tokens = 0 if _is_warmkv(self.client.models.list()) else 1
            response = self.client.chat.completions.create(
                **self._warmup_request(warmup, turn, self.warmup_max_tokens)
            )
            self._record_warmup(warmup, turn, response, started)
        except Exception as err:  # best effort by design: the real request must go on
            log.warning("warm-up for conversation %s failed: %s", warmup.conversation.id, err)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class AsyncWarmClient(_WarmBase):
    def __init__(self, client: AsyncOpenAI, *, warmup: WarmupPolicy | WarmupMode | str = "auto",
                 log: str | Path | None = None, prices: Prices | None = None, sort_tools: bool = True,
                 warmup_max_tokens: int | None = None, warmup_wait_s: float = 0.5) -> None:  # fmt: skip
        super().__init__(warmup, log, prices, sort_tools, warmup_max_tokens, warmup_wait_s)
        self.client = client
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))
        self._in_flight: dict[str, asyncio.Task] = {}

    async def create(self, *, conversation: str | None = None, **request: Any) -> Any:
        turn = self._begin(request, conversation)
        await self._wait_for_warmup(turn.conversation)
        before = self.tracker.warmup_before_turn(turn.conversation, turn.messages)
        if before:
            await self._warm(before, turn)
        if turn.request.get("stream"):
            return self._stream(turn)
        response = await self.client.chat.completions.create(**turn.request)
        self._start_warmup(self._finish(turn, response.usage, _reply(response)), turn)
        return response

    async def _stream(self, turn: _Turn) -> AsyncIterator[Any]:
        reply = _ReplyAccumulator()
        async for chunk in await self.client.chat.completions.create(**self._stream_request(turn.request)):
            reply.add(chunk)
            yield chunk
        self._start_warmup(self._finish(turn, reply.usage, reply.message()), turn)

    def _start_warmup(self, warmup: Warmup | None, turn: _Turn) -> None:
        if warmup:
            self._in_flight[warmup.conversation.id] = asyncio.create_task(self._warm(warmup, turn))

    async def _wait_for_warmup(self, conv: Conversation) -> None:
        task = self._in_flight.pop(conv.id, None)
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=self.warmup_wait_s)
            if not done:
                log.info("conversation %s: warm-up still running; sending the request anyway", conv.id)

    async def _warm(self, warmup: Warmup, turn: _Turn) -> None:
        started = time.monotonic()
        try:
            if self.warmup_max_tokens is None:
                self.warmup_max_tokens = 0 if _is_warmkv(await self.client.models.list()) else 1
            response = await self.client.chat.completions.create(
                **self._warmup_request(warmup, turn, self.warmup_max_tokens)
            )
            self._record_warmup(warmup, turn, response, started)
        except Exception as err:  # best effort by design: the real request must go on
            log.warning("warm-up for conversation %s failed: %s", warmup.conversation.id, err)

    async def close(self) -> None:
        await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
