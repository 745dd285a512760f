"""OpenAI's chat completion and text completion bodies and stream chunks: one format per choice (its index,
its reply, its log-probs), gathered by `Choices` into one response or one stream."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from warmkv.engine.llm_engine import StepOutput
from warmkv.engine.sampling import TokenLogprobs
from warmkv.errors import WarmkvError
from warmkv.server.chat_pipeline import ChatReply, ReplyPiece
from warmkv.server.errors import error_body, error_kind
from warmkv.server.logprobs import chat_logprobs, completion_logprobs
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
    """How one choice's outputs read; the envelope, usage and [DONE] are the whole response's."""

    object_name = ""
    chunk_object = ""

    def __init__(self, request_id: str, model: str, include_usage: bool, index: int, tokenizer: Any) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.include_usage = include_usage
        self.index = index  # of the choice
        self.tokenizer = tokenizer  # for log-probs' token texts
        self._logprobs: list[TokenLogprobs] = []  # not yet sent

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}  # fmt: skip

    def closing(self, record: RequestRecord) -> list[str]:
        usage = [sse({**self.envelope([], usage=openai_usage(record)), "object": self.chunk_object})]
        return [*(usage if self.include_usage else []), "data: [DONE]\n\n"]

    def failure(self, err: WarmkvError) -> list[str]:
        _, kind, code = error_kind(err)
        return [sse(error_body(str(err), kind, code))]

    def whole_choice(self, outputs: list[StepOutput]) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, outputs: list[StepOutput], record: RequestRecord) -> dict[str, Any]:
        return self.envelope([self.whole_choice(outputs)], usage=openai_usage(record))

    def _take_logprobs(self, outputs: list[StepOutput]) -> list[TokenLogprobs] | None:
        """Log-probs of these outputs and any held back; None when the request asked for none."""
        if outputs[-1].sequence.params.logprobs is None:
            return None
        taken = self._logprobs + [o.logprobs for o in outputs if o.logprobs is not None]
        self._logprobs = []
        return taken


class Choices(ReplyFormat):
    """The n choices of one request: each output goes to its choice's format (`choice_of` tells which);
    the first choice's format writes what belongs to the whole response."""

    def __init__(self, formats: list[_OpenAIFormat], choice_of: Callable[[StepOutput], int]) -> None:
        self.formats, self._choice_of = formats, choice_of

    def opening(self) -> list[str]:
        return [event for fmt in self.formats for event in fmt.opening()]

    def delta(self, output: StepOutput) -> list[str]:
        return self.formats[self._choice_of(output)].delta(output)

    def closing(self, record: RequestRecord) -> list[str]:
        return self.formats[0].closing(record)

    def whole(self, outputs: list[StepOutput], record: RequestRecord) -> dict[str, Any]:
        by_choice = [[o for o in outputs if self._choice_of(o) == i] for i in range(len(self.formats))]
        choices = [fmt.whole_choice(mine) for fmt, mine in zip(self.formats, by_choice, strict=True)]
        return self.formats[0].envelope(choices, usage=openai_usage(record))

    def failure(self, err: WarmkvError) -> list[str]:
        return self.formats[0].failure(err)


class ChatFormat(_OpenAIFormat):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, reply: ChatReply, include_usage: bool, index: int,
                 tokenizer: Any) -> None:  # fmt: skip
        super().__init__(request_id, model, include_usage, index, tokenizer)
        self.reply = reply

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self.envelope([choice]), "object": self.chunk_object}
        return chunk | ({"usage": None} if self.include_usage else {})

    def opening(self) -> list[str]:
        return [sse(self._chunk({"role": "assistant", "content": ""}))]

    def delta(self, output: StepOutput) -> list[str]:
        piece = self.reply.feed(output)
        chunks = [self._chunk({"content": piece.text})] if piece.text else []
        sent = len(self.reply.calls) - len(piece.calls)
        chunks += [self._chunk({"tool_calls": [c.to_openai(sent + i)]}) for i, c in enumerate(piece.calls)]
        if piece.end is not None:
            chunks.append(self._chunk({}, piece.end.value))
        logprobs = self._take_logprobs([output])
        if not chunks and logprobs:
            self._logprobs = logprobs  # the token's text is held back: its log-prob goes with it
        elif logprobs is not None:
            chunks[0]["choices"][0]["logprobs"] = chat_logprobs(logprobs, self.tokenizer)
        return [sse(chunk) for chunk in chunks]

    def whole_choice(self, outputs: list[StepOutput]) -> dict[str, Any]:
        pieces = [self.reply.feed(output) for output in outputs]
        content = "".join(piece.text for piece in pieces)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.reply.calls:
            message |= {"content": content or None, "tool_calls": [c.to_openai() for c in self.reply.calls]}
        logprobs = self._take_logprobs(outputs)
        return {
            "index": self.index,
            "message": message,
            "logprobs": None if logprobs is None else chat_logprobs(logprobs, self.tokenizer),
            "finish_reason": _end(pieces[-1]),
        }


def _end(piece: ReplyPiece) -> str:
    assert piece.end is not None, "the last output ends the reply"
    return piece.end.value


class CompletionFormat(_OpenAIFormat):
    object_name = chunk_object = "text_completion"

    def __init__(self, request_id: str, model: str, include_usage: bool, index: int, tokenizer: Any) -> None:
        super().__init__(request_id, model, include_usage, index, tokenizer)
        self._text_offset = 0  # characters of the completion sent, where the next tokens' text starts

    def _choice(self, text: str, finish_reason: str | None, outputs: list[StepOutput]) -> dict[str, Any]:
        logprobs = self._take_logprobs(outputs) if outputs else None
        if logprobs is not None:
            logprobs = completion_logprobs(logprobs, self.tokenizer, self._text_offset)
            self._text_offset += sum(len(token) for token in logprobs["tokens"])
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def opening(self) -> list[str]:
        return [sse(self.envelope([self._choice("", None, [])]))]

    def delta(self, output: StepOutput) -> list[str]:
        reason = output.sequence.finish_reason.value if output.finished else None  # type: ignore[union-attr]
        if not (output.text or reason):
            self._logprobs += [output.logprobs] if output.logprobs is not None else []
            return []
        return [sse(self.envelope([self._choice(output.text, reason, [output])]))]

    def whole_choice(self, outputs: list[StepOutput]) -> dict[str, Any]:
        text = "".join(output.text for output in outputs)
        reason = outputs[-1].sequence.finish_reason.value  # type: ignore[union-attr]
        return self._choice(text, reason, outputs)
