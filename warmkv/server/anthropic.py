"""Anthropic's Messages API on the chat path: a request translated into a `ChatRequest`, and the reply
written back as a Message (whole, or as Anthropic's event stream), with Anthropic's error bodies."""

from __future__ import annotations

import json
import uuid
from typing import Any

from warmkv.chat.tool_calls import ToolCall
from warmkv.engine.llm_engine import StepOutput
from warmkv.engine.sampling import SamplingParams
from warmkv.errors import InvalidRequest, WarmkvError, anthropic_error_body
from warmkv.server.anthropic_protocol import (
    AnthropicMessage,
    CountTokensRequest,
    MessagesRequest,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
)
from warmkv.server.chat_pipeline import ChatReply, ChatRequest, ReplyEnd, ReplyPiece
from warmkv.server.request_log import RequestRecord
from warmkv.server.respond import ReplyFormat, sse


def anthropic_error(
    status: int, kind: str, message: str, code: str | None, param: str | None
) -> dict[str, Any]:
    return anthropic_error_body(status, message)


def to_chat(body: CountTokensRequest, namespace: str) -> ChatRequest:
    """The chat path's form of a Messages request (count_tokens bodies too: they lack only sampling)."""
    messages, breakpoints = _messages(body)
    tools = [
        {"type": "function", "function": {"name": t.name, "description": t.description or "",
                                          "parameters": t.input_schema}}
        for t in body.tools or []
    ]  # fmt: skip
    if any(t.cache_control for t in body.tools or []):
        breakpoints.add(0)  # tools render into the head of the prompt, before the first message ends
    if body.cache_control is not None:  # automatic caching: the breakpoint moves with the conversation
        breakpoints.add(len(messages) - 1)
    choice = body.tool_choice
    one_call = (
        choice is not None and not isinstance(choice, ToolChoiceNone) and choice.disable_parallel_tool_use
    )
    sampled = body if isinstance(body, MessagesRequest) else None
    return ChatRequest(
        id=f"msg_{uuid.uuid4().hex[:24]}",
        endpoint="messages",
        messages=messages,
        tools=tools or None,
        tool_choice=_tool_choice(body),
        params=SamplingParams(
            temperature=sampled.temperature if sampled else 0.0,
            top_p=sampled.top_p if sampled and sampled.top_p is not None else 1.0,
            top_k=sampled.top_k or 0 if sampled else 0,
            stop=list(sampled.stop_sequences or []) if sampled else [],
        ),
        max_tokens=sampled.max_tokens if sampled else None,
        namespace=namespace,
        breakpoints=frozenset(breakpoints),
        max_tool_calls=1 if one_call else None,
        continue_final=_prefilled(body),
    )


def _prefilled(body: CountTokensRequest) -> bool:
    """A last assistant message of text is the start of the reply (a prefill): the model goes on with it."""
    last = body.messages[-1] if body.messages else None
    if last is None or last.role != "assistant":
        return False
    blocks = _blocks(last)
    if any(block.get("type") != "text" for block in blocks):
        return False  # (tool uses: rendered as a whole turn, as before)
    text = "".join(block.get("text", "") for block in blocks)
    if not text:
        return False  # nothing to go on with: a new turn, as before
    if text != text.rstrip():  # as Anthropic's API: the model would go on from a cut it never makes
        raise InvalidRequest("final assistant content cannot end with trailing whitespace")
    return True


def _tool_choice(body: CountTokensRequest) -> str | dict[str, Any] | None:
    choice = body.tool_choice
    if choice is None:
        return None
    if isinstance(choice, ToolChoiceTool):
        return {"type": "function", "function": {"name": choice.name}}
    return "required" if isinstance(choice, ToolChoiceAny) else choice.type  # "auto" | "none"


def _messages(body: CountTokensRequest) -> tuple[list[dict[str, Any]], set[int]]:
    """OpenAI chat messages, and the indices of those a cache_control breakpoint ends."""
    out: list[dict[str, Any]] = []
    breakpoints: set[int] = set()
    if isinstance(body.system, str) and body.system:
        out.append({"role": "system", "content": body.system})
    elif body.system:
        out.append({"role": "system", "content": [{"type": "text", "text": b.text} for b in body.system]})
        if any(b.cache_control for b in body.system):
            breakpoints.add(0)
    # the tool_use ids of the assistant turn before, which results answer (consecutive messages of one role
    # are one turn, as Anthropic combines them)
    called: set[str] = set()
    for at, message in enumerate(body.messages):
        blocks = _blocks(message)
        first = len(out)  # blocks of this message join messages from here on, never an earlier turn's
        for block in blocks:
            if block.get("type") not in _BLOCK_TYPES[message.role]:
                raise InvalidRequest(
                    f"messages.{at}.content: blocks of type {block.get('type')!r} are not supported in "
                    f"{message.role} messages (supported: {', '.join(sorted(_BLOCK_TYPES[message.role]))})"
                )
            if message.role == "assistant":
                _add_assistant_block(out, block, at, first)
            else:
                _add_user_block(out, block, at, first, called)
            if block.get("cache_control"):
                breakpoints.add(len(out) - 1)
        if message.role == "assistant":
            opened = at == 0 or body.messages[at - 1].role != "assistant"
            calls = {b.get("id", "") for b in blocks if b.get("type") == "tool_use"}
            called = calls if opened else called | calls
    return out, breakpoints


def _blocks(message: AnthropicMessage) -> list[dict[str, Any]]:
    """A message's content as blocks (a string is one text block)."""
    content = message.content
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


_BLOCK_TYPES = {
    "user": {"text", "tool_result"},
    "assistant": {"text", "tool_use", "thinking", "redacted_thinking"},
}


def _add_user_block(out: list[dict[str, Any]], block: dict[str, Any], at: int, first: int,
                    called: set[str]) -> None:  # fmt: skip
    if block["type"] == "tool_result":
        if "tool_use_id" not in block:
            raise InvalidRequest(f"messages.{at}.content: a tool_result block needs its tool_use_id")
        if block["tool_use_id"] not in called:  # as Anthropic's API: a result answers the call before it
            raise InvalidRequest(f"messages.{at}.content: tool_result for {block['tool_use_id']!r}, which no "
                                 "tool_use block of the assistant message before it has")  # fmt: skip
        text = _text_of(block.get("content", ""), f"messages.{at}.content.tool_result")
        # the chat path has no error flag on a tool result: the model reads it in the text
        out.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                    "content": f"Error: {text}" if block.get("is_error") else text})  # fmt: skip
        return
    part = {"type": "text", "text": block.get("text", "")}
    if len(out) > first and out[-1]["role"] == "user":  # a message's text blocks make one user message
        out[-1]["content"].append(part)
    else:
        out.append({"role": "user", "content": [part]})


def _add_assistant_block(out: list[dict[str, Any]], block: dict[str, Any], at: int, first: int) -> None:
    if block["type"] in ("thinking", "redacted_thinking"):
        return  # another model's thinking: the served models read no thinking blocks back
    if len(out) == first:
        out.append({"role": "assistant", "content": []})
    message = out[-1]
    if block["type"] == "text":
        message["content"].append({"type": "text", "text": block.get("text", "")})
        return
    if not isinstance(block.get("input", {}), dict):
        raise InvalidRequest(f"messages.{at}.content: a tool_use block's input must be an object")
    function = {"name": block.get("name", ""), "arguments": json.dumps(block.get("input", {}))}
    call = {"id": block.get("id", ""), "type": "function", "function": function}
    message.setdefault("tool_calls", []).append(call)


def _text_of(content: str | list[dict[str, Any]], where: str) -> str:
    if isinstance(content, str):
        return content
    kinds = {part.get("type") for part in content} - {"text"}
    if kinds:
        raise InvalidRequest(f"{where}: content of type {sorted(kinds)[0]!r} is not supported (text only)")
    return "".join(part.get("text", "") for part in content)


def usage(record: RequestRecord, breakpoint_tokens: int) -> dict[str, Any]:
    """Anthropic's split of the prompt: read from the cache, computed and written up to the last
    cache_control breakpoint, and computed after it; they add up to the prompt."""
    created = max(0, min(breakpoint_tokens, record.prompt_tokens) - record.cached_tokens)
    return {
        "input_tokens": record.computed_tokens - created,
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": record.cached_tokens,
        "output_tokens": record.completion_tokens,
    }


def _stop_reason(piece: ReplyPiece) -> str:
    if piece.end is ReplyEnd.STOP and piece.stop_sequence is not None:
        return "stop_sequence"
    return {ReplyEnd.LENGTH: "max_tokens", ReplyEnd.TOOL_CALLS: "tool_use"}.get(piece.end, "end_turn")  # type: ignore[arg-type]


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)}


class MessageFormat(ReplyFormat):
    def __init__(self, request_id: str, model: str, reply: ChatReply, record: RequestRecord,
                 breakpoint_tokens: int) -> None:  # fmt: skip
        self.id, self.model, self.reply, self.record = request_id, model, reply, record
        self.breakpoint_tokens = breakpoint_tokens
        self._blocks = 0  # content blocks started
        self._text_open = False
        self._last: ReplyPiece | None = None

    def _message(self, content: list[dict[str, Any]], last: ReplyPiece | None) -> dict[str, Any]:
        return {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
            "stop_reason": _stop_reason(last) if last else None,
            "stop_sequence": last.stop_sequence if last else None,
            "usage": usage(self.record, self.breakpoint_tokens),
        }  # fmt: skip

    def whole(self, outputs: list[StepOutput], record: RequestRecord) -> dict[str, Any]:
        pieces = [self.reply.feed(output) for output in outputs]
        content: list[dict[str, Any]] = []  # in the reply's order, the blocks the stream would start
        for piece in pieces:
            if piece.text and content and content[-1]["type"] == "text":
                content[-1]["text"] += piece.text
            elif piece.text:
                content.append({"type": "text", "text": piece.text})
            content += [_tool_use(call) for call in piece.calls]
        return self._message(content or [{"type": "text", "text": ""}], pieces[-1])

    def opening(self) -> list[str]:
        start = {"type": "message_start", "message": self._message([], None)}
        return [sse(start, "message_start"), sse({"type": "ping"}, "ping")]

    def delta(self, output: StepOutput) -> list[str]:
        piece = self.reply.feed(output)
        events = []
        if piece.text:
            if not self._text_open:
                events.append(self._start({"type": "text", "text": ""}))
                self._text_open = True
            delta = {"type": "text_delta", "text": piece.text}
            events.append(sse({"type": "content_block_delta", "index": self._blocks - 1, "delta": delta},
                              "content_block_delta"))  # fmt: skip
        for call in piece.calls:
            events += self._close_text()
            events.append(self._start({"type": "tool_use", "id": call.id, "name": call.name, "input": {}}))
            delta = {"type": "input_json_delta", "partial_json": call.arguments}
            events.append(sse({"type": "content_block_delta", "index": self._blocks - 1, "delta": delta},
                              "content_block_delta"))  # fmt: skip
            events.append(self._stop())
        if piece.end is not None:
            if self._blocks == 0:  # an empty reply still has its (empty) text block
                events.append(self._start({"type": "text", "text": ""}))
                self._text_open = True
            events += self._close_text()
            self._last = piece
        return events

    def closing(self, record: RequestRecord) -> list[str]:
        assert self._last is not None, "the last output ends the reply"
        delta = {"stop_reason": _stop_reason(self._last), "stop_sequence": self._last.stop_sequence}
        message_delta = {
            "type": "message_delta",
            "delta": delta,
            "usage": usage(record, self.breakpoint_tokens),
        }
        return [sse(message_delta, "message_delta"), sse({"type": "message_stop"}, "message_stop")]

    def failure(self, err: WarmkvError) -> list[str]:
        return [sse(anthropic_error(500, "server_error", str(err), None, None), "error")]

    def _start(self, block: dict[str, Any]) -> str:
        self._blocks += 1
        start = {"type": "content_block_start", "index": self._blocks - 1, "content_block": block}
        return sse(start, "content_block_start")

    def _stop(self) -> str:
        return sse({"type": "content_block_stop", "index": self._blocks - 1}, "content_block_stop")

    def _close_text(self) -> list[str]:
        if not self._text_open:
            return []
        self._text_open = False
        return [self._stop()]
