"""OpenAI's chat completion and text completion bodies and stream chunks."""

from __future__ import annotations

import time
from typing import Any

from warmkv.engine.llm_engine import StepOutput
from warmkv.errors import WarmkvError
from warmkv.server.chat_pipeline import ChatReply, ReplyPiece
from warmkv.server.errors import error_body, error_kind
from warmkv.server.request_log import RequestRecord
from warmkv.server.respond import ReplyFormat, sse


def openai_usage(r: RequestRecord) -> dict[str, Any]:
    """Token counts as OpenAI reports them (with DeepSeek's hit/miss names beside)."""
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": r.cached_tokens},
        "prompt_cache_hit_tokens": r.cached_tokens,
        "prompt_cache_miss_tokens": r.computed_tokens,
    }


class _OpenAIFormat(ReplyFormat):
    object_name = ""
    chunk_object = ""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.include_usage = include_usage

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}  # fmt: skip

    def closing(self, record: RequestRecord) -> list[str]:
        usage = [sse({**self.envelope([], usage=openai_usage(record)), "object": self.chunk_object})]
        return [*(usage if self.include_usage else []), "data: [DONE]\n\n"]

    def failure(self, err: WarmkvError) -> list[str]:
        _, kind, code = error_kind(err)
        return [sse(error_body(str(err), kind, code))]


class ChatFormat(_OpenAIFormat):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, reply: ChatReply, include_usage: bool) -> None:
        super().__init__(request_id, model, include_usage)
        self.reply = reply

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self.envelope([choice]), "object": self.chunk_object}
        return sse(chunk | ({"usage": None} if self.include_usage else {}))

    def opening(self) -> list[str]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def delta(self, output: StepOutput) -> list[str]:
        piece = self.reply.feed(output)
        chunks = [self._chunk({"content": piece.text})] if piece.text else []
        sent = len(self.reply.calls) - len(piece.calls)
        chunks += [self._chunk({"tool_calls": [c.to_openai(sent + i)]}) for i, c in enumerate(piece.calls)]
        if piece.end is not None:
            chunks.append(self._chunk({}, piece.end.value))
        return chunks

    def whole(self, outputs: list[StepOutput], record: RequestRecord) -> dict[str, Any]:
        pieces = [self.reply.feed(output) for output in outputs]
        content = "".join(piece.text for piece in pieces)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.reply.calls:
            message |= {"content": content or None, "tool_calls": [c.to_openai() for c in self.reply.calls]}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _end(pieces[-1])}
        return self.envelope([choice], usage=openai_usage(record))


def _end(piece: ReplyPiece) -> str:
    assert piece.end is not None, "the last output ends the reply"
    return piece.end.value


class CompletionFormat(_OpenAIFormat):
    object_name = chunk_object = "text_completion"

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> list[str]:
        return [sse(self.envelope([self._choice("", None)]))]

    def delta(self, output: StepOutput) -> list[str]:
        reason = output.sequence.finish_reason.value if output.finished else None  # type: ignore[union-attr]
        return [sse(self.envelope([self._choice(output.text, reason)]))] if output.text or reason else []

    def whole(self, outputs: list[StepOutput], record: RequestRecord) -> dict[str, Any]:
        text = "".join(output.text for output in outputs)
        reason = outputs[-1].sequence.finish_reason.value  # type: ignore[union-attr]
        return self.envelope([self._choice(text, reason)], usage=openai_usage(record))
