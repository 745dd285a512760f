"""A local fake of a hosted API with DeepSeek-style context caching, behind the official openai client.

Cache units: after a request completes, its prompt (cut down to whole units of 64 tokens) is stored; a later
request's hit is its longest common prefix with any stored prompt, cut down to whole units. Tokens are the
whitespace-separated words of a plain rendering of tools and messages.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

UNIT = 64


def render_tokens(body: dict) -> list[str]:
    parts = [json.dumps(tool, sort_keys=True) for tool in body.get("tools") or []]
    for message in body["messages"]:
        calls = json.dumps(message.get("tool_calls") or [], sort_keys=True)
        parts.append(f"<|{message['role']}|> {message.get('content') or ''} {calls}")
    return " ".join(parts).split()


def _common(a: list[str], b: tuple[str, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class FakeDeepSeek:
    def __init__(self, reply: Callable[[dict], dict]) -> None:
        self.reply = reply  # request body -> assistant message
        self.stored: list[tuple[str, ...]] = []
        self.requests: list[dict] = []
        self.fail_warmups = False

    def evict_all(self) -> None:
        self.stored.clear()

    def hit_tokens(self, tokens: list[str]) -> int:
        best = max((_common(tokens, entry) for entry in self.stored), default=0)
        return best // UNIT * UNIT

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            card = {"id": "deepseek-chat", "object": "model", "created": 0, "owned_by": "deepseek"}
            return httpx.Response(200, json={"object": "list", "data": [card]})
        body = json.loads(request.content)
        self.requests.append(body)
        warmup = body.get("max_tokens") == 1
        if warmup and self.fail_warmups:
            return httpx.Response(500, json={"error": {"message": "overloaded", "type": "server_error"}})
        tokens = render_tokens(body)
        hit = self.hit_tokens(tokens)
        self.stored.append(tuple(tokens[: len(tokens) // UNIT * UNIT]))
        message = {"role": "assistant", "content": "."} if warmup else self.reply(body)
        completion = len(json.dumps(message).split())
        usage = {"prompt_tokens": len(tokens), "completion_tokens": completion,
                 "total_tokens": len(tokens) + completion, "prompt_cache_hit_tokens": hit,
                 "prompt_cache_miss_tokens": len(tokens) - hit}  # fmt: skip
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        if body.get("stream"):
            return self._stream(message, usage, finish)
        return httpx.Response(200, json={
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 0,
            "model": body["model"], "usage": usage,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}]})  # fmt: skip

    def _stream(self, message: dict, usage: dict, finish: str) -> httpx.Response:
        calls = [{"index": i, **call} for i, call in enumerate(message.get("tool_calls") or [])]
        deltas = [{"role": "assistant", "content": message.get("content")}, {"tool_calls": calls}]
        chunks = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        chunks += [{"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
                   {"choices": [], "usage": usage}]  # fmt: skip
        head = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 0, "model": "deepseek-chat"}
        text = "".join(f"data: {json.dumps(head | c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
