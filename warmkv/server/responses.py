"""OpenAI's Responses API on the chat path: input items (and a stored previous response) translated into a
`ChatRequest`, and the reply written back as a Response object, whole or as the Responses event stream."""

from __future__ import annotations

import copy
import time
import uuid
from typing import Any

from warmkv.chat.conversations import ConversationStore
from warmkv.chat.tool_calls import ToolCall
from warmkv.engine.llm_engine import StepOutput
from warmkv.engine.sampling import SamplingParams
from warmkv.errors import InvalidRequest, WarmkvError
from warmkv.server.chat_pipeline import ChatReply, ChatRequest, ReplyEnd, ReplyPiece
from warmkv.server.errors import ApiError
from warmkv.server.request_log import RequestRecord
from warmkv.server.respond import ReplyFormat, sse
from warmkv.server.responses_protocol import ResponsesRequest


def to_chat(body: ResponsesRequest, namespace: str, store: ConversationStore) -> ChatRequest:
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id, namespace)
        if previous is None:
            raise ApiError(
                404, f"Previous response with id {body.previous_response_id!r} not found.",
                code="previous_response_not_found", param="previous_response_id",
            )  # fmt: skip
        history = copy.deepcopy(previous.messages)  # the items below extend it; the stored stays as is
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    for at, item in enumerate(items):
        _add_item(history, item, at)
    # instructions are this request's alone: a follow-up does not inherit them
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    one_call = body.parallel_tool_calls is False
    return ChatRequest(
        id=f"resp_{uuid.uuid4().hex}",
        endpoint="responses",
        messages=[*system, *history],
        tools=_tools(body),
        tool_choice=_tool_choice(body),
        params=SamplingParams(
            temperature=body.temperature if body.temperature is not None else 1.0,
            top_p=body.top_p if body.top_p is not None else 1.0,
        ),
        max_tokens=body.max_output_tokens,
        namespace=namespace,
        max_tool_calls=1 if one_call else body.max_tool_calls,
        response_format=body.text.format.response_format() if body.text and body.text.format else None,
    )


def _text_format(body: ResponsesRequest) -> dict[str, Any]:
    fmt = body.text.format if body.text else None
    return fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}


def _tools(body: ResponsesRequest) -> list[dict[str, Any]] | None:
    no_parameters = {"type": "object", "properties": {}}
    return [
        {"type": "function", "function": {"name": t.name, "description": t.description or "",
                                          "parameters": t.parameters or no_parameters}}
        for t in body.tools or []
    ] or None  # fmt: skip


def _tool_choice(body: ResponsesRequest) -> str | dict[str, Any] | None:
    choice = body.tool_choice
    return (
        choice if isinstance(choice, str | None) else {"type": "function", "function": {"name": choice.name}}
    )


def _add_item(messages: list[dict[str, Any]], item: dict[str, Any], at: int) -> None:
    kind = item.get("type", "message")
    where = f"input.{at}"
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise InvalidRequest(f"{where}.role: {role!r} is not one of user, system, developer, assistant")
        text = _text_of(item.get("content", ""), where)
        if (
            role == "assistant"
            and messages
            and messages[-1]["role"] == "assistant"
            and not messages[-1]["content"]
        ):
            messages[-1]["content"] = text
        else:
            messages.append({"role": role, "content": text})
    elif kind == "function_call":
        _require(item, ("call_id", "name", "arguments"), where)
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}  # fmt: skip
        if not messages or messages[-1]["role"] != "assistant":  # a call joins its turn's text
            messages.append({"role": "assistant", "content": ""})
        messages[-1].setdefault("tool_calls", []).append(call)
    elif kind == "function_call_output":
        _require(item, ("call_id", "output"), where)
        output = _text_of(item["output"], f"{where}.output")
        messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
    elif kind != "reasoning":  # reasoning items carry another model's thinking: nothing to render
        raise InvalidRequest(
            f"{where}.type: input items of type {kind!r} are not supported "
            "(message, function_call, function_call_output)"
        )


def _require(item: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [key for key in keys if key not in item]
    if missing:
        raise InvalidRequest(f"{where}: a {item['type']} item needs {', '.join(missing)}")


def _text_of(content: str | list[dict[str, Any]], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") not in ("input_text", "output_text", "text"):
            raise InvalidRequest(
                f"{where}.content: parts of type {part.get('type')!r} are not supported (text only)"
            )
        parts.append(part.get("text", ""))
    return "".join(parts)


def responses_usage(record: RequestRecord) -> dict[str, Any]:
    return {
        "input_tokens": record.prompt_tokens,
        "input_tokens_details": {"cached_tokens": record.cached_tokens},
        "output_tokens": record.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": record.prompt_tokens + record.completion_tokens,
    }


class ResponseFormat(ReplyFormat):
    """A Response object, or its event stream; it also collects the reply as an assistant chat message,
    for the store."""

    def __init__(self, body: ResponsesRequest, chat: ChatRequest, model: str, reply: ChatReply,
                 record: RequestRecord) -> None:  # fmt: skip
        self.body, self.chat, self.model, self.reply, self.record = body, chat, model, reply, record
        self.created = int(time.time())
        self.text = ""
        self.output: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None  # the output message while its text streams
        self._sequence = 0
        self._end: ReplyPiece | None = None

    def assistant_message(self) -> dict[str, Any]:
        """The reply as the chat path renders it back in the next turn."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.reply.calls:
            message["tool_calls"] = [call.to_openai() for call in self.reply.calls]
        return message

    def response(self, status: str) -> dict[str, Any]:
        body = self.body
        incomplete = status == "incomplete"
        choice = body.tool_choice
        return {
            "id": self.chat.id, "object": "response", "created_at": self.created, "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": body.max_tool_calls, "model": self.model, "output": self.output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "store": body.store,
            "temperature": self.chat.params.temperature, "top_p": self.chat.params.top_p,
            "text": {"format": _text_format(body)}, "truncation": "disabled",
            "tool_choice": choice if isinstance(choice, str) else choice.model_dump() if choice else "auto",
            "tools": [t.model_dump() for t in body.tools or []],
            "usage": responses_usage(self.record) if status != "in_progress" else None,
            "metadata": body.metadata or {}, "user": body.user,
        }  # fmt: skip

    def _status(self) -> str:
        assert self._end is not None, "the last output ends the reply"
        return "incomplete" if self._end.end is ReplyEnd.LENGTH else "completed"

    def whole(self, outputs: list[StepOutput], record: RequestRecord) -> dict[str, Any]:
        for output in outputs:
            self._take(self.reply.feed(output))
        return self.response(self._status())

    def opening(self) -> list[str]:
        created = self.response("in_progress")
        return [self._event("response.created", response=created),
                self._event("response.in_progress", response=created)]  # fmt: skip

    def delta(self, output: StepOutput) -> list[str]:
        return self._take(self.reply.feed(output))

    def closing(self, record: RequestRecord) -> list[str]:
        status = self._status()
        return [self._event(f"response.{status}", response=self.response(status))]

    def failure(self, err: WarmkvError) -> list[str]:
        return [self._event("error", code="server_error", message=str(err), param=None)]

    # -- the output items, built as the reply streams ---------------------------------------------

    def _take(self, piece: ReplyPiece) -> list[str]:
        events = []
        if piece.text:
            events += self._open_message() if self._message is None else []
            self.text += piece.text
            events.append(self._event("response.output_text.delta", item_id=self._message["id"],  # type: ignore[index]
                                      output_index=len(self.output) - 1, content_index=0, delta=piece.text,
                                      logprobs=[]))  # fmt: skip
        for call in piece.calls:
            events += self._close_message()
            events += self._function_call(call)
        if piece.end is not None:
            self._end = piece
            events += self._close_message()
        return events

    def _open_message(self) -> list[str]:
        self._message = {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "in_progress",
                         "role": "assistant", "content": []}  # fmt: skip
        self.output.append(self._message)
        index = len(self.output) - 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [self._event("response.output_item.added", output_index=index, item=dict(self._message)),
                self._event("response.content_part.added", item_id=self._message["id"], output_index=index,
                            content_index=0, part=part)]  # fmt: skip

    def _close_message(self) -> list[str]:
        message, self._message = self._message, None
        if message is None:
            return []
        part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
        # a message a call follows is whole; the last one is cut with the reply
        cut = self._end is not None and self._end.end is ReplyEnd.LENGTH
        message |= {"status": "incomplete" if cut else "completed", "content": [part]}
        index = self.output.index(message)
        ids = {"item_id": message["id"], "output_index": index, "content_index": 0}
        return [self._event("response.output_text.done", **ids, text=self.text, logprobs=[]),
                self._event("response.content_part.done", **ids, part=part),
                self._event("response.output_item.done", output_index=index, item=message)]  # fmt: skip

    def _function_call(self, call: ToolCall) -> list[str]:
        item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id,
                "name": call.name, "arguments": "", "status": "in_progress"}  # fmt: skip
        index = len(self.output)
        events = [self._event("response.output_item.added", output_index=index, item=dict(item))]
        item |= {"arguments": call.arguments, "status": "completed"}
        self.output.append(item)
        ids = {"item_id": item["id"], "output_index": index}
        return [*events,
                self._event("response.function_call_arguments.delta", **ids, delta=call.arguments),
                self._event("response.function_call_arguments.done", **ids, name=call.name,
                            arguments=call.arguments),
                self._event("response.output_item.done", output_index=index, item=item)]  # fmt: skip

    def _event(self, kind: str, **fields: Any) -> str:
        self._sequence += 1
        return sse({"type": kind, "sequence_number": self._sequence - 1, **fields}, kind)
